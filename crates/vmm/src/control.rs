//! The framing of the control channels between a backend and the process
//! it spawned (`nitrile vmm`, the QEMU launcher): JSON lines over a Unix
//! socketpair, each at most [`MAX_CONTROL_LINE`] bytes, each one value of a
//! closed enum, accepted only in the canonical form [`write_message`]
//! produces.

use std::io::{BufRead, Read, Write};

use serde::{Deserialize, Serialize};

/// Longest control line accepted, newline included.
pub const MAX_CONTROL_LINE: usize = 256;

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

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
    enum Msg {
        Start,
        Say { word: String },
    }

    #[test]
    fn unknown_oversized_and_unfinished_lines_are_refused() {
        let mut r = std::io::Cursor::new(b"{\"op\":\"read_memory\"}\n".to_vec());
        assert!(matches!(
            read_message::<Msg>(&mut r),
            Err(ControlError::Malformed(_))
        ));
        let mut r = std::io::Cursor::new(b"{\"op\":\"start\",\"x\":1}\n".to_vec());
        assert!(matches!(
            read_message::<Msg>(&mut r),
            Err(ControlError::Malformed(_) | ControlError::NotCanonical)
        ));
        let mut r = std::io::Cursor::new(b"{ \"op\":\"start\"}\n".to_vec());
        assert!(matches!(
            read_message::<Msg>(&mut r),
            Err(ControlError::NotCanonical)
        ));
        let mut long = vec![b' '; MAX_CONTROL_LINE + 10];
        long.push(b'\n');
        let mut r = std::io::Cursor::new(long);
        assert!(matches!(
            read_message::<Msg>(&mut r),
            Err(ControlError::TooLong)
        ));
        let mut r = std::io::Cursor::new(b"{\"op\":\"start\"}".to_vec());
        assert!(matches!(
            read_message::<Msg>(&mut r),
            Err(ControlError::Closed)
        ));
    }

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        let msgs = [Msg::Start, Msg::Say { word: "hi".into() }];
        for m in &msgs {
            write_message(&mut buf, m).unwrap();
        }
        let mut r = std::io::Cursor::new(buf);
        for m in &msgs {
            assert_eq!(&read_message::<Msg>(&mut r).unwrap(), m);
        }
        assert!(matches!(
            read_message::<Msg>(&mut r),
            Err(ControlError::Closed)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut r = std::io::Cursor::new(bytes);
            let _ = read_message::<Msg>(&mut r);
        }
    }
}
