//! Process hardening, tested in child processes (this test binary re-run in
//! a child mode): a system call outside the vCPU allowlist kills the VMM;
//! another uid cannot open `/proc/<vmm>/mem`; SIGABRT leaves no core.

// Dropping privileges and making a forbidden system call need raw libc calls.
#![allow(unsafe_code)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};

use nitrile_vmm_kvm::harden;

const CHILD_MODE: &str = "NITRILE_VMM_KVM_TEST_CHILD";
const NOBODY: u32 = 65534;

/// Re-runs this test binary as a child running only `test` in `mode`.
fn child(test: &str, mode: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_MODE, mode);
    cmd
}

fn child_mode() -> Option<String> {
    std::env::var(CHILD_MODE).ok()
}

fn wait_line(child: &mut Child, marker: &str) -> bool {
    let out = child.stdout.as_mut().unwrap();
    let mut lines = BufReader::new(out).lines();
    lines.any(|l| l.is_ok_and(|l| l.contains(marker)))
}

fn become_nobody() {
    // SAFETY: plain system calls with integer arguments; the group first,
    // while still privileged.
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setgid(NOBODY), 0);
        assert_eq!(libc::setuid(NOBODY), 0);
    }
}

/// Whether this process may switch uids; prints the skip line when not.
fn root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        println!("SKIPPED: switching to uid nobody needs root");
    }
    euid == 0
}

/// Holds the process until the parent closes stdin.
fn hold() {
    println!("HELD");
    std::io::stdout().flush().unwrap();
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
}

/// Whether uid `nobody` can open `/proc/<pid>/mem`.
fn nobody_can_open_mem(pid: u32) -> bool {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3< /proc/{pid}/mem && echo OPENED"))
        .uid(NOBODY)
        .gid(NOBODY)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("OPENED")
}

#[test]
fn syscall_outside_seccomp_allowlist_kills_the_vmm() {
    if child_mode().as_deref() == Some("seccomp") {
        // Everything the guest exercises (serial, encrypted blk, vsock)
        // runs inside the allowlist.
        let dir = tempfile::tempdir().unwrap();
        let listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut c, &mut buf) {
                c.write_all(&buf[..n]).unwrap();
            }
        });
        let disk = tempfile::tempfile().unwrap();
        disk.set_len(1 << 20).unwrap();
        let console = common::Console::default();
        let config = nitrile_vmm_kvm::VmConfig {
            memory_bytes: 32 << 20,
            kernel: common::guest_file(),
            kernel_format: nitrile_vmm_kvm::KernelFormat::Elf,
            cmdline: "blk=rw vsock=5000".into(),
            serial_out: Box::new(console.clone()),
            disks: vec![nitrile_vmm_kvm::DiskConfig {
                file: disk,
                encryption: nitrile_vmm_kvm::DiskEncryption::Xts(common::key(5)),
                read_only: false,
                id: "seccomp".into(),
            }],
            vsock: Some(nitrile_vmm_kvm::VsockConfig {
                guest_cid: 3,
                uds_path: dir.path().join("v.sock"),
            }),
        };
        let mut vmm = nitrile_vmm_kvm::Vmm::new(config).unwrap();
        harden::harden_process().unwrap();
        harden::confine_vcpu_thread().unwrap();
        // The run loop works inside the allowlist...
        let exit = vmm.run().unwrap();
        let text = console.text();
        assert!(
            text.contains("BLK-OK") && text.contains("VSOCK-OK"),
            "{text}"
        );
        println!("RAN-UNDER-SECCOMP {exit:?}");
        std::io::stdout().flush().unwrap();
        // ...and a socket() call, outside it, must kill the process.
        // SAFETY: a plain system call; its result does not matter.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        println!("SURVIVED socket={fd}");
        return;
    }
    if !common::kvm_usable() {
        return;
    }
    let out = child("syscall_outside_seccomp_allowlist_kills_the_vmm", "seccomp")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("RAN-UNDER-SECCOMP"),
        "child output: {stdout}"
    );
    assert!(!stdout.contains("SURVIVED"), "child output: {stdout}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "status {:?}",
        out.status
    );
}

#[test]
fn seccomp_filter_compiles_to_bpf() {
    if child_mode().is_some() {
        return;
    }
    let program = harden::vcpu_filter().unwrap();
    assert!(!program.is_empty());
}

#[test]
fn another_uid_cannot_open_vmm_mem() {
    match child_mode().as_deref() {
        Some("hold-vmm") => {
            let (_, out) = common::boot("", Vec::new());
            assert!(out.contains("NITRILE-TESTGUEST-READY"));
            harden::harden_process().unwrap();
            hold();
            return;
        }
        Some(_) => return,
        None => {}
    }
    if !common::kvm_usable() || !root() {
        return;
    }
    let mut vmm = child("another_uid_cannot_open_vmm_mem", "hold-vmm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_line(&mut vmm, "HELD"));
    let opened = nobody_can_open_mem(vmm.id());
    drop(vmm.stdin.take());
    vmm.wait().unwrap();
    assert!(!opened, "uid nobody opened the VMM's /proc/<pid>/mem");
}

/// Same uid as the target: only PR_SET_DUMPABLE=0 stands in the way.
#[test]
fn non_dumpable_process_mem_closed_even_to_its_own_uid() {
    match child_mode().as_deref() {
        Some("hold-nobody-plain") => {
            become_nobody();
            hold();
            return;
        }
        Some("hold-nobody-hardened") => {
            become_nobody();
            harden::harden_process().unwrap();
            hold();
            return;
        }
        Some(_) => return,
        None => {}
    }
    if !root() {
        return;
    }
    let test = "non_dumpable_process_mem_closed_even_to_its_own_uid";
    let mut results = Vec::new();
    for mode in ["hold-nobody-plain", "hold-nobody-hardened"] {
        let mut c = child(test, mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(wait_line(&mut c, "HELD"), "{mode}");
        results.push(nobody_can_open_mem(c.id()));
        drop(c.stdin.take());
        c.wait().unwrap();
    }
    assert!(
        !results[1],
        "a non-dumpable process's memory was opened by its own uid"
    );
    if !results[0] {
        println!("SKIPPED: control not shown: this kernel refuses /proc/<pid>/mem to the same uid");
    }
}

#[test]
fn sigabrt_leaves_no_core_file() {
    match child_mode().as_deref() {
        Some("abort-hardened") => {
            raise_core_limit();
            harden::harden_process().unwrap();
            std::process::abort();
        }
        Some("abort-plain") => {
            raise_core_limit();
            std::process::abort();
        }
        Some(_) => return,
        None => {}
    }
    let run = |mode: &str| {
        let dir = tempfile::tempdir().unwrap();
        let status = child("sigabrt_leaves_no_core_file", mode)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{mode}");
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        (status.core_dumped(), files)
    };
    let (dumped, files) = run("abort-hardened");
    assert!(!dumped, "the kernel reported a core dump");
    assert_eq!(files, 0, "a file was left behind");
    // Control: the same abort without hardening, core limit raised.
    if run("abort-plain") == (false, 0) {
        println!(
            "SKIPPED: control not shown: this kernel writes no core files here (core_pattern)"
        );
    }
}

/// Lifts the soft core limit to the hard limit, so only hardening stops it.
fn raise_core_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the calls read and write.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_CORE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_CORE, &lim), 0);
    }
}
