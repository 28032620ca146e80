//! Helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::path::{Path, PathBuf};

use nitrile_api::{Audience, Name, PrincipalId, ResourceId};

/// The sample bundle shipped in the repository.
pub fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../entitlements")
}

/// A writable copy of the sample bundle (without signatures), its rules
/// included.
pub fn sample_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_files(&sample_dir(), tmp.path());
    let rules = tmp.path().join("rules");
    fs::create_dir(&rules).unwrap();
    copy_files(&sample_dir().join("rules"), &rules);
    tmp
}

fn copy_files(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn principal(s: &str) -> PrincipalId {
    PrincipalId::parse(&format!("nitrile://cell-1/{s}")).unwrap()
}

pub fn res(s: &str) -> ResourceId {
    ResourceId::parse(s).unwrap()
}

pub fn aud(s: &str) -> Audience {
    Audience::new(s).unwrap()
}

/// Replaces `from` by `to` in a file of the bundle; the text must be there.
pub fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} does not contain {from:?}");
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
}
