//! The key service's core without a network or a journal: unwraps per
//! second (a wrapped data key opened and sealed with HPKE to a fresh
//! recipient key, as an attach asks) on 1 and 2 threads, and the durable
//! operations (a volume key made, a volume record destroyed: each an fsync
//! of a file and of its directory). This is the ceiling of the service's
//! delegated unwraps, whose goal is >= 5,000/s on a 2-core machine (AWS
//! KMS's default quota for symmetric operations is 5,500 to 10,000/s per
//! account and Region). `NITRILE_BENCH_N` sets the unwraps per thread
//! (default 20,000).

use std::time::{Duration, Instant};

use nitrile_api::{Name, PrincipalId};
use nitrile_kms::{KeyName, Kms, Recipient};
use time::OffsetDateTime;

const VOLUMES: usize = 64;
const TARGET: f64 = 5_000.0;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n: usize = std::env::var("NITRILE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let kms = Kms::open(&dir.path().join("kms")).expect("open");
    let now = OffsetDateTime::now_utc();
    let owner = PrincipalId::parse("nitrile://bench/service/kms").expect("principal");
    kms.create_key(&KeyName::default_key(), &owner, now)
        .expect("key");

    let mut made = Vec::with_capacity(VOLUMES);
    let mut gen_times = Vec::with_capacity(VOLUMES);
    for i in 0..VOLUMES {
        let v = Name::new(&format!("v{i}")).expect("name");
        let t = Instant::now();
        let w = kms
            .generate_volume_key(&v, &KeyName::default_key(), now)
            .expect("generate");
        gen_times.push(t.elapsed());
        made.push((v, w.wrapped.encode()));
    }
    gen_times.sort();

    // Recipients are made by the VMM, not by kms: made before timing.
    let recipients: Vec<Recipient> = (0..VOLUMES)
        .map(|_| Recipient::generate().expect("recipient"))
        .collect();

    for threads in [1usize, 2] {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (kms, made, recipients) = (&kms, &made, &recipients);
                s.spawn(move || {
                    for i in 0..n {
                        let j = (i + t) % VOLUMES;
                        let (v, w) = &made[j];
                        kms.unwrap_sealed(v, w, recipients[j].public_key(), now)
                            .expect("unwrap");
                    }
                });
            }
        });
        let per_s = (n * threads) as f64 / start.elapsed().as_secs_f64();
        println!(
            "unwrap_sealed, {threads} thread(s): {per_s:.0}/s ({:.1} us each per thread; goal of the service {TARGET:.0}/s)",
            1e6 * threads as f64 / per_s
        );
    }

    let mut destroy_times = Vec::with_capacity(VOLUMES);
    for (v, _) in &made {
        let t = Instant::now();
        kms.destroy_volume(v).expect("destroy");
        destroy_times.push(t.elapsed());
    }
    destroy_times.sort();
    println!(
        "generate_volume_key (durable): p50 {:?}, p99 {:?}",
        percentile(&gen_times, 0.5),
        percentile(&gen_times, 0.99)
    );
    println!(
        "destroy_volume (durable): p50 {:?}, p99 {:?}",
        percentile(&destroy_times, 0.5),
        percentile(&destroy_times, 0.99)
    );
}
