//! The monitor wired into logd: the rules of the cell's signed entitlement
//! bundle run over every ingested record and every integrity alert; what
//! they find is raised like logd's own alerts (journaled, served, sent to
//! sinks). Rules that nobody signed, or an older bundle's, stop logd.

mod support;

use nitrile_api::Operation;
use nitrile_logd::alert::AlertKind;
use nitrile_logd::config::MonitorSource;
use nitrile_logd::rules::BundleRulesError;
use nitrile_logd::{Logd, LogdError, LogdOptions};
use nitrile_policy::SerialError;
use support::*;

/// The monitor reads the rules of the cell's bundle, checked against the
/// cell's reviewers.
fn reviewed_rules(cell: &TestCell) -> Option<MonitorSource> {
    Some(MonitorSource {
        bundle: cell.layout.entitlements_dir(),
        reviewers: cell.layout.reviewers_file(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_rules_fire_on_ingested_records_and_integrity_alerts() {
    let cell = TestCell::new().await;
    let mut config = logd_config(&cell, &cell.scratch("logd"), 200);
    config.monitor = reviewed_rules(&cell);
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
    config.monitor = reviewed_rules(&cell);
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
    config.monitor = reviewed_rules(&cell);
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

/// Has both local reviewers of the cell sign its bundle as it is.
fn sign_bundle(cell: &TestCell) {
    for name in ["reviewer-1", "reviewer-2"] {
        nitrile_policy::ReviewerKey::load(
            &cell.layout.reviewer_keys_dir().join(format!("{name}.key")),
            nitrile_api::Name::new(name).unwrap(),
        )
        .unwrap()
        .sign_dir(&cell.layout.entitlements_dir())
        .unwrap();
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

async fn refused(config: &nitrile_logd::LogdConfig) -> BundleRulesError {
    let options = LogdOptions {
        stdout_alerts: false,
        ..LogdOptions::default()
    };
    match Logd::open(config, options).await {
        Err(LogdError::MonitorBundle(e)) => e,
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("logd started on rules it must refuse"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_rule_stops_logd_and_a_re_signed_one_with_a_higher_serial_runs() {
    let cell = TestCell::new().await;
    let mut config = logd_config(&cell, &cell.scratch("logd"), 200);
    config.monitor = reviewed_rules(&cell);
    start_logd(&cell, config.clone()).await.stop().await;
    let serial_1 = cell.scratch("serial-1");
    copy_dir(&cell.layout.entitlements_dir(), &serial_1);

    // A rule edited in place, without review: the sensitive operation rule
    // would now fire on every describe (or, edited the other way, be
    // silenced). logd does not start.
    let rule = cell
        .layout
        .entitlements_dir()
        .join("rules/sensitive-operation.yml");
    let text = std::fs::read_to_string(&rule).unwrap();
    let edited = text.replace(
        "      - host.update\n",
        "      - host.update\n      - host.describe\n",
    );
    assert_ne!(edited, text);
    std::fs::write(&rule, &edited).unwrap();
    let e = refused(&config).await;
    assert!(matches!(e, BundleRulesError::Bundle { .. }), "{e}");
    assert!(e.to_string().contains("reviewed rules"), "{e}");

    // Signed, but under the serial already loaded: refused too.
    sign_bundle(&cell);
    let e = refused(&config).await;
    assert!(
        matches!(&e, BundleRulesError::Order { source, .. }
            if matches!(**source, SerialError::SerialReused { .. })),
        "{e}"
    );

    // Serial 2, signed: logd runs the edited rule.
    std::fs::write(
        cell.layout.entitlements_dir().join("bundle.toml"),
        "serial = 2\n",
    )
    .unwrap();
    sign_bundle(&cell);
    let logd = start_logd(&cell, config.clone()).await;
    let (j, e) = journal_batch(&host_journal(&cell, "h1", 1));
    let (status, _) = ship(&cell, &logd, "host/h1", &j, &e).await;
    assert_eq!(status, 200);
    wait_until("the re-signed rule fires on a describe", async || {
        logd.alerts.all().iter().any(|a| {
            a.kind == AlertKind::Monitor && a.detail["rule_name"] == "nitrile_sensitive_operation"
        })
    })
    .await;
    logd.stop().await;
    let recorded: serde_json::Value = serde_json::from_slice(
        &std::fs::read(config.state.join(nitrile_policy::SERIAL_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(recorded["serial"], 2);

    // The serial-1 bundle put back, its signatures valid: refused.
    std::fs::remove_dir_all(cell.layout.entitlements_dir()).unwrap();
    copy_dir(&serial_1, &cell.layout.entitlements_dir());
    let e = refused(&config).await;
    assert!(
        matches!(&e, BundleRulesError::Order { source, .. }
            if matches!(**source, SerialError::Rollback { .. })),
        "{e}"
    );
    // logd's journal says which bundle's rules were in force at each start,
    // and that the older one was refused.
    let records = journal_records(&config.state.join("journal"));
    let bundles: Vec<&serde_json::Value> = records
        .iter()
        .filter_map(|r| r.detail.as_ref()?.get("monitor_bundle"))
        .collect();
    assert!(
        bundles
            .iter()
            .any(|b| b["serial"] == 2 && b["previous"]["serial"] == 1),
        "{bundles:?}"
    );
    let last = bundles.last().unwrap();
    assert_eq!(last["refused"]["serial"], 1, "{bundles:?}");
    assert_eq!(last["in_force"]["serial"], 2, "{bundles:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_outside_a_bundle_are_not_read() {
    let cell = TestCell::new().await;
    // A loose rules directory, the way logd.toml named one before.
    let loose = cell.scratch("loose-rules");
    copy_dir(&cell.layout.entitlements_dir().join("rules"), &loose);
    let config = logd_config(&cell, &cell.scratch("logd"), 200);
    let path = cell.scratch("conf").join("logd.toml");
    let text = config.to_toml().replacen(
        "checkpoint_interval_ms",
        &format!(
            "rules = {:?}\ncheckpoint_interval_ms",
            loose.display().to_string()
        ),
        1,
    );
    std::fs::write(&path, text).unwrap();
    let err = nitrile_logd::LogdConfig::load(&path).unwrap_err();
    assert!(
        matches!(
            err,
            nitrile_logd::ConfigError::Invalid {
                problem: nitrile_logd::config::ConfigProblem::UnreviewedRules,
                ..
            }
        ),
        "{err}"
    );
    // A bundle whose reviewers are not the cell's is refused.
    let other = nitrile_policy::ReviewerKey::generate(nitrile_api::Name::new("mallory").unwrap());
    let other_2 = nitrile_policy::ReviewerKey::generate(nitrile_api::Name::new("trudy").unwrap());
    let forged = cell.scratch("forged");
    copy_dir(&cell.layout.entitlements_dir(), &forged);
    std::fs::remove_dir_all(forged.join("signatures")).unwrap();
    other.sign_dir(&forged).unwrap();
    other_2.sign_dir(&forged).unwrap();
    let mut config = config;
    config.monitor = Some(MonitorSource {
        bundle: forged,
        reviewers: cell.layout.reviewers_file(),
    });
    let e = refused(&config).await;
    assert!(matches!(e, BundleRulesError::Bundle { .. }), "{e}");
}
