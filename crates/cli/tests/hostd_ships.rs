//! Claim 6 without `nitrile up`: a host agent started by hand, with
//! `[logd]` in its config, ships its journal to the audit log itself and
//! anchors it in the log when the log's key is pinned. The cell is
//! provisioned with the cell crate's functions and the configs are written
//! as an operator would write them; `nitrile logd` and `nitrile hostd` run
//! as processes of their own, and nothing else starts a shipper.

mod cell;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nitrile_api::{Name, PrincipalId};
use nitrile_audit::{JournalEntry, JournalReader, RecordKind};
use nitrile_cell::{CellLayout, bootstrap, provision_host, provision_logd};
use nitrile_logclient::leaf::{self, LeafV1};
use nitrile_logclient::{LOG_ANCHOR_FILE, RememberedCheckpoint};
use nitrile_tlog::{FileStorage, NoteVerifier, open_checkpoint};

/// Longest a service takes to start, or the log to catch up.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Processes of the test, killed if it fails before stopping them.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `nitrile <args>` with its output in `log` and waits for the line
/// `ready` there.
fn start(children: &mut Children, args: &[&str], config: &Path, log: &Path, ready: &str) {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(cell::NITRILE)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    children.0.push(child);
    assert!(
        cell::wait_for_line(log, ready, TIMEOUT),
        "no {ready:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Stops the last child started with SIGTERM and returns its exit status.
fn stop_last(children: &mut Children) -> std::process::ExitStatus {
    let mut child = children.0.pop().unwrap();
    assert!(cell::wait_catches(
        child.id(),
        nix::sys::signal::Signal::SIGTERM
    ));
    cell::signal(child.id(), nix::sys::signal::Signal::SIGTERM);
    child.wait().unwrap()
}

/// Every leaf of the log stored in `store`, once the whole log (every
/// checkpoint against `log_key`, every tile and bundle) verifies; none
/// before its first checkpoint.
fn logged_leaves(store: &Path, log_key: &NoteVerifier) -> Result<Vec<LeafV1>, String> {
    if !store.join("checkpoint").exists() {
        return Ok(Vec::new());
    }
    let storage = FileStorage::open(store).map_err(|e| e.to_string())?;
    let mut leaves = Vec::new();
    nitrile_tlog::audit_entries(&storage, log_key.name(), log_key, &mut |_, entry| {
        leaves.push(leaf::decode(entry)?);
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(leaves)
}

#[test]
fn claim6_a_host_agent_started_by_hand_ships_and_anchors_its_own_journal() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CellLayout::new(&dir.path().join("state"));
    let cell = Name::new("local").unwrap();
    let host = Name::new("h1").unwrap();
    let now = time::OffsetDateTime::now_utc();
    bootstrap(&layout, &cell, "127.0.0.1:0", now).unwrap();
    // The token service's published keys, pinned by the host and logd.
    nitrile_tokend::KeyRing::init_or_load(
        &layout.tokend_dir(),
        PrincipalId::parse("nitrile://local/service/tokend").unwrap(),
        &mut rand_core::OsRng,
    )
    .unwrap();
    let logd = provision_logd(&layout, &cell, now).unwrap();
    let h1 = provision_host(&layout, &cell, &host, now).unwrap();
    let mut children = Children(Vec::new());

    // The audit log service, taking host h1's journal.
    let logd_addr = format!("127.0.0.1:{}", cell::free_port());
    let logd_config = logd.dir.join("logd.toml");
    std::fs::write(
        &logd_config,
        format!(
            "cell = \"local\"\nlisten = \"{logd_addr}\"\nstate = \".\"\nca = \"{}\"\ncert = \
             \"{}\"\nkey = \"{}\"\nissuer_keys = \"{}\"\n\n[sources]\nhosts = [\"h1\"]\n",
            layout.ca_cert().display(),
            logd.cert.display(),
            logd.key.display(),
            logd.issuer_keys.display(),
        ),
    )
    .unwrap();
    start(
        &mut children,
        &["logd"],
        &logd_config,
        &dir.path().join("logd.log"),
        &format!("nitrile logd: serving on {logd_addr}"),
    );
    let vkey = std::fs::read_to_string(logd.dir.join("log.vkey")).unwrap();
    let log_key = NoteVerifier::from_vkey(vkey.trim()).unwrap();

    // The host agent, by hand: its config names logd and pins the log's key.
    let hostd_addr = format!("127.0.0.1:{}", cell::free_port());
    let hostd_config = h1.dir.join("hostd.toml");
    let config_text = |log_vkey: &str| {
        format!(
            "cell = \"local\"\nhost = \"h1\"\nlisten = \"{hostd_addr}\"\nstate = \".\"\nca = \
             \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nissuer_keys = \"{}\"\nimages = \"{}\"\n\n\
             [hypervisor]\nbackend = \"qemu\"\nqemu = \"/nonexistent/qemu-system-x86_64\"\n\n\
             [logd]\naddr = \"{logd_addr}\"\nlog_vkey = \"{log_vkey}\"\n",
            layout.ca_cert().display(),
            h1.cert.display(),
            h1.key.display(),
            h1.issuer_keys.display(),
            layout.images_dir().display(),
        )
    };

    // A key that is not one stops the agent: it never ships unanchored by
    // mistake.
    std::fs::write(&hostd_config, config_text("not a key")).unwrap();
    let refused = Command::new(cell::NITRILE)
        .args(["hostd", "--config"])
        .arg(&hostd_config)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("log_vkey"), "{err}");

    std::fs::write(&hostd_config, config_text(vkey.trim())).unwrap();
    start(
        &mut children,
        &["hostd"],
        &hostd_config,
        &dir.path().join("hostd.log"),
        &format!("nitrile hostd: h1 serving on {hostd_addr}"),
    );
    // Something to journal: a connection that is not TLS (a refusal at
    // step tls, in the host's journal).
    {
        use std::io::Write as _;
        let mut s = TcpStream::connect(&hostd_addr).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    let journal: PathBuf = h1.dir.join("journal");
    let deadline = Instant::now() + TIMEOUT;
    let records = loop {
        let records: Vec<JournalEntry> = JournalReader::open(&journal)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        if records
            .iter()
            .any(|e| e.record().unwrap().kind == RecordKind::Refusal)
        {
            break records;
        }
        assert!(Instant::now() < deadline, "no refusal journaled");
        std::thread::sleep(Duration::from_millis(100));
    };

    // The log holds the host's journal, record for record, and the host
    // remembers a checkpoint of the log covering it.
    let anchor_file = h1.dir.join(LOG_ANCHOR_FILE);
    let source = "nitrile://local/host/h1";
    let last_seq = records.last().unwrap().seq;
    let deadline = Instant::now() + TIMEOUT;
    let (leaves, anchored) = loop {
        let leaves: Result<Vec<LeafV1>, String> = logged_leaves(&logd.dir.join("log"), &log_key)
            .map(|all| all.into_iter().filter(|l| l.source == source).collect());
        let anchored = RememberedCheckpoint::load(&anchor_file).unwrap();
        if let Ok(leaves) = &leaves
            && leaves.len() as u64 >= last_seq
            && anchored.as_ref().is_some_and(|a| a.seq >= 1)
        {
            break (leaves.clone(), anchored.unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "h1's journal was not shipped and anchored ({last_seq} records): log {:?}, anchor \
             {anchored:?}\n{}",
            leaves.map(|l| l.len()),
            std::fs::read_to_string(dir.path().join("hostd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // Record for record: the log's leaves are the journal's records.
    for (record, leaf) in records.iter().zip(&leaves) {
        assert_eq!(
            (leaf.seq, leaf.hash, &leaf.payload),
            (record.seq, record.hash, &record.payload)
        );
    }
    let cp = open_checkpoint(&anchored.checkpoint, log_key.name(), &log_key).unwrap();
    assert_eq!(
        (cp.size, hex::encode(cp.root)),
        (anchored.size, anchored.root)
    );
    assert!(cp.size >= 1);

    // Both stop cleanly; the host agent stops its shipper itself.
    assert!(stop_last(&mut children).success(), "hostd");
    assert!(stop_last(&mut children).success(), "logd");
}
