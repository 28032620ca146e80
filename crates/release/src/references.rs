//! Host references: the PCR values each host must show to be believed to
//! run a release.
//!
//! A host image carries the host's own provisioning, so its measurements
//! (`reference.json` of `nitrile image build-host`: `pcr4`, `pcr11`,
//! `pcr15`) are per host. A release carries them for the hosts it is built
//! for in one file, [`HOST_REFERENCES_FILE`]:
//!
//! ```json
//! {"format": "nitrile-host-references/1",
//!  "hosts": {"h1": {"pcr4": "<64 hex>", "pcr11": "<64 hex>", "pcr15": "<64 hex>"}}}
//! ```
//!
//! It is an ordinary release file: the manifest names its digest, the test
//! attestation covers it and the release signers sign it as a TUF target.
//! [`HostReferences::parse`] reads it strictly (bounded, the one format,
//! no unknown or repeated keys, host names as `nitrile_api::Name`, PCR
//! indices below 24, lowercase hex), since a key service releases volume
//! keys on what it says.

use std::collections::BTreeMap;
use std::fmt;

use nitrile_api::Name;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::ReleaseError;

/// The file name of a release's host references.
pub const HOST_REFERENCES_FILE: &str = "host-references.json";
/// The format this crate writes and reads.
pub const HOST_REFERENCES_FORMAT: &str = "nitrile-host-references/1";
/// Largest host references file read.
pub const MAX_HOST_REFERENCES_LEN: u64 = 1 << 20;
/// Most hosts in one release's references.
pub const MAX_HOSTS: usize = 4096;
/// Largest `reference.json` of a host image read.
pub const MAX_REFERENCE_JSON_LEN: u64 = 1 << 20;
/// PCR indices are below this (a TPM 2.0 PC client has 24).
pub const PCR_COUNT: u8 = 24;

/// The PCR values (SHA-256 bank) one host must show: 1 to [`PCR_COUNT`]
/// of them, each index below [`PCR_COUNT`]. Never empty: an entry that
/// names no PCR would admit anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReference(BTreeMap<u8, [u8; 32]>);

impl HostReference {
    /// A reference from its PCR values.
    pub fn new(pcrs: BTreeMap<u8, [u8; 32]>) -> Result<Self, ReleaseError> {
        if pcrs.is_empty() {
            return Err(bad("a host's entry names no PCR"));
        }
        if let Some(i) = pcrs.keys().find(|i| **i >= PCR_COUNT) {
            return Err(bad(format!("PCR {i} is not below {PCR_COUNT}")));
        }
        Ok(Self(pcrs))
    }

    /// The PCR values of a host image's `reference.json` (`nitrile image
    /// build-host`): every `pcr<N>` key (`N` decimal) is taken and must be
    /// a PCR below [`PCR_COUNT`] with 64 hex digits; other keys
    /// (`pcr4_events`, `files`, ...) are ignored.
    pub fn from_reference_json(bytes: &[u8]) -> Result<Self, ReleaseError> {
        let malformed = |e: String| ReleaseError::malformed("the reference values", e);
        if bytes.len() as u64 > MAX_REFERENCE_JSON_LEN {
            return Err(malformed(format!(
                "larger than {MAX_REFERENCE_JSON_LEN} bytes"
            )));
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        let object = value
            .as_object()
            .ok_or_else(|| malformed("not a JSON object".to_owned()))?;
        let mut pcrs = BTreeMap::new();
        for (key, value) in object {
            let Some(digits) = key
                .strip_prefix("pcr")
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let index = pcr_index(digits).ok_or_else(|| malformed(format!("{key:?}")))?;
            let hex = value
                .as_str()
                .ok_or_else(|| malformed(format!("{key} is not a string")))?
                .to_ascii_lowercase();
            let digest =
                pcr_value(&hex).ok_or_else(|| malformed(format!("{key} is not 64 hex digits")))?;
            pcrs.insert(index, digest);
        }
        if pcrs.is_empty() {
            return Err(malformed("no pcr<N> values in it".to_owned()));
        }
        Self::new(pcrs).map_err(|e| malformed(e.to_string()))
    }

    /// The values, by PCR index.
    pub fn pcrs(&self) -> &BTreeMap<u8, [u8; 32]> {
        &self.0
    }

    /// The first PCR of this reference whose value in `measured` is not
    /// the reference value (or is missing), if any.
    pub fn mismatch(&self, measured: &BTreeMap<u8, [u8; 32]>) -> Option<u8> {
        self.0
            .iter()
            .find(|(i, want)| measured.get(i) != Some(want))
            .map(|(i, _)| *i)
    }
}

/// A release's host references: for each host name it is built for, the
/// PCR values that host must show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReferences(BTreeMap<Name, HostReference>);

/// The file as it is written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: String,
    hosts: Unique<Unique<String>>,
}

impl HostReferences {
    /// References for 1 to [`MAX_HOSTS`] hosts.
    pub fn new(hosts: BTreeMap<Name, HostReference>) -> Result<Self, ReleaseError> {
        if hosts.is_empty() || hosts.len() > MAX_HOSTS {
            return Err(bad(format!("1 to {MAX_HOSTS} hosts")));
        }
        Ok(Self(hosts))
    }

    /// Parses [`HOST_REFERENCES_FILE`] strictly: at most
    /// [`MAX_HOST_REFERENCES_LEN`] bytes, the format
    /// [`HOST_REFERENCES_FORMAT`], no unknown or repeated key, 1 to
    /// [`MAX_HOSTS`] hosts named as host names, each with 1 to
    /// [`PCR_COUNT`] values `pcr<N>` (`N` below [`PCR_COUNT`], without
    /// leading zeros) of 64 lowercase hex digits.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReleaseError> {
        if bytes.len() as u64 > MAX_HOST_REFERENCES_LEN {
            return Err(bad(format!("larger than {MAX_HOST_REFERENCES_LEN} bytes")));
        }
        let wire: Wire = serde_json::from_slice(bytes).map_err(bad)?;
        if wire.format != HOST_REFERENCES_FORMAT {
            return Err(bad(format!(
                "format {:?}, this build reads {HOST_REFERENCES_FORMAT}",
                wire.format.chars().take(64).collect::<String>()
            )));
        }
        if wire.hosts.0.is_empty() || wire.hosts.0.len() > MAX_HOSTS {
            return Err(bad(format!("1 to {MAX_HOSTS} hosts")));
        }
        let mut hosts = BTreeMap::new();
        for (name, values) in wire.hosts.0 {
            let host = Name::new(&name).map_err(|e| bad(format!("host {e}")))?;
            let mut pcrs = BTreeMap::new();
            for (key, hex) in values.0 {
                let index = key.strip_prefix("pcr").and_then(pcr_index).ok_or_else(|| {
                    bad(format!(
                        "{host}: {:?} is not pcr<N> with N below {PCR_COUNT}",
                        key.chars().take(16).collect::<String>()
                    ))
                })?;
                let value = pcr_value(&hex)
                    .ok_or_else(|| bad(format!("{host}: {key} is not 64 lowercase hex digits")))?;
                pcrs.insert(index, value);
            }
            let reference = HostReference::new(pcrs).map_err(|e| bad(format!("{host}: {e}")))?;
            hosts.insert(host, reference);
        }
        Self::new(hosts)
    }

    /// The file's bytes (pretty JSON, final newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let hosts = self
            .0
            .iter()
            .map(|(name, r)| {
                let values =
                    r.0.iter()
                        .map(|(i, v)| (format!("pcr{i}"), hex::encode(v)))
                        .collect();
                (name.to_string(), Unique(values))
            })
            .collect();
        let wire = Wire {
            format: HOST_REFERENCES_FORMAT.to_owned(),
            hosts: Unique(hosts),
        };
        let mut out = serde_json::to_vec_pretty(&wire)
            .unwrap_or_else(|_| unreachable!("host references are strings and maps"));
        out.push(b'\n');
        out
    }

    /// The reference of `host`, if the release is built for it.
    pub fn get(&self, host: &Name) -> Option<&HostReference> {
        self.0.get(host)
    }

    /// The hosts, in order.
    pub fn hosts(&self) -> impl Iterator<Item = &Name> {
        self.0.keys()
    }
}

fn bad(reason: impl fmt::Display) -> ReleaseError {
    ReleaseError::malformed("the host references", reason)
}

/// A PCR index written in decimal without leading zeros, below
/// [`PCR_COUNT`].
fn pcr_index(digits: &str) -> Option<u8> {
    let canonical = !digits.is_empty()
        && digits.len() <= 2
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical
        .then(|| digits.parse::<u8>().ok())
        .flatten()
        .filter(|i| *i < PCR_COUNT)
}

/// 64 lowercase hex digits.
fn pcr_value(hex: &str) -> Option<[u8; 32]> {
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| hex::decode(hex).ok()?.try_into().ok()).flatten()
}

/// A JSON object whose keys are all different (serde_json would keep the
/// last of two equal keys; a signed file is read one way only).
struct Unique<V>(BTreeMap<String, V>);

impl<V: Serialize> Serialize for Unique<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Unique<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Keys<V> {
            type Value = Unique<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object without repeated keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "the key {:?} is repeated",
                            k.chars().take(64).collect::<String>()
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Unique(out))
            }
        }
        d.deserialize_map(Keys(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn file(hosts: &str) -> String {
        format!(r#"{{"format": "{HOST_REFERENCES_FORMAT}", "hosts": {hosts}}}"#)
    }

    fn refused(text: &str, why: &str) {
        match HostReferences::parse(text.as_bytes()) {
            Err(e @ ReleaseError::Malformed { .. }) => {
                assert!(e.to_string().contains(why), "{why}: {e}")
            }
            other => panic!("{text:?} was not refused ({why}): {other:?}"),
        }
    }

    #[test]
    fn host_references_round_trip() {
        let text = file(&format!(
            r#"{{"h1": {{"pcr4": "{A}", "pcr11": "{B}", "pcr15": "{A}"}}, "h-2": {{"pcr0": "{B}"}}}}"#
        ));
        let refs = HostReferences::parse(text.as_bytes()).unwrap();
        let h1 = refs.get(&Name::new("h1").unwrap()).unwrap();
        assert_eq!(h1.pcrs().keys().copied().collect::<Vec<_>>(), [4, 11, 15]);
        assert_eq!(h1.pcrs()[&11].to_vec(), hex::decode(B).unwrap());
        assert!(refs.get(&Name::new("h3").unwrap()).is_none());
        assert_eq!(refs.hosts().count(), 2);
        assert_eq!(HostReferences::parse(&refs.to_bytes()).unwrap(), refs);
        // The first PCR that differs, none when all match.
        let mut measured = h1.pcrs().clone();
        assert_eq!(h1.mismatch(&measured), None);
        measured.insert(11, [0; 32]);
        assert_eq!(h1.mismatch(&measured), Some(11));
        measured.remove(&4);
        assert_eq!(h1.mismatch(&measured), Some(4));
    }

    #[test]
    fn bad_hex_is_refused() {
        for (value, why) in [
            (&A[..63], "64 lowercase hex"),
            (&format!("{A}a")[..], "64 lowercase hex"),
            (&A.to_uppercase()[..], "64 lowercase hex"),
            (&format!("{}g", &A[..63])[..], "64 lowercase hex"),
            ("", "64 lowercase hex"),
        ] {
            refused(&file(&format!(r#"{{"h1": {{"pcr4": "{value}"}}}}"#)), why);
        }
        refused(&file(r#"{"h1": {"pcr4": 7}}"#), "invalid type");
    }

    #[test]
    fn an_unknown_format_or_key_is_refused() {
        refused(
            &format!(
                r#"{{"format": "nitrile-host-references/2", "hosts": {{"h1": {{"pcr4": "{A}"}}}}}}"#
            ),
            "format",
        );
        refused(
            &format!(r#"{{"hosts": {{"h1": {{"pcr4": "{A}"}}}}}}"#),
            "format",
        );
        refused(
            &format!(
                r#"{{"format": "{HOST_REFERENCES_FORMAT}", "hosts": {{"h1": {{"pcr4": "{A}"}}}}, "x": 1}}"#
            ),
            "unknown field",
        );
        for key in [
            "pcr24",
            "pcr04",
            "pcr",
            "pcr-1",
            "PCR4",
            "pcr4_events",
            "pcr255",
        ] {
            refused(
                &file(&format!(r#"{{"h1": {{"{key}": "{A}"}}}}"#)),
                "is not pcr<N>",
            );
        }
        refused(
            &file(&format!(r#"{{"h1": {{"pcr4": "{A}", "pcr4": "{B}"}}}}"#)),
            "repeated",
        );
        refused(
            &file(&format!(
                r#"{{"h1": {{"pcr4": "{A}"}}, "h1": {{"pcr4": "{B}"}}}}"#
            )),
            "repeated",
        );
    }

    #[test]
    fn bad_hosts_and_empty_entries_are_refused() {
        refused(&file("{}"), "1 to 4096 hosts");
        refused(&file(r#"{"h1": {}}"#), "names no PCR");
        for name in ["H1", "-h", "h 1", "../h", "", &"h".repeat(64)] {
            refused(
                &file(&format!(r#"{{"{name}": {{"pcr4": "{A}"}}}}"#)),
                "host",
            );
        }
        refused("[]", "invalid length");
        refused("1", "invalid type");
        refused("", "EOF");
    }

    #[test]
    fn oversize_files_are_refused_before_parsing() {
        let mut text = file(&format!(r#"{{"h1": {{"pcr4": "{A}"}}}}"#)).into_bytes();
        text.resize(MAX_HOST_REFERENCES_LEN as usize + 1, b' ');
        refused(std::str::from_utf8(&text).unwrap(), "larger than");
        // Too many hosts, within the byte bound.
        let hosts: Vec<String> = (0..=MAX_HOSTS)
            .map(|i| format!(r#""h{i}": {{"pcr4": "{A}"}}"#))
            .collect();
        let text = file(&format!("{{{}}}", hosts.join(",")));
        assert!(text.len() as u64 <= MAX_HOST_REFERENCES_LEN);
        refused(&text, "1 to 4096 hosts");
        let mut big = br#"{"pcr4": ""#.to_vec();
        big.resize(MAX_REFERENCE_JSON_LEN as usize + 1, b'a');
        assert!(HostReference::from_reference_json(&big).is_err());
    }

    #[test]
    fn a_host_images_reference_json_gives_its_pcr_values() {
        let json = format!(
            r#"{{"format": "nitrile-host-image/1", "pcr4": "{A}", "pcr11": "{}", "pcr15": "{B}",
                "pcr4_events": [{{"x": 1}}], "files": {{}}, "annotations": {{"pcr7": "x"}}}}"#,
            B.to_uppercase()
        );
        let r = HostReference::from_reference_json(json.as_bytes()).unwrap();
        assert_eq!(r.pcrs().keys().copied().collect::<Vec<_>>(), [4, 11, 15]);
        assert_eq!(r.pcrs()[&11].to_vec(), hex::decode(B).unwrap());
        for bad in [
            format!(r#"{{"pcr4": "{}"}}"#, &A[..62]),
            format!(r#"{{"pcr24": "{A}"}}"#),
            r#"{"pcr4": 1}"#.to_owned(),
            r#"{"kernel_release": "6.1"}"#.to_owned(),
            "[1]".to_owned(),
        ] {
            assert!(
                HostReference::from_reference_json(bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    fn any_reference() -> impl Strategy<Value = HostReference> {
        prop::collection::btree_map(0..PCR_COUNT, any::<[u8; 32]>(), 1..6)
            .prop_map(|pcrs| HostReference::new(pcrs).unwrap())
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back_the_same(
            hosts in prop::collection::btree_map("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", any_reference(), 1..8)
        ) {
            let hosts = hosts
                .into_iter()
                .map(|(name, r)| (Name::new(&name).unwrap(), r))
                .collect();
            let refs = HostReferences::new(hosts).unwrap();
            prop_assert_eq!(HostReferences::parse(&refs.to_bytes()).unwrap(), refs);
        }

        #[test]
        fn what_is_accepted_is_what_would_be_written(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(refs) = HostReferences::parse(&bytes) {
                prop_assert_eq!(HostReferences::parse(&refs.to_bytes()).unwrap(), refs);
            }
            let _ = HostReference::from_reference_json(&bytes);
        }
    }
}
