//! Booting real guests in tests: where QEMU is, and waiting for a marker
//! line on a guest's serial console. Only the standard library, so that
//! every crate that includes this harness can build it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `qemu-system-x86_64` on the `PATH`, if there is one.
pub fn find_qemu() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    })
}

/// Waits until `serial` has a line equal to one of `markers` (or starting
/// with it followed by a space, for markers that carry a value) and returns
/// that line; prints the console and returns `None` at `timeout`.
pub fn wait_for_line(serial: &Path, markers: &[&str], timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
        if let Some(line) = text.lines().map(str::trim).find(|l| {
            markers
                .iter()
                .any(|m| *l == *m || l.strip_prefix(*m).is_some_and(|r| r.starts_with(' ')))
        }) {
            return Some(line.to_owned());
        }
        if Instant::now() > deadline {
            println!("serial output of {}:\n{text}", serial.display());
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Removes the named network namespaces when dropped, so a test that fails
/// half-way leaves no data path namespace behind.
pub struct Namespaces(pub Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
