//! Attacks on `write_atomic`: failures half-way, concurrent writers, the
//! umask, and the order of the durable steps as the kernel sees them.
//!
//! Some tests run one of this binary's ignored tests in a child process
//! (`child_*`), to give it a file-size limit, a umask or a tracer of its own
//! without touching the other tests of this process.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use nitrile_fs::{AtomicFile, FsError, Step, sync_dir, write_atomic};

/// The file a child test writes, passed in the environment.
const TARGET_ENV: &str = "NITRILE_FS_TEST_TARGET";

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs the ignored test `test` of this binary alone in a child, through
/// `sh -c '<prelude>; exec "$0" ...'`, with `target` in the environment.
fn run_child(prelude: &str, wrapper: &[&str], test: &str, target: &Path) -> Output {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{prelude}; exec \"$@\""))
        .arg("sh")
        .args(wrapper)
        .arg(exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TARGET_ENV, target);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child {test} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn child_target() -> PathBuf {
    PathBuf::from(std::env::var_os(TARGET_ENV).expect("run by another test"))
}

#[test]
fn a_file_is_replaced_whole_and_no_temporary_file_remains() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("state.json");
    write_atomic(&p, b"one", 0o600).unwrap();
    write_atomic(&p, b"two, longer", 0o600).unwrap();
    write_atomic(&p, b"3", 0o600).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"3");
    assert_eq!(names(dir.path()), ["state.json"]);
}

#[test]
fn a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big");
    fs::write(&p, b"old").unwrap();
    // 8 blocks of 512 bytes at most per file: the 1 MiB write fails with
    // EFBIG after the temporary file got its first bytes.
    run_child(
        "trap '' XFSZ; ulimit -f 8",
        &[],
        "child_writes_more_than_its_file_size_limit",
        &p,
    );
    assert_eq!(fs::read(&p).unwrap(), b"old");
    assert_eq!(names(dir.path()), ["big"]);
}

#[test]
#[ignore = "run by a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary_file"]
fn child_writes_more_than_its_file_size_limit() {
    let p = child_target();
    let e = write_atomic(&p, &vec![7u8; 1 << 20], 0o600).unwrap_err();
    match &e {
        FsError::Io {
            step: Step::Write,
            path,
            error,
        } => {
            assert_eq!(error.kind(), io::ErrorKind::FileTooLarge, "{e:?}");
            assert_eq!(path.parent(), p.parent());
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(".big.tmp-"), "{name}");
        }
        other => panic!("not a failed write: {other:?}"),
    }
}

#[test]
fn a_rename_that_fails_leaves_the_target_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("target");
    fs::create_dir(&p).unwrap();
    fs::write(p.join("inside"), b"kept").unwrap();
    let e = write_atomic(&p, b"new", 0o600).unwrap_err();
    assert!(
        matches!(&e, FsError::Io { step: Step::Rename, path, .. } if *path == p),
        "{e:?}"
    );
    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    assert_eq!(names(dir.path()), ["target"]);
    assert_eq!(fs::read(p.join("inside")).unwrap(), b"kept");
}

#[test]
fn a_missing_directory_is_an_error_naming_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("absent").join("f");
    let e = write_atomic(&p, b"x", 0o600).unwrap_err();
    match &e {
        FsError::Io {
            step: Step::CreateTemp,
            path,
            error,
        } => {
            assert_eq!(error.kind(), io::ErrorKind::NotFound);
            assert_eq!(path.parent(), p.parent());
        }
        other => panic!("{other:?}"),
    }
    assert!(!dir.path().join("absent").exists(), "no directory is made");
    // The one line says what, where and why.
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot create ") && msg.contains("absent") && msg.contains("os error 2"),
        "{msg}"
    );
    // As an io::Error (for callers whose errors hold one): same kind, same
    // message, the FsError inside.
    let io: io::Error = e.into();
    assert_eq!(io.kind(), io::ErrorKind::NotFound);
    assert_eq!(io.to_string(), msg);
    assert!(io.get_ref().is_some_and(|inner| inner.is::<FsError>()));
}

#[test]
fn the_mode_is_exactly_the_one_asked_for_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("public");
    fs::write(&p, b"old").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).unwrap();
    run_child("umask 077", &[], "child_writes_with_modes", &p);
    assert_eq!(mode(&p), 0o644);
    assert_eq!(mode(&dir.path().join("private")), 0o600);
    assert_eq!(mode(&dir.path().join("group")), 0o640);
}

#[test]
#[ignore = "run by the_mode_is_exactly_the_one_asked_for_whatever_the_umask"]
fn child_writes_with_modes() {
    let p = child_target();
    let dir = p.parent().unwrap();
    write_atomic(&p, b"new", 0o644).unwrap();
    write_atomic(&dir.join("private"), b"key", 0o600).unwrap();
    write_atomic(&dir.join("group"), b"metrics", 0o640).unwrap();
}

#[test]
fn concurrent_writers_of_one_path_never_produce_a_mixed_file() {
    const WRITERS: u8 = 6;
    const ROUNDS: usize = 25;
    const LEN: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(dir.path().join("shared"));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (p, done) = (Arc::clone(&p), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut seen = 0;
            while !done.load(Ordering::SeqCst) {
                match fs::read(&*p) {
                    Ok(bytes) => {
                        assert_eq!(bytes.len(), LEN, "a partial file was seen");
                        assert!(
                            bytes.iter().all(|b| *b == bytes[0]),
                            "a file mixing two writers was seen"
                        );
                        seen += 1;
                    }
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
                }
            }
            seen
        })
    };
    let start = Arc::new(Barrier::new(usize::from(WRITERS)));
    let writers: Vec<_> = (1..=WRITERS)
        .map(|w| {
            let (p, start) = (Arc::clone(&p), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                // Written in small pieces, giving way between them, so that
                // writers sharing a temporary file would interleave.
                for _ in 0..ROUNDS {
                    let mut f =
                        AtomicFile::create_in(p.parent().unwrap(), p.file_name().unwrap(), 0o600)
                            .unwrap();
                    for _ in 0..LEN / 4096 {
                        f.write_all(&[w; 4096]).unwrap();
                        std::thread::yield_now();
                    }
                    f.commit(&p).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.join().unwrap();
    let last = fs::read(&*p).unwrap();
    assert_eq!(last.len(), LEN);
    assert!((1..=WRITERS).contains(&last[0]) && last.iter().all(|b| *b == last[0]));
    assert!(seen > 0);
    assert_eq!(names(dir.path()), ["shared"]);
}

#[test]
fn an_uncommitted_file_is_removed_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = AtomicFile::create_in(dir.path(), OsStr::new("blob"), 0o600).unwrap();
    f.write_all(b"half").unwrap();
    let temp = f.temp_path().to_owned();
    assert!(temp.exists());
    drop(f);
    assert!(!temp.exists());
    assert!(names(dir.path()).is_empty());
}

#[test]
fn a_deferred_directory_sync_is_left_to_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("tile");
    fs::create_dir(&sub).unwrap();
    let mut f = AtomicFile::create_in(&sub, OsStr::new("0"), 0o644).unwrap();
    f.write_all(b"tile").unwrap();
    let to_sync = f.commit_unsynced_dir(&sub.join("0")).unwrap();
    assert_eq!(to_sync, sub);
    sync_dir(&to_sync).unwrap();
    assert_eq!(fs::read(sub.join("0")).unwrap(), b"tile");
    assert_eq!(mode(&sub.join("0")), 0o644);
    let e = sync_dir(&dir.path().join("absent")).unwrap_err();
    assert!(
        matches!(&e, FsError::Io { step: Step::SyncDir, path, .. } if path.ends_with("absent")),
        "{e:?}"
    );
}

/// The durable protocol as the kernel sees it: the temporary file is
/// created exclusively with the mode, fsynced before the rename, and the
/// directory is fsynced after it. Needs `strace`; without it the test says
/// so and checks nothing.
#[test]
fn the_file_is_fsynced_before_the_rename_and_the_directory_after() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("strace is not installed: the syscall order is not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("durable");
    let log = dir.path().join("strace.log");
    let log_arg = log.to_str().unwrap();
    run_child(
        "true",
        &[
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=openat,fchmod,fsync,rename,renameat,renameat2",
            "-o",
            log_arg,
        ],
        "child_writes_once",
        &p,
    );
    let trace = fs::read_to_string(&log).unwrap();
    let dir_s = dir.path().to_str().unwrap();
    // Lines about our directory, from the first open of the temporary file.
    let lines: Vec<&str> = trace.lines().collect();
    let created = lines
        .iter()
        .position(|l| l.contains("openat(") && l.contains(".durable.tmp-"))
        .unwrap_or_else(|| panic!("no temporary file created:\n{trace}"));
    let create = lines[created];
    assert!(
        create.contains("O_CREAT") && create.contains("O_EXCL") && create.contains("0600"),
        "{create}"
    );
    let fd = |l: &str| l.rsplit("= ").next().unwrap().trim().to_owned();
    let temp_fd = fd(create);
    let after = &lines[created..];
    let find = |pred: &dyn Fn(&str) -> bool| after.iter().position(|l| pred(l));
    let chmod = find(&|l| l.contains(&format!("fchmod({temp_fd}, 0600)")))
        .unwrap_or_else(|| panic!("no fchmod:\n{trace}"));
    let file_sync = find(&|l| l.contains(&format!("fsync({temp_fd})")))
        .unwrap_or_else(|| panic!("the temporary file is not fsynced:\n{trace}"));
    let rename = find(&|l| l.contains("rename") && l.contains("/durable\""))
        .unwrap_or_else(|| panic!("no rename:\n{trace}"));
    let dir_open = find(&|l| l.contains(&format!("openat(AT_FDCWD, \"{dir_s}\"")))
        .unwrap_or_else(|| panic!("the directory is not opened:\n{trace}"));
    let dir_fd = fd(after[dir_open]);
    let dir_sync = after
        .iter()
        .skip(dir_open)
        .position(|l| l.contains(&format!("fsync({dir_fd})")))
        .map(|i| i + dir_open)
        .unwrap_or_else(|| panic!("the directory is not fsynced:\n{trace}"));
    assert!(chmod < file_sync, "{trace}");
    assert!(file_sync < rename, "fsync after the rename:\n{trace}");
    assert!(rename < dir_open && dir_open < dir_sync, "{trace}");
}

#[test]
#[ignore = "run by the_file_is_fsynced_before_the_rename_and_the_directory_after"]
fn child_writes_once() {
    write_atomic(&child_target(), b"durable", 0o600).unwrap();
}
