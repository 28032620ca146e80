//! Audited `host.describe` calls per second through the host agent, end to
//! end: keep-alive mTLS connections on loopback, each call carrying a token
//! the host verifies (pinned issuer keys, expiry, audience, operation,
//! resource, binding to the client certificate; the Ed25519 check is cached
//! per token for read operations) and journaled twice (request record
//! durable before the call runs, outcome record durable before the answer).
//!
//! Setup: a cell bootstrapped in a temporary directory with
//! `nitrile_cell::bootstrap`, the token service opened in-process to mint
//! one `host.describe` token for alice per host agent (reads are not single
//! use, so one token serves every call), host `h1` provisioned with
//! `provision_host`, and `Hostd` run in-process on `127.0.0.1:0` on its own
//! tokio runtime (default multi-thread runtime, as `nitrile hostd` builds),
//! on its own thread. Clients run on a second 2-worker runtime.
//!
//! Two host agents in turn: the journal as shipped (group-committed
//! fdatasync), then the same with `danger_journal_no_sync` (the ceiling of
//! everything but the disk). For each, C = 16, 64, 128 clients issue
//! `GET /v1/host` back to back for [`RUN`] after a [`WARMUP_RUN`] warm-up.
//! At the end each journal is read back: it must verify and hold exactly one
//! request and one outcome record per answered call, and nothing else.
//!
//! Run: `cargo bench -p nitrile-hostd --bench describe`; with
//! `NITRILE_BENCH_QUICK=1` a short smoke run. Target: >= 10,000 calls/s
//! with p99 <= 10 ms on a 2-core machine, journal fsync on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nitrile_api::admin::HostDescription;
use nitrile_api::{Name, Operation, PrincipalId, PrincipalKind};
use nitrile_audit::{JournalReader, Outcome, RecordKind, verify_journal};
use nitrile_hostd::HostdOptions;
use nitrile_net::Client;
use nitrile_pki::tls::{CaRoots, client_config};

mod common;
use common::{Cell, cell, mint, start_hostd};

/// Target rate of the issue, journal fsync on.
const TARGET_PER_SEC: f64 = 10_000.0;
/// Target p99 latency of the issue.
const TARGET_P99: Duration = Duration::from_millis(10);
/// Calls each client makes on its fresh connection before the clock starts.
const WARMUP_CALLS: usize = 2;

struct Plan {
    run: Duration,
    warmup_run: Duration,
    clients: &'static [usize],
}

fn plan() -> Plan {
    if std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1") {
        Plan {
            run: Duration::from_millis(500),
            warmup_run: Duration::from_millis(200),
            clients: &[16],
        }
    } else {
        Plan {
            run: RUN,
            warmup_run: WARMUP_RUN,
            clients: &[16, 64, 128],
        }
    }
}

/// Length of each measured run.
const RUN: Duration = Duration::from_secs(5);
/// A discarded run before each measured one.
const WARMUP_RUN: Duration = Duration::from_secs(1);

struct Row {
    clients: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    calls: usize,
}

impl Row {
    fn from(clients: usize, mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        Self {
            clients,
            rate: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            calls: latencies.len(),
        }
    }
}

/// `clients` keep-alive mTLS connections, one task each, calling
/// `GET /v1/host` back to back for `run`. Returns the row and how many calls
/// were answered in all (warm-up calls included).
async fn run(
    cell: &Cell,
    addr: SocketAddr,
    host: &PrincipalId,
    token: &Arc<str>,
    clients: usize,
    run: Duration,
) -> (Row, u64) {
    let roots = CaRoots::load(&cell.layout.ca_cert()).expect("CA roots");
    let tls = client_config(&roots, &cell.alice_tls()).expect("client TLS config");
    let addr = addr.to_string();
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = Client::connect(&addr, host, Arc::clone(&tls))
            .await
            .expect("connect");
        for _ in 0..WARMUP_CALLS {
            let resp = client
                .get_json_with_bearer("/v1/host", token)
                .await
                .expect("warm-up call");
            assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
            let d: HostDescription = resp.json().expect("HostDescription");
            assert_eq!(d.host.as_str(), host.name.as_str());
        }
        connected.push(client);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(clients);
    for mut client in connected {
        let (barrier, stop, token) = (Arc::clone(&barrier), Arc::clone(&stop), Arc::clone(token));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(8192);
            barrier.wait().await;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let resp = client
                    .get_json_with_bearer("/v1/host", &token)
                    .await
                    .expect("describe call");
                let took = start.elapsed();
                assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
                latencies.push(took);
            }
            assert_eq!(
                client.connections_made(),
                1,
                "a connection was not kept alive"
            );
            latencies
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    let elapsed = start.elapsed();
    let answered = (latencies.len() + clients * WARMUP_CALLS) as u64;
    (Row::from(clients, latencies, elapsed), answered)
}

/// What one host agent's journal holds once it stopped.
struct JournalCheck {
    records: u64,
    requests: u64,
    outcomes: u64,
}

/// Verifies the journal at `path` (header, framing, sequence, hash chain)
/// and counts its host.describe request and executed outcome records;
/// any other record fails the bench.
fn check_journal(path: &std::path::Path) -> JournalCheck {
    let report = verify_journal(path).expect("the host journal verifies");
    let (mut requests, mut outcomes) = (0, 0);
    for entry in JournalReader::open(path).expect("journal") {
        let record = entry.expect("entry").record().expect("record");
        assert_eq!(record.operations, vec![Operation::HostDescribe]);
        match record.kind {
            RecordKind::Request => requests += 1,
            RecordKind::Outcome if record.outcome == Some(Outcome::Executed) => outcomes += 1,
            other => panic!("unexpected {other:?} record: {record:?}"),
        }
    }
    JournalCheck {
        records: report.records,
        requests,
        outcomes,
    }
}

struct Measured {
    no_sync: bool,
    rows: Vec<Row>,
    answered: u64,
    journal: JournalCheck,
}

/// Runs a host agent named `host` (journal fsync on unless `no_sync`) on a
/// runtime of its own thread, measures each client count, stops it and
/// checks its journal.
fn measure(cell: &Cell, host: &str, no_sync: bool, plan: &Plan) -> Measured {
    let host = Name::new(host).expect("host name");
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    // The token service writes the issuer keys that provisioning pins.
    let token: Arc<str> = clients_rt.block_on(mint(cell, &host)).into();
    let state = cell.layout.host_dir(&host);
    let config = cell.host_config(&host, state.clone());
    let host_principal = PrincipalId::new(cell.cell.clone(), PrincipalKind::Host, host.clone());

    let server = start_hostd(
        config,
        HostdOptions {
            danger_journal_no_sync: no_sync,
            ..HostdOptions::default()
        },
    );
    let addr = server.addr;

    let (rows, answered) = clients_rt.block_on(async {
        let mut rows = Vec::new();
        let mut answered = 0;
        for &clients in plan.clients {
            let (_, n) = run(
                cell,
                addr,
                &host_principal,
                &token,
                clients,
                plan.warmup_run,
            )
            .await;
            answered += n;
            let (row, n) = run(cell, addr, &host_principal, &token, clients, plan.run).await;
            answered += n;
            rows.push(row);
        }
        (rows, answered)
    });
    drop(clients_rt);
    server.stop();
    let journal = check_journal(&state.join("journal"));
    Measured {
        no_sync,
        rows,
        answered,
        journal,
    }
}

fn main() {
    let plan = plan();
    let cell = cell();
    let durable = measure(&cell, "h1", false, &plan);
    let ceiling = measure(&cell, "h2", true, &plan);

    println!();
    println!(
        "audited host.describe over keep-alive mTLS on loopback, {:?} per run after {:?} warm-up",
        plan.run, plan.warmup_run
    );
    println!(
        "{:<15} {:>7} {:>9} {:>9} {:>9} {:>9}  target {TARGET_PER_SEC:.0}/s, p99 <= {TARGET_P99:?}",
        "journal", "clients", "calls/s", "p50", "p99", "calls"
    );
    for m in [&durable, &ceiling] {
        for row in &m.rows {
            let verdict = if m.no_sync {
                "(ceiling)"
            } else if row.rate >= TARGET_PER_SEC && row.p99 <= TARGET_P99 {
                "met"
            } else {
                "NOT met"
            };
            println!(
                "{:<15} {:>7} {:>9.0} {:>9.2?} {:>9.2?} {:>9}  {verdict}",
                if m.no_sync { "danger_no_sync" } else { "fsync" },
                row.clients,
                row.rate,
                row.p50,
                row.p99,
                row.calls,
            );
        }
    }
    println!();
    println!(
        "{:>7} {:>12} {:>12} {:>16}",
        "clients", "fsync/s", "no-sync/s", "ratio durable/no-sync"
    );
    for (d, c) in durable.rows.iter().zip(&ceiling.rows) {
        println!(
            "{:>7} {:>12.0} {:>12.0} {:>16.2}",
            d.clients,
            d.rate,
            c.rate,
            d.rate / c.rate
        );
    }
    println!();
    for m in [&durable, &ceiling] {
        let j = &m.journal;
        println!(
            "journal ({}): verified, {} records = {} requests + {} outcomes for {} answered calls",
            if m.no_sync { "danger_no_sync" } else { "fsync" },
            j.records,
            j.requests,
            j.outcomes,
            m.answered
        );
        assert_eq!(j.requests, m.answered, "one request record per call");
        assert_eq!(j.outcomes, m.answered, "one outcome record per call");
        assert_eq!(j.records, 2 * m.answered, "nothing but those records");
    }
}
