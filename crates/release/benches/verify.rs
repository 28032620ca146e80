//! Host-side verification of a release against hashing its bytes.
//!
//! A prod repository (2 of 3 signers, the CI's attestation) holds a
//! release whose `nitrile` file is 100 MiB of random bytes. Measured, in
//! the same run and alternating: (a) the verification a host does for
//! `host.update`: tough's client loads the metadata from the pinned root
//! (signatures, thresholds, expiry, versions against a fresh datastore),
//! then `verify_release` checks the manifest's version and environment,
//! the attestation under the CI key, and reads each file, whose length and
//! SHA-256 tough checks against the signed targets entry (which must be
//! the manifest's); (b) the same plus staging, `fetch_release`: each file
//! written durably (write, fsync, rename); (c) the baseline: a plain
//! SHA-256 of the same file, read from disk. The ratios (a)/(c) (goal
//! <= 1.2: hashing is the limit) and (b)/(c) are reported.
//!
//! Run: `cargo bench -p nitrile-release --bench verify`;
//! `NITRILE_BENCH_QUICK=1` for a 16 MiB file and fewer rounds.

#![allow(clippy::disallowed_macros)]

use std::io::Read as _;
use std::path::Path;
use std::time::{Duration, Instant};

use nitrile_release::client::{self, Trust};
use nitrile_release::keys::ReleaseKey;
use nitrile_release::repo::{self, InitOptions};
use nitrile_release::{Environment, attest, manifest};
use rand_core::RngCore as _;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

fn quick() -> bool {
    std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1")
}

fn sha256_file(path: &Path) -> [u8; 32] {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mib: usize = if quick() { 16 } else { 100 };
    let rounds = if quick() { 3 } else { 7 };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let now = OffsetDateTime::now_utc();
    let env = Environment::new("prod").unwrap();
    let root = ReleaseKey::generate();
    let signers: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate()).collect();
    let online = ReleaseKey::generate();
    let ci = ReleaseKey::generate();
    let repo = repo::init(
        &d.join("repo"),
        &InitOptions {
            environment: env.clone(),
            root_keys: vec![root.public()],
            root_threshold: 1,
            signers: signers.iter().map(ReleaseKey::public).collect(),
            threshold: 2,
            online: online.public(),
            root_expiry_days: 30,
        },
        std::slice::from_ref(&root),
        now,
    )
    .unwrap();
    let src = d.join("nitrile");
    let mut bytes = vec![0u8; mib << 20];
    rand_core::OsRng.fill_bytes(&mut bytes);
    std::fs::write(&src, &bytes).unwrap();
    drop(bytes);
    let bundle = d.join("bundle");
    let m = manifest::build(
        "1.0.0".parse().unwrap(),
        env.clone(),
        &[("nitrile".into(), src.clone())],
        &bundle,
        now,
    )
    .unwrap();
    let e = attest::sign(&attest::statement(&m, "bench"), &ci);
    std::fs::write(
        bundle.join(manifest::ATTESTATION_FILE),
        serde_json::to_vec(&e).unwrap(),
    )
    .unwrap();
    repo.stage(&bundle, false, now).unwrap();
    repo.sign(&signers[0]).unwrap();
    repo.sign(&signers[2]).unwrap();
    repo.publish(&online, now, None).unwrap();
    let trust = Trust {
        environment: env,
        root: std::fs::read(repo.dir().join("metadata/root.json")).unwrap(),
        ci_key: ci.verifying_key(),
    };
    // The target as the repository stores it: what a host reads.
    let target = std::fs::read_dir(repo.dir().join("targets"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("-nitrile"))
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut verify, mut stage, mut hash, mut load) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // A warm-up of each: the page cache holds the file for all.
    let _ = sha256_file(&target);
    for round in 0..=rounds {
        let t0 = Instant::now();
        let mut loaded_at = Duration::ZERO;
        rt.block_on(async {
            let loaded = client::load(repo.dir(), &trust, &d.join(format!("tuf-v{round}")))
                .await
                .unwrap();
            loaded_at = t0.elapsed();
            std::hint::black_box(
                client::verify_release(&loaded, &trust, "1.0.0".parse().unwrap())
                    .await
                    .unwrap(),
            );
        });
        let v = t0.elapsed();
        let out = d.join(format!("staged-{round}"));
        let t0 = Instant::now();
        rt.block_on(async {
            let loaded = client::load(repo.dir(), &trust, &d.join(format!("tuf-s{round}")))
                .await
                .unwrap();
            client::fetch_release(&loaded, &trust, "1.0.0".parse().unwrap(), &out)
                .await
                .unwrap();
        });
        let st = t0.elapsed();
        let t0 = Instant::now();
        std::hint::black_box(sha256_file(&target));
        let h = t0.elapsed();
        std::fs::remove_dir_all(&out).unwrap();
        if round > 0 {
            verify.push(v);
            load.push(loaded_at);
            stage.push(st);
            hash.push(h);
        }
    }
    let (v, st, h, l) = (median(verify), median(stage), median(hash), median(load));
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    println!(
        "release verification, {mib} MiB target, median of {rounds}: verify {:.1} ms (metadata {:.1} ms), verify and stage (fsync) {:.1} ms, plain SHA-256 {:.1} ms; ratios {:.2} and {:.2}",
        ms(v),
        ms(l),
        ms(st),
        ms(h),
        v.as_secs_f64() / h.as_secs_f64(),
        st.as_secs_f64() / h.as_secs_f64()
    );
}
