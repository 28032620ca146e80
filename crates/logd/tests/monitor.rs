//! The monitor wired into logd: the shipped `rules/` run over every
//! ingested record and every integrity alert; what they find is raised like
//! logd's own alerts (journaled, served, sent to sinks).

mod support;

use nitrile_api::Operation;
use nitrile_logd::alert::AlertKind;
use support::*;

fn rules_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_rules_fire_on_ingested_records_and_integrity_alerts() {
    let cell = TestCell::new().await;
    let mut config = logd_config(&cell, &cell.scratch("logd"), 200);
    config.rules = Some(rules_dir());
    let logd = start_logd(&cell, config).await;

    let now = nitrile_token::Clock::now(&*cell.clock);
    nitrile_cell::provision_host(
        &cell.layout,
        &cell.cell,
        &nitrile_api::Name::new("h1").unwrap(),
        now,
    )
    .unwrap();
    let path = cell.scratch("h1").join("journal");
    let j = nitrile_audit::Journal::open(&path, &host_principal("h1").uri()).unwrap();
    for (n, op) in [Operation::HostDescribe, Operation::HostDrain]
        .into_iter()
        .enumerate()
    {
        let r = nitrile_audit::AuditRecord::request(
            now,
            host_principal("h1"),
            nitrile_audit::RequestId::from_bytes([n as u8; 16]),
        )
        .with_principal(principal("operator/alice"))
        .with_operations([op])
        .with_resources([r("host/h1")]);
        j.append(&r.encode().unwrap()).unwrap();
    }
    let (jref, entries) = journal_batch(&path);
    // Record 1 only: a describe fires nothing.
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &entries[..1]).await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !logd
            .alerts
            .all()
            .iter()
            .any(|a| a.kind == AlertKind::Monitor),
        "{:?}",
        logd.alerts.all()
    );
    // The drain fires the sensitive-operation rule.
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &entries[1..]).await;
    assert_eq!(status, 200);
    wait_until("the sensitive operation rule fires", async || {
        logd.alerts.all().iter().any(|a| {
            a.kind == AlertKind::Monitor && a.detail["rule_name"] == "nitrile_sensitive_operation"
        })
    })
    .await;
    // A gap is an integrity event for the journal-integrity rule too.
    let mut skipped = entries[1].clone();
    skipped.seq = 5;
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &[skipped]).await;
    assert_eq!(status, 409);
    wait_until("the journal integrity rule fires", async || {
        let all = logd.alerts.all();
        all.iter().any(|a| a.kind == AlertKind::Gap)
            && all.iter().any(|a| {
                a.kind == AlertKind::Monitor
                    && a.detail["rule_name"]
                        .as_str()
                        .is_some_and(|n| n.contains("integrity"))
            })
    })
    .await;
    // Monitor alerts are journaled by logd and served to the auditor.
    let monitor_alerts: Vec<_> = logd
        .alerts
        .all()
        .into_iter()
        .filter(|a| a.kind == AlertKind::Monitor)
        .collect();
    assert!(monitor_alerts.iter().all(|a| a.audit_seq.is_some()));
    let token = audit_token(&cell, "auditor/carol").await;
    let (status, body) = read(&cell, &logd, "auditor/carol", "/v1/alerts", Some(&token)).await;
    assert_eq!(status, 200);
    let served = serde_json::from_slice::<nitrile_logd::AlertPage>(&body)
        .unwrap()
        .alerts;
    assert!(
        served
            .iter()
            .filter(|a| a.kind == AlertKind::Monitor)
            .count()
            >= 2
    );
    logd.stop().await;
}

fn lag_alerts(logd: &RunningLogd) -> Vec<nitrile_logd::Alert> {
    logd.alerts
        .all()
        .into_iter()
        .filter(|a| a.kind == AlertKind::Monitor && a.detail["rule_name"] == "nitrile_journal_lag")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_head_runs_ahead_of_the_log_for_too_long_raises_a_lag_alert() {
    let cell = TestCell::new().await;
    let mut config = logd_config(&cell, &cell.scratch("logd"), 200);
    config.rules = Some(rules_dir());
    let logd = start_logd(&cell, config).await;

    // h1 ships one record of three and says its journal holds three; h2
    // ships all it holds.
    let (j1, e1) = journal_batch(&host_journal(&cell, "h1", 3));
    let (j2, e2) = journal_batch(&host_journal(&cell, "h2", 2));
    let (status, _) = ship_with_head(&cell, &logd, "host/h1", &j1, &e1[..1], Some(3)).await;
    assert_eq!(status, 200);
    let (status, _) = ship_with_head(&cell, &logd, "host/h2", &j2, &e2, Some(2)).await;
    assert_eq!(status, 200);
    // Within the allowed lag: nothing.
    cell.clock.advance(time::Duration::seconds(10));
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert!(lag_alerts(&logd).is_empty(), "{:?}", lag_alerts(&logd));
    // h1 ships one more but is still behind the head it reported: the lag
    // started when it first fell behind, and outlives the limit.
    let (status, _) = ship_with_head(&cell, &logd, "host/h1", &j1, &e1[1..2], Some(3)).await;
    assert_eq!(status, 200);
    cell.clock.advance(time::Duration::seconds(25));
    wait_until("the journal lag detector fires for h1", async || {
        !lag_alerts(&logd).is_empty()
    })
    .await;
    let alerts = lag_alerts(&logd);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        alerts[0].source.as_deref(),
        Some(host_principal("h1").uri().as_str()),
        "{alerts:?}"
    );
    // It is journaled by logd like its other alerts.
    assert!(alerts[0].audit_seq.is_some());
    logd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_log_raises_no_checkpoint_alert() {
    let cell = TestCell::new().await;
    let mut config = logd_config(&cell, &cell.scratch("logd"), 100);
    config.rules = Some(rules_dir());
    let logd = start_logd(&cell, config).await;
    let (j1, e1) = journal_batch(&host_journal(&cell, "h1", 2));
    let (status, _) = ship(&cell, &logd, "host/h1", &j1, &e1).await;
    assert_eq!(status, 200);
    // Twenty checkpoint intervals with nothing new: logd publishes only
    // every max_checkpoint_age when idle, and that is not a stall.
    for _ in 0..20 {
        cell.clock.advance(time::Duration::milliseconds(100));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let stalls: Vec<_> = logd
        .alerts
        .all()
        .into_iter()
        .filter(|a| {
            a.kind == AlertKind::Monitor
                && a.detail["rule_name"] == "nitrile_checkpoint_not_advancing"
        })
        .collect();
    assert!(stalls.is_empty(), "{stalls:?}");
    logd.stop().await;
}
