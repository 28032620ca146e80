//! logd ingestion benchmark, on a real cell in a temporary directory (real
//! TLS, real files, fsync everywhere):
//!
//! - several host journals written at a paced rate by writer threads
//!   (group-committed appends), each shipped by its own `Shipper` over mTLS;
//! - logd checkpointing every INTERVAL_MS (500 ms, its default, unless given);
//! - measured: sustained ingestion rate (records acknowledged per second),
//!   p50/p99 time from a record's durable append in its host journal to the
//!   publication of a checkpoint that includes it; then inclusion proofs
//!   served per second to concurrent auditor connections, one per read and
//!   then 256 per read (every read journaled by logd before it is answered).
//!
//! Baseline (from the issue): Tessera on local disk publishes about 2,900
//! entries/s with 0.6-6 s to integrate; targets: >= 10,000 records/s with
//! p99 <= 1 s, >= 20,000 proofs/s.
//!
//! `cargo bench -p nitrile-logd --bench ingest [-- SOURCES RATE SECONDS INTERVAL_MS]`
//!
//! Results and what bounds them: docs/PERFORMANCE.md (issue 5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nitrile_api::{Name, Operation};
use nitrile_audit::{AuditRecord, Journal, RequestId};
use nitrile_logclient::Shipper;
use support::*;

const BASELINE_RATE: f64 = 2_900.0;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let sources: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(4);
    let rate: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(12_000);
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let interval_ms: u64 = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(nitrile_logd::config::DEFAULT_CHECKPOINT_INTERVAL_MS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(sources, rate, seconds, interval_ms));
}

async fn run(sources: usize, rate: u64, seconds: u64, interval_ms: u64) {
    let cell = TestCell::new().await;
    let logd = start_logd(
        &cell,
        logd_config(&cell, &cell.scratch("logd"), interval_ms),
    )
    .await;
    let now = nitrile_token::Clock::now(&*cell.clock);

    // Host journals and their writers.
    let stop = Arc::new(AtomicBool::new(false));
    let appended: Arc<Mutex<HashMap<(String, u64), Instant>>> = Arc::default();
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let mut shippers = Vec::new();
    for h in 0..sources {
        let host = format!("b{h}");
        nitrile_cell::provision_host(&cell.layout, &cell.cell, &Name::new(&host).unwrap(), now)
            .unwrap();
        let path = cell.scratch(&host).join("journal");
        let source = host_principal(&host).uri();
        let journal = Journal::open(&path, &source).unwrap();
        let per_source = rate / sources as u64;
        let (stop, appended, written) = (stop.clone(), appended.clone(), written.clone());
        let principal = host_principal(&host);
        writers.push(std::thread::spawn(move || {
            let chunk = 50u64;
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_secs_f64(n as f64 / per_source as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let pending: Vec<_> = (0..chunk)
                    .map(|i| {
                        let r = AuditRecord::request(
                            now,
                            principal.clone(),
                            RequestId::from_bytes([((n + i) % 251) as u8; 16]),
                        )
                        .with_principal(principal_of("operator/alice"))
                        .with_operations([Operation::HostDescribe])
                        .with_token_id(format!("{:032x}", n + i));
                        journal.submit(&r.encode().unwrap())
                    })
                    .collect();
                for p in pending {
                    let receipt = p.wait().unwrap();
                    appended
                        .lock()
                        .unwrap()
                        .insert((source.clone(), receipt.seq), Instant::now());
                }
                n += chunk;
                written.fetch_add(chunk, Ordering::Relaxed);
            }
        }));
        shippers.push(Shipper::spawn(
            path,
            logd.addr.to_string(),
            logd_principal(),
            cell.tls_for(&format!("host/{host}")),
        ));
    }

    let token = audit_token(&cell, "auditor/carol").await;
    let t0 = Instant::now();
    let warm = shipped(&shippers);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let acked = shipped(&shippers) - warm;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    // Let the rest be shipped and checkpointed.
    let total = written.load(Ordering::Relaxed);
    for _ in 0..300 {
        if shipped(&shippers) >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rate_acked = acked as f64 / elapsed;

    // Latency: durable journal append -> first checkpoint covering it.
    // Publication times as logd's observer hook reports them.
    let cps = logd.seen.checkpoints();
    if std::env::var_os("LOGD_BENCH_DEBUG").is_some() {
        for (t, size) in &cps {
            eprintln!(
                "checkpoint {size} at {:.3}s",
                t.duration_since(t0).as_secs_f64()
            );
        }
        eprintln!("log entries seen {}", logd.seen.all().len());
    }
    let appended = std::mem::take(&mut *appended.lock().unwrap());
    let mut lat = Vec::new();
    for (index, source, seq) in logd.seen.all() {
        let Some(t) = appended.get(&(source, seq)) else {
            continue;
        };
        if let Some((tc, _)) = cps.iter().find(|(_, size)| *size > index) {
            lat.push(tc.saturating_duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Inclusion proofs served per second: one per read, then a range of
    // RANGE consecutive entries per read (every read journaled either way).
    let size = cps.last().map_or(0, |c| c.1);
    let clients = 64;
    let single = serve_proofs(&cell, &logd, &token, clients, size, 1).await;
    let ranged = serve_proofs(&cell, &logd, &token, clients, size, RANGE).await;

    println!();
    println!(
        "logd ingest: {sources} sources, offered {rate} records/s, {seconds} s, checkpoint every {interval_ms} ms, fsync on"
    );
    println!("| metric | value | baseline / target |");
    println!("|---|---|---|");
    println!(
        "| sustained ingestion (acked records/s) | {rate_acked:.0} | Tessera ~2,900/s (x{:.1}); target >= 10,000 |",
        rate_acked / BASELINE_RATE
    );
    println!(
        "| append -> published checkpoint p50 | {:.0} ms | Tessera 600-6,000 ms |",
        pct(&lat, 0.5)
    );
    println!(
        "| append -> published checkpoint p99 | {:.0} ms | target <= 1,000 ms |",
        pct(&lat, 0.99)
    );
    println!("| records measured | {} | |", lat.len());
    println!(
        "| inclusion proofs served/s, one per read ({clients} auditor connections, each read journaled) | {:.0} | target >= 20,000 |",
        single.0
    );
    println!(
        "| inclusion proofs served/s, {RANGE} per read ({clients} connections; {:.0} reads/s, each journaled) | {:.0} | target >= 20,000 |",
        ranged.1, ranged.0
    );
    for s in shippers {
        s.stop().await;
    }
    logd.stop().await;
}

/// Proofs per read in the range phase.
const RANGE: u64 = 256;

/// Asks `clients` concurrent auditor connections for inclusion proofs in
/// the tree of `size` for 5 s, `per_read` consecutive entries per read;
/// returns proofs/s and reads/s.
async fn serve_proofs(
    cell: &TestCell,
    logd: &RunningLogd,
    token: &str,
    clients: u64,
    size: u64,
    per_read: u64,
) -> (f64, f64) {
    let proofs = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let p_stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for k in 0..clients {
        let mut c = logd_client(cell, logd, "auditor/carol").await;
        let (token, proofs, reads, p_stop) = (
            token.to_owned(),
            proofs.clone(),
            reads.clone(),
            p_stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = k;
            while !p_stop.load(Ordering::Relaxed) {
                let index = (i * 7919) % size.max(1);
                let path = if per_read == 1 {
                    format!("/v1/log/proof/inclusion/{index}/{size}")
                } else {
                    format!("/v1/log/proofs/inclusion/{index}/{per_read}/{size}")
                };
                let (status, body) = send_raw(&mut c, "GET", &path, b"", Some(&token)).await;
                assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
                let n = if per_read == 1 {
                    1
                } else {
                    serde_json::from_slice::<nitrile_logclient::protocol::ProofsBody>(&body)
                        .unwrap()
                        .proofs
                        .len() as u64
                };
                proofs.fetch_add(n, Ordering::Relaxed);
                reads.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let p0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    p_stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let secs = p0.elapsed().as_secs_f64();
    (
        proofs.load(Ordering::Relaxed) as f64 / secs,
        reads.load(Ordering::Relaxed) as f64 / secs,
    )
}

fn principal_of(kind_name: &str) -> nitrile_api::PrincipalId {
    principal(kind_name)
}

fn shipped(shippers: &[nitrile_logclient::ShipperHandle]) -> u64 {
    shippers.iter().map(|s| s.status().shipped_seq).sum()
}
