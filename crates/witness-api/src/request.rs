//! The bodies of c2sp.org/tlog-witness `add-checkpoint`: the request (old
//! size line, consistency proof lines, blank line, checkpoint) and the
//! response (cosignature lines).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nitrile_tlog::Hash;

/// Most consistency proof lines a request may carry (the spec's limit).
pub const MAX_PROOF_LINES: usize = 63;
/// Largest checkpoint note accepted (body and signature lines).
pub const MAX_NOTE_SIZE: usize = 16 * 1024;
/// Largest request body accepted: the old size line, the proof and the note.
pub const MAX_REQUEST_SIZE: usize = 32 + MAX_PROOF_LINES * 46 + 1 + MAX_NOTE_SIZE;
/// Most cosignature lines a response may carry.
pub const MAX_COSIGNATURE_LINES: usize = 16;
/// Largest response body accepted.
pub const MAX_RESPONSE_SIZE: usize = MAX_COSIGNATURE_LINES * 1024;

/// Why a request or response body was refused (answered `400 Bad Request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The body is larger than its bound.
    #[error("body is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// The body's length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The body is not UTF-8.
    #[error("body is not UTF-8")]
    NotUtf8,
    /// The first line is not `old <decimal>` without leading zeroes.
    #[error("first line is not `old <size>`")]
    BadOldSize,
    /// A proof line is not the base64 of 32 bytes.
    #[error("consistency proof line {line} is not a base64 SHA-256 hash")]
    BadProofLine {
        /// The 1-based index of the proof line.
        line: usize,
    },
    /// More than [`MAX_PROOF_LINES`] proof lines.
    #[error("more than {MAX_PROOF_LINES} consistency proof lines")]
    TooManyProofLines,
    /// No blank line separates the proof from the checkpoint.
    #[error("no blank line before the checkpoint")]
    NoCheckpoint,
    /// A response line is not a signed-note signature line.
    #[error("response line {line} is not a note signature line")]
    BadSignatureLine {
        /// The 1-based index of the line.
        line: usize,
    },
    /// A response with no cosignature line, or more than
    /// [`MAX_COSIGNATURE_LINES`].
    #[error("response carries {0} signature lines")]
    SignatureLineCount(usize),
}

/// An `add-checkpoint` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// The size of the checkpoint the client believes the witness last
    /// cosigned (0 when it has none).
    pub old_size: u64,
    /// The consistency proof from `old_size` to the checkpoint's size.
    pub proof: Vec<Hash>,
    /// The checkpoint, a signed note (text, blank line, signature lines).
    pub note: String,
}

/// Parses a decimal with no leading zeroes (`0` alone is allowed).
fn parse_decimal(s: &str) -> Option<u64> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok { s.parse().ok() } else { None }
}

impl AddCheckpoint {
    /// Parses a request body.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_REQUEST_SIZE {
            return Err(RequestError::TooLarge {
                len: body.len(),
                max: MAX_REQUEST_SIZE,
            });
        }
        let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
        let (first, mut rest) = text.split_once('\n').ok_or(RequestError::BadOldSize)?;
        let old_size = first
            .strip_prefix("old ")
            .and_then(parse_decimal)
            .ok_or(RequestError::BadOldSize)?;
        let mut proof = Vec::new();
        loop {
            let (line, after) = rest.split_once('\n').ok_or(RequestError::NoCheckpoint)?;
            rest = after;
            if line.is_empty() {
                break;
            }
            if proof.len() == MAX_PROOF_LINES {
                return Err(RequestError::TooManyProofLines);
            }
            let bad = RequestError::BadProofLine {
                line: proof.len() + 1,
            };
            if line.len() != 44 {
                return Err(bad);
            }
            let raw = B64.decode(line).map_err(|_| bad.clone())?;
            let hash: Hash = raw.try_into().map_err(|_| bad)?;
            proof.push(hash);
        }
        if rest.len() > MAX_NOTE_SIZE {
            return Err(RequestError::TooLarge {
                len: rest.len(),
                max: MAX_NOTE_SIZE,
            });
        }
        Ok(Self {
            old_size,
            proof,
            note: rest.to_owned(),
        })
    }

    /// Encodes the request body.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 + self.proof.len() * 45 + 1 + self.note.len());
        out.push_str("old ");
        out.push_str(&self.old_size.to_string());
        out.push('\n');
        for h in &self.proof {
            out.push_str(&B64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.note);
        out
    }
}

/// Parses an `add-checkpoint` success response: one or more note signature
/// lines (`— <name> <base64>\n`). Returns the lines without their newline.
/// It checks the form only; verify each line with the witness's key.
pub fn parse_cosignature_lines(body: &[u8]) -> Result<Vec<String>, RequestError> {
    if body.len() > MAX_RESPONSE_SIZE {
        return Err(RequestError::TooLarge {
            len: body.len(),
            max: MAX_RESPONSE_SIZE,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    let Some(text) = text.strip_suffix('\n') else {
        return Err(RequestError::BadSignatureLine { line: 1 });
    };
    let mut lines = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        if lines.len() == MAX_COSIGNATURE_LINES {
            return Err(RequestError::SignatureLineCount(i + 1));
        }
        let bad = RequestError::BadSignatureLine { line: i + 1 };
        let rest = line.strip_prefix("\u{2014} ").ok_or(bad.clone())?;
        let (name, sig) = rest.split_once(' ').ok_or(bad.clone())?;
        let name_ok = !name.is_empty() && !name.contains('+');
        let sig_ok = B64.decode(sig).is_ok_and(|raw| raw.len() > 4);
        if !name_ok || !sig_ok {
            return Err(bad);
        }
        lines.push(line.to_owned());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPEC_EXAMPLE: &str = "old 20852014
PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=
jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=
5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=
/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=

example.com/behind-the-sofa
20852163
CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=

\u{2014} example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=
";

    #[test]
    fn the_spec_example_parses_and_round_trips() {
        let req = AddCheckpoint::parse(SPEC_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(req.old_size, 20_852_014);
        assert_eq!(req.proof.len(), 4);
        assert_eq!(
            B64.encode(req.proof[3]),
            "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0="
        );
        assert!(
            req.note
                .starts_with("example.com/behind-the-sofa\n20852163\n")
        );
        assert_eq!(req.encode(), SPEC_EXAMPLE);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let cases: &[(&str, RequestError)] = &[
            ("old 01\n\nx\n", RequestError::BadOldSize),
            ("old -1\n\nx\n", RequestError::BadOldSize),
            ("old  1\n\nx\n", RequestError::BadOldSize),
            ("new 1\n\nx\n", RequestError::BadOldSize),
            ("old 1", RequestError::BadOldSize),
            ("old 1\n", RequestError::NoCheckpoint),
            ("old 1\nAAAA\n\nx\n", RequestError::BadProofLine { line: 1 }),
            ("old 18446744073709551616\n\nx\n", RequestError::BadOldSize),
        ];
        for (body, want) in cases {
            assert_eq!(
                AddCheckpoint::parse(body.as_bytes()).unwrap_err(),
                *want,
                "{body:?}"
            );
        }
        let mut many = "old 1\n".to_owned();
        for _ in 0..64 {
            many.push_str(&B64.encode([7u8; 32]));
            many.push('\n');
        }
        many.push_str("\nx\n");
        assert_eq!(
            AddCheckpoint::parse(many.as_bytes()).unwrap_err(),
            RequestError::TooManyProofLines
        );
        assert_eq!(
            AddCheckpoint::parse(&[b'o'; MAX_REQUEST_SIZE + 1]).unwrap_err(),
            RequestError::TooLarge {
                len: MAX_REQUEST_SIZE + 1,
                max: MAX_REQUEST_SIZE
            }
        );
    }

    #[test]
    fn cosignature_responses_parse() {
        let body = "\u{2014} witness.example/w1 CMp+6LWBU0anHGH5aNDTJkH/gj79sG+T6+iP2ThYN5krrDJbR1HDnucjL39QsZTSvVjyQLrdk3DXDqI5G2HgLatVs0pWh6Up69HVOw==\n\u{2014} witness.example/w2 AWui8Sk55XjYLOijihBjhqEH6nS1ndDymE0a+6idX7pLcnoB+dhnz0854aLZgrrKbYKA7nC3HNJhm/kWl7oJlqU3rXXvpysAdyP3wQ==\n";
        let lines = parse_cosignature_lines(body.as_bytes()).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("\u{2014} witness.example/w2 "));
        for bad in [
            "",
            "\n",
            "- w AAAAAAAA\n",
            "\u{2014} w AAAAAAAA",
            "\u{2014} w !!\n",
        ] {
            assert!(parse_cosignature_lines(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn requests_round_trip(
            old_size in any::<u64>(),
            proof in proptest::collection::vec(any::<[u8; 32]>(), 0..=MAX_PROOF_LINES),
            note in "[a-z./]{1,20}\n[0-9]{1,5}\n[A-Za-z0-9+/=]{4,44}\n\n\u{2014} [a-z]{1,8} [A-Za-z0-9+/]{8}\n",
        ) {
            let req = AddCheckpoint { old_size, proof, note };
            prop_assert_eq!(AddCheckpoint::parse(req.encode().as_bytes()).unwrap(), req);
        }

        #[test]
        fn parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = AddCheckpoint::parse(&body);
            let _ = parse_cosignature_lines(&body);
        }

        #[test]
        fn parsing_text_never_panics(body in "(old [0-9]{0,3}\n)?([A-Za-z0-9+/=]{0,46}\n){0,3}\n?.{0,40}") {
            let _ = AddCheckpoint::parse(body.as_bytes());
        }
    }
}
