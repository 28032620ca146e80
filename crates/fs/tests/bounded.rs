//! Attacks on the bounded reads: one byte too many, endless files,
//! missing files, non-text, and the secret buffer growing.

use std::fs;
use std::io;
use std::path::Path;

use nitrile_fs::{
    FsError, Step, read_bounded, read_bounded_to_string, read_secret, read_secret_to_string,
};

/// Every read, its result reduced to the bytes.
fn all_reads(path: &Path, max: u64) -> [Result<Vec<u8>, FsError>; 4] {
    [
        read_bounded(path, max),
        read_bounded_to_string(path, max).map(String::into_bytes),
        read_secret(path, max).map(|b| b.to_vec()),
        read_secret_to_string(path, max).map(|s| s.as_bytes().to_vec()),
    ]
}

#[test]
fn a_file_of_exactly_the_bound_is_read_and_one_byte_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.toml");
    fs::write(&p, "a".repeat(100)).unwrap();
    for r in all_reads(&p, 100) {
        assert_eq!(r.unwrap(), "a".repeat(100).as_bytes());
    }
    for r in all_reads(&p, 99) {
        let e = r.unwrap_err();
        assert!(
            matches!(&e, FsError::TooLarge { path, max: 99 } if *path == p),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains("99"),
            "{msg}"
        );
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
    }
    fs::write(&p, "").unwrap();
    for r in all_reads(&p, 0) {
        assert_eq!(r.unwrap(), b"");
    }
}

#[test]
fn an_endless_file_is_refused_after_the_bound() {
    // /dev/zero never ends: only a read that stops at max + 1 returns.
    for r in all_reads(Path::new("/dev/zero"), 4096) {
        assert!(matches!(r, Err(FsError::TooLarge { max: 4096, .. })));
    }
}

#[test]
fn a_missing_file_is_told_apart_from_other_failures() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent");
    for r in all_reads(&missing, 10) {
        let e = r.unwrap_err();
        assert!(
            matches!(&e, FsError::Missing { path, .. } if *path == missing),
            "{e:?}"
        );
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    }
    // A directory is there, but is no file to read.
    for r in all_reads(dir.path(), 10) {
        let e = r.unwrap_err();
        assert!(
            matches!(&e, FsError::Io { step: Step::Read, error, .. }
                if error.kind() == io::ErrorKind::IsADirectory),
            "{e:?}"
        );
    }
    // Below a file: not missing, not a directory.
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = read_bounded(&file.join("below"), 10).unwrap_err();
    assert!(
        matches!(&e, FsError::Io { step: Step::Open, error, .. }
            if error.kind() == io::ErrorKind::NotADirectory),
        "{e:?}"
    );
}

#[test]
fn bytes_that_are_not_utf8_are_not_text() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("key");
    fs::write(&p, b"ok\xff\xfe").unwrap();
    assert_eq!(read_bounded(&p, 10).unwrap(), b"ok\xff\xfe");
    assert_eq!(read_secret(&p, 10).unwrap().as_slice(), b"ok\xff\xfe");
    for e in [
        read_bounded_to_string(&p, 10).unwrap_err(),
        read_secret_to_string(&p, 10).unwrap_err(),
    ] {
        match &e {
            FsError::NotText { path, error } => {
                assert_eq!(*path, p);
                assert_eq!(error.valid_up_to(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}

#[test]
fn a_secret_is_read_into_one_buffer_that_never_grows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("key.pem");
    fs::write(&p, vec![b'k'; 3000]).unwrap();
    let bytes = read_secret(&p, 4096).unwrap();
    assert_eq!(bytes.len(), 3000);
    // Allocated once at max + 1: a buffer that had grown (and left copies
    // of the key in freed memory) would have another capacity.
    assert_eq!(bytes.capacity(), 4097);
    let text = read_secret_to_string(&p, 4096).unwrap();
    assert_eq!(text.len(), 3000);
    assert_eq!(text.capacity(), 4097, "the string took the buffer over");
}
