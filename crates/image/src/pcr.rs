//! Predicting TPM 2.0 PCR values of the SHA-256 bank.
//!
//! A PCR starts as 32 zero bytes (PCRs 0 to 15 after a reset) and each
//! measurement extends it: `new = SHA-256(old || digest)`. [`extend_all`]
//! replays a sequence of event digests; [`InitEvent`] is one measurement
//! the host's init makes into [`INIT_PCR`] before it starts the host agent.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The PCR the host's init extends with its [`InitEvent`]s (PCR 15,
/// "system identity" in the Linux TPM PCR registry).
pub const INIT_PCR: u32 = 15;

/// `new = SHA-256(old || digest)`.
pub fn extend(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

/// The value of a PCR that started at zero after extending `digests` in
/// order.
pub fn extend_all<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    digests
        .into_iter()
        .fold([0u8; 32], |pcr, d| extend(&pcr, d))
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// One measurement of the host's init: a named file's SHA-256 digest.
/// Serialized as one line of `init-events.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitEvent {
    /// What the file is (`hostd-config`, `issuer-keys`, `cell-ca`, ...).
    pub name: String,
    /// Where the host reads it.
    pub path: String,
    /// SHA-256 of its contents, hex.
    #[serde(with = "hex32")]
    pub sha256: [u8; 32],
}

impl InitEvent {
    /// The event of `contents` read from `path` as `name`.
    pub fn of_bytes(name: &str, path: &Path, contents: &[u8]) -> Self {
        Self {
            name: name.to_owned(),
            path: path.display().to_string(),
            sha256: sha256(contents),
        }
    }
}

/// 32 bytes as 64 lowercase hex digits.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

/// The value [`INIT_PCR`] holds after `events`, extended in order from zero.
pub fn init_pcr(events: &[InitEvent]) -> [u8; 32] {
    extend_all(events.iter().map(|e| &e.sha256))
}

/// Most events [`parse_event_log`] reads.
pub const MAX_LOG_EVENTS: usize = 10_000;
/// `TPM_ALG_SHA256`.
const TPM_ALG_SHA256: u16 = 0x000b;

/// One event of a firmware's TCG event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    /// The PCR it extended.
    pub pcr: u32,
    /// Its type (`EV_*` of the TCG PC Client Platform Firmware Profile).
    pub event_type: u32,
    /// Its SHA-256 digest, when the log has that bank.
    pub sha256: Option<[u8; 32]>,
    /// Its event data.
    pub data: Vec<u8>,
}

/// The name of a common event type.
pub fn event_type_name(t: u32) -> &'static str {
    match t {
        0x0000_0001 => "EV_POST_CODE",
        0x0000_0003 => "EV_NO_ACTION",
        0x0000_0004 => "EV_SEPARATOR",
        0x0000_0005 => "EV_ACTION",
        0x0000_0006 => "EV_EVENT_TAG",
        0x0000_0007 => "EV_S_CRTM_CONTENTS",
        0x0000_0008 => "EV_S_CRTM_VERSION",
        0x0000_000d => "EV_IPL",
        0x8000_0001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x8000_0002 => "EV_EFI_VARIABLE_BOOT",
        0x8000_0003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x8000_0007 => "EV_EFI_ACTION",
        0x8000_0008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x8000_0009 => "EV_EFI_HANDOFF_TABLES",
        0x8000_000a => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000_000c => "EV_EFI_VARIABLE_AUTHORITY",
        0x8000_00e0 => "EV_EFI_VARIABLE_BOOT2",
        _ => "EV_?",
    }
}

/// Why an event log could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventLogError {
    /// bad input: truncated, or not the crypto-agile format
    #[error("malformed TCG event log at offset {0}")]
    Malformed(usize),
    /// bad input: more than [`MAX_LOG_EVENTS`] events
    #[error("more than {MAX_LOG_EVENTS} events")]
    TooMany,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], EventLogError> {
        let s = self
            .b
            .get(self.at..self.at.saturating_add(n))
            .ok_or(EventLogError::Malformed(self.at))?;
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, EventLogError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, EventLogError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

/// Reads a crypto-agile TCG event log (TCG PC Client Platform Firmware
/// Profile, section 10: a SHA-1 format `Spec ID Event03` header naming the
/// banks and their digest sizes, then `TCG_PCR_EVENT2` records), as the
/// kernel exposes it in `binary_bios_measurements`. Trailing zero bytes
/// end it.
pub fn parse_event_log(bytes: &[u8]) -> Result<Vec<LogEvent>, EventLogError> {
    let mut r = Reader { b: bytes, at: 0 };
    // The header: pcr, type, a SHA-1 digest, then the Spec ID event.
    r.take(4 + 4 + 20)?;
    let size = r.u32()? as usize;
    let spec = r.take(size)?;
    if spec.get(..15) != Some(b"Spec ID Event03".as_slice()) {
        return Err(EventLogError::Malformed(28));
    }
    let mut s = Reader { b: spec, at: 24 };
    let n = s.u32()? as usize;
    let mut sizes = std::collections::BTreeMap::new();
    for _ in 0..n.min(16) {
        let alg = s.u16()?;
        let len = s.u16()?;
        sizes.insert(alg, usize::from(len));
    }
    let mut events = Vec::new();
    while r.at + 8 <= bytes.len() {
        if bytes[r.at..].iter().all(|b| *b == 0) {
            break;
        }
        if events.len() >= MAX_LOG_EVENTS {
            return Err(EventLogError::TooMany);
        }
        let pcr = r.u32()?;
        let event_type = r.u32()?;
        let count = r.u32()?;
        let mut sha256 = None;
        for _ in 0..count.min(16) {
            let at = r.at;
            let alg = r.u16()?;
            let len = *sizes.get(&alg).ok_or(EventLogError::Malformed(at))?;
            let d = r.take(len)?;
            if alg == TPM_ALG_SHA256 {
                sha256 = <[u8; 32]>::try_from(d).ok();
            }
        }
        let size = r.u32()? as usize;
        let data = r.take(size)?.to_vec();
        events.push(LogEvent {
            pcr,
            event_type,
            sha256,
            data,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of one SHA-256 bank with two events reads back; cut short,
    /// it is refused.
    #[test]
    fn an_event_log_reads_back() {
        let mut spec = b"Spec ID Event03\0".to_vec();
        spec.extend_from_slice(&[0, 0, 0, 0, 0, 2, 0, 2]);
        spec.extend_from_slice(&1u32.to_le_bytes());
        spec.extend_from_slice(&TPM_ALG_SHA256.to_le_bytes());
        spec.extend_from_slice(&32u16.to_le_bytes());
        spec.push(0);
        let mut log = vec![0u8; 8];
        log[4] = 3;
        log.extend_from_slice(&[0u8; 20]);
        log.extend_from_slice(&u32::try_from(spec.len()).unwrap().to_le_bytes());
        log.extend_from_slice(&spec);
        for (pcr, data) in [(4u32, b"one".as_slice()), (11, b"two")] {
            log.extend_from_slice(&pcr.to_le_bytes());
            log.extend_from_slice(&0x8000_0007u32.to_le_bytes());
            log.extend_from_slice(&1u32.to_le_bytes());
            log.extend_from_slice(&TPM_ALG_SHA256.to_le_bytes());
            log.extend_from_slice(&sha256(data));
            log.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
            log.extend_from_slice(data);
        }
        let events = parse_event_log(&log).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].pcr, 11);
        assert_eq!(events[1].sha256, Some(sha256(b"two")));
        assert_eq!(event_type_name(events[0].event_type), "EV_EFI_ACTION");
        assert!(parse_event_log(&log[..log.len() - 1]).is_err());
        log.extend_from_slice(&[0u8; 64]);
        assert_eq!(parse_event_log(&log).unwrap().len(), 2);
    }

    #[test]
    fn extending_nothing_leaves_zero() {
        assert_eq!(extend_all([]), [0u8; 32]);
    }

    /// The TCG rule, spelled out for one event.
    #[test]
    fn one_extension_hashes_the_old_value_then_the_digest() {
        let d = sha256(b"abc");
        let mut both = [0u8; 64];
        both[32..].copy_from_slice(&d);
        assert_eq!(extend_all([&d]), sha256(&both));
    }

    #[test]
    fn init_events_extend_in_order() {
        let a = InitEvent::of_bytes("a", Path::new("/a"), b"1");
        let b = InitEvent::of_bytes("b", Path::new("/b"), b"2");
        assert_ne!(
            init_pcr(&[a.clone(), b.clone()]),
            init_pcr(&[b.clone(), a.clone()])
        );
        let line = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<InitEvent>(&line).unwrap(), a);
        assert!(line.contains(&hex::encode(sha256(b"1"))));
    }
}
