//! Claim 6 under a flood before authentication: 1,200 connections from one
//! address that never complete a handshake (plaintext garbage, most of them
//! reset at accept by the per-source limits) are all on the host's record,
//! and the record stays small: a few `tls` refusals one by one and one
//! summary per report interval, whose counts add up to exactly the
//! connections made. Before, each failed handshake was one synced record.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nitrile_api::wire::RefusalStep;
use nitrile_audit::{RecordKind, verify_journal};
use support::{TestCell, journal_records};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Connections the attacker makes.
const MADE: u64 = 1200;

/// One connection from [`ATTACKER`] that sends garbage and waits until the
/// host ends it (or was reset as it connected).
async fn garbage(to: SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(ATTACKER), 0))
        .unwrap();
    let Ok(mut tcp) = socket.connect(to).await else {
        return; // reset at once: refused, and made all the same
    };
    let _ = tcp.write_all(b"GET /v1/host HTTP/1.1\r\n\r\n").await;
    // Whatever comes back is a TLS alert, never HTTP.
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got).await;
    assert!(
        got.is_empty() || got[0] == 0x15,
        "the host answered a connection without TLS: {got:02x?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_failed_and_refused_connections_are_journaled_bounded_and_complete() {
    let mut cell = TestCell::with_hosts(&["h1"]).await;
    let addr = cell.host_addr("h1");
    let journal = cell.host_journal("h1");
    let before = journal_records(&journal).len();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..16 {
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < MADE {
                garbage(addr).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // Every connection has been ended by the host; stopping it journals
    // the summary of the interval in progress.
    cell.stop_host("h1").await;
    let elapsed = started.elapsed();

    let records = journal_records(&journal);
    let added = &records[before..];
    let mut one_by_one = 0u64;
    let mut summarized = 0u64;
    let mut summaries = 0u64;
    for r in added {
        assert_eq!(r.kind, RecordKind::Refusal, "{r:?}");
        assert_eq!(r.step, Some(RefusalStep::Tls), "{r:?}");
        assert!(r.principal.is_none(), "{r:?}");
        let detail = r.detail.as_ref().expect("a tls refusal has its detail");
        match detail.get("total").and_then(serde_json::Value::as_u64) {
            Some(total) => {
                summaries += 1;
                summarized += total;
                assert_eq!(detail["sources"][0]["source"], "127.0.0.2", "{detail}");
                assert!(
                    r.reason
                        .as_deref()
                        .is_some_and(|s| s.contains("failed or refused before authentication")),
                    "{r:?}"
                );
            }
            None => {
                one_by_one += 1;
                assert!(
                    detail["remote"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("127.0.0.2:")),
                    "{detail}"
                );
                assert!(
                    r.reason
                        .as_deref()
                        .is_some_and(|s| s.contains("TLS handshake failed")),
                    "{r:?}"
                );
            }
        }
    }
    assert_eq!(
        one_by_one + summarized,
        MADE,
        "the journal does not count every connection"
    );
    // At most 4 of one source one by one and one summary per 10 s interval.
    let intervals = elapsed.as_secs() / 10 + 2;
    assert!(
        one_by_one <= 4 * intervals && summaries <= intervals,
        "{one_by_one} records one by one and {summaries} summaries in {elapsed:?}"
    );
    verify_journal(&journal).unwrap();
}
