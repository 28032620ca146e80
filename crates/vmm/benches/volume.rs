//! Guest sequential throughput on a volume, qemu backend: an encrypted
//! volume served through `QemuBackend` against the same QEMU with
//! encryption off, side by side.
//!
//! Three configurations, each booting the Debian guest image (1 vCPU,
//! 256 MiB) with one volume of N + 16 MiB whose init writes N MiB to
//! `/dev/vda` (1 MiB `O_DIRECT` writes, then fsync), drops its page cache
//! and reads them back (`nitrile.test=volume-bench`):
//!
//! - `a`: an encrypted volume through [`QemuBackend`], exactly as the
//!   backend serves one: a LUKS qcow2 file whose data key the key service
//!   made and sealed to the launcher (create, supply_keys, start), QEMU in
//!   its jail (namespaces, chroot, uid 65534, seccomp, the VM's cgroup);
//! - `b`: a plain qcow2 file (`qemu-img create -f qcow2`) on the same
//!   virtio-blk device, QEMU started by this program with the backend's
//!   machine arguments minus the encryption;
//! - `c`: a raw file, likewise.
//!
//! `b` and `c` are not jailed (no namespaces, chroot or uid change), but run
//! under QEMU's same `-sandbox` and in a cgroup of their own with the VM
//! cgroup's memory and CPU limits, so that all three have the same one core
//! per vCPU (`NITRILE_BENCH_CGROUP=off` runs all three, the backend's VM
//! included, without a cgroup). Every run starts from a freshly created,
//! empty file.
//!
//! The host times each step: from the guest's `NITRILE-BENCH-WRITE-START`
//! line reaching the serial file to its `NITRILE-BENCH-WRITE` line (the
//! serial file polled every millisecond), likewise for `READ`. The guest's
//! own nanoseconds, printed on those lines, are shown next to them but not
//! used: under TCG its TSC runs at the host's rate while the kernel assumes
//! `tsc_early_khz`, and once the watchdog gives up on it the clock is
//! jiffies.
//!
//! Runs alternate a, b, c (`NITRILE_BENCH_RUNS`, default 3); N is
//! `NITRILE_BENCH_MIB` (default 64). Prints each run (with the cores QEMU
//! kept busy during each step, from its CPU time in `/proc/<pid>/stat`), the
//! p50 of each configuration and the ratios a/b and a/c. Prints `SKIPPED: <reason>`
//! without root, QEMU, `qemu-img`, the `nitrile` binary or the guest image.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nitrile_vmm::{Accel, Hypervisor, JailConfig, QemuBackend, VmSpec, VmStatus};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Env, KeyService};

/// How long one run may take: boot under TCG on a busy machine, then the
/// two steps.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the serial file is read while a step runs.
const POLL: Duration = Duration::from_millis(1);
/// Margin of the volume over what the guest writes.
const VOLUME_MARGIN_MIB: u64 = 16;
/// How long a baseline QEMU gets to power off after its last marker.
const EXIT_GRACE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    Encrypted,
    Qcow2,
    Raw,
}

impl Config {
    const ALL: [Config; 3] = [Config::Encrypted, Config::Qcow2, Config::Raw];

    fn label(self) -> &'static str {
        match self {
            Config::Encrypted => "a: LUKS qcow2, QemuBackend (jailed)",
            Config::Qcow2 => "b: plain qcow2, same QEMU args",
            Config::Raw => "c: raw file, same QEMU args",
        }
    }
}

/// One run's measurements.
#[derive(Debug, Clone, Copy)]
struct Sample {
    bytes: u64,
    write: Duration,
    read: Duration,
    guest_write_ns: u64,
    guest_read_ns: u64,
    /// CPU time QEMU used during each step, all its threads.
    write_cpu: Duration,
    read_cpu: Duration,
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64()
}

impl Sample {
    fn write_mib_s(&self) -> f64 {
        mib_s(self.bytes, self.write)
    }
    fn read_mib_s(&self) -> f64 {
        mib_s(self.bytes, self.read)
    }
    fn guest_write_mib_s(&self) -> f64 {
        mib_s(self.bytes, Duration::from_nanos(self.guest_write_ns))
    }
    fn guest_read_mib_s(&self) -> f64 {
        mib_s(self.bytes, Duration::from_nanos(self.guest_read_ns))
    }
    /// Cores QEMU kept busy during the write step.
    fn write_cores(&self) -> f64 {
        self.write_cpu.as_secs_f64() / self.write.as_secs_f64()
    }
    fn read_cores(&self) -> f64 {
        self.read_cpu.as_secs_f64() / self.read.as_secs_f64()
    }
}

/// CPU time (user and system, all threads, exited ones included) of
/// process `pid` so far, in the kernel's 10 ms ticks.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces: state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// When a marker reached the serial file, and QEMU's CPU time then.
type Stamp = (Instant, Duration);

/// The marker lines of one run, with when each reached the serial file.
#[derive(Default)]
struct Markers {
    write_start: Option<Stamp>,
    write: Option<(Stamp, u64, u64)>,
    read_start: Option<Stamp>,
    read: Option<(Stamp, u64, u64)>,
    done: bool,
    failed: Option<String>,
}

impl Markers {
    fn see(&mut self, line: &str, at: Stamp) {
        let mut words = line.split_whitespace();
        let nums = |w: &mut std::str::SplitWhitespace<'_>| -> Option<(u64, u64)> {
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        };
        match words.next() {
            Some("NITRILE-BENCH-WRITE-START") => self.write_start = Some(at),
            Some("NITRILE-BENCH-READ-START") => self.read_start = Some(at),
            Some("NITRILE-BENCH-WRITE") => {
                self.write = nums(&mut words).map(|(b, ns)| (at, b, ns));
            }
            Some("NITRILE-BENCH-READ") => {
                self.read = nums(&mut words).map(|(b, ns)| (at, b, ns));
            }
            Some("NITRILE-BENCH-DONE") => self.done = true,
            Some(
                m @ ("NITRILE-BENCH-FAILED" | "NITRILE-VOLUME-NODISK" | "NITRILE-TEST-UNKNOWN"),
            ) => {
                self.failed = Some(format!(
                    "the guest printed {m} {}",
                    words.collect::<Vec<_>>().join(" ")
                ));
            }
            _ => {}
        }
    }

    fn sample(&self) -> Result<Sample, String> {
        match (self.write_start, self.write, self.read_start, self.read) {
            (Some(ws), Some((we, bytes, gw)), Some(rs), Some((re, rbytes, gr)))
                if bytes == rbytes =>
            {
                Ok(Sample {
                    bytes,
                    write: we.0 - ws.0,
                    read: re.0 - rs.0,
                    guest_write_ns: gw,
                    guest_read_ns: gr,
                    write_cpu: we.1.saturating_sub(ws.1),
                    read_cpu: re.1.saturating_sub(rs.1),
                })
            }
            _ => Err("the guest's markers are incomplete".to_owned()),
        }
    }
}

/// Follows a serial file, stamping each whole line as it appears.
struct SerialWatch {
    path: PathBuf,
    file: Option<std::fs::File>,
    partial: Vec<u8>,
    text: String,
}

impl SerialWatch {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            partial: Vec::new(),
            text: String::new(),
        }
    }

    /// Reads what was appended since the last call; feeds whole lines,
    /// the benchmark's own stamped with the time and QEMU's CPU time.
    fn poll(&mut self, markers: &mut Markers, cpu: &dyn Fn() -> Option<Duration>) {
        let now = Instant::now();
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() || buf.is_empty() {
            return;
        }
        self.partial.extend_from_slice(&buf);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if line.starts_with("NITRILE-BENCH-") {
                markers.see(line, (now, cpu().unwrap_or_default()));
            }
            self.text.push_str(line);
            self.text.push('\n');
        }
    }

    fn tail(&self) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

/// Watches `serial` until the guest is done or failed, `alive` says the VM
/// ended, or the run times out.
fn watch(
    serial: &Path,
    started: Instant,
    mut alive: impl FnMut() -> bool,
    cpu: &dyn Fn() -> Option<Duration>,
) -> Result<Sample, String> {
    let mut watch = SerialWatch::new(serial.to_owned());
    let mut markers = Markers::default();
    let mut last_check = Instant::now();
    loop {
        watch.poll(&mut markers, cpu);
        if markers.done {
            return markers.sample();
        }
        if let Some(why) = &markers.failed {
            return Err(format!("{why}\nserial tail:\n{}", watch.tail()));
        }
        if started.elapsed() > RUN_TIMEOUT {
            return Err(format!("timed out\nserial tail:\n{}", watch.tail()));
        }
        // The VM's state is checked every 100 ms, not at every poll.
        if last_check.elapsed() > Duration::from_millis(100) {
            last_check = Instant::now();
            if !alive() {
                watch.poll(&mut markers, cpu);
                if markers.done {
                    return markers.sample();
                }
                return Err(format!(
                    "the VM ended before NITRILE-BENCH-DONE\nserial tail:\n{}",
                    watch.tail()
                ));
            }
        }
        std::thread::sleep(POLL);
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The spec of configuration a: the guest image with the benchmark action
/// and one volume `data` of `size_mib` at `path`.
fn spec(env: &Env, instance: &str, cmdline: &str, path: &Path, size_mib: u64) -> VmSpec {
    let json = serde_json::json!({
        "instance": instance,
        "image": {
            "digest": "00".repeat(32),
            "kernel": env.kernel,
            "initramfs": env.initramfs,
            "cmdline": cmdline,
        },
        "vcpus": 1,
        "memory_mib": 256,
        "volumes": [{ "id": "data", "path": path, "size_mib": size_mib }],
    });
    VmSpec::parse_json(&serde_json::to_vec(&json).expect("json")).expect("bench spec")
}

/// A cgroup with the VM cgroup's limits (memory, one core per vCPU), for
/// the baselines' QEMU: cgroup v2, else the v1 `memory` and `cpu`
/// hierarchies, as the backend makes them.
struct BenchCgroup {
    dirs: Vec<PathBuf>,
}

impl BenchCgroup {
    fn create(name: &str, memory_bytes: u64, cpus: u32) -> std::io::Result<Option<Self>> {
        const PERIOD_US: u64 = 100_000;
        let quota = u64::from(cpus) * PERIOD_US;
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            let parent = root.join("nitrile-bench");
            std::fs::create_dir_all(&parent)?;
            std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu")?;
            std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu")?;
            let dir = parent.join(name);
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir)?;
            let cg = Self {
                dirs: vec![dir.clone()],
            };
            std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
            std::fs::write(dir.join("memory.swap.max"), "0").ok();
            std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
            return Ok(Some(cg));
        }
        let mem = root.join("memory");
        let cpu = root.join("cpu");
        if !mem.join("memory.limit_in_bytes").exists() || !cpu.join("cpu.cfs_quota_us").exists() {
            return Ok(None);
        }
        let mdir = mem.join("nitrile-bench").join(name);
        let cdir = cpu.join("nitrile-bench").join(name);
        for d in [&mdir, &cdir] {
            let _ = std::fs::remove_dir(d);
        }
        let mut cg = Self { dirs: Vec::new() };
        std::fs::create_dir_all(&mdir)?;
        cg.dirs.push(mdir.clone());
        std::fs::write(mdir.join("memory.memsw.limit_in_bytes"), "-1").ok();
        std::fs::write(mdir.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
        std::fs::write(
            mdir.join("memory.memsw.limit_in_bytes"),
            memory_bytes.to_string(),
        )
        .ok();
        std::fs::create_dir_all(&cdir)?;
        cg.dirs.push(cdir.clone());
        std::fs::write(cdir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
        std::fs::write(cdir.join("cpu.cfs_quota_us"), quota.to_string())?;
        Ok(Some(cg))
    }

    fn join(&self, pid: u32) -> std::io::Result<()> {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
            // `nitrile-bench` too, unless another run still uses it.
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// A baseline QEMU, killed if the run is abandoned.
struct Baseline(Child);

impl Drop for Baseline {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Escapes a path for a QEMU option value (commas doubled).
fn opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

struct Bench {
    env: Env,
    qemu_img: PathBuf,
    mib: u64,
    dir: tempfile::TempDir,
    hv: QemuBackend,
    keys: KeyService,
    /// Whether every configuration runs in a cgroup (the baselines in
    /// their own, with the backend's limits).
    cgroups: bool,
    cgroup_note: String,
}

impl Bench {
    fn cmdline(&self) -> String {
        format!(
            "{} nitrile.test=volume-bench nitrile.bench_mib={}",
            self.env.cmdline, self.mib
        )
    }

    fn volume_mib(&self) -> u64 {
        self.mib + VOLUME_MARGIN_MIB
    }

    fn run(&mut self, config: Config, n: usize) -> Result<Sample, String> {
        match config {
            Config::Encrypted => self.run_encrypted(n),
            Config::Qcow2 => self.run_baseline(n, "qcow2"),
            Config::Raw => self.run_baseline(n, "raw"),
        }
    }

    /// Configuration a: the backend, with a fresh volume and data key.
    fn run_encrypted(&mut self, n: usize) -> Result<Sample, String> {
        let volume = self.dir.path().join("a.qcow2");
        let _ = std::fs::remove_file(&volume);
        self.keys.make("data");
        let spec = spec(
            &self.env,
            &format!("volbench-{n}"),
            &self.cmdline(),
            &volume,
            self.volume_mib(),
        );
        let created = self.hv.create(&spec).map_err(|e| format!("create: {e}"))?;
        let id = created.id.clone();
        let result = (|| {
            self.hv
                .supply_keys(&id, self.keys.seal(&created))
                .map_err(|e| format!("supply_keys: {e}"))?;
            let started = Instant::now();
            self.hv.start(&id).map_err(|e| format!("start: {e}"))?;
            let serial = self.hv.vm_dir(&id).join("serial.log");
            let pid = self.hv.qemu_pid(&id).ok_or("no QEMU pid")?;
            watch(
                &serial,
                started,
                || {
                    !matches!(
                        self.hv.status(&id),
                        Ok(VmStatus::Stopped | VmStatus::Failed { .. }) | Err(_)
                    )
                },
                &|| cpu_time(pid),
            )
        })();
        let destroyed = self.hv.destroy(&id);
        let _ = std::fs::remove_file(&volume);
        let sample = result?;
        destroyed.map_err(|e| format!("destroy: {e}"))?;
        Ok(sample)
    }

    /// Configurations b and c: QEMU started here with the backend's machine
    /// arguments and a plain disk of `format`.
    fn run_baseline(&self, n: usize, format: &str) -> Result<Sample, String> {
        let work = self.dir.path().join(format!("{format}-{n}"));
        std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
        let disk = work.join(format!("disk.{format}"));
        let status = Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", format])
            .arg(&disk)
            .arg(format!("{}M", self.volume_mib()))
            .status()
            .map_err(|e| format!("qemu-img: {e}"))?;
        if !status.success() {
            return Err(format!("qemu-img create -f {format}: {status}"));
        }
        let serial = work.join("serial.log");
        std::fs::File::create(&serial).map_err(|e| e.to_string())?;
        let stderr = std::fs::File::create(work.join("qemu.stderr")).map_err(|e| e.to_string())?;
        let cgroup = if self.cgroups {
            BenchCgroup::create(
                &format!("volbench-{format}-{n}"),
                (256 + nitrile_vmm::qemu::QEMU_OVERHEAD_MIB) << 20,
                1,
            )
            .map_err(|e| format!("cgroup: {e}"))?
        } else {
            None
        };
        let accel = match self.env.accel {
            Accel::Tcg => "tcg,tb-size=64",
            Accel::Kvm => "kvm",
        };
        let started = Instant::now();
        let child = Command::new(&self.env.qemu)
            .args([
                "-M",
                "microvm,pic=off,pit=off,dump-guest-core=off,mem-merge=off",
                "-accel",
                accel,
                "-cpu",
                "max,-la57",
                "-smp",
                "1",
                "-m",
                "256M",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-monitor",
                "none",
                "-chardev",
            ])
            .arg(format!("file,id=ser0,path={}", opt(&serial)))
            .args(["-serial", "chardev:ser0", "-kernel"])
            .arg(&self.env.kernel)
            .arg("-initrd")
            .arg(&self.env.initramfs)
            .arg("-append")
            .arg(self.cmdline())
            .args([
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                "-blockdev",
            ])
            .arg(format!(
                "driver={format},node-name=vol0,read-only=off,file.driver=file,file.filename={}",
                opt(&disk)
            ))
            .args(["-device", "virtio-blk-device,drive=vol0"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawning QEMU: {e}"))?;
        let mut qemu = Baseline(child);
        let pid = qemu.0.id();
        if let Some(cg) = &cgroup {
            cg.join(pid)
                .map_err(|e| format!("joining the cgroup: {e}"))?;
            let joined = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if !joined.contains("nitrile-bench/") {
                return Err(format!("QEMU is not in the benchmark's cgroup: {joined}"));
            }
        }
        let result = watch(
            &serial,
            started,
            || matches!(qemu.0.try_wait(), Ok(None)),
            &|| cpu_time(pid),
        );
        // The guest powers off after its last marker; give it the time.
        let deadline = Instant::now() + EXIT_GRACE;
        while matches!(qemu.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(qemu);
        drop(cgroup);
        let _ = std::fs::remove_dir_all(&work);
        result
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn p50(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

fn main() {
    let env = match common::env() {
        Ok(e) => e,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let Some(qemu_img) = env
        .qemu
        .parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.is_file())
        .or_else(|| find_in_path("qemu-img"))
    else {
        println!("SKIPPED: qemu-img is not installed");
        return;
    };
    let runs: usize = std::env::var("NITRILE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mib: u64 = std::env::var("NITRILE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
        .clamp(1, 4096);
    let dir = tempfile::tempdir().expect("tempdir");
    // NITRILE_BENCH_CGROUP=off: no cgroup for any configuration (the
    // backend's too), so that QEMU may use more than one core.
    let cgroups = std::env::var("NITRILE_BENCH_CGROUP").as_deref() != Ok("off");
    let mut jail = JailConfig::default();
    if !cgroups {
        jail.cgroup_root = None;
    }
    let hv = QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
        .expect("qemu backend")
        .with_accel(env.accel)
        .with_jail(jail);
    let cgroup_note = if !cgroups {
        "NITRILE_BENCH_CGROUP=off: no configuration in a cgroup (no CPU or memory limit)".to_owned()
    } else {
        match BenchCgroup::create("volbench-probe", 1 << 30, 1) {
            Ok(Some(_)) => {
                format!(
                    "a in the VM's cgroup, b and c in cgroups with its limits (1 core, {} MiB)",
                    256 + nitrile_vmm::qemu::QEMU_OVERHEAD_MIB
                )
            }
            Ok(None) => "no cgroup hierarchy: no configuration is limited".to_owned(),
            Err(e) => {
                println!("SKIPPED: cannot make a cgroup for the baselines: {e}");
                return;
            }
        }
    };
    let mut bench = Bench {
        env,
        qemu_img,
        mib,
        dir,
        hv,
        keys: KeyService::new(),
        cgroups,
        cgroup_note,
    };
    println!(
        "qemu backend ({:?}), 1 vCPU, 256 MiB, {mib} MiB written then read per run on a {} MiB volume, {runs} runs of a, b, c alternating; {}",
        bench.env.accel,
        bench.volume_mib(),
        bench.cgroup_note
    );
    println!("load average before: {}", loadavg());
    println!(
        "{:<4} {:<38} {:>12} {:>12} {:>20} {:>26}",
        "run",
        "configuration",
        "write MiB/s",
        "read MiB/s",
        "QEMU cores: w, r",
        "guest clock MiB/s: w, r"
    );
    let mut samples: Vec<(Config, Sample)> = Vec::new();
    for n in 0..runs {
        for config in Config::ALL {
            match bench.run(config, n) {
                Ok(s) => {
                    println!(
                        "{:<4} {:<38} {:>12.1} {:>12.1} {:>13.2}, {:>4.2} {:>19.1}, {:>4.1}",
                        n + 1,
                        config.label(),
                        s.write_mib_s(),
                        s.read_mib_s(),
                        s.write_cores(),
                        s.read_cores(),
                        s.guest_write_mib_s(),
                        s.guest_read_mib_s()
                    );
                    samples.push((config, s));
                }
                Err(e) => {
                    println!("run {} of {}: failed: {e}", n + 1, config.label());
                    std::process::exit(1);
                }
            }
        }
    }
    println!("load average after: {}", loadavg());
    let of = |c: Config| -> Vec<Sample> {
        samples
            .iter()
            .filter(|(k, _)| *k == c)
            .map(|(_, s)| *s)
            .collect()
    };
    let (a, b, c) = (of(Config::Encrypted), of(Config::Qcow2), of(Config::Raw));
    let w = |s: &[Sample]| p50(s, Sample::write_mib_s);
    let r = |s: &[Sample]| p50(s, Sample::read_mib_s);
    println!();
    println!(
        "{:<43} {:>12} {:>12}",
        "p50 over the runs", "write MiB/s", "read MiB/s"
    );
    for (config, s) in [
        (Config::Encrypted, &a),
        (Config::Qcow2, &b),
        (Config::Raw, &c),
    ] {
        println!("{:<43} {:>12.1} {:>12.1}", config.label(), w(s), r(s));
    }
    println!(
        "{:<43} {:>11.3}x {:>11.3}x",
        "ratio a / b (encrypted / plain qcow2)",
        w(&a) / w(&b),
        r(&a) / r(&b)
    );
    println!(
        "{:<43} {:>11.3}x {:>11.3}x",
        "ratio a / c (encrypted / raw)",
        w(&a) / w(&c),
        r(&a) / r(&c)
    );
}
