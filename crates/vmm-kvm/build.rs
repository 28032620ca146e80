//! Builds the bare-metal test guest (`guest/testguest`) with the host's own
//! `rustc` for the x86_64-unknown-linux-gnu target, freestanding and statically
//! linked at 1 MiB, into `OUT_DIR/testguest.elf`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../../guest/testguest");
    let src = guest.join("src/main.rs");
    let script = guest.join("link.ld");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("testguest.elf");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let status = Command::new(rustc)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["--edition", "2024", "--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
        ])
        .args(["-C", "code-model=small"])
        // No SSE in the guest: the software hypervisor some hosts run
        // (kvm_pvm) cannot run SSE instructions in this early environment.
        .args(["-C", "target-feature=+crt-static,-sse,-sse2,+soft-float"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .args(["--crate-type", "bin", "--crate-name", "testguest"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run rustc for the test guest");
    assert!(status.success(), "building the test guest failed");
}
