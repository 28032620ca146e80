//! A minimal QMP client: only the four commands the backend needs.
//!
//! The command set is closed ([`Command`]); there is no way to send an
//! arbitrary QMP command (e.g. `human-monitor-command`, `pmemsave`,
//! `migrate`) through this module. Replies are read as lines of at most
//! [`MAX_QMP_LINE`] bytes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest QMP reply line accepted, in bytes.
pub const MAX_QMP_LINE: usize = 64 * 1024;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// reading or writing the socket failed
    #[error("QMP socket I/O")]
    Io(#[from] io::Error),
    /// QEMU closed the connection
    #[error("QMP connection closed")]
    Closed,
    /// a reply line is longer than [`MAX_QMP_LINE`]
    #[error("QMP reply longer than {MAX_QMP_LINE} bytes")]
    TooLong,
    /// a reply is not the JSON we expect
    #[error("malformed QMP reply")]
    Malformed(#[source] serde_json::Error),
    /// QEMU answered with an error
    #[error("QEMU refused {command}: {class}")]
    Refused {
        /// the command
        command: &'static str,
        /// QMP error class
        class: String,
    },
    /// the status reply names a run state we do not know
    #[error("unknown QEMU run state {0:?}")]
    UnknownState(String),
}

/// The closed set of QMP commands the backend sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    QueryStatus,
    Cont,
    Stop,
    Quit,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::QueryStatus => "query-status",
            Command::Cont => "cont",
            Command::Stop => "stop",
            Command::Quit => "quit",
        }
    }
}

/// QEMU's run state, reduced to what the backend distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    /// `prelaunch` (started with `-S`, never run).
    Prelaunch,
    /// `running`.
    Running,
    /// `paused` and similar stopped-but-resumable states.
    Paused,
    /// `shutdown`, `guest-panicked` and other terminal states.
    Terminal,
}

pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Qmp")
    }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::UnknownState("no QMP greeting".to_owned()));
        }
        qmp.send("qmp_capabilities")?;
        qmp.read_return("qmp_capabilities")?;
        Ok(qmp)
    }

    fn send(&mut self, command: &str) -> Result<(), QmpError> {
        let line = serde_json::json!({ "execute": command }).to_string();
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        Ok(())
    }

    fn read_message(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_QMP_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.len() > MAX_QMP_LINE {
            return Err(QmpError::TooLong);
        }
        serde_json::from_slice(&line).map_err(QmpError::Malformed)
    }

    /// Reads until the reply to `command`, skipping asynchronous events.
    fn read_return(&mut self, command: &'static str) -> Result<serde_json::Value, QmpError> {
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let class = err
                    .get("class")
                    .and_then(|c| c.as_str())
                    .unwrap_or("unknown")
                    .chars()
                    .take(64)
                    .collect();
                return Err(QmpError::Refused { command, class });
            }
        }
    }

    /// Sends `command` and waits for its reply.
    pub(crate) fn execute(&mut self, command: Command) -> Result<serde_json::Value, QmpError> {
        self.send(command.name())?;
        match command {
            // QEMU may close the socket before or after answering `quit`.
            Command::Quit => match self.read_return(command.name()) {
                Ok(v) => Ok(v),
                Err(QmpError::Closed) => Ok(serde_json::Value::Null),
                Err(QmpError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    Ok(serde_json::Value::Null)
                }
                Err(e) => Err(e),
            },
            _ => self.read_return(command.name()),
        }
    }

    /// The VM's run state.
    pub(crate) fn run_state(&mut self) -> Result<RunState, QmpError> {
        let ret = self.execute(Command::QueryStatus)?;
        let status = ret
            .get("status")
            .and_then(|s| s.as_str())
            .ok_or_else(|| QmpError::UnknownState("missing status".to_owned()))?;
        Ok(match status {
            "prelaunch" => RunState::Prelaunch,
            "running" => RunState::Running,
            "paused" | "suspended" | "debug" | "io-error" | "watchdog" | "colo"
            | "finish-migrate" | "inmigrate" | "postmigrate" | "restore-vm" | "save-vm" => {
                RunState::Paused
            }
            "shutdown" | "guest-panicked" | "internal-error" => RunState::Terminal,
            other => return Err(QmpError::UnknownState(other.chars().take(64).collect())),
        })
    }
}
