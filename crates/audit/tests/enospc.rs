//! A full disk must never lead to an acknowledged record that is not in the
//! journal, and the journal must work again once space returns.
//!
//! Needs root to mount a tiny tmpfs; prints `SKIPPED: needs root` otherwise.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use nitrile_audit::{Journal, JournalError, JournalReader, verify_journal};

const SOURCE: &str = "nitrile://cell-1/host/h1";

/// A 64 KiB tmpfs mounted on a temporary directory, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Fills the file system with a filler file until a write fails.
fn fill(path: &Path) -> PathBuf {
    let filler = path.join("filler");
    let mut f = File::create(&filler).unwrap();
    let chunk = [0xaa_u8; 512];
    while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
    filler
}

#[test]
fn enospc_acknowledges_nothing_and_recovers() {
    if !is_root() {
        println!("SKIPPED: needs root");
        return;
    }
    let Some(fs_) = TinyFs::mount() else {
        println!("SKIPPED: needs root (mounting a tmpfs failed)");
        return;
    };
    let path = fs_.path().join("journal");
    let j = Journal::open(&path, SOURCE).unwrap();
    let mut acked = Vec::new();
    for i in 0..3 {
        let p = format!("before the disk filled {i}");
        acked.push((j.append(p.as_bytes()).unwrap(), p));
    }
    let durable_len = fs::metadata(&path).unwrap().len();

    let filler = fill(fs_.path());
    let payload = vec![b'x'; 8 * 1024];
    let mut failed = 0;
    for _ in 0..4 {
        match j.append(&payload) {
            Err(JournalError::WriteFailed { source }) => {
                assert_eq!(
                    source.raw_os_error(),
                    Some(28),
                    "ENOSPC expected, got {source}"
                );
                failed += 1;
            }
            other => panic!("an append on a full disk must fail, got {other:?}"),
        }
    }
    assert_eq!(failed, 4);
    assert!(!j.is_poisoned());
    assert_eq!(j.metrics().failures, 4);
    assert_eq!(j.head().seq, 3, "nothing was acknowledged");
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        durable_len,
        "the file was cut back to its durable length"
    );
    let report = verify_journal(&path).unwrap();
    assert_eq!(report.last_seq, 3);

    // Space returns: appends work again and continue the chain.
    fs::remove_file(filler).unwrap();
    let r = j.append(b"after space returned").unwrap();
    assert_eq!(r.seq, 4);
    drop(j);
    let report = verify_journal(&path).unwrap();
    assert_eq!(report.last_seq, 4);
    assert_eq!(report.head_hash, r.hash);
    let entries: Vec<_> = JournalReader::open(&path)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (e, (receipt, p)) in entries.iter().zip(&acked) {
        assert_eq!(e.seq, receipt.seq);
        assert_eq!(e.hash, receipt.hash);
        assert_eq!(e.payload, p.as_bytes());
    }
    assert_eq!(entries[3].payload, b"after space returned");
}
