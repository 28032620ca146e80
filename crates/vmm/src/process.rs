//! VMM processes a backend tracks, whether it spawned them or adopted them
//! from an earlier backend process, and the record that makes adoption safe.
//!
//! A process is named by its pid *and* its start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot), so a pid the kernel recycled
//! for an unrelated process is never mistaken for a VMM. Once identified, a
//! process is held through a pidfd ([`nitrile_vmm_sys::PidFd`]): exit
//! detection polls it and signals are sent through it, so no signal can
//! reach a later process that reused the pid. Processes we spawned are also
//! reaped through their [`Child`].

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nitrile_vmm_sys::PidFd;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// Longest `/proc/<pid>/stat` read, in bytes.
const MAX_STAT_LEN: u64 = 4096;
/// Longest adoption record accepted, in bytes.
pub const MAX_RECORD_LEN: u64 = 16 * 1024;
/// How often a waiting loop looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A process as persisted: its pid and its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProcRecord {
    /// The host pid.
    pub(crate) pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
    pub(crate) start_time: u64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// The state letter (`R`, `S`, `Z`, ...).
    state: char,
    start_time: u64,
}

/// Parses the fields we need from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 is the state; field 22 the start time (19 fields further on).
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

fn read_stat(pid: u32) -> io::Result<Stat> {
    let mut text = String::new();
    File::open(format!("/proc/{pid}/stat"))?
        .take(MAX_STAT_LEN)
        .read_to_string(&mut text)?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat line"))
}

/// Whether the process behind `pidfd` has exited (it may be a zombie); an
/// error counts as still running.
fn exited(pidfd: &PidFd) -> bool {
    pidfd.has_exited().unwrap_or(false)
}

/// How a tracked process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// A child of ours, reaped with this status.
    Status(ExitStatus),
    /// An adopted process: its status went to its actual parent.
    Unknown,
}

/// A process identified by pid and start time and held through a pidfd.
#[derive(Debug)]
pub(crate) struct Tracked {
    record: ProcRecord,
    pidfd: PidFd,
    child: Option<Child>,
    /// Adopted: reap it on exit should it be a child of ours after all (a
    /// successor backend in the process that spawned it).
    reap: bool,
    exit: Option<Exit>,
}

impl Tracked {
    /// Tracks a child we just spawned (not reaped yet, so its pid is ours);
    /// on failure the child is killed and reaped.
    pub(crate) fn spawned(mut child: Child) -> io::Result<Self> {
        let pid = child.id();
        let found = PidFd::open(pid).and_then(|fd| Ok((fd, read_stat(pid)?)));
        let (pidfd, stat) = match found {
            Ok(f) => f,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            record: ProcRecord {
                pid,
                start_time: stat.start_time,
            },
            pidfd,
            child: Some(child),
            reap: false,
            exit: None,
        })
    }

    /// Tracks `pid`, a process that is not our child (e.g. QEMU under its
    /// waiting parent), as it is now.
    pub(crate) fn observe(pid: u32) -> io::Result<Self> {
        let pidfd = PidFd::open(pid)?;
        // Read after the pidfd exists: if the pid had been reused before the
        // open, the pidfd and this start time both belong to the new process.
        let stat = read_stat(pid)?;
        Ok(Self {
            record: ProcRecord {
                pid,
                start_time: stat.start_time,
            },
            pidfd,
            child: None,
            reap: false,
            exit: None,
        })
    }

    /// Takes over the process `record` names if it still runs: `None` when
    /// the pid is gone, a zombie, or now belongs to a process with another
    /// start time (which is then left alone). An exited child of ours (the
    /// same process starting a successor backend) is reaped.
    pub(crate) fn adopt(record: ProcRecord) -> Option<Self> {
        let pidfd = PidFd::open(record.pid).ok()?;
        let stat = read_stat(record.pid).ok()?;
        if stat.start_time != record.start_time {
            return None;
        }
        if matches!(stat.state, 'Z' | 'X') || exited(&pidfd) {
            // Reaped if it is an exited child of ours; harmless (ECHILD)
            // when it is not our child.
            let _ = pidfd.try_reap();
            return None;
        }
        Some(Self {
            record,
            pidfd,
            child: None,
            reap: true,
            exit: None,
        })
    }

    /// What to persist so a successor can adopt this process.
    pub(crate) fn record(&self) -> ProcRecord {
        self.record
    }

    /// The host pid.
    pub(crate) fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Whether (and how) the process has ended; never blocks.
    pub(crate) fn try_exit(&mut self) -> io::Result<Option<Exit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        self.exit = match self.child.as_mut() {
            Some(child) => child.try_wait()?.map(Exit::Status),
            None if exited(&self.pidfd) => {
                if self.reap {
                    let _ = self.pidfd.try_reap();
                }
                Some(Exit::Unknown)
            }
            None => None,
        };
        Ok(self.exit)
    }

    /// Whether the process has ended (an error counts as still running).
    #[cfg(test)]
    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.try_exit(), Ok(Some(_)))
    }

    /// Sends `signal` through the pidfd (nothing happens once it has exited).
    pub(crate) fn signal(&self, signal: Signal) {
        let _ = self.pidfd.send_signal(signal);
    }

    /// Waits until the process has ended or `deadline` passes.
    pub(crate) fn wait_until(&mut self, deadline: Instant) -> Option<Exit> {
        loop {
            match self.try_exit() {
                Ok(Some(exit)) => return Some(exit),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                _ => return None,
            }
        }
    }

    /// Waits until the process has ended, however long that takes.
    pub(crate) fn wait(&mut self) -> io::Result<Exit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        if let Some(child) = self.child.as_mut() {
            let exit = Exit::Status(child.wait()?);
            self.exit = Some(exit);
            return Ok(exit);
        }
        loop {
            if let Some(exit) = self.try_exit()? {
                return Ok(exit);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Reads a JSON record of at most [`MAX_RECORD_LEN`] bytes; `Ok(None)` when
/// the file does not exist.
pub(crate) fn read_record<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, RecordError> {
    let bytes = match nitrile_fs::read_bounded(path, MAX_RECORD_LEN) {
        Ok(bytes) => bytes,
        Err(nitrile_fs::FsError::Missing { .. }) => return Ok(None),
        Err(nitrile_fs::FsError::TooLarge { .. }) => return Err(RecordError::TooLong),
        Err(e) => return Err(RecordError::Io(e.into())),
    };
    Ok(Some(serde_json::from_slice(&bytes)?))
}

/// Writes `value` as JSON to `path` with [`nitrile_fs::write_atomic`]: a
/// unique temporary file (mode 0600) in the same directory, fsync, rename
/// over `path`, fsync of the directory.
pub(crate) fn write_record<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    nitrile_fs::write_atomic(path, &bytes, 0o600).map_err(io::Error::from)
}

/// Why an adoption record could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// reading the file failed
    #[error("reading the record")]
    Io(#[from] io::Error),
    /// the file is longer than any record this crate writes
    #[error("the record is longer than {MAX_RECORD_LEN} bytes")]
    TooLong,
    /// the file is not a record this crate writes
    #[error("malformed record")]
    Malformed(#[from] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stat_of_this_process_parses_and_is_stable() {
        let me = std::process::id();
        let a = read_stat(me).unwrap();
        let b = read_stat(me).unwrap();
        assert_eq!(a.start_time, b.start_time);
        assert!(a.start_time > 0);
    }

    #[test]
    fn stat_with_parentheses_and_spaces_in_the_name_parses() {
        let line = "42 (a) b (c) d) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn truncated_stat_is_refused() {
        assert_eq!(parse_stat("42 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    proptest! {
        #[test]
        fn parse_stat_never_panics(s in ".{0,400}") {
            let _ = parse_stat(&s);
        }
    }

    #[test]
    fn a_live_child_is_adopted_and_a_wrong_start_time_is_not() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut tracked = Tracked::spawned(child).unwrap();
        let rec = tracked.record();
        let mut adopted = Tracked::adopt(rec).expect("adopted");
        assert!(!adopted.exited());
        let wrong = ProcRecord {
            pid: rec.pid,
            start_time: rec.start_time + 1,
        };
        assert!(Tracked::adopt(wrong).is_none());
        // The refused adoption sent nothing: the process still runs.
        assert!(!tracked.exited());
        adopted.signal(Signal::SIGKILL);
        assert!(matches!(tracked.wait().unwrap(), Exit::Status(s) if !s.success()));
        assert_eq!(adopted.wait().unwrap(), Exit::Unknown);
        // Reaped and gone: nothing to adopt any more.
        assert!(Tracked::adopt(rec).is_none());
    }

    #[test]
    fn record_round_trips_atomically_and_refuses_junk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        assert!(read_record::<ProcRecord>(&path).unwrap().is_none());
        let rec = ProcRecord {
            pid: 7,
            start_time: 9,
        };
        write_record(&path, &rec).unwrap();
        assert_eq!(read_record::<ProcRecord>(&path).unwrap(), Some(rec));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("r.json.tmp").exists());
        fs::write(&path, br#"{"pid":7,"start_time":9,"extra":1}"#).unwrap();
        assert!(matches!(
            read_record::<ProcRecord>(&path),
            Err(RecordError::Malformed(_))
        ));
        fs::write(&path, vec![b' '; MAX_RECORD_LEN as usize + 1]).unwrap();
        assert!(matches!(
            read_record::<ProcRecord>(&path),
            Err(RecordError::TooLong)
        ));
    }
}
