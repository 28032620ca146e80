//! A whole cell for the claim tests, run through the real `nitrile` binary.
//!
//! [`Cell::up`] runs `nitrile up` in a temporary directory on free loopback
//! ports and keeps it running (its host agent is a child of it).
//! [`Cell::separate`] lets `nitrile up` provision the cell, stops it, and
//! runs `nitrile tokend`, `nitrile kms` and `nitrile hostd` as processes of
//! their own, so that a test can kill and restart the host agent alone.
//!
//! Dropping a [`Cell`] kills every process it started and every process
//! whose command line names its directory (QEMU and the waiting parents the
//! host agent leaves behind on purpose).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(crate) const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");
/// The host of a `nitrile up` cell.
pub(crate) const HOST: &str = "h1";
/// Longest a service may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether QEMU and a built guest image are here; else why not.
pub(crate) fn guest_prerequisites() -> Result<nitrile_image::BuiltImage, String> {
    let qemu = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !qemu {
        return Err("qemu-system-x86_64 is not on PATH".into());
    }
    let cache = nitrile_image::default_cache_dir().map_err(|e| e.to_string())?;
    nitrile_image::read_output(&nitrile_image::output_dir(&cache))
        .map_err(|e| format!("no guest image ({e}); run scripts/guest-image.sh"))
}

/// Prints `SKIPPED: <reason>` and returns from the test when QEMU or the
/// guest image is missing; else evaluates to the built image.
#[macro_export]
macro_rules! guest_or_skip {
    () => {
        match $crate::cell::guest_prerequisites() {
            Ok(built) => built,
            Err(why) => {
                $crate::cell::skipped(&why);
                return;
            }
        }
    };
}

/// Prints `SKIPPED: <why>` for the person running the tests (the test
/// harness prints, not the binary: the output layer's rule is not for it).
#[allow(clippy::disallowed_macros)]
pub(crate) fn skipped(why: &str) {
    println!("SKIPPED: {why}");
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running cell and the processes of it.
pub(crate) struct Cell {
    dir: tempfile::TempDir,
    /// The cell's state directory.
    pub(crate) state: PathBuf,
    /// Client config of alice (operator, group oncall).
    pub(crate) alice: PathBuf,
    /// Client config of the placement service (instance lifecycle).
    pub(crate) placement: PathBuf,
    /// Client config of carol (auditor: reads the audit log).
    pub(crate) carol: PathBuf,
    /// Where the token service listens.
    pub(crate) tokend_addr: SocketAddr,
    /// Where the host agent listens.
    pub(crate) hostd_addr: SocketAddr,
    /// Where the key service listens (fixed, so that a key service started
    /// apart from `nitrile up` is where the host's config says).
    pub(crate) kms_addr: SocketAddr,
    /// What `nitrile up` printed on stdout before the export line.
    pub(crate) up_stdout: Vec<String>,
    /// How many host agents `nitrile up` runs (`--hosts`).
    pub(crate) hosts: u8,
    up: Option<Child>,
    tokend: Option<Child>,
    kms: Option<Child>,
    hostd: Option<Child>,
    /// The host agent's pid (a child of `nitrile up`, or of this test).
    hostd_pid: Option<u32>,
    /// Other services run apart from `nitrile up` ([`Cell::start_service`]),
    /// by name.
    services: Vec<(String, Child)>,
}

impl Cell {
    /// `nitrile up` in a fresh directory, left running.
    pub(crate) fn up() -> Self {
        Self::up_with_hosts(1)
    }

    /// `nitrile up --hosts N` in a fresh directory, left running: host
    /// agents h1..hN (h1 on a fixed free port, the others on port 0 with
    /// their real addresses in the client configs) and the placement
    /// service, whose address the customers' configs name.
    pub(crate) fn up_with_hosts(hosts: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let tokend_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let hostd_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let kms_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cell = Self {
            state,
            alice: PathBuf::new(),
            placement: PathBuf::new(),
            carol: PathBuf::new(),
            tokend_addr,
            hostd_addr,
            kms_addr,
            up_stdout: Vec::new(),
            hosts: 1,
            up: None,
            tokend: None,
            kms: None,
            hostd: None,
            hostd_pid: None,
            services: Vec::new(),
            dir,
        };
        cell.hosts = hosts;
        cell.start_up();
        cell
    }

    /// A cell provisioned by `nitrile up`, then run as separate `nitrile
    /// tokend`, `nitrile kms` and `nitrile hostd` processes.
    /// `edit_hostd_config` may change the host agent's config text before it
    /// starts.
    pub(crate) fn separate(edit_hostd_config: impl FnOnce(&str) -> String) -> Self {
        let mut cell = Self::up();
        cell.stop_up();
        let path = cell.hostd_config();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit_hostd_config(&text)).unwrap();
        cell.start_tokend();
        cell.start_kms();
        cell.start_hostd();
        cell
    }

    /// The temporary directory holding everything.
    pub(crate) fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The host's state directory.
    pub(crate) fn host_dir(&self) -> PathBuf {
        self.state.join("hosts").join(HOST)
    }

    /// The host agent's config file.
    pub(crate) fn hostd_config(&self) -> PathBuf {
        self.host_dir().join("hostd.toml")
    }

    /// The host's journal.
    pub(crate) fn host_journal(&self) -> PathBuf {
        self.host_dir().join("journal")
    }

    /// The client config of customer `name` (`acme`, `globex`).
    pub(crate) fn customer(&self, name: &str) -> PathBuf {
        self.alice.with_file_name(format!("customer-{name}.toml"))
    }

    /// The placement service's journal.
    pub(crate) fn placed_journal(&self) -> PathBuf {
        self.state.join("placed").join("journal")
    }

    /// The journal of host `host`.
    pub(crate) fn journal_of_host(&self, host: &str) -> PathBuf {
        self.state.join("hosts").join(host).join("journal")
    }

    /// The token service's journal.
    pub(crate) fn tokend_journal(&self) -> PathBuf {
        self.state.join("tokend").join("journal")
    }

    /// The cell's image store.
    pub(crate) fn images_dir(&self) -> PathBuf {
        self.state.join("images")
    }

    /// The per-VM directory of an instance (the backend's state).
    pub(crate) fn vm_dir(&self, instance: &str) -> PathBuf {
        self.host_dir().join("vms").join(instance)
    }

    /// The log file of the processes this cell started.
    pub(crate) fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// What the processes of this cell wrote to stderr so far.
    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["up", "tokend", "kms", "hostd"] {
            if let Ok(text) = std::fs::read_to_string(self.log(name)) {
                out.push_str(&format!("--- {name}\n{text}"));
            }
        }
        out
    }

    /// The host agent's pid.
    pub(crate) fn hostd_pid(&self) -> u32 {
        self.hostd_pid.expect("the host agent runs")
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))
            .unwrap()
    }

    /// Runs `nitrile up` on the cell's state and ports (again) and waits
    /// for its export line.
    pub(crate) fn start_up(&mut self) {
        self.up_stdout.clear();
        let mut child = Command::new(NITRILE)
            .arg("up")
            .arg("--tokend-listen")
            .arg(self.tokend_addr.to_string())
            .args(["--tokend-metrics", "127.0.0.1:0"])
            .arg("--hostd-listen")
            .arg(self.hostd_addr.to_string())
            .args(["--logd-listen", "127.0.0.1:0"])
            .args(["--logd-metrics", "127.0.0.1:0"])
            .args(["--witness-listen", "127.0.0.1:0"])
            .arg("--kms-listen")
            .arg(self.kms_addr.to_string())
            .args(["--placed-listen", "127.0.0.1:0"])
            .args(["--deployd-listen", "127.0.0.1:0"])
            .arg("--hosts")
            .arg(self.hosts.to_string())
            .arg("--state")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(self.log_file("up")))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.up = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let alice = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(path) = line.strip_prefix("export NITRILE_CONFIG=") {
                        break PathBuf::from(path);
                    }
                    self.up_stdout.push(line);
                }
                Err(e) => panic!(
                    "no export line from nitrile up ({e}); stdout {:?}\n{}",
                    self.up_stdout,
                    self.logs()
                ),
            }
        };
        self.placement = alice.with_file_name("service-placement.toml");
        self.carol = alice.with_file_name("auditor-carol.toml");
        self.alice = alice;
        // "  hostd h1       127.0.0.1:P (mTLS, pid N)   config ..."
        self.hostd_pid = self
            .up_stdout
            .iter()
            .find(|l| l.trim_start().starts_with("hostd "))
            .and_then(|l| l.split("pid ").nth(1))
            .and_then(|rest| rest.split(')').next())
            .and_then(|pid| pid.parse().ok());
        assert!(
            self.hostd_pid.is_some(),
            "no hostd pid in {:?}",
            self.up_stdout
        );
    }

    /// Stops `nitrile up` (SIGTERM) and waits for its clean exit.
    pub(crate) fn stop_up(&mut self) {
        let mut child = self.up.take().expect("nitrile up runs");
        // It prints the export line before it handles SIGTERM; a SIGTERM
        // in between would kill it without a clean stop.
        assert!(
            wait_catches(child.id(), nix::sys::signal::Signal::SIGTERM),
            "nitrile up never handled SIGTERM"
        );
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = child.wait().unwrap();
        assert!(status.success(), "nitrile up stopped with {status}");
        self.hostd_pid = None;
    }

    /// Runs `nitrile tokend` on the cell's state and token service port and
    /// waits until it accepts connections.
    pub(crate) fn start_tokend(&mut self) {
        self.start_tokend_with(&[]);
    }

    /// [`Cell::start_tokend`] with more arguments (e.g. `--logd ADDR`).
    pub(crate) fn start_tokend_with(&mut self, extra: &[&str]) {
        assert!(self.tokend.is_none());
        let child = Command::new(NITRILE)
            .arg("tokend")
            .arg("--state")
            .arg(&self.state)
            .arg("--listen")
            .arg(self.tokend_addr.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.log_file("tokend")))
            .stderr(Stdio::from(self.log_file("tokend")))
            .spawn()
            .unwrap();
        self.tokend = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(self.tokend_addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tokend does not accept connections\n{}",
                self.logs()
            );
            if let Some(status) = self.tokend.as_mut().unwrap().try_wait().unwrap() {
                panic!("tokend exited with {status}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `nitrile kms --config <state>/kms/kms.toml` (the config `nitrile
    /// up` wrote, on [`Cell::kms_addr`]) and waits until it accepts
    /// connections.
    pub(crate) fn start_kms(&mut self) {
        assert!(self.kms.is_none() && self.up.is_none());
        let child = Command::new(NITRILE)
            .arg("kms")
            .arg("--config")
            .arg(self.state.join("kms/kms.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.log_file("kms")))
            .stderr(Stdio::from(self.log_file("kms")))
            .spawn()
            .unwrap();
        self.kms = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(self.kms_addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the key service does not accept connections\n{}",
                self.logs()
            );
            if let Some(status) = self.kms.as_mut().unwrap().try_wait().unwrap() {
                panic!("the key service exited with {status}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `nitrile hostd --config <host dir>/hostd.toml` (instances outlive
    /// it) and waits for its `serving on` line.
    pub(crate) fn start_hostd(&mut self) {
        assert!(self.hostd.is_none() && self.up.is_none());
        let mut child = Command::new(NITRILE)
            .arg("hostd")
            .arg("--config")
            .arg(self.hostd_config())
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.log_file("hostd")))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let pid = child.id();
        self.hostd = Some(child);
        self.hostd_pid = Some(pid);
        let mut log = self.log_file("hostd");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if line.contains(" serving on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => assert!(
                line.ends_with(&format!("serving on {}", self.hostd_addr)),
                "{line}"
            ),
            Err(e) => panic!("hostd did not start serving ({e})\n{}", self.logs()),
        }
    }

    /// Runs `nitrile <args>` apart from `nitrile up` as service `name` (its
    /// stderr in `<name>.log`) and waits (bounded) for a stderr line that
    /// contains `ready`; returns the line. E.g. a second host agent or the
    /// placement service of a [`Cell::stop_up`] cell.
    pub(crate) fn start_service(&mut self, name: &str, args: &[&str], ready: &str) -> String {
        assert!(self.up.is_none());
        assert!(!self.services.iter().any(|(n, _)| n == name), "{name} runs");
        let mut child = Command::new(NITRILE)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.log_file(name)))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        self.services.push((name.to_owned(), child));
        let mut log = self.log_file(name);
        let ready = ready.to_owned();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if line.contains(&ready)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(e) => panic!(
                "{name} did not start ({e})\n{}",
                std::fs::read_to_string(self.log(name)).unwrap_or_default()
            ),
        }
    }

    /// SIGKILLs service `name` of [`Cell::start_service`] and reaps it.
    pub(crate) fn kill_service(&mut self, name: &str) {
        let i = self
            .services
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} does not run"));
        let (_, mut child) = self.services.remove(i);
        signal(child.id(), nix::sys::signal::Signal::SIGKILL);
        let status = child.wait().unwrap();
        assert!(!status.success(), "{status}");
    }

    /// The state directory of host `host`.
    pub(crate) fn dir_of_host(&self, host: &str) -> PathBuf {
        self.state.join("hosts").join(host)
    }

    /// The placement service's config.
    pub(crate) fn placed_config(&self) -> PathBuf {
        self.state.join("placed").join("placed.toml")
    }

    /// SIGKILLs the host agent started by [`Cell::start_hostd`] and reaps it.
    pub(crate) fn kill_hostd(&mut self) {
        let mut child = self.hostd.take().expect("hostd runs as our child");
        signal(child.id(), nix::sys::signal::Signal::SIGKILL);
        let status = child.wait().unwrap();
        assert!(!status.success(), "{status}");
        self.hostd_pid = None;
    }

    /// The auditor's state directory (`$XDG_STATE_HOME`) of the CLI calls
    /// of [`Cell::nitrile`]: what `nitrile audit` remembers of the log.
    pub(crate) fn auditor_state(&self) -> PathBuf {
        self.dir.path().join("auditor-state")
    }

    /// Runs the CLI as the principal of `config`.
    pub(crate) fn nitrile(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(NITRILE)
            .env("XDG_STATE_HOME", self.auditor_state())
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Like [`Cell::nitrile`], and the call must succeed: its stdout.
    pub(crate) fn ok(&self, config: &Path, args: &[&str]) -> String {
        let out = self.nitrile(config, args);
        assert!(
            out.status.success(),
            "nitrile {args:?}: exit {:?}; stderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Imports `built` (the sample guest image) as the customer of
    /// `config` with `cmdline` and, when given, a root disk; its digest.
    pub(crate) fn import_image(
        &self,
        config: &Path,
        built: &nitrile_image::BuiltImage,
        cmdline: &str,
        root_disk: Option<&Path>,
    ) -> String {
        let mut args = vec![
            "customer",
            "image",
            "import",
            "--kernel",
            built.kernel.to_str().unwrap(),
            "--initramfs",
            built.initramfs.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "-o",
            "json",
        ];
        if let Some(r) = root_disk {
            args.extend_from_slice(&["--root-disk", r.to_str().unwrap()]);
        }
        let out = self.ok(config, &args);
        let image: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        image["digest"].as_str().unwrap().to_owned()
    }

    /// The records of a journal, through `nitrile audit show-journal -o json`.
    pub(crate) fn journal(&self, file: &Path) -> Vec<serde_json::Value> {
        let out = Command::new(NITRILE)
            .args(["audit", "show-journal", "-o", "json"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "show-journal {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
            .collect()
    }

    /// `nitrile audit verify-journal -o json` of a journal; panics unless it
    /// verifies.
    pub(crate) fn verify_journal(&self, file: &Path) -> serde_json::Value {
        let out = Command::new(NITRILE)
            .args(["audit", "verify-journal", "-o", "json"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "journal {} does not verify: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Pids of the live processes whose command line names this cell's
    /// directory (QEMU, the waiting parents of jailed VMs, the services).
    pub(crate) fn processes(&self) -> Vec<u32> {
        processes_naming(self.dir.path())
    }

    /// Waits (bounded) until no process names this cell's directory.
    pub(crate) fn wait_no_processes(&self, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        for child in [
            self.up.take(),
            self.hostd.take(),
            self.kms.take(),
            self.tokend.take(),
        ]
        .into_iter()
        .flatten()
        .chain(self.services.drain(..).map(|(_, c)| c))
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // What they left: VMs and their waiting parents, by pid.
        for _ in 0..50 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The host agents' data path namespaces, which a killed agent
        // could not remove.
        for entry in std::fs::read_dir(self.state.join("hosts"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let config =
                std::fs::read_to_string(entry.path().join("hostd.toml")).unwrap_or_default();
            let netns = config.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "netns").then(|| v.trim().trim_matches('"').to_owned())
            });
            if let Some(ns) = netns {
                let _ = Command::new("ip")
                    .args(["netns", "delete", &ns])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Sends `sig` to `pid` (gone already is fine).
pub(crate) fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), sig);
}

/// Waits (bounded) until process `pid` has a handler for `sig` (the
/// `SigCgt` mask of `/proc/<pid>/status`); false if it never does.
pub(crate) fn wait_catches(pid: u32, sig: nix::sys::signal::Signal) -> bool {
    let bit = 1u64 << (sig as i32 - 1);
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return false;
        };
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if caught & bit != 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The NUL-separated command line of a process, or `None` when it is gone.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// Fields of `/proc/<pid>/stat` after the command name: `[0]` is the state
/// letter, `[19]` the start time in clock ticks since boot.
pub(crate) fn stat(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The start time of a live (not zombie) process, in clock ticks since boot.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let f = stat(pid)?;
    if f[0] == "Z" || f[0] == "X" {
        return None;
    }
    f[19].parse().ok()
}

/// Live processes whose command line names a path under `dir`.
pub(crate) fn processes_naming(dir: &Path) -> Vec<u32> {
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || start_time(pid).is_none() {
            continue;
        }
        if cmdline(pid).is_some_and(|c| c.windows(needle.len()).any(|w| w == needle)) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) until `path`'s text has a line equal to `marker`.
pub(crate) fn wait_for_line(path: &Path, marker: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = std::fs::read(path).unwrap_or_default();
        if String::from_utf8_lossy(&text)
            .lines()
            .any(|l| l.trim() == marker)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The first `n` log leaves of a journal of host h1 whose records are
/// `"{tag} {i}"`, chained as a journal chains them (a journal id of its
/// own per `tag`): the entries of a log that `nitrile audit verify`, which
/// replays every journal through the log, accepts.
pub(crate) fn journal_leaves(tag: &str, n: u64) -> Vec<Vec<u8>> {
    use sha2::Digest as _;
    let source = "nitrile://local/host/h1";
    let mut id = [0u8; 16];
    id.copy_from_slice(&sha2::Sha256::digest(tag.as_bytes())[..16]);
    let journal_id = nitrile_audit::JournalId(id);
    let mut hash = nitrile_audit::genesis_hash(
        nitrile_audit::FORMAT_VERSION,
        &journal_id,
        source.as_bytes(),
    );
    (1..=n)
        .map(|seq| {
            let payload = format!("{tag} {}", seq - 1).into_bytes();
            hash = nitrile_audit::record_hash(&hash, seq, &payload);
            nitrile_logclient::leaf::encode(&nitrile_logclient::leaf::LeafV1 {
                source: source.to_owned(),
                journal_id,
                seq,
                hash,
                payload,
            })
            .unwrap()
        })
        .collect()
}

/// Replaces the line of `file` that starts with `key = ` by `key = "value"`.
/// Replaces the line `key = ...` of section `[section]` of `file` by
/// `key = "value"`.
pub(crate) fn set_section_line(file: &Path, section: &str, key: &str, value: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let header = format!("[{section}]");
    let prefix = format!("{key} = ");
    let mut inside = false;
    let mut done = false;
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with('[') {
                inside = l.trim() == header;
            } else if inside && !done && l.starts_with(&prefix) {
                done = true;
                return format!("{key} = \"{value}\"");
            }
            l.to_owned()
        })
        .collect();
    assert!(done, "no {key} in [{section}] of {text}");
    std::fs::write(file, edited.join("\n") + "\n").unwrap();
}

pub(crate) fn set_line(file: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let prefix = format!("{key} = ");
    assert_eq!(
        text.lines().filter(|l| l.starts_with(&prefix)).count(),
        1,
        "{key} in {text}"
    );
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{key} = \"{value}\"")
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(file, edited.join("\n") + "\n").unwrap();
}
