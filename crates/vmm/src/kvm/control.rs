//! The control channel between the `kvm` backend and a `nitrile vmm`
//! process once its VM is built: JSON lines over a Unix socketpair
//! ([`crate::control`]'s framing: each at most [`MAX_CONTROL_LINE`] bytes,
//! one value of a closed enum, canonical form only).
//!
//! The backend sends [`Request`]s; the VMM answers with [`Event`]s. No message
//! carries guest memory, disk contents or console output. Before the VM is
//! built, the same channel carries the volume-key exchange of
//! [`crate::unlock`]: recipient public keys out, sealed keys in, never a
//! plaintext key.

use serde::{Deserialize, Serialize};

pub use crate::control::{ControlError, MAX_CONTROL_LINE, read_message, write_message};

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
