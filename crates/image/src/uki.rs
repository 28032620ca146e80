//! A Unified Kernel Image: systemd's UEFI stub (`linuxx64.efi.stub`) with
//! the kernel, its initramfs, its command line and an os-release added as
//! PE sections, as `ukify` and the Arch Linux wiki build one with
//! `objcopy --add-section NAME=FILE --change-section-vma NAME=ADDR`.
//!
//! The sections are placed after the stub's own, each at the next 4 KiB
//! boundary after the previous one, in the order given; the addresses
//! depend only on the stub and the sections' sizes, and the PE time stamp
//! is zero (objcopy writes the time of day; it is zeroed and the PE checksum made
//! anew), so the same inputs give the same image.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::pe::{PeError, PeImage};

/// The order in which systemd-stub (v252 to v254) measures the sections
/// it knows into PCR 11, whatever their order in the file.
pub const MEASURED_ORDER: [&str; 4] = [".linux", ".osrel", ".cmdline", ".initrd"];

/// Alignment of the added sections' addresses.
const SECTION_ALIGN: u64 = 4096;

/// Why the image could not be assembled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UkiError {
    /// The stub is not a PE32+ image.
    #[error("the stub {}", path.display())]
    Stub {
        /// The stub.
        path: PathBuf,
        /// Why.
        #[source]
        source: PeError,
    },
    /// misuse: a section name is not `.` and up to 7 letters
    #[error("invalid section name {0:?}")]
    SectionName(String),
    /// A temporary file could not be written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `objcopy` could not be run or failed.
    #[error("objcopy failed: {0}")]
    Objcopy(String),
    /// The result lacks a section it was given.
    #[error("objcopy's output lacks section {0}")]
    Missing(String),
}

/// Writes `out`: `stub` (its bytes `stub_bytes`) with `sections` added.
/// `work` holds temporary files.
pub fn assemble(
    stub: &Path,
    stub_bytes: &[u8],
    sections: &[(&str, &[u8])],
    out: &Path,
    work: &Path,
) -> Result<(), UkiError> {
    let image = PeImage::parse(stub_bytes).map_err(|source| UkiError::Stub {
        path: stub.to_owned(),
        source,
    })?;
    let mut vma = image.end_of_sections().next_multiple_of(SECTION_ALIGN);
    let mut cmd = Command::new("objcopy");
    for (name, data) in sections {
        let ok = name.len() <= 8
            && name.starts_with('.')
            && name[1..].bytes().all(|b| b.is_ascii_lowercase());
        if !ok {
            return Err(UkiError::SectionName((*name).to_owned()));
        }
        let file = work.join(format!("section{name}"));
        fs::write(&file, data).map_err(|source| UkiError::Io {
            path: file.clone(),
            source,
        })?;
        cmd.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={:#x}", image.image_base + vma));
        vma = (vma + data.len() as u64).next_multiple_of(SECTION_ALIGN);
    }
    cmd.arg(stub).arg(out);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| UkiError::Objcopy(format!("cannot run it: {e}")))?;
    if !output.status.success() {
        return Err(UkiError::Objcopy(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    for (name, _) in sections {
        let _ = fs::remove_file(work.join(format!("section{name}")));
    }
    let mut bytes = fs::read(out).map_err(|source| UkiError::Io {
        path: out.to_owned(),
        source,
    })?;
    crate::pe::zero_timestamp(&mut bytes).map_err(|source| UkiError::Stub {
        path: out.to_owned(),
        source,
    })?;
    fs::write(out, &bytes).map_err(|source| UkiError::Io {
        path: out.to_owned(),
        source,
    })?;
    let built = PeImage::parse(&bytes).map_err(|source| UkiError::Stub {
        path: out.to_owned(),
        source,
    })?;
    for (name, _) in sections {
        if built.section(name).is_none() {
            return Err(UkiError::Missing((*name).to_owned()));
        }
    }
    Ok(())
}
