//! swtpm, the software TPM 2.0 of the tests, the benchmarks and `nitrile
//! host boot`: manufactured once per state directory (endorsement keys and
//! their certificates from swtpm's local CA, the SHA-256 PCR bank), then
//! served on loopback TCP for tpm2-tss's `swtpm` TCTI.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why swtpm could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmError {
    /// A program is missing.
    #[error("{0} is not installed (scripts/setup.sh installs swtpm and swtpm-tools)")]
    Missing(&'static str),
    /// A program failed.
    #[error("{what}: {detail}")]
    Failed {
        /// What was run.
        what: &'static str,
        /// Its output or error.
        detail: String,
    },
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// `Ok` if swtpm and swtpm_setup are installed, else why not.
pub fn available() -> Result<(), SwtpmError> {
    for p in ["swtpm", "swtpm_setup"] {
        if !on_path(p) {
            return Err(SwtpmError::Missing(if p == "swtpm" {
                "swtpm"
            } else {
                "swtpm_setup"
            }));
        }
    }
    Ok(())
}

/// `Ok` if a TPM can be manufactured and served here: swtpm is installed
/// and this process runs as root (swtpm's local CA keeps its keys under
/// /var/lib/swtpm-localca); else why not, for a test's `SKIPPED:` line.
pub fn usable() -> Result<(), String> {
    available().map_err(|e| e.to_string())?;
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        Ok(())
    } else {
        Err("manufacturing a TPM with swtpm's local CA needs root".into())
    }
}

/// Manufactures a TPM in `state` (a directory) unless it holds one:
/// endorsement keys (RSA 2048 and ECC P-384) with certificates signed by
/// swtpm's local CA, a platform certificate, the SHA-256 bank active.
pub fn manufacture(state: &Path) -> Result<(), SwtpmError> {
    available()?;
    if state.join("tpm2-00.permall").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(state).map_err(|e| SwtpmError::Failed {
        what: "creating the TPM state directory",
        detail: e.to_string(),
    })?;
    let out = Command::new("swtpm_setup")
        .args([
            "--tpm2",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
        ])
        .args(["--pcr-banks", "sha256"])
        .arg("--tpmstate")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SwtpmError::Failed {
            what: "running swtpm_setup",
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SwtpmError::Failed {
            what: "swtpm_setup",
            detail: String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(2000)
                .collect(),
        });
    }
    Ok(())
}

/// A running swtpm serving one TPM on loopback TCP (tpm2-tss's swtpm
/// TCTI speaks TCP: the command port and the control port after it);
/// stopped on drop.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    port: u16,
}

fn free_port_pair() -> Option<u16> {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let port = a.local_addr().ok()?.port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Some(port);
        }
    }
    None
}

impl Swtpm {
    /// Starts swtpm on the TPM in `state` (manufactured first if needed) on
    /// two free loopback ports, powered on and started (TPM2_Startup).
    pub fn start(state: &Path) -> Result<Self, SwtpmError> {
        manufacture(state)?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port_pair().ok_or(SwtpmError::Failed {
                what: "swtpm",
                detail: "no two free ports".into(),
            })?;
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| SwtpmError::Failed {
                    what: "starting swtpm",
                    detail: e.to_string(),
                })?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    last = format!("exited ({status}): {}", err.trim());
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_ok() {
                    return Ok(Self { child, port });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SwtpmError::Failed {
                        what: "swtpm",
                        detail: "not listening after 10 s".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(SwtpmError::Failed {
            what: "swtpm",
            detail: last,
        })
    }

    /// The TCTI for tpm2-tss (and tpm2-tools' `TPM2TOOLS_TCTI`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
