//! Claim 5 at the token service, over real mTLS on loopback: who gets a
//! token, for what, how many; and claim 6: every request, refused ones
//! included, is in the token service's journal before the answer.

use std::path::Path;
use std::sync::Arc;

use nitrile_api::wire::{RefusalStep, TokenRequest, TokenResponse};
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_audit::{AuditRecord, JournalReader, Outcome, RecordKind};
use nitrile_cell::{CellLayout, bootstrap};
use nitrile_net::{Client, NetError, Response};
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config, danger};
use nitrile_pki::{CellCa, PeerIdentity};
use nitrile_policy::ReviewerKey;
use nitrile_token::{Clock, FixedClock, Request, Verifier};
use nitrile_tokend::{IssuerFile, KeyRing, Tokend, TokendConfig};
use time::{Duration, OffsetDateTime};

fn p(s: &str) -> PrincipalId {
    PrincipalId::parse(s).unwrap()
}

struct Cell {
    _dir: tempfile::TempDir,
    layout: CellLayout,
    cell: Name,
    clock: Arc<FixedClock>,
}

impl Cell {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:0", now).unwrap();
        Self {
            _dir: dir,
            layout,
            cell,
            clock: Arc::new(FixedClock::new(now)),
        }
    }

    /// Rewrites a file of the bundle and has both local reviewers sign it.
    fn edit_bundle(&self, file: &str, edit: impl FnOnce(String) -> String) {
        let path = self.layout.entitlements_dir().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(text)).unwrap();
        self.sign_bundle();
    }

    /// Has both local reviewers sign the bundle as it is.
    fn sign_bundle(&self) {
        for name in ["reviewer-1", "reviewer-2"] {
            let key = ReviewerKey::load(
                &self.layout.reviewer_keys_dir().join(format!("{name}.key")),
                Name::new(name).unwrap(),
            )
            .unwrap();
            key.sign_dir(&self.layout.entitlements_dir()).unwrap();
        }
    }

    fn config(&self) -> TokendConfig {
        let me = p("nitrile://local/service/tokend");
        let (cert, key) = self.layout.cert_and_key(&me);
        TokendConfig {
            cell: self.cell.clone(),
            state_dir: self.layout.tokend_dir(),
            ca: self.layout.ca_cert(),
            cert,
            key,
            entitlements: self.layout.entitlements_dir(),
            reviewers: self.layout.reviewers_file(),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            max_token_lifetime_secs: None,
            logd: None,
        }
    }

    async fn start(&self) -> Running {
        self.start_with(&self.config()).await
    }

    async fn start_with(&self, config: &TokendConfig) -> Running {
        let tokend = Tokend::open_with_clock(config, self.clock.clone())
            .await
            .unwrap();
        let addr = tokend.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tokend.serve(async move {
            let _ = stopped.await;
        }));
        Running {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn identity(&self, who: &str) -> TlsIdentity {
        let (cert, key) = self
            .layout
            .cert_and_key(&p(&format!("nitrile://local/{who}")));
        TlsIdentity::load(&cert, &key).unwrap()
    }

    fn roots(&self) -> CaRoots {
        CaRoots::load(&self.layout.ca_cert()).unwrap()
    }

    async fn client(&self, running: &Running, who: &str) -> Client {
        let tls = client_config(&self.roots(), &self.identity(who)).unwrap();
        Client::connect(&running.addr, &p("nitrile://local/service/tokend"), tls)
            .await
            .unwrap()
    }

    fn journal(&self) -> Vec<AuditRecord> {
        JournalReader::open(self.layout.tokend_journal())
            .unwrap()
            .map(|e| e.unwrap().record().unwrap())
            .collect()
    }

    fn verifier(&self, host: &str) -> Verifier {
        let keys = IssuerFile::load(&KeyRing::issuer_file_path(&self.layout.tokend_dir())).unwrap();
        Verifier::new(keys, Audience::new(host).unwrap())
    }
}

struct Running {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), nitrile_tokend::TokendError>>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn request(ops: &[Operation], resources: &[&str], audience: &str) -> TokenRequest {
    TokenRequest {
        operations: ops.to_vec(),
        resources: resources
            .iter()
            .map(|r| ResourceId::parse(r).unwrap())
            .collect(),
        audience: Audience::new(audience).unwrap(),
        group: None,
        lifetime_secs: None,
    }
}

async fn ask(client: &mut Client, req: &TokenRequest) -> Response {
    client.post_json("/v1/tokens", req).await.unwrap()
}

/// Asserts a refusal answer and that the journal's last record is that
/// refusal, with the step, caller and request.
fn assert_refused(cell: &Cell, resp: &Response, status: u16, step: RefusalStep, who: &str) {
    assert_eq!(resp.status.as_u16(), status, "{:?}", resp.body);
    let refusal = resp.refusal().expect("refusal body");
    assert_eq!(refusal.step, step);
    let records = cell.journal();
    let last = records.last().expect("nothing journaled");
    assert_eq!(
        refusal.audit_seq,
        Some(records.len() as u64),
        "refusal names its record"
    );
    assert_eq!(last.kind, RecordKind::Refusal);
    assert_eq!(last.step, Some(step));
    assert_eq!(
        last.principal.as_ref().map(|p| p.uri()),
        Some(format!("nitrile://local/{who}"))
    );
    assert!(
        records
            .iter()
            .all(|r| r.token_id.is_none() || r.outcome == Some(Outcome::Granted)),
        "a token id outside a grant record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_granted_token_is_journaled_scoped_and_bound_to_the_callers_certificate() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let resp = ask(
        &mut alice,
        &request(&[Operation::HostDescribe], &["host/h1"], "h1"),
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let granted: TokenResponse = resp.json().unwrap();
    assert_eq!(granted.group, "oncall");

    let grant = cell.journal().pop().unwrap();
    assert_eq!(grant.kind, RecordKind::Outcome);
    assert_eq!(grant.outcome, Some(Outcome::Granted));
    assert_eq!(grant.token_id.as_deref(), Some(granted.token_id.as_str()));
    assert_eq!(grant.group.as_deref(), Some("oncall"));

    // The token verifies at h1 only for alice's certificate.
    let alice_cert = PeerIdentity::from_der(cell.identity("operator/alice").leaf(), &cell.cell)
        .unwrap()
        .cert_sha256;
    let bob_cert = PeerIdentity::from_der(cell.identity("operator/bob").leaf(), &cell.cell)
        .unwrap()
        .cert_sha256;
    let req = Request {
        operation: Operation::HostDescribe,
        resource: ResourceId::parse("host/h1").unwrap(),
    };
    let clock = FixedClock::new(cell.clock.now());
    cell.verifier("h1")
        .verify(&granted.token, &req, &alice_cert, &clock)
        .unwrap();
    let err = cell
        .verifier("h1")
        .verify(&granted.token, &req, &bob_cert, &clock)
        .unwrap_err();
    assert_eq!(err.code(), "certificate_mismatch");
    let err = cell
        .verifier("h2")
        .verify(&granted.token, &req, &alice_cert, &clock)
        .unwrap_err();
    assert_eq!(err.code(), "wrong_audience");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_operation_outside_the_entitlement_refused_and_journaled() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let resp = ask(
        &mut alice,
        &request(&[Operation::InstanceLaunch], &["host/h1"], "h1"),
    )
    .await;
    assert_refused(
        &cell,
        &resp,
        403,
        RefusalStep::Entitlement,
        "operator/alice",
    );
    // A host outside every resource set.
    let resp = ask(
        &mut alice,
        &request(&[Operation::HostDescribe], &["host/h9"], "h9"),
    )
    .await;
    assert_refused(
        &cell,
        &resp,
        403,
        RefusalStep::Entitlement,
        "operator/alice",
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_principal_with_no_entitlement_refused_and_journaled() {
    let cell = Cell::new();
    // eve has a valid certificate of the cell but is in no group.
    let ca = CellCa::load(&cell.layout.pki_dir(), &cell.cell, cell.clock.now()).unwrap();
    let eve = p("nitrile://local/operator/eve");
    let (cert, key) = cell.layout.cert_and_key(&eve);
    ca.issue(&eve, None, cell.clock.now())
        .unwrap()
        .write_files(&cert, &key)
        .unwrap();
    let running = cell.start().await;
    let mut client = cell.client(&running, "operator/eve").await;
    let resp = ask(
        &mut client,
        &request(&[Operation::HostDescribe], &["host/h1"], "h1"),
    )
    .await;
    assert_refused(&cell, &resp, 403, RefusalStep::Entitlement, "operator/eve");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_quota_exhausted_then_freed_after_the_window_and_durable_across_restart() {
    let cell = Cell::new();
    cell.edit_bundle("quotas.toml", |t| {
        t.replacen(
            "operation = \"host.drain\"\nmax_resources = 20",
            "operation = \"host.drain\"\nmax_resources = 1",
            1,
        )
    });
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let drain = |h: &str| request(&[Operation::HostDrain], &[&format!("host/{h}")], h);
    assert_eq!(ask(&mut alice, &drain("h1")).await.status.as_u16(), 200);
    // The same host again does not count twice.
    assert_eq!(ask(&mut alice, &drain("h1")).await.status.as_u16(), 200);
    let resp = ask(&mut alice, &drain("h2")).await;
    assert_refused(&cell, &resp, 429, RefusalStep::Quota, "operator/alice");
    let refusal = resp.refusal().unwrap();
    assert!(
        refusal.quota.as_deref().unwrap().contains("host.drain"),
        "{refusal:?}"
    );
    let retry = refusal.retry_after_secs.expect("says when the quota frees");
    assert!(retry > 0 && retry <= 3600, "{retry}");
    assert_eq!(
        resp.headers.get("retry-after").unwrap().to_str().unwrap(),
        retry.to_string()
    );

    // Counters survive a restart of the token service.
    running.stop().await;
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let resp = ask(&mut alice, &drain("h2")).await;
    assert_refused(&cell, &resp, 429, RefusalStep::Quota, "operator/alice");

    // Once the window has passed, the quota is free again.
    cell.clock.advance(Duration::seconds(retry as i64 + 1));
    let resp = ask(&mut alice, &drain("h2")).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_bundle_signed_by_one_reviewer_is_refused_at_start() {
    let cell = Cell::new();
    std::fs::remove_file(
        cell.layout
            .entitlements_dir()
            .join("signatures/reviewer-2.sig"),
    )
    .unwrap();
    let err = Tokend::open(&cell.config()).await.unwrap_err();
    assert!(
        matches!(err, nitrile_tokend::TokendError::Entitlements { .. }),
        "{err}"
    );
    // A bundle changed after review is refused too.
    let cell = Cell::new();
    let path = cell.layout.entitlements_dir().join("oncall.cedar");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n// widened without review\n")).unwrap();
    let err = Tokend::open(&cell.config()).await.unwrap_err();
    assert!(
        matches!(err, nitrile_tokend::TokendError::Entitlements { .. }),
        "{err}"
    );
}

/// Every record since `before` is a TLS refusal that names no principal, and
/// there is at least one. (A client may dial again after the server dropped
/// the connection, so one attempt can be two refused handshakes.)
fn assert_tls_refusal_journaled(cell: &Cell, before: usize) {
    let records = cell.journal();
    assert!(records.len() > before, "handshake failure not journaled");
    for r in &records[before..] {
        assert_eq!(r.kind, RecordKind::Refusal);
        assert_eq!(r.step, Some(RefusalStep::Tls));
        assert!(r.principal.is_none());
    }
}

async fn wait_for_records(cell: &Cell, n: usize) {
    for _ in 0..200 {
        if cell.journal().len() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_certificate_from_another_ca_refused_at_tls_and_journaled() {
    let cell = Cell::new();
    let running = cell.start().await;
    let other = tempfile::tempdir().unwrap();
    let now = cell.clock.now();
    let rogue_ca = CellCa::init_or_load(other.path(), &cell.cell, now).unwrap();
    let issued = rogue_ca
        .issue(&p("nitrile://local/operator/alice"), None, now)
        .unwrap();
    let tls = client_config(&cell.roots(), &TlsIdentity::from_issued(&issued).unwrap()).unwrap();
    let before = cell.journal().len();
    let result = async {
        let mut c =
            Client::connect(&running.addr, &p("nitrile://local/service/tokend"), tls).await?;
        c.post_json(
            "/v1/tokens",
            &request(&[Operation::HostDescribe], &["host/h1"], "h1"),
        )
        .await
    }
    .await;
    let err: NetError = result.expect_err("a foreign certificate got an HTTP answer");
    // The server rejects the certificate after the client's half of the TLS 1.3
    // handshake: the client sees the alert, or, when the server's close races
    // the request, a broken exchange. Either way no HTTP answer came back.
    assert!(err.is_tls() || matches!(err, NetError::Http(_)), "{err}");
    wait_for_records(&cell, before + 1).await;
    assert_tls_refusal_journaled(&cell, before);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_tls12_refused_and_journaled() {
    let cell = Cell::new();
    let running = cell.start().await;
    let tls =
        danger::danger_client_config_tls12_only(&cell.roots(), &cell.identity("operator/alice"))
            .unwrap();
    let before = cell.journal().len();
    let result = Client::connect(&running.addr, &p("nitrile://local/service/tokend"), tls).await;
    let err = result.expect_err("TLS 1.2 accepted");
    assert!(err.is_tls(), "{err}");
    wait_for_records(&cell, before + 1).await;
    assert_tls_refusal_journaled(&cell, before);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_error_and_a_journal_record() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let resp = alice
        .post_json(
            "/v1/tokens",
            &serde_json::json!({"operations": ["host.shell"]}),
        )
        .await
        .unwrap();
    assert_refused(&cell, &resp, 400, RefusalStep::Request, "operator/alice");
    let resp = alice.get_json("/v1/secrets").await.unwrap();
    assert_refused(&cell, &resp, 404, RefusalStep::Request, "operator/alice");
    let mut long = request(&[Operation::HostDescribe], &["host/h1"], "h1");
    long.lifetime_secs = Some(16 * 60);
    let resp = ask(&mut alice, &long).await;
    assert_refused(&cell, &resp, 400, RefusalStep::Request, "operator/alice");
    running.stop().await;
}

/// Root only: the token service's state on a 256 KiB tmpfs that is then
/// filled, so the journal cannot be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_no_token_when_the_journal_cannot_be_written() {
    if !nix_is_root() {
        println!("SKIPPED: needs root to mount a small tmpfs");
        return;
    }
    let cell = Cell::new();
    let mnt = cell.layout.tokend_dir();
    std::fs::create_dir_all(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    if !status.success() {
        println!("SKIPPED: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let describe = request(&[Operation::HostDescribe], &["host/h1"], "h1");
    assert_eq!(ask(&mut alice, &describe).await.status.as_u16(), 200);
    let granted_before = cell.journal().len();
    // Fill the filesystem.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    use std::io::Write;
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    // The last page of the journal may still hold a few records; keep
    // asking until the journal is out of room. Every token answered before
    // that is journaled.
    let mut resp = ask(&mut alice, &describe).await;
    let mut granted = 0;
    while resp.status.as_u16() == 200 && granted < 64 {
        granted += 1;
        resp = ask(&mut alice, &describe).await;
    }
    assert_eq!(resp.status.as_u16(), 503, "{:?}", resp.body);
    let refusal = resp.refusal().unwrap();
    assert_eq!(refusal.step, RefusalStep::Journal);
    assert!(
        !String::from_utf8_lossy(&resp.body).contains("v4.public."),
        "a token leaked"
    );
    assert_eq!(
        cell.journal().len(),
        granted_before + granted,
        "only answered grants are durable"
    );
    // Space returns: service recovers.
    std::fs::remove_file(&filler).unwrap();
    let resp = ask(&mut alice, &describe).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    running.stop().await;
    nitrile_audit::verify_journal(cell.layout.tokend_journal()).unwrap();
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The `detail.bundle` of the token service's records about its bundle.
fn bundle_records(cell: &Cell) -> Vec<(RecordKind, serde_json::Value)> {
    cell.journal()
        .into_iter()
        .filter_map(|r| {
            let b = r
                .detail
                .as_ref()?
                .get(nitrile_tokend::bundle::BUNDLE_DETAIL_KEY)?;
            assert_eq!(
                r.principal.as_ref().map(|p| p.uri()),
                Some("nitrile://local/service/tokend".to_owned())
            );
            Some((r.kind, b.clone()))
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn set_serial(cell: &Cell, serial: u64) {
    std::fs::write(
        cell.layout.entitlements_dir().join("bundle.toml"),
        format!("serial = {serial}\n"),
    )
    .unwrap();
}

fn recorded_serial(cell: &Cell) -> serde_json::Value {
    let text = std::fs::read_to_string(cell.layout.tokend_dir().join(nitrile_policy::SERIAL_FILE))
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The attack of issue 9: bundle serial 1 is signed and in force, serial 2
/// revokes bob's on-call membership, then the serial-1 directory is put back
/// with its valid signatures. The token service refuses to start on it,
/// keeps serial 2 as the highest loaded, and the journal has every start and
/// the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_a_restored_older_bundle_with_valid_signatures_is_refused_and_journaled() {
    let cell = Cell::new();
    let bob_drains = request(&[Operation::HostDrain], &["host/h1"], "h1");
    let running = cell.start().await;
    let mut bob = cell.client(&running, "operator/bob").await;
    assert_eq!(ask(&mut bob, &bob_drains).await.status.as_u16(), 200);
    running.stop().await;
    let serial_1 = cell._dir.path().join("serial-1");
    copy_dir(&cell.layout.entitlements_dir(), &serial_1);
    let state_before = cell._dir.path().join("tokend-state-before");
    copy_dir(&cell.layout.tokend_dir(), &state_before);

    // Serial 2: bob is no longer on call.
    set_serial(&cell, 2);
    cell.edit_bundle("groups.json", |t| {
        t.replace(
            r#"{"uid": {"type": "Nitrile::Operator", "id": "bob"}, "attrs": {},
   "parents": [{"type": "Nitrile::Group", "id": "oncall"}]}"#,
            r#"{"uid": {"type": "Nitrile::Operator", "id": "bob"}, "attrs": {}, "parents": []}"#,
        )
    });
    let running = cell.start().await;
    let mut bob = cell.client(&running, "operator/bob").await;
    let resp = ask(&mut bob, &bob_drains).await;
    assert_refused(&cell, &resp, 403, RefusalStep::Entitlement, "operator/bob");
    running.stop().await;
    assert_eq!(recorded_serial(&cell)["serial"], 2);
    let digest_2 = recorded_serial(&cell)["digest"].clone();

    // The serial-1 directory, signatures and all, put back.
    std::fs::remove_dir_all(cell.layout.entitlements_dir()).unwrap();
    copy_dir(&serial_1, &cell.layout.entitlements_dir());
    let err = Tokend::open_with_clock(&cell.config(), cell.clock.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, nitrile_tokend::TokendError::BundleOrder { .. }),
        "{err}"
    );
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("serial 1 is older than serial 2"), "{chain}");
    assert_eq!(recorded_serial(&cell)["serial"], 2);
    assert_eq!(recorded_serial(&cell)["digest"], digest_2);

    // The journal: serial 1 first, serial 2 replacing it, the refusal.
    let records = bundle_records(&cell);
    assert_eq!(records.len(), 3, "{records:#?}");
    let (kind, first) = &records[0];
    assert_eq!(*kind, RecordKind::Outcome);
    assert_eq!(first["serial"], 1);
    assert!(first.get("previous").is_none(), "{first}");
    let (kind, second) = &records[1];
    assert_eq!(*kind, RecordKind::Outcome);
    assert_eq!(second["serial"], 2);
    assert_eq!(second["digest"], digest_2);
    assert_eq!(second["previous"]["serial"], 1);
    assert_eq!(second["previous"]["digest"], first["digest"]);
    assert_eq!(
        second["reviewers"],
        serde_json::json!(["reviewer-1", "reviewer-2"])
    );
    let (kind, refused) = &records[2];
    assert_eq!(*kind, RecordKind::Refusal);
    assert_eq!(refused["refused"]["serial"], 1);
    assert_eq!(refused["in_force"]["serial"], 2);
    let last = cell.journal().pop().unwrap();
    assert_eq!(last.step, Some(RefusalStep::Entitlement));

    // The revocation holds: bob is still refused with serial 2 back.
    std::fs::remove_dir_all(cell.layout.entitlements_dir()).unwrap();
    copy_dir(&serial_1, &cell.layout.entitlements_dir());
    set_serial(&cell, 2);
    cell.edit_bundle("groups.json", |t| {
        t.replace(
            r#"{"uid": {"type": "Nitrile::Operator", "id": "bob"}, "attrs": {},
   "parents": [{"type": "Nitrile::Group", "id": "oncall"}]}"#,
            r#"{"uid": {"type": "Nitrile::Operator", "id": "bob"}, "attrs": {}, "parents": []}"#,
        )
    });
    let running = cell.start().await;
    let mut bob = cell.client(&running, "operator/bob").await;
    let resp = ask(&mut bob, &bob_drains).await;
    assert_refused(&cell, &resp, 403, RefusalStep::Entitlement, "operator/bob");
    running.stop().await;
    let records = bundle_records(&cell);
    let (_, again) = records.last().unwrap();
    assert_eq!(again["serial"], 2);
    assert!(again.get("previous").is_none(), "unchanged: {again}");

    // A thief of the whole state directory who puts back its serial record
    // from before the change gets the old bundle loaded (nothing left on
    // this machine knows better), but not off the record: the journal, which
    // is shipped to the audit log, shows serial 2 followed by serial 1.
    std::fs::copy(
        state_before.join(nitrile_policy::SERIAL_FILE),
        cell.layout.tokend_dir().join(nitrile_policy::SERIAL_FILE),
    )
    .unwrap();
    std::fs::remove_dir_all(cell.layout.entitlements_dir()).unwrap();
    copy_dir(&serial_1, &cell.layout.entitlements_dir());
    let running = cell.start().await;
    running.stop().await;
    let serials: Vec<serde_json::Value> = bundle_records(&cell)
        .into_iter()
        .filter(|(k, _)| *k == RecordKind::Outcome)
        .map(|(_, b)| b["serial"].clone())
        .collect();
    assert_eq!(serials, [1, 2, 2, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_a_changed_bundle_that_keeps_its_serial_is_refused() {
    let cell = Cell::new();
    cell.start().await.stop().await;
    // Re-signed, but the serial was not raised.
    cell.edit_bundle("quotas.toml", |t| {
        t.replacen("max_resources = 20", "max_resources = 2000", 1)
    });
    let err = Tokend::open_with_clock(&cell.config(), cell.clock.clone())
        .await
        .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("raise it in bundle.toml"), "{chain}");
    let records = bundle_records(&cell);
    assert_eq!(records.last().unwrap().0, RecordKind::Refusal);
    // Raised, it starts.
    set_serial(&cell, 2);
    cell.sign_bundle();
    cell.start().await.stop().await;
    assert_eq!(recorded_serial(&cell)["serial"], 2);
}

/// The lifetime of a token (exp - iat) as granted.
async fn granted_lifetime(cell: &Cell, client: &mut Client, req: &TokenRequest) -> i64 {
    let resp = ask(client, req).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let granted: TokenResponse = resp.json().unwrap();
    let alice = PeerIdentity::from_der(cell.identity("operator/alice").leaf(), &cell.cell)
        .unwrap()
        .cert_sha256;
    let grant = cell
        .verifier("h1")
        .verify(
            &granted.token,
            &Request {
                operation: Operation::HostDescribe,
                resource: ResourceId::parse("host/h1").unwrap(),
            },
            &alice,
            &FixedClock::new(cell.clock.now()),
        )
        .unwrap();
    (grant.claims().expires_at() - grant.claims().issued_at()).whole_seconds()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_tokens_live_at_most_five_minutes_or_the_configured_maximum() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let mut req = request(&[Operation::HostDescribe], &["host/h1"], "h1");
    assert_eq!(granted_lifetime(&cell, &mut alice, &req).await, 300);
    req.lifetime_secs = Some(300);
    assert_eq!(granted_lifetime(&cell, &mut alice, &req).await, 300);
    req.lifetime_secs = Some(301);
    let resp = ask(&mut alice, &req).await;
    assert_refused(&cell, &resp, 400, RefusalStep::Request, "operator/alice");
    assert!(
        resp.refusal().unwrap().reason.contains("1..=300s"),
        "{:?}",
        resp.refusal()
    );
    running.stop().await;

    // A lower maximum applies to requests and to the default.
    let mut config = cell.config();
    config.max_token_lifetime_secs = Some(120);
    let running = cell.start_with(&config).await;
    let mut alice = cell.client(&running, "operator/alice").await;
    req.lifetime_secs = None;
    assert_eq!(granted_lifetime(&cell, &mut alice, &req).await, 120);
    req.lifetime_secs = Some(120);
    assert_eq!(granted_lifetime(&cell, &mut alice, &req).await, 120);
    req.lifetime_secs = Some(121);
    let resp = ask(&mut alice, &req).await;
    assert_refused(&cell, &resp, 400, RefusalStep::Request, "operator/alice");
    running.stop().await;

    // Never higher, never zero.
    for bad in [0, 301, 900] {
        let mut config = cell.config();
        config.max_token_lifetime_secs = Some(bad);
        let err = Tokend::open(&config).await.unwrap_err();
        assert!(
            matches!(err, nitrile_tokend::TokendError::MaxTokenLifetime { secs } if secs == bad),
            "{err}"
        );
    }
}

/// A request for two operations whose second quota is exhausted leaves the
/// first operation's count as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_quota_charges_of_one_request_are_all_or_none() {
    let cell = Cell::new();
    cell.edit_bundle("quotas.toml", |t| {
        t.replacen(
            "operation = \"host.drain\"\nmax_resources = 20",
            "operation = \"host.drain\"\nmax_resources = 2",
            1,
        )
        .replacen(
            "operation = \"host.undrain\"\nmax_resources = 20",
            "operation = \"host.undrain\"\nmax_resources = 1",
            1,
        )
    });
    // h3 is a fleet host of the sample bundle.
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let both = |h: &str| {
        request(
            &[Operation::HostDrain, Operation::HostUndrain],
            &[&format!("host/{h}")],
            h,
        )
    };
    assert_eq!(ask(&mut alice, &both("h1")).await.status.as_u16(), 200);
    // h2's drain fits (2 of 2), its undrain does not (2 of 1): refused.
    let resp = ask(&mut alice, &both("h2")).await;
    assert_refused(&cell, &resp, 429, RefusalStep::Quota, "operator/alice");
    assert!(
        resp.refusal()
            .unwrap()
            .quota
            .as_deref()
            .unwrap()
            .contains("host.undrain"),
        "{:?}",
        resp.refusal()
    );
    // So h1 is still the only drain charged: h3 fits, then h2 does not.
    let drain = |h: &str| request(&[Operation::HostDrain], &[&format!("host/{h}")], h);
    let resp = ask(&mut alice, &drain("h3")).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let resp = ask(&mut alice, &drain("h2")).await;
    assert_refused(&cell, &resp, 429, RefusalStep::Quota, "operator/alice");
    running.stop().await;
    // And the durable store agrees after a restart.
    let running = cell.start().await;
    let mut alice = cell.client(&running, "operator/alice").await;
    let resp = ask(&mut alice, &drain("h1")).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let resp = ask(&mut alice, &drain("h2")).await;
    assert_refused(&cell, &resp, 429, RefusalStep::Quota, "operator/alice");
    running.stop().await;
}
