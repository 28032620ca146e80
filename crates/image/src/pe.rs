//! Just enough of the PE/COFF format (Microsoft PE/COFF specification,
//! "PE Format") to place sections after a UEFI stub's own and to compute
//! the Authenticode image hash a UEFI firmware extends into PCR 4 when it
//! loads an EFI application.

use sha2::{Digest as _, Sha256};

/// Largest header area read (`SizeOfHeaders` bound).
const MAX_HEADERS_LEN: usize = 64 * 1024;
/// The index of the certificate table in the data directories.
const SECURITY_DIRECTORY: usize = 4;
/// `IMAGE_NT_OPTIONAL_HDR64_MAGIC` (PE32+).
const PE32_PLUS: u16 = 0x20b;
/// Size of one section header.
const SECTION_HEADER_LEN: usize = 40;

/// Why bytes are not a PE image this module reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeError {
    /// bad input: a header or table is missing, truncated or out of bounds
    #[error("not a PE32+ image: {0}")]
    Malformed(&'static str),
}

/// One section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The name (up to 8 bytes, NULs trimmed).
    pub name: String,
    /// `VirtualSize`.
    pub virtual_size: u32,
    /// `VirtualAddress` (relative to the image base).
    pub virtual_address: u32,
    /// `SizeOfRawData`.
    pub raw_size: u32,
    /// `PointerToRawData`.
    pub raw_offset: u32,
}

/// The parts of a PE32+ image's headers used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeImage {
    /// `ImageBase`.
    pub image_base: u64,
    /// `SectionAlignment`.
    pub section_alignment: u32,
    /// `SizeOfHeaders`.
    pub size_of_headers: u32,
    /// The section headers in table order.
    pub sections: Vec<Section>,
    /// File offset of the `CheckSum` field.
    checksum_offset: usize,
    /// File offset of the certificate table's data directory entry, when
    /// the image has that many directories.
    security_dir_offset: Option<usize>,
    /// The certificate table's size.
    security_size: u32,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, PeError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(PeError::Malformed("truncated header"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, PeError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(PeError::Malformed("truncated header"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, PeError> {
    Ok(u64::from(u32_at(b, at)?) | (u64::from(u32_at(b, at + 4)?) << 32))
}

impl PeImage {
    /// Parses the headers of a PE32+ image.
    pub fn parse(bytes: &[u8]) -> Result<Self, PeError> {
        if bytes.get(..2) != Some(b"MZ".as_slice()) {
            return Err(PeError::Malformed("no MZ signature"));
        }
        let pe = u32_at(bytes, 0x3c)? as usize;
        if bytes.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) {
            return Err(PeError::Malformed("no PE signature"));
        }
        let coff = pe + 4;
        let nsections = usize::from(u16_at(bytes, coff + 2)?);
        let opt_len = usize::from(u16_at(bytes, coff + 16)?);
        let opt = coff + 20;
        if u16_at(bytes, opt)? != PE32_PLUS {
            return Err(PeError::Malformed("not PE32+"));
        }
        let image_base = u64_at(bytes, opt + 24)?;
        let section_alignment = u32_at(bytes, opt + 32)?;
        let size_of_headers = u32_at(bytes, opt + 60)?;
        let checksum_offset = opt + 64;
        let ndirs = u32_at(bytes, opt + 108)? as usize;
        let (security_dir_offset, security_size) = if ndirs > SECURITY_DIRECTORY {
            let at = opt + 112 + 8 * SECURITY_DIRECTORY;
            (Some(at), u32_at(bytes, at + 4)?)
        } else {
            (None, 0)
        };
        if size_of_headers as usize > MAX_HEADERS_LEN || size_of_headers as usize > bytes.len() {
            return Err(PeError::Malformed("SizeOfHeaders out of bounds"));
        }
        let table = opt + opt_len;
        let mut sections = Vec::with_capacity(nsections);
        for i in 0..nsections {
            let at = table + i * SECTION_HEADER_LEN;
            let raw_name = bytes
                .get(at..at + 8)
                .ok_or(PeError::Malformed("truncated section table"))?;
            let name = String::from_utf8_lossy(raw_name)
                .trim_end_matches('\0')
                .to_owned();
            sections.push(Section {
                name,
                virtual_size: u32_at(bytes, at + 8)?,
                virtual_address: u32_at(bytes, at + 12)?,
                raw_size: u32_at(bytes, at + 16)?,
                raw_offset: u32_at(bytes, at + 20)?,
            });
        }
        Ok(Self {
            image_base,
            section_alignment,
            size_of_headers,
            sections,
            checksum_offset,
            security_dir_offset,
            security_size,
        })
    }

    /// The first address (relative to the image base) after every
    /// section's memory.
    pub fn end_of_sections(&self) -> u64 {
        self.sections
            .iter()
            .map(|s| u64::from(s.virtual_address) + u64::from(s.virtual_size.max(s.raw_size)))
            .max()
            .unwrap_or(u64::from(self.size_of_headers))
    }

    /// The section named `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }
}

/// Sets the COFF header's `TimeDateStamp` to zero and recomputes the
/// optional header's `CheckSum` (the PE checksum: the file summed as
/// 16-bit little-endian words with end-around carry, the checksum field
/// read as zero, plus the file's length).
pub fn zero_timestamp(bytes: &mut [u8]) -> Result<(), PeError> {
    let image = PeImage::parse(bytes)?;
    let pe = u32_at(bytes, 0x3c)? as usize;
    bytes[pe + 8..pe + 12].fill(0);
    let at = image.checksum_offset;
    bytes[at..at + 4].fill(0);
    let mut sum: u64 = 0;
    for chunk in bytes.chunks(2) {
        let word = u64::from(chunk[0]) | (u64::from(*chunk.get(1).unwrap_or(&0)) << 8);
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = (sum & 0xffff) + (sum >> 16);
    let checksum = u32::try_from(sum + bytes.len() as u64)
        .map_err(|_| PeError::Malformed("image larger than 4 GiB"))?;
    bytes[at..at + 4].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

/// The Authenticode SHA-256 hash of a PE image, as a UEFI firmware
/// computes it to measure an image it loads (EDK2's
/// `Tcg2MeasurePeImage`): the headers without the `CheckSum` field and the
/// certificate table's directory entry, then each section's raw data in
/// the order of their file offsets, then any bytes after the last section
/// except the certificate table.
pub fn authenticode_sha256(bytes: &[u8]) -> Result<[u8; 32], PeError> {
    let image = PeImage::parse(bytes)?;
    let headers = image.size_of_headers as usize;
    let mut h = Sha256::new();
    h.update(&bytes[..image.checksum_offset]);
    let after_checksum = image.checksum_offset + 4;
    match image.security_dir_offset {
        Some(dir) => {
            h.update(&bytes[after_checksum..dir]);
            h.update(&bytes[dir + 8..headers]);
        }
        None => h.update(&bytes[after_checksum..headers]),
    }
    let mut sections: Vec<&Section> = image.sections.iter().filter(|s| s.raw_size > 0).collect();
    sections.sort_by_key(|s| s.raw_offset);
    let mut hashed = headers;
    for s in sections {
        let start = s.raw_offset as usize;
        let data = bytes
            .get(start..start + s.raw_size as usize)
            .ok_or(PeError::Malformed("section data out of bounds"))?;
        h.update(data);
        hashed += data.len();
    }
    let end = bytes
        .len()
        .checked_sub(image.security_size as usize)
        .ok_or(PeError::Malformed("certificate table out of bounds"))?;
    if end > hashed {
        h.update(&bytes[hashed..end]);
    }
    Ok(h.finalize().into())
}
