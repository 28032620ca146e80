//! logd's Prometheus metrics: served on a loopback port over plain HTTP for
//! as long as logd serves, counting what it ingests, refuses, answers and
//! alerts on; a config naming an address that is not loopback is refused.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use nitrile_api::Operation;
use nitrile_logd::alert::AlertKind;
use nitrile_logd::config::{ConfigError, MetricsAddr};
use nitrile_logd::{Logd, LogdConfig, LogdOptions};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERVAL_MS: u64 = 200;

/// `GET path` on the metrics port over plain TCP: (status line, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// Every sample of `GET /metrics`, by name.
async fn scrape(addr: SocketAddr) -> BTreeMap<String, u64> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn get(m: &BTreeMap<String, u64>, name: &str) -> u64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no metric {name} in {m:?}"))
}

/// How much each `nitrile_logd_*` metric moved from `before` to `after`.
fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    get(after, name) - get(before, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_ingests_reads_refusals_and_alerts_on_loopback() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    describe(&cell, 3).await;
    let state = cell.scratch("logd");
    let mut config = logd_config(&cell, &state, INTERVAL_MS);
    config.metrics = Some(MetricsAddr::new("127.0.0.1:0".parse().unwrap()).unwrap());
    let logd = start_logd(&cell, config).await;
    let metrics = logd.metrics.expect("a metrics address");
    assert!(metrics.ip().is_loopback());
    assert_ne!(metrics.port(), 0);
    assert_ne!(metrics, logd.addr);

    // Only GET /metrics is served there.
    let (status, _) = http_get(metrics, "/v1/log/checkpoint").await;
    assert!(status.contains(" 404 "), "{status}");
    let before = scrape(metrics).await;
    // The mTLS server's counters are in the same registry.
    assert!(
        before.contains_key("nitrile_logd_requests_total"),
        "{before:?}"
    );

    // The host journal, shipped in two batches with a refused gap between.
    let (jref, entries) = journal_batch(&cell.host_journal("h1"));
    assert!(
        entries.len() >= 6,
        "3 calls make request and outcome records"
    );
    let (status, body) = ship(&cell, &logd, "host/h1", &jref, &entries[..2]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &entries[3..]).await;
    assert_eq!(status, 409, "a gap");
    let (status, body) = ship(&cell, &logd, "host/h1", &jref, &entries[2..]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The token service ships the host's journal: refused.
    let (status, _) = ship(&cell, &logd, "service/tokend", &jref, &entries[..1]).await;
    assert_eq!(status, 403, "another source's journal");
    let kinds: Vec<AlertKind> = logd.alerts.all().into_iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec![AlertKind::Gap, AlertKind::WrongSource]);

    // Reads: two answered, one admitted but not answerable, two refused.
    let token = audit_token(&cell, "auditor/carol").await;
    for path in ["/v1/alerts", "/v1/log/entries/0/2"] {
        let (status, body) = read(&cell, &logd, "auditor/carol", path, Some(&token)).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (status, _) = read(
        &cell,
        &logd,
        "auditor/carol",
        "/v1/log/proof/inclusion/1000000/1000001",
        Some(&token),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = read(&cell, &logd, "operator/alice", "/v1/alerts", None).await;
    assert_eq!(status, 401);
    let alice_token = cell
        .token("operator/alice", Operation::HostDescribe, "host/h1", "h1")
        .await;
    let (status, _) = read(
        &cell,
        &logd,
        "operator/alice",
        "/v1/alerts",
        Some(&alice_token),
    )
    .await;
    assert_eq!(status, 403);

    let after = scrape(metrics).await;
    let m = |name: &str| moved(&before, &after, &format!("nitrile_logd_{name}"));
    assert_eq!(m("records_ingested_total"), entries.len() as u64);
    assert_eq!(m("ingest_batches_refused_total"), 2);
    assert_eq!(m("integrity_alerts_total"), 2);
    assert_eq!(m("reads_answered_total"), 2);
    assert_eq!(m("reads_failed_total"), 1);
    assert_eq!(m("reads_refused_total"), 2);
    assert_eq!(m("monitor_alerts_total"), 0);
    assert_eq!(m("monitor_alerts_dropped_total"), 0);
    assert!(m("requests_total") >= 9, "{after:?}");

    // Once logd's own journal (the reads, the refusals) is in the log and
    // checkpointed, the gauges show the log's size: what the observer saw
    // appended, everything shipped plus logd's own records.
    wait_until("the log is checkpointed and settled", async || {
        let a = scrape(metrics).await;
        let size = get(&a, "nitrile_logd_log_size");
        let seen = logd.seen.all();
        let last_checkpoint = logd.seen.checkpoints().last().map(|c| c.1);
        let settled = size == seen.len() as u64
            && seen.iter().map(|s| s.0 + 1).max() == Some(size)
            && get(&a, "nitrile_logd_checkpoint_size") == size
            && last_checkpoint == Some(size)
            && get(&a, "nitrile_logd_records_ingested_total")
                + get(&a, "nitrile_logd_own_records_ingested_total")
                == size;
        if !settled {
            return false;
        }
        // Nothing moved while we looked.
        tokio::time::sleep(std::time::Duration::from_millis(3 * INTERVAL_MS)).await;
        scrape(metrics).await == a && logd.seen.all().len() == seen.len()
    })
    .await;
    let settled = scrape(metrics).await;
    let size = get(&settled, "nitrile_logd_log_size");
    let shipped = logd
        .seen
        .all()
        .into_iter()
        .filter(|s| s.1 == jref.source)
        .count();
    assert_eq!(shipped, entries.len());
    assert!(size > entries.len() as u64, "logd's own records are in it");
    assert!(get(&settled, "nitrile_logd_checkpoints_published_total") >= 1);

    // The metrics port closes with logd.
    logd.stop().await;
    assert!(tokio::net::TcpStream::connect(metrics).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_that_is_not_loopback_is_refused() {
    let cell = TestCell::with_hosts(&[]).await;
    let state = cell.scratch("logd");
    let config = logd_config(&cell, &state, INTERVAL_MS);
    let path = state.join("logd.toml");
    std::fs::create_dir_all(&state).unwrap();
    for bad in ["0.0.0.0:9", "192.0.2.1:9100", "[::]:9"] {
        std::fs::write(&path, format!("metrics = \"{bad}\"\n{}", config.to_toml())).unwrap();
        let err = LogdConfig::load(&path).unwrap_err();
        let ConfigError::Field { field, .. } = &err else {
            panic!("{bad}: {err:?}");
        };
        assert_eq!(field, "metrics");
        let mut chain = String::new();
        let mut e: Option<&dyn std::error::Error> = Some(&err);
        while let Some(x) = e {
            chain.push_str(&format!("{x}\n"));
            e = x.source();
        }
        assert!(chain.contains("`metrics`"), "{chain}");
        assert!(chain.contains("not a loopback address"), "{chain}");
    }
    // A loopback address loads, and logd serves metrics there.
    std::fs::write(
        &path,
        format!("metrics = \"127.0.0.1:0\"\n{}", config.to_toml()),
    )
    .unwrap();
    let loaded = LogdConfig::load(&path).unwrap();
    let logd = Logd::open(
        &loaded,
        LogdOptions {
            clock: cell.clock.clone(),
            stdout_alerts: false,
            ..LogdOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(logd.metrics_addr().unwrap().ip().is_loopback());
}
