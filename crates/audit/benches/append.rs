//! Journal append throughput and latency with 1, 16 and 64 concurrent
//! appenders, fsync on, against the `danger_no_sync` ceiling.
//!
//! `cargo bench -p nitrile-audit --bench append`

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nitrile_audit::{Journal, JournalOptions};

/// A payload the size of a typical JSON audit record.
const PAYLOAD_LEN: usize = 400;
/// Appends per run, split among the appenders.
const TOTAL_APPENDS: usize = 6400;

struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    fsyncs: u64,
}

fn run(appenders: usize, no_sync: bool) -> Run {
    let dir = tempfile::tempdir().expect("temporary directory");
    let journal: Arc<Journal> = Arc::new(
        JournalOptions::new()
            .danger_no_sync(no_sync)
            .open(dir.path().join("journal"), "nitrile://bench/host/h1")
            .expect("open journal"),
    );
    let per_thread = TOTAL_APPENDS / appenders;
    let barrier = Arc::new(Barrier::new(appenders + 1));
    let handles: Vec<_> = (0..appenders)
        .map(|t| {
            let (journal, barrier) = (Arc::clone(&journal), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let payload = vec![b'a' + (t % 26) as u8; PAYLOAD_LEN];
                let mut latencies = Vec::with_capacity(per_thread);
                barrier.wait();
                for _ in 0..per_thread {
                    let start = Instant::now();
                    journal.append(&payload).expect("append");
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("appender thread"))
        .collect();
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    Run {
        per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        fsyncs: journal.metrics().fsyncs,
    }
}

fn main() {
    println!("journal append, {PAYLOAD_LEN}-byte payloads, {TOTAL_APPENDS} appends per run\n");
    println!(
        "{:>9}  {:>12} {:>10} {:>10} {:>8}  {:>12} {:>10} {:>10}  {:>7}",
        "appenders", "fsync/s", "p50", "p99", "fsyncs", "no-sync/s", "p50", "p99", "ratio"
    );
    for appenders in [1, 16, 64] {
        let synced = run(appenders, false);
        let ceiling = run(appenders, true);
        println!(
            "{:>9}  {:>12.0} {:>10.1?} {:>10.1?} {:>8}  {:>12.0} {:>10.1?} {:>10.1?}  {:>6.1}%",
            appenders,
            synced.per_sec,
            synced.p50,
            synced.p99,
            synced.fsyncs,
            ceiling.per_sec,
            ceiling.p50,
            ceiling.p99,
            100.0 * synced.per_sec / ceiling.per_sec
        );
    }
    println!("\nratio: appends/s with fsync as a share of the danger_no_sync ceiling");
}
