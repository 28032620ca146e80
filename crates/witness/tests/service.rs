//! The witness over real mTLS: `WitnessService` serving a configuration
//! file's witness, `WitnessClient` as the log uses it.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use nitrile_api::{Name, PrincipalId};
use nitrile_pki::CellCa;
use nitrile_pki::tls::{self, CaRoots, TlsIdentity};
use nitrile_tlog::{FileStorage, Log, NoteSigner, NoteVerifier, cosignatures};
use nitrile_witness::{
    AddCheckpoint, SIZE_CONTENT_TYPE, Witness, WitnessClient, WitnessConfig, WitnessError,
    WitnessService, write_signing_key,
};

const ORIGIN: &str = "local.nitrile/log";
const WITNESS_KEY: &str = "local.nitrile/witness/w1";

struct Cell {
    dir: tempfile::TempDir,
    ca: CellCa,
}

impl Cell {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = CellCa::init_or_load(&dir.path().join("ca"), &Name::new("local").unwrap(), now)
            .unwrap();
        Self { dir, ca }
    }

    fn issue(&self, uri: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let p = PrincipalId::parse(uri).unwrap();
        let issued = self
            .ca
            .issue(&p, None, time::OffsetDateTime::now_utc())
            .unwrap();
        let name = uri.rsplit('/').next().unwrap();
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}.key"));
        issued.write_files(&cert, &key).unwrap();
        (cert, key)
    }

    fn client_tls(&self, uri: &str) -> Arc<rustls::ClientConfig> {
        let (cert, key) = self.issue(uri);
        tls::client_config(
            &CaRoots::load(&self.dir.path().join("ca/ca.pem")).unwrap(),
            &TlsIdentity::load(&cert, &key).unwrap(),
        )
        .unwrap()
    }
}

fn write_config(cell: &Cell, log: &NoteVerifier) -> std::path::PathBuf {
    cell.issue("nitrile://local/service/w1");
    let state = cell.dir.path().join("witness");
    std::fs::create_dir_all(&state).unwrap();
    let key = Witness::generate_key(WITNESS_KEY).unwrap();
    write_signing_key(&state.join("cosigner.skey"), &key).unwrap();
    let config = format!(
        r#"
cell = "local"
name = "w1"
listen = "127.0.0.1:0"
state = "witness"
ca = "ca/ca.pem"
cert = "w1.pem"
key = "w1.key"

[[logs]]
origin = "{ORIGIN}"
vkey = "{}"
"#,
        log.to_vkey()
    );
    let path = cell.dir.path().join("witness.toml");
    std::fs::write(&path, config).unwrap();
    path
}

async fn start(config: &Path) -> (String, NoteVerifier, tokio::sync::oneshot::Sender<()>) {
    let config = WitnessConfig::load(config).unwrap();
    let service = WitnessService::open(&config).await.unwrap();
    let addr = service.local_addr().unwrap().to_string();
    let vkey = service.witness().verifier();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        service
            .serve(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (addr, vkey, tx)
}

fn new_log(dir: &Path, skey: &str) -> Log<FileStorage> {
    Log::open(
        FileStorage::open(dir).unwrap(),
        ORIGIN,
        NoteSigner::from_skey(skey).unwrap(),
    )
    .unwrap()
}

fn grow(log: &mut Log<FileStorage>, n: u64, tag: &str) -> String {
    let start = log.size();
    let entries: Vec<Vec<u8>> = (start..start + n)
        .map(|i| format!("{tag} {i}").into_bytes())
        .collect();
    log.append(&entries).unwrap();
    log.prepare_checkpoint(1_750_000_000_000).unwrap().text
}

fn with_lines(note: &str, lines: &[String]) -> String {
    let mut out = note.to_owned();
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_witness_cosigns_over_mtls_and_refuses_per_the_spec() {
    let cell = Cell::new();
    let logs = tempfile::tempdir().unwrap();
    let skey = NoteSigner::generate(ORIGIN).unwrap().to_skey();
    let mut log = new_log(&logs.path().join("a"), &skey);
    let config = write_config(&cell, &log_verifier(&skey));
    let (addr, wvkey, stop) = start(&config).await;
    let witness = PrincipalId::parse("nitrile://local/service/w1").unwrap();
    let tls = cell.client_tls("nitrile://local/service/logd");
    let mut client = WitnessClient::connect(&addr, &witness, tls.clone())
        .await
        .unwrap();

    // First checkpoint, then one consistent with it.
    let note = grow(&mut log, 10, "a");
    let lines = client.add_checkpoint(0, &[], &note).await.unwrap();
    assert_eq!(
        cosignatures(&with_lines(&note, &lines), std::slice::from_ref(&wvkey)),
        vec![WITNESS_KEY.to_owned()]
    );
    let note = grow(&mut log, 6, "a");
    let proof = log.consistency_proof(10, 16).unwrap();
    let lines = client.add_checkpoint(10, &proof, &note).await.unwrap();
    let full = with_lines(&note, &lines);
    assert_eq!(cosignatures(&full, std::slice::from_ref(&wvkey)).len(), 1);
    log.publish(&nitrile_tlog::SignedNote { text: full })
        .unwrap();

    // 409 with the recorded size.
    let note = grow(&mut log, 4, "a");
    match client.add_checkpoint(0, &[], &note).await {
        Err(WitnessError::Conflict { recorded: 16 }) => {}
        other => panic!("expected 409 with 16, got {other:?}"),
    }
    // 422 on a bad proof.
    let mut proof = log.consistency_proof(16, 20).unwrap();
    proof[0][0] ^= 0x80;
    assert!(matches!(
        client.add_checkpoint(16, &proof, &note).await,
        Err(WitnessError::Inconsistent { .. })
    ));
    // 403 on a forged signature (same origin, another key).
    let mut forged = new_log(
        &logs.path().join("forged"),
        &NoteSigner::generate(ORIGIN).unwrap().to_skey(),
    );
    let fnote = grow(&mut forged, 20, "a");
    assert!(matches!(
        client
            .add_checkpoint(16, &log.consistency_proof(16, 20).unwrap(), &fnote)
            .await,
        Err(WitnessError::BadSignature { .. })
    ));
    // 404 on an unknown log.
    let mut other = Log::open(
        FileStorage::open(logs.path().join("other")).unwrap(),
        "other.nitrile/log",
        NoteSigner::generate("other.nitrile/log").unwrap(),
    )
    .unwrap();
    let onote = grow(&mut other, 2, "o");
    assert!(matches!(
        client.add_checkpoint(0, &[], &onote).await,
        Err(WitnessError::UnknownLog { .. })
    ));

    // Split view: a twin log (same origin and key, other leaves) at the
    // recorded size 16 is reported as such.
    let mut twin = new_log(&logs.path().join("twin"), &skey);
    let tnote = grow(&mut twin, 16, "twin");
    match client.add_checkpoint(16, &[], &tnote).await {
        Err(WitnessError::SplitView { reason }) => {
            assert!(reason.contains("split view"), "{reason}")
        }
        other => panic!("expected a split view, got {other:?}"),
    }

    // The honest log goes on.
    let proof = log.consistency_proof(16, 20).unwrap();
    let lines = client.add_checkpoint(16, &proof, &note).await.unwrap();
    assert_eq!(
        cosignatures(&with_lines(&note, &lines), std::slice::from_ref(&wvkey)).len(),
        1
    );

    // A malformed body is a 400; the latest checkpoint is served to monitors.
    let mut raw = nitrile_net::Client::connect(&addr, &witness, tls)
        .await
        .unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri("/add-checkpoint")
        .body(Bytes::from_static(b"old 01\n\nx\n"))
        .unwrap();
    assert_eq!(raw.send(req).await.unwrap().status, 400);
    let req = http::Request::builder()
        .method("POST")
        .uri("/add-checkpoint")
        .body(Bytes::from(
            AddCheckpoint {
                old_size: 3,
                proof: vec![],
                note: note.clone(),
            }
            .encode(),
        ))
        .unwrap();
    let resp = raw.send(req).await.unwrap();
    assert_eq!(resp.status, 409);
    assert_eq!(resp.headers["content-type"], SIZE_CONTENT_TYPE);
    assert_eq!(&resp.body[..], b"20\n");
    let path = format!("/{}/checkpoint", nitrile_witness::origin_hash(ORIGIN));
    let resp = raw.get_json(&path).await.unwrap();
    assert_eq!(resp.status, 200);
    let served = String::from_utf8(resp.body.to_vec()).unwrap();
    assert!(served.starts_with(&format!("{ORIGIN}\n20\n")));
    assert_eq!(cosignatures(&served, std::slice::from_ref(&wvkey)).len(), 1);

    // Restart on the same state: it remembers size 20.
    let _ = stop.send(());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (addr, wvkey2, _stop) = start(&config).await;
    assert_eq!(wvkey2, wvkey);
    let tls = cell.client_tls("nitrile://local/service/logd2");
    let mut client = WitnessClient::connect(&addr, &witness, tls).await.unwrap();
    let note = grow(&mut log, 1, "a");
    assert!(matches!(
        client.add_checkpoint(0, &[], &note).await,
        Err(WitnessError::Conflict { recorded: 20 })
    ));
    let lines = client
        .add_checkpoint(20, &log.consistency_proof(20, 21).unwrap(), &note)
        .await
        .unwrap();
    assert_eq!(cosignatures(&with_lines(&note, &lines), &[wvkey]).len(), 1);
}

fn log_verifier(skey: &str) -> NoteVerifier {
    NoteSigner::from_skey(skey).unwrap().verifier()
}

#[tokio::test]
async fn the_service_refuses_a_certificate_of_another_principal() {
    let cell = Cell::new();
    let skey = NoteSigner::generate(ORIGIN).unwrap().to_skey();
    let config_path = write_config(&cell, &log_verifier(&skey));
    let mut config = WitnessConfig::load(&config_path).unwrap();
    config.name = Name::new("w2").unwrap();
    assert!(matches!(
        WitnessService::open(&config).await,
        Err(nitrile_witness::ServiceError::WrongCertificate { .. })
    ));
}

#[tokio::test]
async fn the_service_refuses_a_readable_signing_key() {
    use std::os::unix::fs::PermissionsExt as _;
    let cell = Cell::new();
    let skey = NoteSigner::generate(ORIGIN).unwrap().to_skey();
    let config_path = write_config(&cell, &log_verifier(&skey));
    let config = WitnessConfig::load(&config_path).unwrap();
    let key = config.signing_key_path();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        WitnessService::open(&config).await,
        Err(nitrile_witness::ServiceError::KeyFile { .. })
    ));
}
