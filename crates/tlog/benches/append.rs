//! Append throughput and proof rate of the log on real files (fsync on).
//!
//! Appends N entries of 600 bytes in batches of 100, preparing and publishing
//! a checkpoint every 1,000 or 10,000 entries, then serves inclusion proofs
//! for random entries. Compared with the targets: ingestion >= 10,000
//! records/s (Tessera on local disk: about 2,900 entries/s) and inclusion
//! proofs >= 20,000/s. `NITRILE_BENCH_N` sets N (default 200,000).

use std::time::{Duration, Instant};

use nitrile_tlog::{FileStorage, Log, NoteSigner, leaf_hash, verify_inclusion};

const ORIGIN: &str = "bench.nitrile/log";
const BATCH: usize = 100;
const TARGET_APPEND: f64 = 10_000.0;
const TESSERA_APPEND: f64 = 2_900.0;
const TARGET_PROOFS: f64 = 20_000.0;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Run {
    every: u64,
    entries_per_s: f64,
    checkpoint_p50: Duration,
    checkpoint_p99: Duration,
    proofs_per_s: f64,
    verified_per_s: f64,
}

fn run(n: u64, every: u64) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FileStorage::open(dir.path()).expect("storage");
    let mut log =
        Log::open(storage, ORIGIN, NoteSigner::generate(ORIGIN).expect("key")).expect("log");
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut checkpoints = Vec::new();
    let start = Instant::now();
    let mut i = 0u64;
    while i < n {
        batch.clear();
        for _ in 0..BATCH.min((n - i) as usize) {
            let mut e = vec![0u8; 600];
            e[..8].copy_from_slice(&i.to_be_bytes());
            batch.push(e);
            i += 1;
        }
        log.append(&batch).expect("append");
        if i.is_multiple_of(every) || i == n {
            let t = Instant::now();
            let note = log.prepare_checkpoint(now_ms()).expect("prepare");
            log.publish(&note).expect("publish");
            checkpoints.push(t.elapsed());
        }
    }
    let elapsed = start.elapsed();
    checkpoints.sort();

    // Inclusion proofs for pseudo-random entries against the full tree.
    let size = log.size();
    let root = log.root();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let proofs = 100_000u64;
    let t = Instant::now();
    let mut total = 0usize;
    for _ in 0..proofs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        total += log.inclusion_proof(x % size, size).expect("proof").len();
    }
    let proofs_per_s = proofs as f64 / t.elapsed().as_secs_f64();
    std::hint::black_box(total);
    let t = Instant::now();
    let verified = 20_000u64;
    for _ in 0..verified {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let idx = x % size;
        let p = log.inclusion_proof(idx, size).expect("proof");
        let leaf = log.leaf_hash(idx).expect("leaf");
        verify_inclusion(&leaf, idx, size, &p, &root).expect("verifies");
    }
    let verified_per_s = verified as f64 / t.elapsed().as_secs_f64();
    std::hint::black_box(leaf_hash(b""));

    Run {
        every,
        entries_per_s: n as f64 / elapsed.as_secs_f64(),
        checkpoint_p50: percentile(&checkpoints, 0.50),
        checkpoint_p99: percentile(&checkpoints, 0.99),
        proofs_per_s,
        verified_per_s,
    }
}

fn main() {
    let n: u64 = std::env::var("NITRILE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!(
        "nitrile-tlog append: {n} entries of 600 bytes, batches of {BATCH}, FileStorage with fsync"
    );
    println!(
        "{:>16} {:>12} {:>9} {:>10} {:>14} {:>14} {:>12} {:>12} {:>9}",
        "checkpoint every",
        "entries/s",
        "x target",
        "x Tessera",
        "ckpt p50",
        "ckpt p99",
        "proofs/s",
        "+verify/s",
        "x target"
    );
    for every in [1_000u64, 10_000] {
        let r = run(n, every);
        println!(
            "{:>16} {:>12.0} {:>9.2} {:>10.2} {:>14?} {:>14?} {:>12.0} {:>12.0} {:>9.2}",
            r.every,
            r.entries_per_s,
            r.entries_per_s / TARGET_APPEND,
            r.entries_per_s / TESSERA_APPEND,
            r.checkpoint_p50,
            r.checkpoint_p99,
            r.proofs_per_s,
            r.verified_per_s,
            r.proofs_per_s / TARGET_PROOFS,
        );
    }
}
