//! Writes the seed inputs of the fuzz targets into `fuzz/seeds/<target>/`:
//! valid inputs made with the crates' own writers, so each target starts
//! past its first checks. Run it again when a format changes:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```
//!
//! Tokens are signed with the fixed issuer key the `token_verify` target
//! pins, checkpoints with the fixed keys of `common/note_keys.rs`;
//! certificates come from a throwaway cell CA.

use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_audit::{AuditRecord, JournalId, JournalOptions, Outcome, RequestId};
use nitrile_audit::{FORMAT_VERSION, genesis_hash, record_hash};
use nitrile_logclient::leaf::{self, LeafV1};
use nitrile_logclient::protocol::{IngestBatch, IngestEntry, JournalRef};
use nitrile_tlog::{Checkpoint, SignedNote};
use nitrile_token::{CertThumbprint, ClaimsInput, SigningKey, TokenIssuer};
use time::macros::datetime;

// The target uses every key of it; the seeds are signed by two.
#[allow(dead_code)]
#[path = "../common/note_keys.rs"]
mod note_keys;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let now = datetime!(2030-01-01 00:00:00 UTC);
    let p = |s: &str| PrincipalId::parse(s).expect("valid principal");
    let r = |s: &str| ResourceId::parse(s).expect("valid resource");

    // token_verify: a token the target's verifier accepts, one for another
    // audience, and a bare claims payload.
    let pem = ed25519_dalek::SigningKey::from_bytes(&[7; 32])
        .to_pkcs8_pem(LineEnding::LF)
        .expect("a key encodes");
    let key = SigningKey::from_pkcs8_pem(&pem).expect("the key decodes");
    let issuer = TokenIssuer::new(p("nitrile://cell-1/service/tokend"), key);
    let mint = |audience: &str, ops: Vec<Operation>, res: Vec<ResourceId>| {
        let input = ClaimsInput {
            subject: p("nitrile://cell-1/operator/alice"),
            group: Name::new("oncall").expect("valid name"),
            audience: Audience::new(audience).expect("valid audience"),
            operations: ops,
            resources: res,
            cert: CertThumbprint::from_sha256([0xc0; 32]),
            lifetime: None,
        };
        issuer
            .mint(input, now, &mut rand_core::OsRng)
            .expect("minting a seed token")
    };
    let (token, claims) = mint("h1", vec![Operation::HostDescribe], vec![r("host/h1")]);
    let (other, _) = mint(
        "h2",
        vec![Operation::HostDrain, Operation::HostUndrain],
        vec![r("host/h2"), r("host/h3")],
    );
    let dir = seeds(&root, "token_verify");
    write(&dir, "token-h1", token.as_bytes());
    write(&dir, "token-h2", other.as_bytes());
    write(&dir, "claims.json", &claims.to_json());

    // token_request
    let dir = seeds(&root, "token_request");
    write(
        &dir,
        "minimal.json",
        br#"{"operations":["host.describe"],"resources":["host/h1"],"audience":"h1"}"#,
    );
    write(
        &dir,
        "full.json",
        br#"{"operations":["host.drain","host.undrain"],"resources":["host/h1","host/h2"],"audience":"h1","group":"oncall","lifetime_secs":300}"#,
    );

    // principal_and_resource
    let dir = seeds(&root, "principal_and_resource");
    for (name, text) in [
        ("operator", "nitrile://cell-1/operator/alice"),
        ("service", "nitrile://cell-1/service/tokend"),
        ("host", "host/h1"),
        ("instance", "instance/i-7"),
        ("name", "on-call"),
    ] {
        write(&dir, name, text.as_bytes());
    }

    // peer_identity: a CA certificate, a host's and an operator's.
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let cell = Name::new("cell-1").expect("valid name");
    let ca = nitrile_pki::CellCa::init_or_load(tmp.path(), &cell, now).expect("a cell CA");
    let dir = seeds(&root, "peer_identity");
    write(&dir, "ca.der", ca.cert_der());
    for (name, principal) in [
        ("host.der", "nitrile://cell-1/host/h1"),
        ("operator.der", "nitrile://cell-1/operator/alice"),
    ] {
        let issued = ca.issue(&p(principal), None, now).expect("issuing");
        write(&dir, name, &issued.cert_der);
    }

    // audit_record
    let source = p("nitrile://cell-1/host/h1");
    let id = RequestId::from_bytes([0xab; 16]);
    let refusal = AuditRecord::refusal(now, source.clone(), id, RefusalStep::Token, "expired")
        .with_principal(p("nitrile://cell-1/operator/alice"))
        .with_operations([Operation::HostDrain])
        .with_resources([r("host/h1")])
        .with_audience(Audience::new("h1").expect("valid audience"));
    let outcome = AuditRecord::outcome(now, source.clone(), id, Outcome::Executed)
        .with_detail(serde_json::json!({"bytes": 512, "version": "1.2.3"}));
    let dir = seeds(&root, "audit_record");
    write(&dir, "refusal.json", &refusal.encode().expect("encodes"));
    write(&dir, "outcome.json", &outcome.encode().expect("encodes"));

    // journal: mode byte 1 (raw file) then a real journal of three records;
    // mode byte 0 then bytes the target turns into a journal.
    let path = tmp.path().join("journal");
    let journal = JournalOptions::new()
        .journal_id(JournalId([0x11; 16]))
        .danger_no_sync(true)
        .open(&path, &source.to_string())
        .expect("creating a journal");
    for record in [&refusal, &outcome, &refusal] {
        journal
            .append(&record.encode().expect("encodes"))
            .expect("appending");
    }
    drop(journal);
    let mut raw = vec![1u8];
    raw.extend(fs::read(&path).expect("reading the journal"));
    let dir = seeds(&root, "journal");
    write(&dir, "raw", &raw);
    let mut generated = vec![0u8];
    generated.extend((0..=255u8).cycle().take(400));
    write(&dir, "generated", &generated);

    // quota_and_review_files: quotas, reviewer set and alice's signature,
    // separated by zero bytes.
    let mut input = include_bytes!("../../entitlements/quotas.toml").to_vec();
    input.push(0);
    let reviewers = [("alice", [0xa1; 32]), ("bob", [0xb0; 32])];
    for (name, secret) in reviewers {
        let public = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
        input
            .extend(format!("[[reviewer]]\nname = \"{name}\"\npublic_key = \"{b64}\"\n\n").bytes());
    }
    input.push(0);
    input.extend(
        format!(
            "nitrile-entitlements-signature-v1\nreviewer: alice\ndigest: @DIGEST@\nsignature: {}\n",
            "A".repeat(86) + "=="
        )
        .bytes(),
    );
    write(&seeds(&root, "quota_and_review_files"), "sample", &input);

    // checkpoint_note: mode byte 1 and a checkpoint signed by the log and
    // cosigned by the witness, or the log's vkey; mode byte 0, the signing
    // header (flags, timestamp, flip offset, mask) and a checkpoint text.
    let checkpoint = Checkpoint {
        origin: note_keys::ORIGIN.to_owned(),
        size: 42,
        root: [0xab; 32],
    };
    let body = checkpoint.body();
    let witness = note_keys::witness();
    let note = SignedNote::sign(&body, &note_keys::log(), 0)
        .and_then(|n| n.with_signature_line(&witness.sign_line(&body, 1_900_000_000)?))
        .expect("signing the seed checkpoint");
    let dir = seeds(&root, "checkpoint_note");
    write(
        &dir,
        "cosigned",
        &[b"\x01".as_slice(), note.text.as_bytes()].concat(),
    );
    write(
        &dir,
        "vkey",
        &[
            b"\x01".as_slice(),
            note_keys::log().verifier().to_vkey().as_bytes(),
        ]
        .concat(),
    );
    for (name, flags) in [("signed", 0u8), ("cosigned-stranger", 5), ("flipped", 3)] {
        let mut input = vec![0u8, flags];
        input.extend(1_900_000_000u64.to_be_bytes());
        input.extend(60u16.to_be_bytes());
        input.push(0x01);
        input.extend(format!("{body}extension line\n").bytes());
        write(&dir, name, &input);
    }

    // admin_request: a request line, a newline, the body.
    let dir = seeds(&root, "admin_request");
    for (name, text) in [
        ("describe", "GET /v1/host\n"),
        ("drain", "POST /v1/host/drain\n{}"),
        ("update", "POST /v1/host/update\n{\"version\":\"1.4.0\"}"),
        ("list", "GET /v1/instances\n"),
        (
            "launch",
            concat!(
                "POST /v1/instances\n",
                r#"{"instance":"web1","image":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","#,
                r#""vcpus":2,"memory_mib":256,"volumes":["data"],"scratch_mib":64}"#
            ),
        ),
        (
            "volume-create",
            concat!(
                "POST /v1/volumes\n",
                r#"{"volume":"data","size_mib":64,"kms_key":"default"}"#
            ),
        ),
        ("volume-list", "GET /v1/volumes\n"),
        (
            "volume-attach",
            "POST /v1/volumes/data/attach\n{\"instance\":\"web1\"}",
        ),
        ("volume-delete", "DELETE /v1/volumes/data\n"),
        ("stop", "POST /v1/instances/web1/stop\n"),
        ("terminate", "DELETE /v1/instances/web1\n"),
        (
            "launch-network",
            concat!(
                "POST /v1/instances\n",
                r#"{"instance":"acme--web1","image":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","#,
                r#""vcpus":1,"memory_mib":256,"network":{"customer":"acme","vni":100,"address":"10.80.0.10","#,
                r#""prefix_len":24,"mac":"02:4e:00:64:00:0a","ssh_public_keys":["ssh-ed25519 AAAA k"],"#,
                r#""user_data":"IyEvYmluL3NoCg==","publish":[22]}}"#
            ),
        ),
        (
            "network-update",
            concat!(
                "POST /v1/network\n",
                r#"{"peers":[],"routes":[{"vni":100,"address":"10.80.0.11","host":"h2"}]}"#
            ),
        ),
    ] {
        write(&dir, name, text.as_bytes());
    }

    // ingest_batch: mode byte 1 and a genuine batch of three records, or
    // the log leaf of its first record; mode byte 0 then bytes the target
    // turns into a journal and a batch.
    let id = JournalId([0x22; 16]);
    let journal = JournalRef {
        source: source.to_string(),
        journal_id: id,
        genesis: genesis_hash(FORMAT_VERSION, &id, source.to_string().as_bytes()),
    };
    let mut prev = journal.genesis;
    let mut entries = Vec::new();
    for (seq, record) in (1u64..).zip([&refusal, &outcome, &refusal]) {
        let payload = record.encode().expect("encodes");
        let hash = record_hash(&prev, seq, &payload);
        prev = hash;
        entries.push(IngestEntry { seq, hash, payload });
    }
    let first = leaf::encode(&LeafV1 {
        source: journal.source.clone(),
        journal_id: id,
        seq: 1,
        hash: entries[0].hash,
        payload: entries[0].payload.clone(),
    })
    .expect("a leaf encodes");
    let batch = IngestBatch {
        journal,
        entries,
        head: Some(3),
    };
    let dir = seeds(&root, "ingest_batch");
    let json = serde_json::to_vec(&batch).expect("a batch serializes");
    write(&dir, "batch.json", &[b"\x01".as_slice(), &json].concat());
    write(&dir, "leaf", &[b"\x01".as_slice(), &first].concat());
    let mut generated = vec![0u8];
    generated.extend((0..=255u8).cycle().take(600));
    write(&dir, "generated", &generated);

    // vm_spec: a spec with every section, and one with none of the optional ones.
    let dir = seeds(&root, "vm_spec");
    let image = serde_json::json!({
        "digest": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "kernel": "/var/lib/nitrile/images/k/vmlinux",
        "initramfs": "/var/lib/nitrile/images/k/initramfs.cpio",
        "cmdline": "console=ttyS0 reboot=t panic=-1"
    });
    let full = serde_json::json!({
        "instance": "web1",
        "image": image,
        "vcpus": 2,
        "memory_mib": 256,
        "volumes": [
            {"id": "data", "path": "/var/lib/nitrile/volumes/data.img", "size_mib": 64},
            {"id": "logs", "path": "/var/lib/nitrile/volumes/logs.img", "size_mib": 8, "read_only": true}
        ],
        "scratch": {"path": "/var/lib/nitrile/instances/web1/scratch.img", "size_mib": 64},
        "vsock": {"guest_cid": 3, "uds_path": "/run/nitrile/web1.vsock"},
        "net": {"tap": "tap-web1", "netns": "/run/netns/nitrile-dp-h1", "mac": "02:4e:00:64:00:0a"}
    });
    let minimal = serde_json::json!({
        "instance": "web1",
        "image": image,
        "vcpus": 1,
        "memory_mib": 64
    });
    write(
        &dir,
        "full.json",
        &serde_json::to_vec_pretty(&full).expect("json"),
    );
    write(
        &dir,
        "minimal.json",
        &serde_json::to_vec(&minimal).expect("json"),
    );

    // kms_blobs: a wrapped and a sealed key made by the key service's core
    // in a throwaway store, a recipient key and a key name, each behind the
    // byte that picks its decoder.
    let dir = seeds(&root, "kms_blobs");
    let store = tempfile::tempdir().expect("a temporary directory");
    let state = store.path().join("kms");
    let kms = nitrile_kms::Kms::open(&state).expect("a fresh store opens");
    let key = nitrile_kms::KeyName::new("default").expect("a valid name");
    kms.create_key(&key, &p("nitrile://local/service/kms"), now)
        .expect("a key is made");
    let volume = Name::new("data").expect("a valid name");
    let generated = kms
        .generate_volume_key(&volume, &key, now)
        .expect("a volume key is made");
    let wrapped = generated.wrapped.encode();
    let recipient = nitrile_kms::Recipient::generate().expect("randomness");
    let sealed = kms
        .unwrap_sealed(&volume, &wrapped, recipient.public_key(), now)
        .expect("the key is released")
        .encode();
    write(&dir, "wrapped", &[b"\x00".as_slice(), &wrapped].concat());
    write(&dir, "sealed", &[b"\x01".as_slice(), &sealed].concat());
    write(
        &dir,
        "recipient",
        &[b"\x02".as_slice(), recipient.public_key().as_bytes()].concat(),
    );
    write(&dir, "key-name", b"\x03kms-key/default");
    // vm_key_exchange: the two sealed keys a VMM of two volumes is relayed
    // (well formed, though sealed to no one), one sealed key alone, and a
    // launch plan.
    let dir = seeds(&root, "vm_key_exchange");
    let mut sealed = b"NKSK\x01\x00\x20\x00\x01\x00\x02".to_vec();
    sealed.resize(nitrile_vmm::unlock::SEALED_KEY_LEN, 0x5a);
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&sealed)
    };
    let relay = format!(
        "{{\"op\":\"sealed_key\",\"volume\":0,\"key\":\"{b64}\"}}\n{{\"op\":\"sealed_key\",\"volume\":1,\"key\":\"{b64}\"}}\n"
    );
    write(&dir, "relay", relay.as_bytes());
    write(&dir, "sealed", &sealed);
    let plan = serde_json::json!({
        "qemu": "/usr/bin/qemu-system-x86_64",
        "qemu_img": "/usr/bin/qemu-img",
        "args": ["-M", "microvm", "-S"],
        "spec": serde_json::to_string(&minimal).expect("json"),
    });
    write(&dir, "plan.json", &serde_json::to_vec(&plan).expect("json"));

    // attestation_document: a document of the Nitro layout as a host makes
    // it (its signature and certificates are filler: the target's second
    // check accepts any signature), tagged and untagged, and a quote's
    // shape.
    let dir = seeds(&root, "attestation_document");
    let pcrs = nitrile_attest::Pcrs(
        [(4u8, [0xaa; 32]), (11, [0xbb; 32]), (15, [0xcc; 32])]
            .into_iter()
            .collect(),
    );
    let payload = nitrile_attest::cose::payload(
        "h1",
        1_893_456_000_000,
        &pcrs,
        ca.cert_der(),
        &[ca.cert_der().to_vec()],
        Some(&[0x02; 32]),
        None,
        Some(&[0x5a; 32]),
    );
    let doc = nitrile_attest::cose::sign1(&payload, &[0x07; 96]);
    write(&dir, "nitro-layout", &doc);
    write(&dir, "untagged", doc.get(1..).unwrap_or_default());

    // host_references: a release's references and an image's reference.
    let dir = seeds(&root, "host_references");
    let reference = nitrile_release::HostReference::new(pcrs.0.clone()).expect("valid");
    let refs = nitrile_release::HostReferences::new(
        [
            (Name::new("h1").expect("name"), reference.clone()),
            (Name::new("h2").expect("name"), reference),
        ]
        .into_iter()
        .collect(),
    )
    .expect("valid");
    write(&dir, "two-hosts", &refs.to_bytes());
    let image = serde_json::json!({
        "pcr4": "aa".repeat(32),
        "pcr11": "bb".repeat(32),
        "pcr15": "cc".repeat(32),
        "pcr15_events": [{"name": "hostd-config", "sha256": "dd".repeat(32)}],
        "annotations": {"host": "h1"},
    });
    write(&dir, "reference.json", &serde_json::to_vec_pretty(&image).expect("json"));
}

fn seeds(root: &Path, target: &str) -> PathBuf {
    let dir = root.join(target);
    fs::create_dir_all(&dir).expect("creating the seed directory");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("writing a seed");
}
