//! Signed notes as an auditor, a shipper or a witness reads the log's
//! checkpoints: the C2SP signed-note parser, signature lines, key strings,
//! `open_checkpoint` and `cosignature/v1` lines, with a fixed log key and a
//! fixed witness key.
//!
//! The first byte chooses the input. Odd: the rest is a note (and a key
//! string) as it came over the wire. Even: the rest is a note text that the
//! target signs with the log key, cosigns with the witness key when asked,
//! and then damages as asked, so the fuzzer reaches the checkpoint parser
//! behind genuine signatures:
//!
//! ```text
//! byte 1       flags: 1 cosign, 2 flip a byte, 4 add a signature line by an unknown key
//! bytes 2..10  cosignature timestamp, u64 big-endian
//! bytes 10..12 offset of the flipped byte, u16 big-endian (modulo the note's length)
//! byte 12      mask XORed into it (0 counts as 1)
//! bytes 13..   the note text
//! ```
//!
//! Properties: nothing panics; a key string that parses prints back as
//! exactly the input; a note's text is recovered exactly from the note
//! signed over it; `open_checkpoint` accepts a note the log signed exactly
//! when its text is a checkpoint of the expected origin, and that
//! checkpoint's own text parses back to it; a cosignature verifies with the
//! timestamp it was made at and names only the witness; a note changed
//! after signing never opens; a note accepted from the wire carries a
//! checkpoint whose canonical text starts the note.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use nitrile_tlog::{
    Checkpoint, MAX_NOTE_SIZE, NoteError, NoteSigner, NoteVerifier, SignedNote, cosignatures,
    open_checkpoint, verify_cosignature,
};

#[path = "../common/note_keys.rs"]
mod note_keys;

use note_keys::ORIGIN;

struct Fixture {
    log: NoteSigner,
    witness: NoteSigner,
    stranger: NoteSigner,
}

/// The keys are pinned (`common/note_keys.rs`): the seeds in
/// `fuzz/seeds/checkpoint_note` are signed with them.
static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| Fixture {
    log: note_keys::log(),
    witness: note_keys::witness(),
    stranger: note_keys::stranger(),
});

/// A note from the wire, and the same bytes as a key string.
fn raw(f: &Fixture, data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = NoteVerifier::from_vkey(text) {
        assert_eq!(v.to_vkey(), text, "a vkey changed in a round trip");
    }
    if let Ok(s) = NoteSigner::from_skey(text) {
        assert_eq!(&*s.to_skey(), text, "an skey changed in a round trip");
    }

    let log = f.log.verifier();
    let witness = f.witness.verifier();
    let note = SignedNote {
        text: text.to_owned(),
    };
    let body = note.body();
    if let Ok(cp) = open_checkpoint(text, ORIGIN, &log) {
        let body = body.as_ref().expect("an opened note has a text");
        assert_eq!(cp.origin, ORIGIN);
        assert!(cp.size <= i64::MAX as u64);
        assert!(
            body.starts_with(&cp.body()),
            "the checkpoint is not the start of the note's text"
        );
        assert_eq!(Checkpoint::parse_body(&cp.body()), Ok(cp));
    }
    match verify_cosignature(text, &witness) {
        Ok(cosigned) => {
            assert!(body.is_ok(), "a cosigned note has a text");
            assert_eq!(cosigned.name, witness.name());
            assert!(cosigned.timestamp <= i64::MAX as u64);
            assert_eq!(
                cosignatures(text, std::slice::from_ref(&witness)),
                [witness.name()]
            );
        }
        Err(_) => assert!(cosignatures(text, std::slice::from_ref(&witness)).is_empty()),
    }
    // The log's key is not a witness key.
    assert!(matches!(
        verify_cosignature(text, &log),
        Err(NoteError::WrongKeyKind { .. })
    ));
}

/// A note text signed here, so that the checks behind the signature run.
fn signed(f: &Fixture, data: &[u8]) {
    if data.len() < 12 {
        return;
    }
    let (head, text) = data.split_at(12);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let flags = head[0];
    let timestamp = u64::from_be_bytes(head[1..9].try_into().expect("8 bytes"));
    let flip_at = u16::from_be_bytes([head[9], head[10]]);
    let mask = head[11].max(1);

    let log = f.log.verifier();
    let witness = f.witness.verifier();
    let Ok(note) = SignedNote::sign(text, &f.log, 0) else {
        // Refused texts: no final newline, a control character, too long.
        assert!(
            !text.ends_with('\n')
                || text.chars().any(|c| c < ' ' && c != '\n')
                || text.len() > MAX_NOTE_SIZE,
            "a note text was refused for no reason"
        );
        return;
    };
    if note.text.len() > MAX_NOTE_SIZE {
        // The text fits, the signed note does not.
        assert_eq!(note.body(), Err(NoteError::TooLarge(note.text.len())));
        return;
    }
    assert_eq!(note.body(), Ok(text), "the signed text is not recovered");

    let mut note = note;
    let mut cosigned_at = None;
    if flags & 1 != 0 {
        match f.witness.sign_line(text, timestamp) {
            Ok(line) => {
                let again = note.with_signature_line(&line);
                // The note may now exceed the size bound.
                if let Ok(with) = again {
                    assert_eq!(
                        with.with_signature_line(&line).as_ref(),
                        Ok(&with),
                        "a signature line was added twice"
                    );
                    note = with;
                    cosigned_at = Some(timestamp);
                }
            }
            Err(_) => assert!(timestamp > i64::MAX as u64),
        }
    }
    if flags & 4 != 0 {
        let line = f
            .stranger
            .sign_line(text, 0)
            .expect("the text was signed once");
        if let Ok(with) = note.with_signature_line(&line) {
            note = with;
        }
    }

    let expected = Checkpoint::parse_body(text);
    let opened = open_checkpoint(&note.text, ORIGIN, &log);
    match (&expected, &opened) {
        (Ok(cp), Ok(got)) => {
            assert_eq!(cp, got);
            assert_eq!(cp.origin, ORIGIN);
            assert!(text.starts_with(&cp.body()));
            assert_eq!(Checkpoint::parse_body(&cp.body()).as_ref(), Ok(cp));
        }
        (Ok(cp), Err(NoteError::WrongOrigin { found, .. })) => {
            assert_ne!(cp.origin, ORIGIN);
            assert_eq!(*found, cp.origin);
        }
        (Err(e), Err(got)) => assert_eq!(e, got),
        _ => panic!("open_checkpoint: {opened:?}, the text parses to {expected:?}"),
    }
    match (cosigned_at, verify_cosignature(&note.text, &witness)) {
        (Some(ts), Ok(valid)) => {
            assert_eq!(valid.timestamp, ts);
            assert_eq!(valid.name, witness.name());
        }
        (None, Err(NoteError::NotSigned(_))) => {}
        (at, got) => panic!("cosigned at {at:?}, verified as {got:?}"),
    }
    let names = cosignatures(&note.text, &[witness.clone(), f.stranger.verifier()]);
    assert_eq!(names.len(), usize::from(cosigned_at.is_some()));

    if flags & 2 != 0 {
        let mut bytes = note.text.clone().into_bytes();
        let at = usize::from(flip_at) % bytes.len();
        bytes[at] ^= mask;
        let Ok(changed) = String::from_utf8(bytes) else {
            return;
        };
        // Changing a signature line of another key, or the part of the
        // witness's line the log does not sign, may leave the log's
        // signature valid; the text itself never changes unnoticed.
        if let Ok(cp) = open_checkpoint(&changed, ORIGIN, &log) {
            let now = SignedNote { text: changed }.body().map(str::to_owned);
            assert_eq!(now.as_deref(), Ok(text), "a changed text opened");
            assert_eq!(Ok(cp), expected);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        raw(f, rest);
    } else {
        signed(f, rest);
    }
});
