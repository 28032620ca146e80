//! The VM specification: what hostd asks a backend to run.
//!
//! A [`VmSpec`] only exists in parsed, valid form. [`VmSpec::parse_json`] reads
//! at most [`MAX_SPEC_LEN`] bytes of JSON, refuses unknown fields and checks
//! every value against its bound; each refusal names the field at fault.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use nitrile_api::{IdError, Name};
use serde::{Deserialize, Serialize};

/// Longest spec document accepted, in bytes.
pub const MAX_SPEC_LEN: usize = 64 * 1024;
/// Longest kernel command line accepted, in bytes (x86 `COMMAND_LINE_SIZE` minus the NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Longest host path accepted, in bytes (`PATH_MAX` minus the NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 16;
/// Least guest memory, in MiB.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Most guest memory, in MiB.
pub const MAX_MEMORY_MIB: u32 = 65536;
/// Most volumes a VM may have.
pub const MAX_VOLUMES: usize = 8;
/// Largest volume, in MiB (16 TiB).
pub const MAX_VOLUME_MIB: u64 = 16 * 1024 * 1024;
/// Longest tap device name (`IFNAMSIZ` minus the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// The id the guest sees on the instance-store disk (its virtio-blk serial).
pub const SCRATCH_DISK_ID: &str = "scratch";

/// Why a spec was refused. Every variant names the field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// the document is larger than [`MAX_SPEC_LEN`]
    #[error("spec is {0} bytes long; at most {MAX_SPEC_LEN} are allowed")]
    TooLong(usize),
    /// the JSON is malformed, a field is missing, unknown or of the wrong type
    #[error("spec field `{field}`: {source}")]
    Json {
        /// path of the field at fault (`.` when the document itself is at fault)
        field: String,
        /// what serde_json said
        #[source]
        source: serde_json::Error,
    },
    /// a name field is not a valid nitrile name
    #[error("spec field `{field}`: {source}")]
    Name {
        /// path of the field at fault
        field: String,
        /// why the name was refused
        #[source]
        source: IdError,
    },
    /// a number is outside its allowed range
    #[error("spec field `{field}` is {value}; allowed range is {min}..={max}")]
    OutOfRange {
        /// path of the field at fault
        field: String,
        /// the value given
        value: u64,
        /// least allowed value
        min: u64,
        /// greatest allowed value
        max: u64,
    },
    /// the image digest is not 64 lowercase hex digits
    #[error("spec field `image.digest` must be 64 lowercase hex digits (a SHA-256 digest)")]
    BadDigest,
    /// the kernel command line is too long or has a byte outside printable ASCII
    #[error(
        "spec field `image.cmdline` must be at most {MAX_CMDLINE_LEN} bytes of printable ASCII (no NUL, newline or control characters)"
    )]
    BadCmdline,
    /// a path is not absolute, not normalized, too long or has a NUL
    #[error(
        "spec field `{field}` must be an absolute, normalized path (no `.`, `..` or empty components, no NUL) of at most {MAX_PATH_LEN} bytes"
    )]
    BadPath {
        /// path of the field at fault
        field: String,
    },
    /// more volumes than [`MAX_VOLUMES`]
    #[error("spec field `volumes` has {0} entries; at most {MAX_VOLUMES} are allowed")]
    TooManyVolumes(usize),
    /// two volumes share an id
    #[error("spec field `volumes[{index}].id`: volume id {id} is used twice")]
    DuplicateVolume {
        /// index of the second volume with that id
        index: usize,
        /// the repeated id
        id: Name,
    },
    /// two volumes share a backing file
    #[error("spec field `volumes[{index}].path`: backing file is used twice")]
    DuplicateVolumePath {
        /// index of the second volume with that path
        index: usize,
    },
    /// the instance-store disk's backing file is a volume's
    #[error("spec field `scratch.path`: backing file is a volume's")]
    ScratchIsAVolume,
    /// the tap device name is empty, too long or has a character outside `A-Za-z0-9_-`
    #[error(
        "spec field `net.tap` must be 1 to {MAX_TAP_NAME_LEN} characters of A-Z, a-z, 0-9, `_` and `-`"
    )]
    BadTapName,
    /// the MAC address is not six hex pairs of a unicast, locally
    /// administered address
    #[error(
        "spec field `net.mac` must be a unicast, locally administered MAC address such as 02:4e:00:07:00:0a"
    )]
    BadMac,
}

/// SHA-256 digest naming a guest image (kernel, initramfs and command line).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageDigest([u8; 32]);

impl ImageDigest {
    /// Parses 64 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(SpecError::BadDigest);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| SpecError::BadDigest)?;
        Ok(Self(out))
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageDigest({self})")
    }
}

/// A kernel command line: at most [`MAX_CMDLINE_LEN`] bytes of printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline(String);

impl Cmdline {
    /// Parses a command line, refusing NUL, newlines and other control bytes.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        if s.len() > MAX_CMDLINE_LEN || !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(SpecError::BadCmdline);
        }
        Ok(Self(s.to_owned()))
    }

    /// The command line.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An absolute, normalized host path (no `.`, `..` or empty components).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPath(PathBuf);

impl HostPath {
    fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::BadPath {
            field: field.to_owned(),
        };
        if s.is_empty() || s.len() > MAX_PATH_LEN || s.contains('\0') || !s.starts_with('/') {
            return Err(bad());
        }
        // `Path::components` silently drops `.` and repeated `/`; refuse them
        // so that the string we were given is the path we use.
        if s.len() > 1 && (s.ends_with('/') || s.contains("//")) {
            return Err(bad());
        }
        let p = Path::new(s);
        for c in p.components() {
            match c {
                Component::RootDir | Component::Normal(_) => {}
                Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                    return Err(bad());
                }
            }
        }
        if s.split('/').skip(1).any(|part| part == ".") {
            return Err(bad());
        }
        Ok(Self(p.to_path_buf()))
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    fn to_raw(&self) -> String {
        // Parsed from a `&str`, so this is lossless.
        self.0.to_string_lossy().into_owned()
    }
}

/// The guest image to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Content digest of the image (kernel + initramfs + cmdline).
    pub digest: ImageDigest,
    /// Uncompressed ELF (PVH) kernel on the host.
    pub kernel: HostPath,
    /// Initramfs on the host.
    pub initramfs: HostPath,
    /// Kernel command line.
    pub cmdline: Cmdline,
}

/// One encrypted volume attached as a virtio block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Volume id; the key for it is looked up under this id.
    pub id: Name,
    /// Backing file on the host (created when missing).
    pub path: HostPath,
    /// Size in MiB used when the backing file is created.
    pub size_mib: u64,
    /// Whether the guest sees the volume read-only.
    pub read_only: bool,
    /// A raw disk image (an image's root disk) written into the volume,
    /// encrypted, when its backing file is created; ignored when the file
    /// exists. Its size must be the volume's.
    pub seed: Option<HostPath>,
}

/// An instance-store disk: an encrypted virtio block device (after the
/// volumes, with id [`SCRATCH_DISK_ID`]) whose key the VMM generates itself
/// and never gives out, so that its contents die with the VMM process. Its
/// backing file is made anew (empty) for every VMM and removed by the
/// backend when the VM ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchSpec {
    /// Backing file on the host (replaced when present).
    pub path: HostPath,
    /// Size in MiB, 1 to [`MAX_VOLUME_MIB`].
    pub size_mib: u64,
}

/// A virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// Guest context id, at least 3 (0-2 are reserved), not `u32::MAX`.
    pub guest_cid: u32,
    /// Host Unix socket bridging guest connections.
    pub uds_path: HostPath,
}

/// A tap device name (`IFNAMSIZ` bound, `A-Za-z0-9_-`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapName(String);

impl TapName {
    /// Parses a tap device name.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        if s.is_empty()
            || s.len() > MAX_TAP_NAME_LEN
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(SpecError::BadTapName);
        }
        Ok(Self(s.to_owned()))
    }

    /// The device name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A virtio-net device backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Host tap device.
    pub tap: TapName,
    /// The network namespace the tap lives in (a file such as
    /// `/run/netns/<name>`), when not the host's: the host's data path
    /// keeps instance taps in a namespace of its own.
    pub netns: Option<HostPath>,
    /// The guest's MAC address; derived from the instance name when absent.
    pub mac: Option<[u8; 6]>,
}

/// A validated VM specification.
///
/// Fields are read through accessors; the only way to build one is
/// [`VmSpec::parse_json`], so the cross-field rules (unique volume ids and
/// files, at most [`MAX_VOLUMES`]) always hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    instance: Name,
    image: ImageSpec,
    vcpus: u8,
    memory_mib: u32,
    volumes: Vec<VolumeSpec>,
    scratch: Option<ScratchSpec>,
    vsock: Option<VsockSpec>,
    net: Option<NetSpec>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    instance: String,
    image: RawImage,
    vcpus: u64,
    memory_mib: u64,
    #[serde(default)]
    volumes: Vec<RawVolume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scratch: Option<RawScratch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock: Option<RawVsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<RawNet>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    digest: String,
    kernel: String,
    initramfs: String,
    cmdline: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    id: String,
    path: String,
    size_mib: u64,
    #[serde(default)]
    read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScratch {
    path: String,
    size_mib: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVsock {
    guest_cid: u64,
    uds_path: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNet {
    tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

/// The guest MAC address of an instance whose spec names none: locally
/// administered, unicast, derived from the instance name (FNV-1a), so it is
/// stable across restarts of the VM.
pub fn derived_mac(instance: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[3], b[4], b[5], b[6], b[7]]
}

fn parse_mac(s: &str) -> Result<[u8; 6], SpecError> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next().ok_or(SpecError::BadMac)?;
        if p.len() != 2 {
            return Err(SpecError::BadMac);
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| SpecError::BadMac)?;
    }
    // Unicast, locally administered: what a cell assigns.
    if parts.next().is_some() || out[0] & 0x01 != 0 || out[0] & 0x02 == 0 {
        return Err(SpecError::BadMac);
    }
    Ok(out)
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn range(field: &str, value: u64, min: u64, max: u64) -> Result<u64, SpecError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(SpecError::OutOfRange {
            field: field.to_owned(),
            value,
            min,
            max,
        })
    }
}

fn name(field: &str, s: &str) -> Result<Name, SpecError> {
    Name::new(s).map_err(|source| SpecError::Name {
        field: field.to_owned(),
        source,
    })
}

impl VmSpec {
    /// Parses a JSON spec of at most [`MAX_SPEC_LEN`] bytes, failing closed.
    pub fn parse_json(bytes: &[u8]) -> Result<Self, SpecError> {
        if bytes.len() > MAX_SPEC_LEN {
            return Err(SpecError::TooLong(bytes.len()));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawSpec = serde_path_to_error::deserialize(de).map_err(|e| SpecError::Json {
            field: e.path().to_string(),
            source: e.into_inner(),
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawSpec) -> Result<Self, SpecError> {
        let instance = name("instance", &raw.instance)?;
        let image = ImageSpec {
            digest: ImageDigest::parse(&raw.image.digest)?,
            kernel: HostPath::parse("image.kernel", &raw.image.kernel)?,
            initramfs: HostPath::parse("image.initramfs", &raw.image.initramfs)?,
            cmdline: Cmdline::parse(&raw.image.cmdline)?,
        };
        let vcpus = range("vcpus", raw.vcpus, 1, u64::from(MAX_VCPUS))?;
        let memory_mib = range(
            "memory_mib",
            raw.memory_mib,
            u64::from(MIN_MEMORY_MIB),
            u64::from(MAX_MEMORY_MIB),
        )?;
        if raw.volumes.len() > MAX_VOLUMES {
            return Err(SpecError::TooManyVolumes(raw.volumes.len()));
        }
        let mut volumes = Vec::with_capacity(raw.volumes.len());
        let mut ids = BTreeSet::new();
        let mut paths = BTreeSet::new();
        for (i, v) in raw.volumes.iter().enumerate() {
            let id = name(&format!("volumes[{i}].id"), &v.id)?;
            let path = HostPath::parse(&format!("volumes[{i}].path"), &v.path)?;
            let size_mib = range(
                &format!("volumes[{i}].size_mib"),
                v.size_mib,
                1,
                MAX_VOLUME_MIB,
            )?;
            if !ids.insert(id.clone()) {
                return Err(SpecError::DuplicateVolume { index: i, id });
            }
            if !paths.insert(path.clone()) {
                return Err(SpecError::DuplicateVolumePath { index: i });
            }
            let seed = v
                .seed
                .as_deref()
                .map(|p| HostPath::parse(&format!("volumes[{i}].seed"), p))
                .transpose()?;
            if seed.as_ref().is_some_and(|s| *s == path) {
                return Err(SpecError::DuplicateVolumePath { index: i });
            }
            volumes.push(VolumeSpec {
                id,
                path,
                size_mib,
                read_only: v.read_only,
                seed,
            });
        }
        let scratch = match raw.scratch {
            None => None,
            Some(s) => {
                let path = HostPath::parse("scratch.path", &s.path)?;
                if paths.contains(&path) {
                    return Err(SpecError::ScratchIsAVolume);
                }
                Some(ScratchSpec {
                    path,
                    size_mib: range("scratch.size_mib", s.size_mib, 1, MAX_VOLUME_MIB)?,
                })
            }
        };
        let vsock = match raw.vsock {
            None => None,
            Some(v) => Some(VsockSpec {
                guest_cid: u32::try_from(range(
                    "vsock.guest_cid",
                    v.guest_cid,
                    3,
                    u64::from(u32::MAX - 1),
                )?)
                .map_err(|_| SpecError::OutOfRange {
                    field: "vsock.guest_cid".to_owned(),
                    value: v.guest_cid,
                    min: 3,
                    max: u64::from(u32::MAX - 1),
                })?,
                uds_path: HostPath::parse("vsock.uds_path", &v.uds_path)?,
            }),
        };
        let net = match raw.net {
            None => None,
            Some(n) => Some(NetSpec {
                tap: TapName::parse(&n.tap)?,
                netns: n
                    .netns
                    .as_deref()
                    .map(|p| HostPath::parse("net.netns", p))
                    .transpose()?,
                mac: n.mac.as_deref().map(parse_mac).transpose()?,
            }),
        };
        Ok(Self {
            instance,
            image,
            // In range 1..=16 and 32..=65536, checked above.
            vcpus: u8::try_from(vcpus).unwrap_or(MAX_VCPUS),
            memory_mib: u32::try_from(memory_mib).unwrap_or(MAX_MEMORY_MIB),
            volumes,
            scratch,
            vsock,
            net,
        })
    }

    fn to_raw(&self) -> RawSpec {
        RawSpec {
            instance: self.instance.as_str().to_owned(),
            image: RawImage {
                digest: self.image.digest.to_string(),
                kernel: self.image.kernel.to_raw(),
                initramfs: self.image.initramfs.to_raw(),
                cmdline: self.image.cmdline.as_str().to_owned(),
            },
            vcpus: u64::from(self.vcpus),
            memory_mib: u64::from(self.memory_mib),
            volumes: self
                .volumes
                .iter()
                .map(|v| RawVolume {
                    id: v.id.as_str().to_owned(),
                    path: v.path.to_raw(),
                    size_mib: v.size_mib,
                    read_only: v.read_only,
                    seed: v.seed.as_ref().map(HostPath::to_raw),
                })
                .collect(),
            scratch: self.scratch.as_ref().map(|s| RawScratch {
                path: s.path.to_raw(),
                size_mib: s.size_mib,
            }),
            vsock: self.vsock.as_ref().map(|v| RawVsock {
                guest_cid: u64::from(v.guest_cid),
                uds_path: v.uds_path.to_raw(),
            }),
            net: self.net.as_ref().map(|n| RawNet {
                tap: n.tap.as_str().to_owned(),
                netns: n.netns.as_ref().map(HostPath::to_raw),
                mac: n.mac.as_ref().map(mac_text),
            }),
        }
    }

    /// The spec as canonical JSON; [`VmSpec::parse_json`] reads it back to an equal spec.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and bools cannot fail.
        serde_json::to_vec(&self.to_raw()).unwrap_or_default()
    }

    /// The instance this VM runs.
    pub fn instance(&self) -> &Name {
        &self.instance
    }

    /// The guest image.
    pub fn image(&self) -> &ImageSpec {
        &self.image
    }

    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub fn vcpus(&self) -> u8 {
        self.vcpus
    }

    /// Guest memory in MiB, [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`].
    pub fn memory_mib(&self) -> u32 {
        self.memory_mib
    }

    /// Volumes, at most [`MAX_VOLUMES`], with unique ids and files.
    pub fn volumes(&self) -> &[VolumeSpec] {
        &self.volumes
    }

    /// The instance-store disk, if any.
    pub fn scratch(&self) -> Option<&ScratchSpec> {
        self.scratch.as_ref()
    }

    /// The vsock device, if any.
    pub fn vsock(&self) -> Option<&VsockSpec> {
        self.vsock.as_ref()
    }

    /// The network device, if any.
    pub fn net(&self) -> Option<&NetSpec> {
        self.net.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "instance": "i-1",
            "image": {
                "digest": DIGEST,
                "kernel": "/var/lib/nitrile/images/k/vmlinux",
                "initramfs": "/var/lib/nitrile/images/k/initramfs.cpio",
                "cmdline": "console=ttyS0 tsc_early_khz=2000000 nitrile.test=volume-write"
            },
            "vcpus": 2,
            "memory_mib": 256,
            "volumes": [
                { "id": "data", "path": "/var/lib/nitrile/volumes/data.qcow2", "size_mib": 64, "read_only": false },
                { "id": "logs", "path": "/var/lib/nitrile/volumes/logs.qcow2", "size_mib": 8 }
            ],
            "scratch": { "path": "/var/lib/nitrile/instances/i-1/scratch.img", "size_mib": 64 },
            "vsock": { "guest_cid": 3, "uds_path": "/run/nitrile/i-1.vsock" },
            "net": { "tap": "tap-i1" }
        })
    }

    fn parse(v: &serde_json::Value) -> Result<VmSpec, SpecError> {
        VmSpec::parse_json(&serde_json::to_vec(v).unwrap())
    }

    fn with(f: impl FnOnce(&mut serde_json::Value)) -> Result<VmSpec, SpecError> {
        let mut v = valid();
        f(&mut v);
        parse(&v)
    }

    #[test]
    fn valid_spec_parses_and_round_trips() {
        let spec = parse(&valid()).unwrap();
        assert_eq!(spec.instance().as_str(), "i-1");
        assert_eq!(spec.vcpus(), 2);
        assert_eq!(spec.memory_mib(), 256);
        assert_eq!(spec.volumes().len(), 2);
        assert!(!spec.volumes()[1].read_only);
        assert_eq!(spec.vsock().unwrap().guest_cid, 3);
        assert_eq!(spec.net().unwrap().tap.as_str(), "tap-i1");
        assert_eq!(spec.scratch().unwrap().size_mib, 64);
        assert_eq!(spec.image().digest.to_string(), DIGEST);
        let again = VmSpec::parse_json(&spec.to_json()).unwrap();
        assert_eq!(spec, again);
    }

    fn field_of(e: &SpecError) -> String {
        e.to_string()
    }

    #[test]
    fn targeted_rejections_name_the_field() {
        type Mutation = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("instance", Box::new(|v| v["instance"] = "I-1".into())),
            ("instance", Box::new(|v| v["instance"] = "".into())),
            (
                "image.digest",
                Box::new(|v| v["image"]["digest"] = "ab".into()),
            ),
            (
                "image.digest",
                Box::new(|v| v["image"]["digest"] = DIGEST.to_uppercase().into()),
            ),
            (
                "image.kernel",
                Box::new(|v| v["image"]["kernel"] = "vmlinux".into()),
            ),
            (
                "image.kernel",
                Box::new(|v| v["image"]["kernel"] = "/a/../etc/shadow".into()),
            ),
            (
                "image.initramfs",
                Box::new(|v| v["image"]["initramfs"] = "/a/./b".into()),
            ),
            (
                "image.initramfs",
                Box::new(|v| v["image"]["initramfs"] = "/a//b".into()),
            ),
            (
                "image.cmdline",
                Box::new(|v| v["image"]["cmdline"] = "a\nb".into()),
            ),
            (
                "image.cmdline",
                Box::new(|v| v["image"]["cmdline"] = "a\u{0}b".into()),
            ),
            (
                "image.cmdline",
                Box::new(|v| v["image"]["cmdline"] = "x".repeat(MAX_CMDLINE_LEN + 1).into()),
            ),
            ("vcpus", Box::new(|v| v["vcpus"] = 0.into())),
            ("vcpus", Box::new(|v| v["vcpus"] = 17.into())),
            ("vcpus", Box::new(|v| v["vcpus"] = (-1).into())),
            ("vcpus", Box::new(|v| v["vcpus"] = "2".into())),
            ("memory_mib", Box::new(|v| v["memory_mib"] = 31.into())),
            ("memory_mib", Box::new(|v| v["memory_mib"] = 65537.into())),
            (
                "volumes[1].id",
                Box::new(|v| v["volumes"][1]["id"] = "data".into()),
            ),
            (
                "volumes[1].path",
                Box::new(|v| v["volumes"][1]["path"] = v["volumes"][0]["path"].clone()),
            ),
            (
                "volumes[0].size_mib",
                Box::new(|v| v["volumes"][0]["size_mib"] = 0.into()),
            ),
            (
                "volumes[0].path",
                Box::new(|v| v["volumes"][0]["path"] = "".into()),
            ),
            (
                "volumes",
                Box::new(|v| {
                    let vols: Vec<_> = (0..9)
                        .map(|i| serde_json::json!({"id": format!("v{i}"), "path": format!("/v/{i}"), "size_mib": 1}))
                        .collect();
                    v["volumes"] = vols.into();
                }),
            ),
            (
                "vsock.guest_cid",
                Box::new(|v| v["vsock"]["guest_cid"] = 2.into()),
            ),
            (
                "vsock.guest_cid",
                Box::new(|v| v["vsock"]["guest_cid"] = u64::from(u32::MAX).into()),
            ),
            (
                "vsock.uds_path",
                Box::new(|v| v["vsock"]["uds_path"] = "sock".into()),
            ),
            (
                "scratch.path",
                Box::new(|v| v["scratch"]["path"] = v["volumes"][1]["path"].clone()),
            ),
            (
                "scratch.path",
                Box::new(|v| v["scratch"]["path"] = "scratch.img".into()),
            ),
            (
                "scratch.size_mib",
                Box::new(|v| v["scratch"]["size_mib"] = 0.into()),
            ),
            (
                "scratch.size_mib",
                Box::new(|v| v["scratch"]["size_mib"] = (MAX_VOLUME_MIB + 1).into()),
            ),
            ("scratch", Box::new(|v| v["scratch"]["key"] = "00".into())),
            ("net.tap", Box::new(|v| v["net"]["tap"] = "tap 0".into())),
            (
                "net.tap",
                Box::new(|v| v["net"]["tap"] = "a".repeat(16).into()),
            ),
            ("extra", Box::new(|v| v["extra"] = 1.into())),
            ("image", Box::new(|v| v["image"]["extra"] = 1.into())),
            (
                "vcpus",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("vcpus");
                }),
            ),
        ];
        for (field, mutate) in cases {
            let err = with(mutate).expect_err(field);
            let msg = field_of(&err);
            assert!(
                msg.contains(field) || msg.contains(field.split('.').next_back().unwrap()),
                "error {msg:?} should name {field}"
            );
        }
    }

    #[test]
    fn oversized_and_garbage_documents_are_refused() {
        assert!(matches!(
            VmSpec::parse_json(&vec![b' '; MAX_SPEC_LEN + 1]),
            Err(SpecError::TooLong(_))
        ));
        assert!(matches!(
            VmSpec::parse_json(b"{"),
            Err(SpecError::Json { .. })
        ));
        assert!(matches!(
            VmSpec::parse_json(b"[]"),
            Err(SpecError::Json { .. })
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(VmSpec::parse_json(deep.as_bytes()).is_err());
    }

    #[test]
    fn optional_sections_may_be_absent() {
        let spec = with(|v| {
            let o = v.as_object_mut().unwrap();
            o.remove("vsock");
            o.remove("net");
            o.remove("volumes");
            o.remove("scratch");
        })
        .unwrap();
        assert!(spec.vsock().is_none() && spec.net().is_none() && spec.volumes().is_empty());
        assert!(spec.scratch().is_none());
        assert!(
            !String::from_utf8(spec.to_json())
                .unwrap()
                .contains("scratch")
        );
        assert_eq!(VmSpec::parse_json(&spec.to_json()).unwrap(), spec);
    }

    fn check_outcome(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(spec) = VmSpec::parse_json(bytes) {
            let json = spec.to_json();
            let again = VmSpec::parse_json(&json);
            prop_assert!(again.is_ok(), "re-serialized spec refused: {:?}", again);
            let again = again.unwrap();
            prop_assert_eq!(&again, &spec);
            prop_assert_eq!(again.to_json(), json);
        }
        Ok(())
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(Into::into),
            any::<i64>().prop_map(Into::into),
            (0u64..70000).prop_map(Into::into),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null)),
            ".{0,20}".prop_map(serde_json::Value::String),
            "/[a-z./]{0,12}".prop_map(serde_json::Value::String),
            "[a-z0-9-]{0,8}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Into::into),
                prop::collection::btree_map("[a-z_]{1,10}", inner, 0..3)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn paths(v: &serde_json::Value, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(prefix.clone());
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    let mut p = prefix.clone();
                    p.push(k.clone());
                    paths(child, p, out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    let mut p = prefix.clone();
                    p.push(i.to_string());
                    paths(child, p, out);
                }
            }
            _ => {}
        }
    }

    fn at<'a>(v: &'a mut serde_json::Value, path: &[String]) -> &'a mut serde_json::Value {
        let mut cur = v;
        for k in path {
            cur = match cur {
                serde_json::Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
                other => &mut other[k.as_str()],
            };
        }
        cur
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn byte_mutations_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6)
        ) {
            let mut bytes = serde_json::to_vec(&valid()).unwrap();
            for (idx, kind, byte) in edits {
                if bytes.is_empty() { break; }
                let i = idx.index(bytes.len());
                match kind {
                    0 => bytes[i] = byte,
                    1 => { bytes.remove(i); }
                    _ => bytes.insert(i, byte),
                }
            }
            check_outcome(&bytes)?;
        }

        #[test]
        fn value_mutations_never_panic(
            pick in any::<prop::sample::Index>(),
            replacement in arb_json(),
            delete in any::<bool>(),
        ) {
            let mut v = valid();
            let mut all = Vec::new();
            paths(&v, Vec::new(), &mut all);
            let path = &all[pick.index(all.len())];
            if delete && !path.is_empty() {
                let (last, parent) = path.split_last().unwrap();
                match at(&mut v, parent) {
                    serde_json::Value::Object(m) => { m.remove(last); }
                    serde_json::Value::Array(a) => { a.remove(last.parse::<usize>().unwrap()); }
                    _ => {}
                }
            } else {
                *at(&mut v, path) = replacement;
            }
            check_outcome(&serde_json::to_vec(&v).unwrap())?;
        }
    }
}
