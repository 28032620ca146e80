//! The per-VM cgroup of both backends: created before the VM's processes
//! start, joined by them between `fork` and `exec` (through the open
//! `cgroup.procs` files handed to [`nitrile_vmm_sys::jail::Plan`]), emptied
//! and removed after.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

/// A per-VM cgroup, created before the process starts and removed after.
#[derive(Debug)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
}

impl Cgroup {
    /// Creates `nitrile/<name>` with the given memory and CPU limits, under
    /// cgroup v2 if the host is pure v2, else under the v1 `memory` and `cpu`
    /// hierarchies. Returns `None` when no usable hierarchy exists.
    pub(crate) fn create(
        root: &Path,
        name: &str,
        memory_bytes: u64,
        cpus: u32,
    ) -> io::Result<Option<Self>> {
        const PERIOD_US: u64 = 100_000;
        let quota_us = u64::from(cpus) * PERIOD_US;
        let mut cg = Self {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        if root.join("cgroup.controllers").exists() {
            let parent = root.join("nitrile");
            std::fs::create_dir_all(&parent)?;
            // Enable the controllers for our subtree (idempotent).
            std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu")?;
            std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu")?;
            let dir = parent.join(name);
            // An empty cgroup left by a VM whose backend died is replaced.
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir)?;
            cg.dirs.push(dir.clone());
            std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
            std::fs::write(dir.join("memory.swap.max"), "0").ok();
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {PERIOD_US}"))?;
            cg.procs.push(open_procs(&dir)?);
            return Ok(Some(cg));
        }
        let mem = root.join("memory");
        let cpu = root.join("cpu");
        if !mem.join("memory.limit_in_bytes").exists() || !cpu.join("cpu.cfs_quota_us").exists() {
            return Ok(None);
        }
        let mdir = mem.join("nitrile").join(name);
        let cdir = cpu.join("nitrile").join(name);
        // A cgroup left by a VM whose backend died keeps that VM's limits;
        // start from a fresh one when it is empty (rmdir fails otherwise).
        for dir in [&mdir, &cdir] {
            let _ = std::fs::remove_dir(dir);
        }
        std::fs::create_dir_all(&mdir)?;
        cg.dirs.push(mdir.clone());
        // v1 refuses a memory limit above the memory+swap limit: lift the
        // latter first (it may hold an older, smaller value), then set both.
        std::fs::write(mdir.join("memory.memsw.limit_in_bytes"), "-1").ok();
        std::fs::write(mdir.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
        // No escape into swap either, where the kernel accounts it.
        std::fs::write(
            mdir.join("memory.memsw.limit_in_bytes"),
            memory_bytes.to_string(),
        )
        .ok();
        std::fs::create_dir_all(&cdir)?;
        cg.dirs.push(cdir.clone());
        std::fs::write(cdir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
        std::fs::write(cdir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
        cg.procs.push(open_procs(&mdir)?);
        cg.procs.push(open_procs(&cdir)?);
        Ok(Some(cg))
    }

    /// The cgroup of an earlier backend process's VM `name`, for removal
    /// only (no processes can join it); `None` when none exists.
    pub(crate) fn existing(root: &Path, name: &str) -> Option<Self> {
        let dirs: Vec<PathBuf> = [
            root.join("nitrile").join(name),
            root.join("memory").join("nitrile").join(name),
            root.join("cpu").join("nitrile").join(name),
        ]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect();
        (!dirs.is_empty()).then_some(Self {
            dirs,
            procs: Vec::new(),
        })
    }

    /// Kills every process left in the cgroup (e.g. a QEMU whose backend
    /// died before recording it) and waits, up to `timeout`, until none is
    /// left. A listed pid is signalled through a pidfd, and only if that
    /// process is still in this cgroup once the pidfd is open.
    pub(crate) fn kill_all(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let mut left = false;
            for dir in &self.dirs {
                let name = dir.to_string_lossy();
                for pid in members(dir) {
                    left = true;
                    let Ok(p) = crate::process::Tracked::observe(pid) else {
                        continue;
                    };
                    let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                        .is_ok_and(|c| {
                            c.lines().any(|l| {
                                l.rsplit(':')
                                    .next()
                                    .is_some_and(|path| !path.is_empty() && name.ends_with(path))
                            })
                        });
                    if in_cgroup {
                        p.signal(Signal::SIGKILL);
                    }
                }
            }
            if !left || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The open `cgroup.procs` files a child writes to join the cgroup
    /// ([`nitrile_vmm_sys::jail::Plan::cgroup_procs`]); open as long as
    /// `self` lives.
    pub(crate) fn procs(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Removes the cgroup directories (they must be empty of processes).
    pub(crate) fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The pids listed in `dir/cgroup.procs` (at most [`MAX_CGROUP_PROCS`]).
fn members(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .take(MAX_CGROUP_PROCS)
        .collect()
}

/// Most processes looked at in one VM cgroup (a VM has a handful).
const MAX_CGROUP_PROCS: usize = 1024;

fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    Ok(f.into())
}
