//! The control channel between the `kvm` backend and a `nitrile vmm`
//! process: JSON lines over a Unix socketpair, each at most
//! [`MAX_CONTROL_LINE`] bytes, each one value of a closed enum.
//!
//! The backend sends [`Request`]s; the VMM answers with [`Event`]s. No message
//! carries guest memory, disk contents, console output or key material.

use std::io::{BufRead, Read, Write};

use serde::{Deserialize, Serialize};

/// Longest control line accepted, newline included.
pub const MAX_CONTROL_LINE: usize = 256;

/// What the backend asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Run the vCPU.
    Start,
    /// End the VM: the VMM answers [`Event::Exited`] and exits.
    Stop,
    /// Report [`Event::Status`].
    Status,
}

/// Whether the vCPU has been started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Built and jailed, vCPU not started.
    Created,
    /// The vCPU runs.
    Running,
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExitKind {
    /// Stopped on request.
    Stopped,
    /// The guest wrote `code` to the shutdown port.
    Shutdown {
        /// The guest's exit code.
        code: u8,
    },
    /// The vCPU halted.
    Halted,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest asked for a reset or power-off.
    SystemEvent,
    /// The VMM failed while running the vCPU (details on its stderr).
    VmmFailed,
}

impl ExitKind {
    /// Whether the VM ended as intended (a stop, or the guest powering off
    /// with code 0 or halting).
    pub fn is_clean(self) -> bool {
        matches!(
            self,
            ExitKind::Stopped | ExitKind::Shutdown { code: 0 } | ExitKind::Halted
        )
    }
}

/// What the VMM tells the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The VM is built, the process jailed; waiting for [`Request::Start`].
    Ready,
    /// The answer to [`Request::Status`].
    Status {
        /// The state.
        state: RunState,
    },
    /// The VM ended; the process exits next.
    Exited {
        /// Why.
        reason: ExitKind,
    },
}

/// Why a control line could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The peer closed the channel.
    #[error("the control channel was closed")]
    Closed,
    /// A line was longer than [`MAX_CONTROL_LINE`].
    #[error("a control line exceeded {MAX_CONTROL_LINE} bytes")]
    TooLong,
    /// A line was not a message of the protocol.
    #[error("malformed control message")]
    Malformed(#[source] serde_json::Error),
    /// A line parsed but was not in canonical form (e.g. an unknown field).
    #[error("control message not in canonical form")]
    NotCanonical,
    /// Reading or writing the socket failed (including a timeout).
    #[error("control channel I/O")]
    Io(#[from] std::io::Error),
}

/// Reads one message of at most [`MAX_CONTROL_LINE`] bytes. Only the
/// canonical form [`write_message`] produces is accepted (no extra fields,
/// no whitespace).
pub fn read_message<T: Serialize + for<'de> Deserialize<'de>>(
    r: &mut impl BufRead,
) -> Result<T, ControlError> {
    let mut line = Vec::with_capacity(64);
    r.take(MAX_CONTROL_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(ControlError::Closed);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= MAX_CONTROL_LINE {
            ControlError::TooLong
        } else {
            ControlError::Closed
        });
    }
    let msg: T = serde_json::from_slice(&line).map_err(ControlError::Malformed)?;
    let canonical = serde_json::to_vec(&msg).map_err(ControlError::Malformed)?;
    if canonical[..] != line[..line.len() - 1] {
        return Err(ControlError::NotCanonical);
    }
    Ok(msg)
}

/// Writes one message as a line.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ControlError> {
    let mut line = serde_json::to_vec(msg).map_err(ControlError::Malformed)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        let events = [
            Event::Ready,
            Event::Status {
                state: RunState::Running,
            },
            Event::Exited {
                reason: ExitKind::Shutdown { code: 3 },
            },
        ];
        for e in &events {
            write_message(&mut buf, e).unwrap();
        }
        let mut r = std::io::Cursor::new(buf);
        for e in &events {
            assert_eq!(&read_message::<Event>(&mut r).unwrap(), e);
        }
        assert!(matches!(
            read_message::<Event>(&mut r),
            Err(ControlError::Closed)
        ));
    }

    #[test]
    fn unknown_and_oversized_lines_are_refused() {
        let mut r = std::io::Cursor::new(b"{\"op\":\"read_memory\"}\n".to_vec());
        assert!(matches!(
            read_message::<Request>(&mut r),
            Err(ControlError::Malformed(_))
        ));
        let mut r = std::io::Cursor::new(b"{\"op\":\"start\",\"x\":1}\n".to_vec());
        assert!(matches!(
            read_message::<Request>(&mut r),
            Err(ControlError::NotCanonical)
        ));
        let mut long = vec![b' '; MAX_CONTROL_LINE + 10];
        long.push(b'\n');
        let mut r = std::io::Cursor::new(long);
        assert!(matches!(
            read_message::<Request>(&mut r),
            Err(ControlError::TooLong)
        ));
        let mut r = std::io::Cursor::new(b"{\"op\":\"start\"}".to_vec());
        assert!(matches!(
            read_message::<Request>(&mut r),
            Err(ControlError::Closed)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut r = std::io::Cursor::new(bytes);
            let _ = read_message::<Request>(&mut r);
            let _ = read_message::<Event>(&mut r);
        }
    }
}
