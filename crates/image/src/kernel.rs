//! What a kernel file is: its boot format and, when it says so, its release.

use serde::{Deserialize, Serialize};

/// How many leading bytes of a kernel file [`KernelFormat::detect`] needs.
pub const KERNEL_HEADER_LEN: usize = 0x1000;

/// The longest kernel release string recorded (Linux's `__NEW_UTS_LEN` is 64).
pub const MAX_RELEASE_LEN: usize = 64;

const BANNER: &[u8] = b"Linux version ";

/// The boot format of a kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum KernelFormat {
    /// A 64-bit ELF `vmlinux` (booted through its PVH entry note).
    Elf64,
    /// A bzImage with the x86 Linux boot protocol header (`HdrS`).
    BzImage,
}

impl KernelFormat {
    /// The format of a kernel file from its first bytes, if it is one we boot.
    pub fn detect(head: &[u8]) -> Option<Self> {
        if head.len() >= 5 && head[..4] == *b"\x7fELF" && head[4] == 2 {
            return Some(Self::Elf64);
        }
        if head.len() >= 0x206
            && head[0x1fe..0x200] == [0x55, 0xaa]
            && head[0x202..0x206] == *b"HdrS"
        {
            return Some(Self::BzImage);
        }
        None
    }

    /// Short name, as in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Elf64 => "elf64",
            Self::BzImage => "bz-image",
        }
    }
}

/// The release a bzImage names in its setup header (`kernel_version`), if any.
pub(crate) fn bzimage_release(head: &[u8]) -> Option<String> {
    let ptr = u16::from_le_bytes([*head.get(0x20e)?, *head.get(0x20f)?]);
    if ptr == 0 {
        return None;
    }
    let at = usize::from(ptr) + 0x200;
    release_word(head.get(at..)?)
}

/// The first whitespace-delimited word of `bytes`, if it looks like a release.
fn release_word(bytes: &[u8]) -> Option<String> {
    let end = bytes
        .iter()
        .take(MAX_RELEASE_LEN + 1)
        .position(|b| !b.is_ascii_graphic())?;
    let word = &bytes[..end];
    if word.is_empty() || !word[0].is_ascii_digit() {
        return None;
    }
    String::from_utf8(word.to_vec()).ok()
}

/// Finds the `Linux version <release>` banner in a stream of chunks.
#[derive(Debug, Default)]
pub(crate) struct BannerScanner {
    carry: Vec<u8>,
    found: Option<String>,
}

impl BannerScanner {
    const KEEP: usize = BANNER.len() + MAX_RELEASE_LEN + 1;

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        if self.found.is_some() {
            return;
        }
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        let mut from = 0;
        while let Some(pos) = find(&window[from..], BANNER) {
            let start = from + pos + BANNER.len();
            let rest = &window[start..];
            // Only decide once the whole word is in the window.
            if rest.len() <= MAX_RELEASE_LEN && rest.iter().all(u8::is_ascii_graphic) {
                break;
            }
            if let Some(release) = release_word(rest) {
                self.found = Some(release);
                return;
            }
            from = start;
        }
        let keep = window.len().min(Self::KEEP);
        self.carry = window[window.len() - keep..].to_vec();
    }

    pub(crate) fn finish(self) -> Option<String> {
        self.found
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_elf64_and_bzimage() {
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        assert_eq!(KernelFormat::detect(&elf), Some(KernelFormat::Elf64));
        elf[4] = 1;
        assert_eq!(KernelFormat::detect(&elf), None);

        let mut bz = vec![0u8; 0x400];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        bz[0x300..0x312].copy_from_slice(b"6.12.0-test (x@y) ");
        assert_eq!(KernelFormat::detect(&bz), Some(KernelFormat::BzImage));
        assert_eq!(bzimage_release(&bz).as_deref(), Some("6.12.0-test"));
        assert_eq!(KernelFormat::detect(b"random bytes"), None);
    }

    #[test]
    fn banner_found_across_chunk_boundaries() {
        let text = b"xxLinux version %s\0....Linux version 6.12.95+deb12-cloud-amd64 (gcc) #1\0";
        for split in 0..text.len() {
            let mut s = BannerScanner::default();
            s.feed(&text[..split]);
            s.feed(&text[split..]);
            assert_eq!(
                s.finish().as_deref(),
                Some("6.12.95+deb12-cloud-amd64"),
                "split at {split}"
            );
        }
    }

    #[test]
    fn no_banner_no_release() {
        let mut s = BannerScanner::default();
        s.feed(b"Linux version ");
        s.feed(&[b'9'; 200]);
        assert_eq!(s.finish(), None);
    }
}
