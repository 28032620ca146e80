//! Live update: the running host agent hands its listening socket and its
//! instances to the release it just staged, and exits.
//!
//! After `host.update` staged a release (and journaled its outcome), the
//! agent ([`crate::Hostd::serve_updatable`]):
//! 1. stops accepting: connections that arrive from now on wait in the
//!    listening socket's backlog, which stays open (a duplicate of it is
//!    kept), so no client is refused; it finishes the requests in flight;
//! 2. journals `live update: handing over`, stops shipping, leaves every
//!    VM running (detached) and closes its state: journal, data path;
//! 3. ([`hand_over`]) starts `<state>/releases/<version>/nitrile hostd`
//!    with the listening socket and one end of a socket pair as inherited
//!    descriptors (`--takeover LISTENER,CONTROL`). The new agent opens the
//!    same state, re-adopts every VM (the same VMM processes) and serves
//!    on the inherited socket, then reports [`Ready`] on the control
//!    socket: the host description it serves and the instances it runs;
//! 4. the health check: within the deadline (`[release]
//!    health_deadline_secs`), the report must come, name the staged
//!    version, a healthy journal, and every instance that ran before still
//!    running. Then the old agent sends `commit`; the new one journals
//!    `live update: serving`, records the version as the highest run, and
//!    answers `committed`; the old one exits.
//! 5. Otherwise (no report in time, another version, an instance lost, the
//!    new process gone) the old agent sends `abort` (the new one stops
//!    serving and exits without touching any instance), kills it if it
//!    does not exit, opens its state again on the same socket and journals
//!    `live update: rolled back` with the reason: the previous binary
//!    serves again, nothing was stopped.
//!
//! Only the staged binary of a verified release is ever started here; the
//! path is `<state>/releases/<version>/nitrile`, made by
//! [`crate::update::Releases::update`] and nothing else.

use std::ffi::OsString;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::time::Duration;

use nitrile_api::Name;
use nitrile_api::admin::HostDescription;
use nitrile_release::Version;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

/// How long a new agent may take to report ready, by default.
pub const DEFAULT_HEALTH_DEADLINE: Duration = Duration::from_secs(30);
/// How long an aborted new agent has to exit before it is killed.
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// How long the old agent waits for `committed`.
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// The longest line on the control socket.
const MAX_LINE: usize = 1 << 20;

/// A release staged by `host.update`, to run now.
#[derive(Debug, Clone)]
pub struct Handover {
    /// Its version.
    pub version: Version,
    /// `<state>/releases/<version>/nitrile`.
    pub binary: PathBuf,
}

/// How [`crate::Hostd::serve_updatable`] ended.
#[derive(Debug)]
pub enum Served {
    /// Shut down by its caller.
    Stopped,
    /// Shut down by `host.shutdown`: the host is to power off.
    PowerOff,
    /// Stopped serving to hand over to a staged release: the agent's state
    /// is closed, its VMs run on, the listening socket is open.
    Handover {
        /// The release to run.
        handover: Handover,
        /// The listening socket (a duplicate: its backlog is kept).
        listener: std::net::TcpListener,
        /// The instances running when it stopped.
        running: Vec<Name>,
        /// The version it ran.
        from: Version,
    },
}

/// What a new agent reports on the control socket once it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// Its process id.
    pub pid: u32,
    /// What it answers to `host.describe`.
    pub host: HostDescription,
    /// The instances it runs.
    pub running: Vec<Name>,
}

/// Why a hand-over did not happen; the old agent serves again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// The new agent could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The staged binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The descriptors to pass could not be made.
    #[error("cannot pass the socket to the new agent: {0}")]
    Descriptors(std::io::Error),
    /// No report within the deadline.
    #[error("the new agent did not report serving within {0:?}")]
    Deadline(Duration),
    /// The new agent exited or closed the control socket.
    #[error("the new agent exited before serving ({0})")]
    Exited(String),
    /// A report that fails the health check.
    #[error("the new agent failed its health check: {0}")]
    Unhealthy(String),
    /// Interrupted by a shutdown signal.
    #[error("a shutdown signal arrived during the hand-over")]
    Interrupted,
}

/// The old agent's side: starts `handover.binary` with `args` (its own
/// `hostd` arguments) plus `--takeover`, waits for its [`Ready`] within
/// `deadline`, checks it against the staged version and the instances
/// that ran (`running`), and commits. On success returns the new agent's
/// pid; the caller exits. On failure the new agent is gone (aborted, else
/// killed) and the caller serves again.
pub async fn hand_over(
    handover: &Handover,
    listener: &std::net::TcpListener,
    args: &[OsString],
    running: &[Name],
    deadline: Duration,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<u32, HandoverError> {
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(HandoverError::Descriptors)?;
    // Duplicates without close-on-exec: exactly these two are inherited.
    // Nothing else of this process starts a program meanwhile (it serves
    // nothing), so no other child inherits them.
    let l = nix::unistd::dup(listener).map_err(|e| HandoverError::Descriptors(e.into()))?;
    let c = nix::unistd::dup(&theirs).map_err(|e| HandoverError::Descriptors(e.into()))?;
    let mut child = tokio::process::Command::new(&handover.binary)
        .args(args)
        .arg("--takeover")
        .arg(format!("{},{}", l.as_raw_fd(), c.as_raw_fd()))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| HandoverError::Spawn {
            binary: handover.binary.clone(),
            source,
        })?;
    drop((l, c, theirs));
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, binary = %handover.binary.display(), "started the new host agent");
    ours.set_nonblocking(true)
        .map_err(HandoverError::Descriptors)?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(HandoverError::Descriptors)?;
    let (read, mut write) = ours.into_split();
    let mut lines = BufReader::new(read);

    let checked = {
        tokio::pin!(interrupt);
        tokio::select! {
            biased;
            () = &mut interrupt => Err(HandoverError::Interrupted),
            r = tokio::time::timeout(deadline, read_line(&mut lines)) => match r {
                Err(_) => Err(HandoverError::Deadline(deadline)),
                Ok(Ok(Some(line))) => check_ready(&line, handover, running, pid),
                Ok(Ok(None)) => {
                    let status = child.try_wait().ok().flatten();
                    Err(HandoverError::Exited(status.map_or_else(
                        || "closed the control socket".to_owned(),
                        |s| s.to_string(),
                    )))
                }
                Ok(Err(e)) => Err(HandoverError::Exited(e.to_string())),
            },
        }
    };
    match checked {
        Ok(()) => {
            let _ = write.write_all(b"commit\n").await;
            let _ = write.flush().await;
            match tokio::time::timeout(COMMIT_WAIT, read_line(&mut lines)).await {
                Ok(Ok(Some(l))) if l == "committed" => {}
                other => tracing::warn!(?other, "the new agent did not confirm the commit"),
            }
            Ok(pid)
        }
        Err(e) => {
            tracing::error!(error = %e, "live update failed; the previous agent serves again");
            let _ = write.write_all(b"abort\n").await;
            drop(write);
            drop(lines);
            match tokio::time::timeout(ABORT_GRACE, child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill().await;
                }
            }
            Err(e)
        }
    }
}

async fn read_line(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut limited = r.take(MAX_LINE as u64);
    let n = limited.read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::other("a control line without its end"));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::other("a control line that is not UTF-8"))
}

fn check_ready(
    line: &str,
    handover: &Handover,
    running: &[Name],
    pid: u32,
) -> Result<(), HandoverError> {
    let ready: Ready = serde_json::from_str(line)
        .map_err(|e| HandoverError::Unhealthy(format!("an unreadable report: {e}")))?;
    if ready.pid != pid {
        return Err(HandoverError::Unhealthy(format!(
            "the report names pid {}, not {pid}",
            ready.pid
        )));
    }
    if ready.host.software.nitrile != handover.version.to_string() {
        return Err(HandoverError::Unhealthy(format!(
            "it runs version {:?}, not {}",
            ready.host.software.nitrile, handover.version
        )));
    }
    if ready.host.health.journal != nitrile_api::admin::Health::Ok {
        return Err(HandoverError::Unhealthy(
            "its journal is not healthy".into(),
        ));
    }
    let lost: Vec<&str> = running
        .iter()
        .filter(|n| !ready.running.contains(n))
        .map(Name::as_str)
        .collect();
    if !lost.is_empty() {
        return Err(HandoverError::Unhealthy(format!(
            "instances not running under it: {}",
            lost.join(", ")
        )));
    }
    Ok(())
}

/// The new agent's side of the control socket.
#[derive(Debug)]
pub struct Takeover {
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

/// What the old agent decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve on; the old agent exits.
    Commit,
    /// Stop serving and exit; the old agent serves again.
    Abort,
}

impl Takeover {
    /// The control socket inherited from the old agent.
    pub fn new(control: std::os::unix::net::UnixStream) -> std::io::Result<Self> {
        control.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(control)?.into_split();
        Ok(Self {
            read: BufReader::new(read),
            write,
        })
    }

    /// Reports serving and waits (at most `wait`) for the verdict; anything
    /// but `commit` in time is an abort.
    pub async fn report(&mut self, ready: &Ready, wait: Duration) -> Verdict {
        let mut line = serde_json::to_vec(ready).unwrap_or_default();
        line.push(b'\n');
        if self.write.write_all(&line).await.is_err() {
            return Verdict::Abort;
        }
        match tokio::time::timeout(wait, read_line(&mut self.read)).await {
            Ok(Ok(Some(l))) if l == "commit" => Verdict::Commit,
            _ => Verdict::Abort,
        }
    }

    /// Confirms the commit (after journaling it).
    pub async fn confirm(mut self) {
        let _ = self.write.write_all(b"committed\n").await;
        let _ = self.write.flush().await;
    }
}
