//! Proofs our log produces verify with an independent RFC 9162 verifier
//! (tests/independent/verify.py, Python standard library only), which also
//! recomputes every root from the entries; a flipped proof byte fails there too.

use std::path::Path;
use std::process::Command;

use nitrile_tlog::{FileStorage, Log, NoteSigner};
use serde_json::{Value, json};

const ORIGIN: &str = "local.nitrile/log";

fn python() -> Option<&'static str> {
    Command::new("python3")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "python3")
}

fn run_verifier(input: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proofs.json");
    std::fs::write(&file, serde_json::to_vec(input).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/independent/verify.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn proofs_of_our_log() -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        NoteSigner::generate(ORIGIN).unwrap(),
    )
    .unwrap();
    let entries: Vec<Vec<u8>> = (0u32..600)
        .map(|i| format!("leaf {i}:{}", "y".repeat((i % 7) as usize)).into_bytes())
        .collect();
    // Append in uneven batches, checkpointing now and then, as logd would.
    let mut at = 0usize;
    for (n, batch) in [1usize, 2, 61, 190, 3, 255, 88].iter().enumerate() {
        log.append(&entries[at..at + batch]).unwrap();
        at += batch;
        if n % 2 == 0 {
            let note = log.prepare_checkpoint(n as u64).unwrap();
            log.publish(&note).unwrap();
        }
    }
    assert_eq!(at, 600);
    let size = log.size();
    let mut roots = Vec::new();
    for s in 0..=size {
        roots.push(hex::encode(log.tree().root_at(s).unwrap()));
    }
    let hexes = |p: Vec<[u8; 32]>| p.into_iter().map(hex::encode).collect::<Vec<_>>();
    let mut inclusion = Vec::new();
    for s in (1..=size)
        .filter(|s| s % 13 == 0 || *s <= 20 || s.is_power_of_two() || *s == size || *s == 257)
    {
        for i in (0..s).filter(|i| i % 11 == 0 || *i == s - 1 || *i < 3) {
            let proof = hexes(log.inclusion_proof(i, s).unwrap());
            inclusion
                .push(json!({"index": i, "size": s, "root": roots[s as usize], "proof": proof}));
        }
    }
    let mut consistency = Vec::new();
    for new in (1..=size).filter(|s| s % 29 == 0 || *s <= 17 || *s == size || s.is_power_of_two()) {
        for old in (1..=new).filter(|o| o % 7 == 0 || *o <= 9 || *o == new || o.is_power_of_two()) {
            let proof = hexes(log.consistency_proof(old, new).unwrap());
            consistency.push(json!({
                "old": old, "new": new,
                "old_root": roots[old as usize], "new_root": roots[new as usize], "proof": proof
            }));
        }
    }
    assert!(
        inclusion.len() > 1000 && consistency.len() > 500,
        "{} {}",
        inclusion.len(),
        consistency.len()
    );
    let entries: Vec<String> = entries.iter().map(hex::encode).collect();
    json!({"entries": entries, "inclusion": inclusion, "consistency": consistency})
}

#[test]
fn our_proofs_verify_with_an_independent_python_implementation() {
    if python().is_none() {
        println!("SKIPPED: no python3");
        return;
    }
    let input = proofs_of_our_log();
    let (ok, out) = run_verifier(&input);
    assert!(ok, "the independent verifier refused our proofs:\n{out}");
    assert!(out.contains(" 0 failed"), "{out}");
    println!("{}", out.trim());

    // One flipped bit in one inclusion proof: the independent verifier refuses it.
    let mut bad = input.clone();
    let case = bad["inclusion"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["size"] == 600 && c["index"] == 297)
        .unwrap();
    let h = case["proof"][2].as_str().unwrap().to_owned();
    let mut raw = hex::decode(&h).unwrap();
    raw[9] ^= 0x04;
    case["proof"][2] = json!(hex::encode(raw));
    let (ok, out) = run_verifier(&bad);
    assert!(!ok, "a tampered inclusion proof passed:\n{out}");
    assert!(out.contains("inclusion FAILED index=297 size=600"), "{out}");

    // And in one consistency proof.
    let mut bad = input.clone();
    let case = bad["consistency"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["old"] == 7 && c["new"] == 600)
        .unwrap();
    let h = case["proof"][0].as_str().unwrap().to_owned();
    let mut raw = hex::decode(&h).unwrap();
    raw[0] ^= 0x80;
    case["proof"][0] = json!(hex::encode(raw));
    let (ok, out) = run_verifier(&bad);
    assert!(!ok, "a tampered consistency proof passed:\n{out}");
    assert!(out.contains("consistency FAILED old=7 new=600"), "{out}");

    // A root that is not the MTH of the entries is refused as well.
    let mut bad = input;
    bad["entries"][5] = json!("00");
    let (ok, _) = run_verifier(&bad);
    assert!(!ok, "a changed entry passed");
}
