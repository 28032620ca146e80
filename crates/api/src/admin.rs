//! The host admin API: one typed request per operation, its route, and the
//! metadata-only responses.
//!
//! [`AdminRequest::parse`] is the only way a host learns what it is asked to
//! do: an unknown path, a method the path does not take, an unknown or
//! malformed body field are errors ([`ApiError`]), never passed through.
//! Responses hold names, numbers, states and digests; there is no field of
//! bytes that could carry guest memory, disk blocks or console output.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::network::{HostNetwork, InstanceNetwork, NetworkAttachment, NetworkUpdate};
use crate::{Name, Operation, ResourceId, ResourceKind};

/// Largest admin request body a host reads.
pub const MAX_ADMIN_BODY: usize = 256 * 1024;
/// Most volumes one instance gets.
pub const MAX_INSTANCE_VOLUMES: usize = 8;
/// Most vCPUs one instance gets.
pub const MAX_INSTANCE_VCPUS: u8 = 32;
/// Least guest memory of an instance, in MiB.
pub const MIN_INSTANCE_MEMORY_MIB: u32 = 64;
/// Most guest memory of an instance, in MiB.
pub const MAX_INSTANCE_MEMORY_MIB: u32 = 256 * 1024;
/// Largest volume, in MiB.
pub const MAX_VOLUME_SIZE_MIB: u64 = 16 * 1024 * 1024;
/// Largest instance-store disk, in MiB (1 TiB).
pub const MAX_SCRATCH_MIB: u32 = 1024 * 1024;
/// Longest free-text reason the host puts in a response.
pub const MAX_REASON_LEN: usize = 256;
/// Longest short label in a response: a software version, a measurement's
/// name, a kernel release, a quota's name. Hosts clip longer text with
/// [`clip_text`].
pub const MAX_LABEL_LEN: usize = 128;
/// The header that carries, beside `Authorization`, the caller's
/// `volume.attach` token for the volumes a launch or a start boots with:
/// one token granting `volume.attach` on each `volume/<id>` at this host,
/// from the same caller. The host verifies it as it verifies the bearer
/// token and relays it to the key service, which releases each volume's
/// data key to the instance's VMM once under it.
pub const VOLUME_TOKEN_HEADER: &str = "nitrile-volume-token";
/// Longest RFC 3339 timestamp in a response (nanoseconds and an offset fit).
pub const MAX_TIMESTAMP_LEN: usize = 40;

/// Why an HTTP request is not an admin request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// no operation has this path
    #[error("no admin operation at {0:?}; `nitrile host --help` lists them")]
    UnknownPath(String),
    /// the path exists but not with this method
    #[error("{method} is not allowed on {path:?}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
    },
    /// the body is larger than [`MAX_ADMIN_BODY`]
    #[error("request body of {0} bytes is larger than {MAX_ADMIN_BODY}")]
    TooLarge(usize),
    /// the body is not the operation's request
    #[error("invalid {operation} request: {reason}")]
    BadBody {
        /// The operation whose body was wrong.
        operation: Operation,
        /// Why.
        reason: String,
    },
}

impl ApiError {
    /// The HTTP status a host answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownPath(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::TooLarge(_) => 413,
            Self::BadBody { .. } => 400,
        }
    }
}

/// A SHA-256 digest as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Hex([u8; 32]);

/// Text that is not 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a SHA-256 digest is 64 lowercase hex digits")]
pub struct DigestError;

impl Sha256Hex {
    /// The digest `bytes`.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Sha256Hex {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(DigestError);
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(DigestError),
        };
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for Sha256Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `instance.launch`: boot a new microVM instance on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// The instance's name, unique on the host.
    pub instance: Name,
    /// Digest of a guest image in the host's image store.
    pub image: Sha256Hex,
    /// Virtual CPUs, 1 to [`MAX_INSTANCE_VCPUS`].
    #[schemars(range(min = 1, max = MAX_INSTANCE_VCPUS))]
    pub vcpus: u8,
    /// Guest memory in MiB, [`MIN_INSTANCE_MEMORY_MIB`] to [`MAX_INSTANCE_MEMORY_MIB`].
    #[schemars(range(min = MIN_INSTANCE_MEMORY_MIB, max = MAX_INSTANCE_MEMORY_MIB))]
    pub memory_mib: u32,
    /// Volumes to attach, at most [`MAX_INSTANCE_VOLUMES`]: each made
    /// with `volume.create`, detached, and of this host's volume store.
    /// The token must also grant `volume.attach` on each `volume/<id>`:
    /// the host relays it to the key service, which releases the volume's
    /// data key to the instance's VMM only under that grant.
    #[serde(default)]
    #[schemars(length(max = MAX_INSTANCE_VOLUMES))]
    pub volumes: Vec<Name>,
    /// Size in MiB, 1 to [`MAX_SCRATCH_MIB`], of an instance-store disk:
    /// encrypted under a key its VMM generates and never gives out, empty
    /// at every start, gone when the instance stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_SCRATCH_MIB))]
    pub scratch_mib: Option<u32>,
    /// A NIC on the customer's virtual network, served by the host's data
    /// path (DHCP, the metadata service, the tunnels to other hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkAttachment>,
}

impl LaunchRequest {
    /// Checks the bounds and uniqueness rules the types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_INSTANCE_VCPUS).contains(&self.vcpus) {
            return Err(format!("vcpus must be 1 to {MAX_INSTANCE_VCPUS}"));
        }
        if !(MIN_INSTANCE_MEMORY_MIB..=MAX_INSTANCE_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(format!(
                "memory_mib must be {MIN_INSTANCE_MEMORY_MIB} to {MAX_INSTANCE_MEMORY_MIB}"
            ));
        }
        if self.volumes.len() > MAX_INSTANCE_VOLUMES {
            return Err(format!("at most {MAX_INSTANCE_VOLUMES} volumes"));
        }
        if let Some(mib) = self.scratch_mib
            && !(1..=MAX_SCRATCH_MIB).contains(&mib)
        {
            return Err(format!("scratch_mib must be 1 to {MAX_SCRATCH_MIB}"));
        }
        if let Some(net) = &self.network {
            net.validate()?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volumes {
            if !seen.insert(v.as_str()) {
                return Err(format!("volume {} is listed twice", v.as_str()));
            }
        }
        Ok(())
    }
}

/// Whether the host takes new instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlacementState {
    /// New instances may be launched.
    Accepting,
    /// `host.drain` was called: launches are refused; running instances stay.
    Drained,
}

/// Health of one part of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Working.
    Ok,
    /// Not working; requests that need it are refused.
    Failed,
}

/// What the host's parts are doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostHealth {
    /// The write-ahead journal accepts records.
    pub journal: Health,
    /// The hypervisor backend can run VMs.
    pub hypervisor: Health,
}

/// Versions of the software the host runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Software {
    /// The nitrile release.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub nitrile: String,
    /// The hypervisor backend: `kvm` or `qemu`.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub backend: String,
    /// The backend's own version, e.g. QEMU's.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub backend_version: Option<String>,
    /// The host kernel release.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub kernel: String,
}

/// A digest of something the host runs or trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// What was measured, e.g. `hostd-binary`, `issuer-keys`.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub name: String,
    /// Its SHA-256.
    pub sha256: Sha256Hex,
}

/// What the host has and what its instances use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// vCPUs the host offers to instances.
    pub vcpus_total: u32,
    /// vCPUs of instances that are not terminated.
    pub vcpus_allocated: u32,
    /// Memory the host offers to instances, in MiB.
    pub memory_mib_total: u64,
    /// Memory of instances that are not terminated, in MiB.
    pub memory_mib_allocated: u64,
    /// Instances that are not terminated.
    pub instances: u32,
}

/// A guest image the host can launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSummary {
    /// The image digest to pass to `instance.launch`.
    pub digest: Sha256Hex,
    /// The kernel release, when known.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub kernel_release: Option<String>,
}

/// The answer to `host.describe`, `host.drain` and `host.undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostDescription {
    /// The host's name.
    pub host: Name,
    /// Its cell.
    pub cell: Name,
    /// Whether it takes new instances.
    pub placement: PlacementState,
    /// Health of its parts.
    pub health: HostHealth,
    /// Versions it runs.
    pub software: Software,
    /// Digests of what it runs and trusts.
    pub measurements: Vec<Measurement>,
    /// Its capacity.
    pub capacity: Capacity,
    /// Images it can launch.
    pub images: Vec<ImageSummary>,
    /// When the host agent started (RFC 3339).
    #[schemars(length(max = MAX_TIMESTAMP_LEN), extend("format" = "date-time"))]
    pub started_at: String,
    /// Its instance network, when it has a data path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<HostNetwork>,
}

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Being created.
    Pending,
    /// Its VMM runs.
    Running,
    /// Stopped; volumes kept.
    Stopped,
    /// Its VMM failed; see `reason`.
    Failed,
    /// Terminated; volumes crypto-erased.
    Terminated,
}

/// One volume attached to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachedVolume {
    /// Volume id.
    pub id: Name,
    /// Size in MiB.
    pub size_mib: u64,
}

/// `volume.create`: a new encrypted volume in the host's volume store. Its
/// data key is made by the key service under `kms_key` and kept by the
/// host only wrapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreateRequest {
    /// The volume's id, unique in the volume store.
    pub volume: Name,
    /// Size in MiB, 1 to [`MAX_VOLUME_SIZE_MIB`].
    #[schemars(range(min = 1, max = MAX_VOLUME_SIZE_MIB))]
    pub size_mib: u64,
    /// The key service's key that wraps the data key (its bare name:
    /// `default` for `kms-key/default`, the cell's key, when absent). A
    /// customer's key wraps only under its owner's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<Name>,
    /// An image of the host's image store whose root disk becomes the
    /// volume's first contents: the VMM that first opens the volume
    /// writes it into the encrypted disk (the host never does). The size
    /// must then be the root disk's, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_image: Option<Sha256Hex>,
}

impl VolumeCreateRequest {
    /// Checks the bounds the types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_VOLUME_SIZE_MIB).contains(&self.size_mib) {
            return Err(format!("size_mib must be 1 to {MAX_VOLUME_SIZE_MIB}"));
        }
        Ok(())
    }
}

/// `volume.attach`: the instance (on this host, stopped) the volume is
/// attached to. Its data key is released to the instance's VMM at its next
/// start, under a token that grants `volume.attach` on the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttachRequest {
    /// The instance.
    pub instance: Name,
}

/// Whether a volume is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Attached to no instance: it may be attached or deleted.
    Available,
    /// Attached to an instance.
    Attached,
    /// Deleted: its key destroyed by the key service, its files removed
    /// (only in the answer to `volume.delete`).
    Deleted,
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttachment {
    /// The host whose instance it is.
    pub host: Name,
    /// The instance.
    pub instance: Name,
}

/// Metadata of one volume: never its contents or its key, wrapped or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeDescription {
    /// The volume's id.
    pub volume: Name,
    /// Size in MiB.
    pub size_mib: u64,
    /// The key service's key its data key is wrapped under (bare name).
    pub kms_key: Name,
    /// The on-disk format, which decides the backend it attaches to:
    /// `luks` (the `qemu` backend) or `xts` (the `kvm` backend).
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub format: String,
    /// Whether it is in use.
    pub state: VolumeState,
    /// Where it is attached, when it is.
    pub attachment: Option<VolumeAttachment>,
    /// When it was created (RFC 3339).
    #[schemars(length(max = MAX_TIMESTAMP_LEN), extend("format" = "date-time"))]
    pub created_at: String,
}

/// The answer to `volume.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeList {
    /// The volumes of the host's volume store, by id.
    pub volumes: Vec<VolumeDescription>,
}

/// Metadata of one instance: never its memory, disk or console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceDescription {
    /// The instance's name.
    pub instance: Name,
    /// The host it runs on.
    pub host: Name,
    /// Digest of its guest image.
    pub image: Sha256Hex,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Its volumes.
    #[schemars(length(max = MAX_INSTANCE_VOLUMES))]
    pub volumes: Vec<AttachedVolume>,
    /// Size in MiB of its instance-store disk, if it has one (its contents
    /// do not outlive a stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_SCRATCH_MIB))]
    pub scratch_mib: Option<u32>,
    /// Its place on its customer's network, if it has a NIC (addresses and
    /// ports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<InstanceNetwork>,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Why it is failed or stopped, from the host (never from the guest), at
    /// most [`MAX_REASON_LEN`] characters.
    #[schemars(length(max = MAX_REASON_LEN))]
    pub reason: Option<String>,
    /// When it was launched (RFC 3339).
    #[schemars(length(max = MAX_TIMESTAMP_LEN), extend("format" = "date-time"))]
    pub launched_at: String,
    /// When its state last changed (RFC 3339).
    #[schemars(length(max = MAX_TIMESTAMP_LEN), extend("format" = "date-time"))]
    pub updated_at: String,
}

/// The answer to `instance.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceList {
    /// The host's instances, by name.
    pub instances: Vec<InstanceDescription>,
}

/// `host.update`: the release to install, by version (`MAJOR.MINOR.PATCH`).
/// The host finds it in the repository it pinned at provisioning; nothing
/// of a release travels in the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostUpdateRequest {
    /// The release version.
    #[schemars(length(max = 60))]
    pub version: String,
}

impl HostUpdateRequest {
    /// Checks that the version is `MAJOR.MINOR.PATCH` (decimal, no leading
    /// zeros).
    pub fn validate(&self) -> Result<(), String> {
        let parts: Vec<&str> = self.version.split('.').collect();
        let ok = parts.len() == 3
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.len() <= 19
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p.len() == 1 || !p.starts_with('0'))
            });
        if ok {
            Ok(())
        } else {
            Err("version must be MAJOR.MINOR.PATCH".to_owned())
        }
    }
}

/// The answer to `host.update`: the release checked and staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostUpdate {
    /// The host.
    pub host: Name,
    /// The version running.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub running: String,
    /// The version checked and staged.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub staged: String,
    /// The environment of both.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub environment: String,
    /// The highest version this host has run (it installs none lower).
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub highest: String,
    /// SHA-256 of the staged binary.
    pub binary_sha256: Sha256Hex,
    /// The agent hands its socket and instances to the staged release now
    /// (a live update); `host.describe` shows the new version once it
    /// serves, or the old one after an automatic rollback.
    #[serde(default)]
    pub handing_over: bool,
}

/// `host.attest`: the caller's nonce (hex, 16 to 64 bytes), which the
/// TPM signs into its quote and the document carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostAttestRequest {
    /// The nonce, hex.
    #[schemars(length(min = 32, max = 128), regex(pattern = r"^[0-9a-f]+$"))]
    pub nonce: String,
}

impl HostAttestRequest {
    /// The nonce's bytes, if it is 16 to 64 bytes of lowercase hex.
    pub fn nonce_bytes(&self) -> Result<Vec<u8>, String> {
        let ok = (32..=128).contains(&self.nonce.len())
            && self.nonce.len().is_multiple_of(2)
            && self
                .nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err("nonce must be 16 to 64 bytes of lowercase hex".to_owned());
        }
        Ok(self
            .nonce
            .as_bytes()
            .chunks(2)
            .map(|p| {
                let v = |c: u8| {
                    if c.is_ascii_digit() {
                        c - b'0'
                    } else {
                        c - b'a' + 10
                    }
                };
                (v(p[0]) << 4) | v(p[1])
            })
            .collect())
    }
}

/// One event of what the host measured into a PCR (the event log of
/// `nitrile host-init`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MeasuredEvent {
    /// The PCR extended.
    #[schemars(range(max = 23))]
    pub pcr: u8,
    /// What was measured, e.g. `hostd-config`.
    #[schemars(length(max = MAX_LABEL_LEN))]
    pub name: String,
    /// The digest extended.
    pub sha256: Sha256Hex,
}

/// A TPM quote: the signed TPMS_ATTEST and TPMT_SIGNATURE (hex, as
/// `tpm2_quote -m` and `-s` write them) and the quoted PCR values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TpmQuote {
    /// The marshalled TPMS_ATTEST, hex.
    #[schemars(length(max = 4096))]
    pub message: String,
    /// The marshalled TPMT_SIGNATURE, hex.
    #[schemars(length(max = 1024))]
    pub signature: String,
    /// The quoted PCRs of the SHA-256 bank, by index.
    pub pcrs: Vec<PcrValue>,
}

/// One PCR of the SHA-256 bank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PcrValue {
    /// The PCR.
    #[schemars(range(max = 23))]
    pub index: u8,
    /// Its value.
    pub sha256: Sha256Hex,
}

/// The answer to `host.attest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostAttestation {
    /// The host.
    pub host: Name,
    /// The attestation key's public area (a marshalled TPMT_PUBLIC, hex):
    /// a restricted ECDSA P-384 key fixed to the host's TPM.
    #[schemars(length(max = 1024))]
    pub attestation_key: String,
    /// The quote of the measured PCRs with the caller's nonce.
    pub quote: TpmQuote,
    /// What the host's init measured into its PCR, in order.
    pub event_log: Vec<MeasuredEvent>,
    /// The same PCRs and nonce in an attestation document of the Nitro
    /// layout (COSE_Sign1, ES384, PCRs under `nitrotpm_pcrs`), hex, when
    /// the host holds a certificate for its TPM's document key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub document: Option<String>,
}

/// One parsed admin request. A host serves exactly these.
///
/// `audit.read` (the audit log service) is an operation of the cell but not
/// of this API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// `GET /v1/host`
    HostDescribe,
    /// `POST /v1/host/drain`
    HostDrain,
    /// `POST /v1/host/undrain`
    HostUndrain,
    /// `POST /v1/host/update` with a [`HostUpdateRequest`] body
    HostUpdate(HostUpdateRequest),
    /// `POST /v1/host/attest` with a [`HostAttestRequest`] body
    HostAttest(HostAttestRequest),
    /// `POST /v1/host/shutdown`
    HostShutdown,
    /// `POST /v1/instances` with a [`LaunchRequest`] body
    InstanceLaunch(LaunchRequest),
    /// `GET /v1/instances`
    InstanceList,
    /// `GET /v1/instances/{instance}`
    InstanceDescribe(Name),
    /// `POST /v1/instances/{instance}/stop`
    InstanceStop(Name),
    /// `POST /v1/instances/{instance}/start`
    InstanceStart(Name),
    /// `DELETE /v1/instances/{instance}`
    InstanceTerminate(Name),
    /// `POST /v1/volumes` with a [`VolumeCreateRequest`] body
    VolumeCreate(VolumeCreateRequest),
    /// `GET /v1/volumes`
    VolumeList,
    /// `GET /v1/volumes/{volume}`
    VolumeDescribe(Name),
    /// `POST /v1/volumes/{volume}/attach` with a [`VolumeAttachRequest`] body
    VolumeAttach(Name, VolumeAttachRequest),
    /// `POST /v1/volumes/{volume}/detach`
    VolumeDetach(Name),
    /// `DELETE /v1/volumes/{volume}`
    VolumeDelete(Name),
    /// `POST /v1/network` with a [`NetworkUpdate`] body
    NetworkUpdate(NetworkUpdate),
}

/// One route of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The operation.
    pub operation: Operation,
    /// HTTP method.
    pub method: &'static str,
    /// Path template; `{instance}` stands for an instance name, `{volume}`
    /// for a volume id.
    pub path: &'static str,
}

/// Every route of the admin API, in a stable order.
pub const ROUTES: [Route; 19] = [
    Route {
        operation: Operation::HostDescribe,
        method: "GET",
        path: "/v1/host",
    },
    Route {
        operation: Operation::HostDrain,
        method: "POST",
        path: "/v1/host/drain",
    },
    Route {
        operation: Operation::HostUndrain,
        method: "POST",
        path: "/v1/host/undrain",
    },
    Route {
        operation: Operation::HostUpdate,
        method: "POST",
        path: "/v1/host/update",
    },
    Route {
        operation: Operation::HostAttest,
        method: "POST",
        path: "/v1/host/attest",
    },
    Route {
        operation: Operation::HostShutdown,
        method: "POST",
        path: "/v1/host/shutdown",
    },
    Route {
        operation: Operation::InstanceLaunch,
        method: "POST",
        path: "/v1/instances",
    },
    Route {
        operation: Operation::InstanceList,
        method: "GET",
        path: "/v1/instances",
    },
    Route {
        operation: Operation::InstanceDescribe,
        method: "GET",
        path: "/v1/instances/{instance}",
    },
    Route {
        operation: Operation::InstanceStop,
        method: "POST",
        path: "/v1/instances/{instance}/stop",
    },
    Route {
        operation: Operation::InstanceStart,
        method: "POST",
        path: "/v1/instances/{instance}/start",
    },
    Route {
        operation: Operation::InstanceTerminate,
        method: "DELETE",
        path: "/v1/instances/{instance}",
    },
    Route {
        operation: Operation::VolumeCreate,
        method: "POST",
        path: "/v1/volumes",
    },
    Route {
        operation: Operation::VolumeList,
        method: "GET",
        path: "/v1/volumes",
    },
    Route {
        operation: Operation::VolumeDescribe,
        method: "GET",
        path: "/v1/volumes/{volume}",
    },
    Route {
        operation: Operation::VolumeAttach,
        method: "POST",
        path: "/v1/volumes/{volume}/attach",
    },
    Route {
        operation: Operation::VolumeDetach,
        method: "POST",
        path: "/v1/volumes/{volume}/detach",
    },
    Route {
        operation: Operation::VolumeDelete,
        method: "DELETE",
        path: "/v1/volumes/{volume}",
    },
    Route {
        operation: Operation::NetworkUpdate,
        method: "POST",
        path: "/v1/network",
    },
];

/// A body that must be absent or an empty JSON object.
fn empty_body(operation: Operation, body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    serde_json::from_slice::<Empty>(body)
        .map(|_| ())
        .map_err(|e| ApiError::BadBody {
            operation,
            reason: e.to_string(),
        })
}

impl AdminRequest {
    /// Parses an HTTP request (method, path without query, body) into the
    /// closed set, failing closed on anything else.
    pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Self, ApiError> {
        if body.len() > MAX_ADMIN_BODY {
            return Err(ApiError::TooLarge(body.len()));
        }
        let segments: Vec<&str> = match path.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => return Err(ApiError::UnknownPath(clip(path))),
        };
        let not_allowed = || ApiError::MethodNotAllowed {
            method: clip(method),
            path: clip(path),
        };
        let instance = |s: &str| Name::new(s).map_err(|_| ApiError::UnknownPath(clip(path)));
        let req = match segments.as_slice() {
            ["v1", "host"] => match method {
                "GET" => Self::HostDescribe,
                _ => return Err(not_allowed()),
            },
            ["v1", "host", action @ ("drain" | "undrain")] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                if *action == "drain" {
                    Self::HostDrain
                } else {
                    Self::HostUndrain
                }
            }
            ["v1", "host", "update"] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                let update: HostUpdateRequest =
                    serde_json::from_slice(body).map_err(|e| ApiError::BadBody {
                        operation: Operation::HostUpdate,
                        reason: e.to_string(),
                    })?;
                update.validate().map_err(|reason| ApiError::BadBody {
                    operation: Operation::HostUpdate,
                    reason,
                })?;
                Self::HostUpdate(update)
            }
            ["v1", "host", "attest"] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                let attest: HostAttestRequest =
                    serde_json::from_slice(body).map_err(|e| ApiError::BadBody {
                        operation: Operation::HostAttest,
                        reason: e.to_string(),
                    })?;
                attest.nonce_bytes().map_err(|reason| ApiError::BadBody {
                    operation: Operation::HostAttest,
                    reason,
                })?;
                Self::HostAttest(attest)
            }
            ["v1", "host", "shutdown"] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                Self::HostShutdown
            }
            ["v1", "instances"] => match method {
                "GET" => Self::InstanceList,
                "POST" => {
                    let launch: LaunchRequest =
                        serde_json::from_slice(body).map_err(|e| ApiError::BadBody {
                            operation: Operation::InstanceLaunch,
                            reason: e.to_string(),
                        })?;
                    launch.validate().map_err(|reason| ApiError::BadBody {
                        operation: Operation::InstanceLaunch,
                        reason,
                    })?;
                    Self::InstanceLaunch(launch)
                }
                _ => return Err(not_allowed()),
            },
            ["v1", "instances", name] => match method {
                "GET" => Self::InstanceDescribe(instance(name)?),
                "DELETE" => Self::InstanceTerminate(instance(name)?),
                _ => return Err(not_allowed()),
            },
            ["v1", "instances", name, action @ ("stop" | "start")] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                let name = instance(name)?;
                if *action == "stop" {
                    Self::InstanceStop(name)
                } else {
                    Self::InstanceStart(name)
                }
            }
            ["v1", "volumes"] => match method {
                "GET" => Self::VolumeList,
                "POST" => {
                    let create: VolumeCreateRequest =
                        serde_json::from_slice(body).map_err(|e| ApiError::BadBody {
                            operation: Operation::VolumeCreate,
                            reason: e.to_string(),
                        })?;
                    create.validate().map_err(|reason| ApiError::BadBody {
                        operation: Operation::VolumeCreate,
                        reason,
                    })?;
                    Self::VolumeCreate(create)
                }
                _ => return Err(not_allowed()),
            },
            ["v1", "volumes", id] => match method {
                "GET" => Self::VolumeDescribe(instance(id)?),
                "DELETE" => Self::VolumeDelete(instance(id)?),
                _ => return Err(not_allowed()),
            },
            ["v1", "volumes", id, "attach"] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                let id = instance(id)?;
                let attach: VolumeAttachRequest =
                    serde_json::from_slice(body).map_err(|e| ApiError::BadBody {
                        operation: Operation::VolumeAttach,
                        reason: e.to_string(),
                    })?;
                Self::VolumeAttach(id, attach)
            }
            ["v1", "volumes", id, "detach"] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                Self::VolumeDetach(instance(id)?)
            }
            ["v1", "network"] => {
                if method != "POST" {
                    return Err(not_allowed());
                }
                let update: NetworkUpdate =
                    serde_json::from_slice(body).map_err(|e| ApiError::BadBody {
                        operation: Operation::NetworkUpdate,
                        reason: e.to_string(),
                    })?;
                update.validate().map_err(|reason| ApiError::BadBody {
                    operation: Operation::NetworkUpdate,
                    reason,
                })?;
                Self::NetworkUpdate(update)
            }
            _ => return Err(ApiError::UnknownPath(clip(path))),
        };
        match &req {
            Self::HostDrain
            | Self::HostUndrain
            | Self::HostShutdown
            | Self::InstanceStop(_)
            | Self::InstanceStart(_)
            | Self::InstanceTerminate(_)
            | Self::HostDescribe
            | Self::InstanceList
            | Self::InstanceDescribe(_)
            | Self::VolumeList
            | Self::VolumeDescribe(_)
            | Self::VolumeDetach(_)
            | Self::VolumeDelete(_) => empty_body(req.operation(), body)?,
            Self::InstanceLaunch(_)
            | Self::HostUpdate(_)
            | Self::HostAttest(_)
            | Self::VolumeCreate(_)
            | Self::VolumeAttach(..)
            | Self::NetworkUpdate(_) => {}
        }
        Ok(req)
    }

    /// The operation a token must grant.
    pub fn operation(&self) -> Operation {
        match self {
            Self::HostDescribe => Operation::HostDescribe,
            Self::HostDrain => Operation::HostDrain,
            Self::HostUndrain => Operation::HostUndrain,
            Self::HostUpdate(_) => Operation::HostUpdate,
            Self::HostAttest(_) => Operation::HostAttest,
            Self::HostShutdown => Operation::HostShutdown,
            Self::InstanceLaunch(_) => Operation::InstanceLaunch,
            Self::InstanceList => Operation::InstanceList,
            Self::InstanceDescribe(_) => Operation::InstanceDescribe,
            Self::InstanceStop(_) => Operation::InstanceStop,
            Self::InstanceStart(_) => Operation::InstanceStart,
            Self::InstanceTerminate(_) => Operation::InstanceTerminate,
            Self::VolumeCreate(_) => Operation::VolumeCreate,
            Self::VolumeList => Operation::VolumeList,
            Self::VolumeDescribe(_) => Operation::VolumeDescribe,
            Self::VolumeAttach(..) => Operation::VolumeAttach,
            Self::VolumeDetach(_) => Operation::VolumeDetach,
            Self::VolumeDelete(_) => Operation::VolumeDelete,
            Self::NetworkUpdate(_) => Operation::NetworkUpdate,
        }
    }

    /// The resource a token must grant, on host `host`: the host itself, the
    /// named instance, or the named volume (for `volume.create`, the one
    /// the body names).
    pub fn resource(&self, host: &Name) -> ResourceId {
        match self {
            Self::VolumeCreate(c) => ResourceId::new(ResourceKind::Volume, c.volume.clone()),
            Self::VolumeDescribe(v)
            | Self::VolumeAttach(v, _)
            | Self::VolumeDetach(v)
            | Self::VolumeDelete(v) => ResourceId::new(ResourceKind::Volume, v.clone()),
            Self::InstanceDescribe(n)
            | Self::InstanceStop(n)
            | Self::InstanceStart(n)
            | Self::InstanceTerminate(n) => ResourceId::new(ResourceKind::Instance, n.clone()),
            _ => ResourceId::new(ResourceKind::Host, host.clone()),
        }
    }

    /// The HTTP method a client sends.
    pub fn method(&self) -> &'static str {
        match self {
            Self::HostDescribe
            | Self::InstanceList
            | Self::InstanceDescribe(_)
            | Self::VolumeList
            | Self::VolumeDescribe(_) => "GET",
            Self::InstanceTerminate(_) | Self::VolumeDelete(_) => "DELETE",
            _ => "POST",
        }
    }

    /// The path a client sends.
    pub fn path(&self) -> String {
        match self {
            Self::HostDescribe => "/v1/host".into(),
            Self::HostDrain => "/v1/host/drain".into(),
            Self::HostUndrain => "/v1/host/undrain".into(),
            Self::HostUpdate(_) => "/v1/host/update".into(),
            Self::HostAttest(_) => "/v1/host/attest".into(),
            Self::HostShutdown => "/v1/host/shutdown".into(),
            Self::InstanceLaunch(_) | Self::InstanceList => "/v1/instances".into(),
            Self::InstanceDescribe(n) | Self::InstanceTerminate(n) => {
                format!("/v1/instances/{}", n.as_str())
            }
            Self::InstanceStop(n) => format!("/v1/instances/{}/stop", n.as_str()),
            Self::InstanceStart(n) => format!("/v1/instances/{}/start", n.as_str()),
            Self::VolumeCreate(_) | Self::VolumeList => "/v1/volumes".into(),
            Self::VolumeDescribe(v) | Self::VolumeDelete(v) => {
                format!("/v1/volumes/{}", v.as_str())
            }
            Self::VolumeAttach(v, _) => format!("/v1/volumes/{}/attach", v.as_str()),
            Self::VolumeDetach(v) => format!("/v1/volumes/{}/detach", v.as_str()),
            Self::NetworkUpdate(_) => "/v1/network".into(),
        }
    }

    /// The JSON body a client sends (empty for all but launch, volume
    /// create and volume attach).
    pub fn body(&self) -> Vec<u8> {
        match self {
            Self::InstanceLaunch(l) => serde_json::to_vec(l).unwrap_or_default(),
            Self::VolumeCreate(c) => serde_json::to_vec(c).unwrap_or_default(),
            Self::VolumeAttach(_, a) => serde_json::to_vec(a).unwrap_or_default(),
            Self::NetworkUpdate(u) => serde_json::to_vec(u).unwrap_or_default(),
            Self::HostUpdate(u) => serde_json::to_vec(u).unwrap_or_default(),
            Self::HostAttest(a) => serde_json::to_vec(a).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// The first `max` characters of `text`: how a host keeps a reason or a label
/// within the bound its schema states ([`MAX_REASON_LEN`], [`MAX_LABEL_LEN`]).
pub fn clip_text(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch_body() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "instance": "web1",
            "image": "ab".repeat(32),
            "vcpus": 1,
            "memory_mib": 256,
            "volumes": ["data"],
        }))
        .unwrap()
    }

    #[test]
    fn every_request_round_trips_through_its_route() {
        let web1 = Name::new("web1").unwrap();
        let launch: LaunchRequest = serde_json::from_slice(&launch_body()).unwrap();
        let all = [
            AdminRequest::HostDescribe,
            AdminRequest::HostDrain,
            AdminRequest::HostUndrain,
            AdminRequest::HostUpdate(HostUpdateRequest {
                version: "1.4.0".into(),
            }),
            AdminRequest::HostAttest(HostAttestRequest {
                nonce: "00".repeat(32),
            }),
            AdminRequest::HostShutdown,
            AdminRequest::InstanceLaunch(launch),
            AdminRequest::InstanceList,
            AdminRequest::InstanceDescribe(web1.clone()),
            AdminRequest::InstanceStop(web1.clone()),
            AdminRequest::InstanceStart(web1.clone()),
            AdminRequest::InstanceTerminate(web1.clone()),
            AdminRequest::VolumeCreate(VolumeCreateRequest {
                volume: Name::new("data").unwrap(),
                size_mib: 64,
                kms_key: None,
                seed_image: None,
            }),
            AdminRequest::VolumeList,
            AdminRequest::VolumeDescribe(Name::new("data").unwrap()),
            AdminRequest::VolumeAttach(
                Name::new("data").unwrap(),
                VolumeAttachRequest { instance: web1 },
            ),
            AdminRequest::VolumeDetach(Name::new("data").unwrap()),
            AdminRequest::VolumeDelete(Name::new("data").unwrap()),
            AdminRequest::NetworkUpdate(NetworkUpdate {
                peers: Vec::new(),
                routes: vec![crate::network::NetworkRoute {
                    vni: 7,
                    address: std::net::Ipv4Addr::new(10, 80, 0, 10),
                    host: Name::new("h2").unwrap(),
                }],
            }),
        ];
        assert_eq!(all.len(), ROUTES.len());
        for (req, route) in all.iter().zip(ROUTES) {
            assert_eq!(req.operation(), route.operation);
            assert_eq!(req.method(), route.method);
            let parsed = AdminRequest::parse(req.method(), &req.path(), &req.body()).unwrap();
            assert_eq!(&parsed, req);
        }
    }

    #[test]
    fn resources_follow_the_operation() {
        let h1 = Name::new("h1").unwrap();
        let r = AdminRequest::parse("POST", "/v1/instances/web1/stop", b"").unwrap();
        assert_eq!(r.resource(&h1).to_string(), "instance/web1");
        let r = AdminRequest::parse("GET", "/v1/instances", b"").unwrap();
        assert_eq!(r.resource(&h1).to_string(), "host/h1");
        assert_eq!(r.operation().resource_kind(), ResourceKind::Host);
    }

    #[test]
    fn anything_else_is_refused() {
        let cases: [(&str, &str, &[u8], u16); 19] = [
            ("GET", "/v1/shell", b"", 404),
            ("GET", "/v1/instances/web1/console", b"", 404),
            ("GET", "/v1/instances/../host", b"", 404),
            ("GET", "v1/host", b"", 404),
            ("PUT", "/v1/host", b"", 405),
            ("GET", "/v1/host/drain", b"", 405),
            ("POST", "/v1/host/drain", br#"{"force":true}"#, 400),
            ("GET", "/v1/host/update", b"", 405),
            ("POST", "/v1/host/update", br#"{"version":"1.4"}"#, 400),
            ("POST", "/v1/host/update", br#"{"version":"01.4.0"}"#, 400),
            (
                "POST",
                "/v1/host/update",
                br#"{"version":"1.4.0","binary":"x"}"#,
                400,
            ),
            ("POST", "/v1/host/update", b"", 400),
            ("GET", "/v1/host/attest", b"", 405),
            ("POST", "/v1/host/attest", br#"{"nonce":"00"}"#, 400),
            ("POST", "/v1/host/attest", br#"{"nonce":"XYZ"}"#, 400),
            ("POST", "/v1/host/shutdown", br#"{"now":true}"#, 400),
            ("POST", "/v1/instances", b"{}", 400),
            ("POST", "/v1/instances", b"not json", 400),
            ("GET", "/v1/host", &[b' '; MAX_ADMIN_BODY + 1], 413),
        ];
        for (method, path, body, status) in cases {
            let e = AdminRequest::parse(method, path, body).unwrap_err();
            assert_eq!(e.status(), status, "{method} {path}: {e}");
        }
    }

    #[test]
    fn launch_bounds_and_unknown_fields() {
        let mut v: serde_json::Value = serde_json::from_slice(&launch_body()).unwrap();
        v["vcpus"] = 0.into();
        let e = AdminRequest::parse("POST", "/v1/instances", v.to_string().as_bytes());
        assert!(matches!(e, Err(ApiError::BadBody { .. })));
        let mut v: serde_json::Value = serde_json::from_slice(&launch_body()).unwrap();
        let first = v["volumes"][0].clone();
        v["volumes"].as_array_mut().unwrap().push(first);
        assert!(AdminRequest::parse("POST", "/v1/instances", v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&launch_body()).unwrap();
        v["kernel_cmdline"] = "init=/bin/sh".into();
        assert!(AdminRequest::parse("POST", "/v1/instances", v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&launch_body()).unwrap();
        v["image"] = "AB".repeat(32).into();
        assert!(AdminRequest::parse("POST", "/v1/instances", v.to_string().as_bytes()).is_err());
        for bad in [
            serde_json::json!(0),
            serde_json::json!(u64::from(MAX_SCRATCH_MIB) + 1),
            serde_json::json!(-1),
            serde_json::json!("64M"),
        ] {
            let mut v: serde_json::Value = serde_json::from_slice(&launch_body()).unwrap();
            v["scratch_mib"] = bad.clone();
            let e = AdminRequest::parse("POST", "/v1/instances", v.to_string().as_bytes());
            assert!(matches!(e, Err(ApiError::BadBody { .. })), "{bad}");
        }
        let mut v: serde_json::Value = serde_json::from_slice(&launch_body()).unwrap();
        v["scratch_mib"] = 64.into();
        let Ok(AdminRequest::InstanceLaunch(l)) =
            AdminRequest::parse("POST", "/v1/instances", v.to_string().as_bytes())
        else {
            panic!("a scratch disk of 64 MiB is refused");
        };
        assert_eq!(l.scratch_mib, Some(64));
        // Without one the body is as before (journaled launches unchanged).
        let l: LaunchRequest = serde_json::from_slice(&launch_body()).unwrap();
        assert!(!serde_json::to_string(&l).unwrap().contains("scratch"));
    }

    #[test]
    fn digests_round_trip() {
        let d: Sha256Hex = "0f".repeat(32).parse().unwrap();
        assert_eq!(d.to_string(), "0f".repeat(32));
        assert!("0f".repeat(31).parse::<Sha256Hex>().is_err());
        assert!("g0".repeat(32).parse::<Sha256Hex>().is_err());
    }
}
