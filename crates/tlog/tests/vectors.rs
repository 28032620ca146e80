//! Public vectors: transparency-dev/merkle RFC 6962 proofs, the signed-note
//! examples, and a real checkpoint cosigned by public witnesses.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nitrile_tlog::{
    Checkpoint, Hash, KeyKind, NoteError, NoteSigner, NoteVerifier, SignedNote, Tree, cosignatures,
    leaf_hash, open_checkpoint, verify_consistency, verify_cosignature, verify_inclusion,
};
use serde_json::Value;

fn testdata(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(rel)
}

fn read(rel: &str) -> String {
    fs::read_to_string(testdata(rel)).unwrap()
}

fn hash(v: &Value) -> Hash {
    let raw = B64.decode(v.as_str().unwrap()).unwrap();
    raw.try_into()
        .unwrap_or_else(|r: Vec<u8>| panic!("hash of {} bytes", r.len()))
}

/// Decodes a vector's hash, or `None` for a malformed one (which must fail).
fn maybe_hash(v: &Value) -> Option<Hash> {
    let raw = B64.decode(v.as_str()?).ok()?;
    raw.try_into().ok()
}

fn proof(v: &Value) -> Option<Vec<Hash>> {
    match v {
        Value::Null => Some(Vec::new()),
        Value::Array(a) => a.iter().map(maybe_hash).collect(),
        _ => None,
    }
}

fn vector_files(kind: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut out = Vec::new();
    walk(&testdata(&format!("merkle/{kind}")), &mut out);
    out.sort();
    out
}

/// Vectors whose hashes are not 32 bytes cannot be expressed with `Hash`;
/// those that must fail are counted as failing, the others are skipped.
fn representable(v: &Value, keys: &[&str]) -> bool {
    keys.iter().all(|k| maybe_hash(&v[*k]).is_some())
}

#[test]
fn transparency_dev_inclusion_vectors() {
    let files = vector_files("inclusion");
    assert!(files.len() > 50, "vectors missing: {}", files.len());
    let (mut ok, mut bad) = (0, 0);
    for f in files {
        let v: Value = serde_json::from_str(&fs::read_to_string(&f).unwrap()).unwrap();
        let want_err = v["wantErr"].as_bool().unwrap();
        if !want_err && !representable(&v, &["leafHash", "root"]) {
            continue;
        }
        let result = (|| {
            let leaf = maybe_hash(&v["leafHash"])?;
            let root = maybe_hash(&v["root"])?;
            let p = proof(&v["proof"])?;
            Some(
                verify_inclusion(
                    &leaf,
                    v["leafIdx"].as_u64()?,
                    v["treeSize"].as_u64()?,
                    &p,
                    &root,
                )
                .is_ok(),
            )
        })()
        .unwrap_or(false);
        assert_eq!(result, !want_err, "{}", f.display());
        if want_err { bad += 1 } else { ok += 1 }
    }
    assert!(ok >= 5 && bad >= 40, "{ok} valid, {bad} invalid");
}

#[test]
fn transparency_dev_consistency_vectors() {
    let files = vector_files("consistency");
    assert!(files.len() > 50);
    for f in files {
        let v: Value = serde_json::from_str(&fs::read_to_string(&f).unwrap()).unwrap();
        let want_err = v["wantErr"].as_bool().unwrap();
        if !want_err && !representable(&v, &["root1", "root2"]) {
            continue;
        }
        let result = (|| {
            let r1 = maybe_hash(&v["root1"])?;
            let r2 = maybe_hash(&v["root2"])?;
            let p = proof(&v["proof"])?;
            Some(
                verify_consistency(v["size1"].as_u64()?, v["size2"].as_u64()?, &r1, &r2, &p)
                    .is_ok(),
            )
        })()
        .unwrap_or(false);
        assert_eq!(result, !want_err, "{}", f.display());
    }
}

/// Our tree, fed the RFC 6962 test leaves, yields the published roots and
/// exactly the happy-path proofs of the vectors.
#[test]
fn our_tree_reproduces_the_rfc6962_roots_and_proofs() {
    let t: Value = serde_json::from_str(&read("merkle/rfc6962-tree.json")).unwrap();
    let leaves: Vec<Vec<u8>> = t["leaves_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hex::decode(h.as_str().unwrap()).unwrap())
        .collect();
    let roots: Vec<String> = t["roots_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    let mut tree = Tree::new();
    assert_eq!(hex::encode(tree.root()), roots[0]);
    for (i, l) in leaves.iter().enumerate() {
        tree.push(leaf_hash(l));
        assert_eq!(hex::encode(tree.root()), roots[i + 1], "size {}", i + 1);
    }
    for f in vector_files("inclusion")
        .into_iter()
        .filter(|f| f.ends_with("happy-path.json"))
    {
        let v: Value = serde_json::from_str(&fs::read_to_string(&f).unwrap()).unwrap();
        let (idx, size) = (
            v["leafIdx"].as_u64().unwrap(),
            v["treeSize"].as_u64().unwrap(),
        );
        if size > 8 {
            continue;
        }
        assert_eq!(tree.leaf(idx).unwrap(), hash(&v["leafHash"]));
        assert_eq!(
            tree.inclusion_proof(idx, size).unwrap(),
            proof(&v["proof"]).unwrap(),
            "{}",
            f.display()
        );
    }
    for f in vector_files("consistency")
        .into_iter()
        .filter(|f| f.ends_with("happy-path.json"))
    {
        let v: Value = serde_json::from_str(&fs::read_to_string(&f).unwrap()).unwrap();
        let (s1, s2) = (v["size1"].as_u64().unwrap(), v["size2"].as_u64().unwrap());
        if s2 > 8 {
            continue;
        }
        assert_eq!(tree.root_at(s1).unwrap(), hash(&v["root1"]));
        assert_eq!(
            tree.consistency_proof(s1, s2).unwrap(),
            proof(&v["proof"]).unwrap(),
            "{}",
            f.display()
        );
    }
}

#[test]
fn signed_note_peter_neumann_example_verifies_and_signing_reproduces_it() {
    let skey = read("notes/peter-neumann.skey");
    let vkey = read("notes/peter-neumann.vkey");
    let note = read("notes/peter-neumann.note");
    let verifier = NoteVerifier::from_vkey(vkey.trim()).unwrap();
    assert_eq!(verifier.name(), "PeterNeumann");
    assert_eq!(verifier.key_id(), 0xc74f20a3);
    assert_eq!(verifier.to_vkey(), vkey.trim());
    let signer = NoteSigner::from_skey(skey.trim()).unwrap();
    assert_eq!(signer.verifier(), verifier);
    assert_eq!(&*signer.to_skey(), skey.trim());
    let body = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    // Ed25519 is deterministic: our signature is the published one.
    assert_eq!(SignedNote::sign(body, &signer, 0).unwrap().text, note);
    assert_eq!(SignedNote { text: note.clone() }.body().unwrap(), body);
    // It is not a checkpoint, but the signature is what open_checkpoint checks first.
    assert!(matches!(
        open_checkpoint(&note, "PeterNeumann", &verifier),
        Err(NoteError::BadCheckpoint(_))
    ));
    let tampered = note.replace("answer", "Answer");
    assert!(matches!(
        open_checkpoint(&tampered, "PeterNeumann", &verifier),
        Err(NoteError::BadSignature(_))
    ));
}

#[test]
fn signed_note_spec_example_verifies() {
    let verifier = NoteVerifier::from_vkey(read("notes/example-com-foo.vkey").trim()).unwrap();
    let note = read("notes/example-com-foo.note");
    // Body is one line: not a checkpoint, but the signature must verify first.
    assert!(matches!(
        open_checkpoint(&note, "x", &verifier),
        Err(NoteError::BadCheckpoint(_))
    ));
    let wrong = NoteVerifier::from_vkey(read("notes/peter-neumann.vkey").trim()).unwrap();
    assert!(matches!(
        open_checkpoint(&note, "x", &wrong),
        Err(NoteError::NotSigned(_))
    ));
}

#[test]
fn real_checkpoint_cosignatures_from_public_witnesses_verify() {
    let note = read("notes/arche2025h1.note");
    let witnesses: Vec<NoteVerifier> = read("notes/arche2025h1.witnesses")
        .lines()
        .map(|l| NoteVerifier::from_vkey(l).unwrap())
        .collect();
    assert!(witnesses.iter().all(|w| w.kind() == KeyKind::CosignatureV1));
    let names = cosignatures(&note, &witnesses);
    assert_eq!(
        names,
        vec![
            "transparency.dev/DEV:witness-little-garden",
            "witness1.smartit.nu/witness1",
            "remora.n621.de",
            "witness.stagemole.eu"
        ]
    );
    let c = verify_cosignature(&note, &witnesses[2]).unwrap();
    assert!(
        c.timestamp > 1_700_000_000 && c.timestamp < 2_000_000_000,
        "{}",
        c.timestamp
    );
    let cp = Checkpoint::parse_body(SignedNote { text: note.clone() }.body().unwrap()).unwrap();
    assert_eq!(cp.origin, "arche2025h1.staging.ct.transparency.dev");
    assert_eq!(cp.size, 1_432_088_532);
    assert_eq!(cp.body(), SignedNote { text: note.clone() }.body().unwrap());
    // A different size: no cosignature verifies any more.
    let moved = note.replace("1432088532", "1432088533");
    assert!(cosignatures(&moved, &witnesses).is_empty());
    // A witness key we do not know is ignored; a note signer key is not a cosigner.
    let other = NoteSigner::generate_cosigner("remora.n621.de")
        .unwrap()
        .verifier();
    assert!(cosignatures(&note, &[other]).is_empty());
}

#[test]
fn our_cosignatures_follow_the_spec_message() {
    let log = NoteSigner::generate("example.com/log").unwrap();
    let witness = NoteSigner::generate_cosigner("example.com/witness").unwrap();
    let cp = Checkpoint {
        origin: "example.com/log".into(),
        size: 3,
        root: [7u8; 32],
    };
    let note = SignedNote::sign(&cp.body(), &log, 0).unwrap();
    let line = witness.sign_line(&cp.body(), 1_679_315_147).unwrap();
    let cosigned = note.with_signature_line(&line).unwrap();
    assert_eq!(cosigned.with_signature_line(&line).unwrap(), cosigned);
    assert_eq!(
        open_checkpoint(&cosigned.text, "example.com/log", &log.verifier()).unwrap(),
        cp
    );
    let v = verify_cosignature(&cosigned.text, &witness.verifier()).unwrap();
    assert_eq!(v.timestamp, 1_679_315_147);
    // The signature is Ed25519 over "cosignature/v1\ntime <t>\n" || body.
    let b64 = line.trim_end().rsplit(' ').next().unwrap();
    let raw = B64.decode(b64).unwrap();
    assert_eq!(raw.len(), 4 + 8 + 64);
    assert_eq!(
        u32::from_be_bytes(raw[..4].try_into().unwrap()),
        witness.verifier().key_id()
    );
    assert_eq!(
        u64::from_be_bytes(raw[4..12].try_into().unwrap()),
        1_679_315_147
    );
    let msg = format!("cosignature/v1\ntime 1679315147\n{}", cp.body());
    let vk = ed25519_from_vkey(&witness.verifier().to_vkey());
    let sig = ed25519_dalek::Signature::from_slice(&raw[12..]).unwrap();
    vk.verify_strict(msg.as_bytes(), &sig).unwrap();
    assert_eq!(
        open_checkpoint(&cosigned.text, "example.com/other", &log.verifier()).unwrap_err(),
        NoteError::WrongOrigin {
            expected: "example.com/other".into(),
            found: "example.com/log".into()
        }
    );
}

fn ed25519_from_vkey(vkey: &str) -> ed25519_dalek::VerifyingKey {
    let b64 = vkey.splitn(3, '+').nth(2).unwrap();
    let raw = B64.decode(b64).unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(raw[1..].try_into().unwrap()).unwrap()
}
