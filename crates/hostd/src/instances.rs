//! The host's instances: microVMs driven through [`nitrile_vmm::Hypervisor`],
//! their persisted records, and their volumes' wrapped keys.
//!
//! State under the host state directory:
//!
//! ```text
//! host.json                          placement (accepting | drained)
//! instances/<name>/instance.json     the instance's record (an InstanceDescription)
//! instances/<name>/spec.json         the VM spec it was last booted with
//! instances/<name>/scratch.img       its instance-store disk, while its VM runs
//! vms/                               the backend's per-VM state
//! ```
//!
//! Volumes are resources of their own, in the volume store
//! ([`crate::volumes`]), shared by the hosts of a cell; an instance's record
//! lists the volumes attached to it.
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of
//! the directory). Operations on one instance are serialized by a
//! per-instance lock; hypervisor calls run on blocking threads.
//!
//! No plaintext volume key is on this host's disk or in this process. A
//! volume's data key is made by the key service ([`VolumeKeySource`]) and
//! kept in the volume store only wrapped; to boot an instance, the host
//! creates its VM, whose VMM makes one recipient key pair per volume, has
//! the key service seal each data key to its recipient (relaying the
//! caller's `volume.attach` token, which the key service checks itself) and
//! relays the sealed keys to the VMM
//! ([`nitrile_vmm::Hypervisor::supply_keys`]). Deleting a volume
//! crypto-erases it: the key service destroys its key record before the
//! host removes the ciphertext. Terminating an instance detaches its
//! volumes. An instance-store disk's key is made inside the VMM and dies
//! with it; its backing file is removed when the instance stops.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nitrile_api::Name;
use nitrile_api::admin::{
    AttachedVolume, InstanceDescription, InstanceState, LaunchRequest, MAX_INSTANCE_VOLUMES,
    MAX_REASON_LEN, PlacementState, Sha256Hex, VolumeAttachment, VolumeCreateRequest,
    VolumeDescription, VolumeState, clip_text,
};
use nitrile_api::wire::RefusalStep;
use nitrile_image::{ImageError, ImageStore};
use nitrile_vmm::{Hypervisor, SealedVolumeKeys, VmId, VmSpec, VmStatus, VmmError};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::network::{HostNet, InstancePort, NetError, tap_name};
use crate::volume_keys::{VolumeKeyError, VolumeKeySource, WrappedVolumeKey};
use crate::volumes::{VolumeLock, VolumeRecord, VolumeStore, VolumeStoreError};

/// Largest instance record or host state file read.
pub const MAX_RECORD_LEN: u64 = 64 * 1024;

const RECORD_FILE: &str = "instance.json";
const SPEC_FILE: &str = "spec.json";
const SCRATCH_FILE: &str = "scratch.img";
const HOST_FILE: &str = "host.json";
const NETWORK_FILE: &str = "network.json";

/// Why an instance operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceError {
    /// the host is drained: it launches nothing
    #[error("host is drained; launches are refused until `nitrile host undrain`")]
    Drained,
    /// an instance with this name exists
    #[error("instance {0} already exists on this host")]
    Exists(Name),
    /// no instance with this name
    #[error("no instance {0} on this host")]
    NoSuchInstance(Name),
    /// the image is not in the host's store, or failed its verification
    #[error("image {digest} is not in this host's image store or failed verification")]
    UnknownImage {
        /// The requested image.
        digest: Sha256Hex,
        /// Why.
        #[source]
        source: Box<ImageError>,
    },
    /// `host.update` was refused
    #[error(transparent)]
    Update(#[from] crate::update::UpdateError),
    /// a volume's seed image is not usable: no root disk, or another size
    #[error("cannot seed volume {volume} from image {digest}: {reason}")]
    BadSeed {
        /// The volume.
        volume: Name,
        /// The image.
        digest: Sha256Hex,
        /// Why.
        reason: String,
    },
    /// not enough free vCPUs or memory
    #[error(
        "not enough capacity: {vcpus} vCPUs and {memory_mib} MiB asked, {free_vcpus} vCPUs and {free_memory_mib} MiB free"
    )]
    Capacity {
        /// vCPUs asked.
        vcpus: u32,
        /// Memory asked.
        memory_mib: u64,
        /// vCPUs free.
        free_vcpus: u32,
        /// Memory free.
        free_memory_mib: u64,
    },
    /// the instance is not in a state that allows the operation
    #[error("instance {instance} is {state:?}; cannot {op}")]
    WrongState {
        /// The instance.
        instance: Name,
        /// Its state.
        state: InstanceState,
        /// The refused operation.
        op: &'static str,
    },
    /// the hypervisor backend could not be set up when the agent started
    #[error("no usable hypervisor backend: {reason}")]
    NoHypervisor {
        /// Why, as found at start.
        reason: String,
    },
    /// `host.attest` on a host without `[tpm]`
    #[error("this host has no TPM ([tpm] in its config)")]
    NoTpm,
    /// the TPM refused or failed
    #[error("{0}")]
    Tpm(String),
    /// `host.shutdown` while instances run
    #[error("{0} instance(s) run on this host; stop or move them before it powers off")]
    InstancesRunning(usize),
    /// the hypervisor refused or failed
    #[error("hypervisor")]
    Hypervisor(#[source] VmmError),
    /// the instance has volumes but this host agent has no key service
    #[error("volumes need the key service, and this host agent has none; launch without volumes")]
    NoKeySource,
    /// the volume store refused or failed
    #[error("volume store")]
    Volume(#[from] VolumeStoreError),
    /// the volume is attached to an instance
    #[error("volume {volume} is attached to instance {instance} on host {host}")]
    VolumeAttached {
        /// The volume.
        volume: Name,
        /// Its instance.
        instance: Name,
        /// The instance's host.
        host: Name,
    },
    /// the volume is attached to nothing
    #[error("volume {0} is not attached")]
    VolumeNotAttached(Name),
    /// the volume's instance is on another host
    #[error("volume {volume} is attached to an instance of host {host}; detach it there")]
    VolumeElsewhere {
        /// The volume.
        volume: Name,
        /// The host.
        host: Name,
    },
    /// the volume was made for another backend
    #[error(
        "volume {volume} is in the {format} format, and this host's backend ({backend}) takes {expected}"
    )]
    VolumeFormat {
        /// The volume.
        volume: Name,
        /// Its format.
        format: String,
        /// This host's backend.
        backend: &'static str,
        /// The format it takes.
        expected: &'static str,
    },
    /// an instance has the most volumes
    #[error("instance {0} has {MAX_INSTANCE_VOLUMES} volumes, the most an instance gets")]
    TooManyVolumes(Name),
    /// the key service refused or failed a volume's key
    #[error("the key of volume {volume}")]
    VolumeKey {
        /// The volume.
        volume: Name,
        /// Why.
        #[source]
        source: VolumeKeyError,
    },
    /// the VM spec could not be built or read back
    #[error("VM spec")]
    Spec(#[from] nitrile_vmm::SpecError),
    /// a state file could not be read or written
    #[error("host state file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// a state file is not what the host agent writes
    #[error("host state file {} is damaged: {reason}", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// a blocking task panicked or was cancelled
    #[error("internal task failed")]
    Task(#[source] tokio::task::JoinError),
    /// the request needs the instance network and this host has no data
    /// path
    #[error(
        "this host agent has no instance network (no [network] in its config); launch without a NIC"
    )]
    NoNetwork,
    /// a network update or attachment was refused; nothing changed
    #[error("instance network: {0}")]
    Network(String),
    /// the data path failed
    #[error("instance network")]
    NetworkFailed(#[source] NetError),
}

impl InstanceError {
    /// HTTP status, refusal step and stable code of the error.
    pub fn classify(&self) -> (u16, RefusalStep, &'static str) {
        match self {
            Self::Drained => (409, RefusalStep::State, "drained"),
            Self::Exists(_) => (409, RefusalStep::State, "exists"),
            Self::NoSuchInstance(_) => (404, RefusalStep::State, "no_such_instance"),
            Self::UnknownImage { .. } => (409, RefusalStep::State, "unknown_image"),
            Self::BadSeed { .. } => (400, RefusalStep::Request, "bad_seed"),
            Self::Update(e) if e.is_bad_input() => (400, RefusalStep::Request, e.code()),
            Self::Update(e) => (409, RefusalStep::State, e.code()),
            Self::Capacity { .. } => (409, RefusalStep::State, "capacity"),
            Self::WrongState { .. } => (409, RefusalStep::State, "wrong_state"),
            Self::NoHypervisor { .. } | Self::Hypervisor(_) => {
                (500, RefusalStep::Hypervisor, "hypervisor")
            }
            Self::NoKeySource => (409, RefusalStep::State, "no_key_service"),
            Self::NoTpm => (409, RefusalStep::State, "no_tpm"),
            Self::Tpm(_) => (500, RefusalStep::Internal, "tpm"),
            Self::InstancesRunning(_) => (409, RefusalStep::State, "instances_running"),
            Self::VolumeKey {
                source: VolumeKeyError::Refused(_),
                ..
            } => (409, RefusalStep::State, "volume_key_refused"),
            Self::VolumeKey { .. } => (500, RefusalStep::Internal, "key_service"),
            Self::Volume(VolumeStoreError::NoSuchVolume(_)) => {
                (404, RefusalStep::State, "no_such_volume")
            }
            Self::Volume(VolumeStoreError::Exists(_)) => (409, RefusalStep::State, "volume_exists"),
            Self::Volume(_) => (500, RefusalStep::Internal, "internal"),
            Self::VolumeAttached { .. } => (409, RefusalStep::State, "volume_attached"),
            Self::VolumeNotAttached(_) => (409, RefusalStep::State, "volume_not_attached"),
            Self::VolumeElsewhere { .. } => (409, RefusalStep::State, "volume_elsewhere"),
            Self::VolumeFormat { .. } => (409, RefusalStep::State, "volume_format"),
            Self::TooManyVolumes(_) => (409, RefusalStep::State, "too_many_volumes"),
            Self::Spec(_) | Self::Io { .. } | Self::Damaged { .. } | Self::Task(_) => {
                (500, RefusalStep::Internal, "internal")
            }
            Self::NoNetwork => (409, RefusalStep::State, "no_network"),
            Self::Network(_) => (400, RefusalStep::Request, "bad_network"),
            Self::NetworkFailed(_) => (500, RefusalStep::Internal, "network"),
        }
    }

    /// A one-line reason for the caller, with causes, within
    /// [`MAX_REASON_LEN`].
    pub fn reason(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        clip_text(&text, MAX_REASON_LEN)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a state file of at most `max` bytes into a buffer zeroized when
/// dropped (key files are among them).
fn read_bounded(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, InstanceError> {
    nitrile_fs::read_secret(path, max).map_err(|e| match e {
        nitrile_fs::FsError::TooLarge { path, max } => InstanceError::Damaged {
            path,
            reason: format!("larger than {max} bytes"),
        },
        e => io(path)(e.into()),
    })
}

/// Writes a state file, owner-only, with [`nitrile_fs::write_atomic`].
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), InstanceError> {
    nitrile_fs::write_atomic(path, bytes, 0o600).map_err(|e| io(path)(e.into()))
}

fn private_dir(path: &Path) -> Result<(), InstanceError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

/// The persisted placement state of the host.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostState {
    placement: PlacementState,
}

/// What the host offers to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityLimits {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl CapacityLimits {
    /// The configured limits, defaulting to the machine's CPUs and 3/4 of
    /// its `MemTotal`.
    pub fn from_config(config: &crate::config::CapacityConfig) -> Self {
        let vcpus = config.vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1)
        });
        let memory_mib = config.memory_mib.unwrap_or_else(|| {
            let total_kib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("MemTotal:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            total_kib / 1024 * 3 / 4
        });
        Self { vcpus, memory_mib }
    }
}

/// vCPUs, memory and count of the instances that are not terminated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocated {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Instances.
    pub instances: u32,
}

/// The instances of one host.
pub struct Instances {
    host: Name,
    state_dir: PathBuf,
    images: ImageStore,
    hypervisor: Result<Arc<dyn Hypervisor>, String>,
    volume_keys: Option<Arc<dyn VolumeKeySource>>,
    volumes: VolumeStore,
    network: Option<Arc<HostNet>>,
    format: &'static str,
    backend: &'static str,
    limits: CapacityLimits,
    table: Mutex<BTreeMap<Name, InstanceDescription>>,
    locks: Mutex<BTreeMap<Name, Arc<tokio::sync::Mutex<()>>>>,
    launch_gate: tokio::sync::Mutex<()>,
    drained: AtomicBool,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("host", &self.host)
            .field("state_dir", &self.state_dir)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn attachment_of(this: &Instances, name: &Name) -> VolumeAttachment {
    VolumeAttachment {
        host: this.host.clone(),
        instance: name.clone(),
    }
}

/// Re-adopts the VM of `spec` after a host agent restart (the backend's
/// [`Hypervisor::adopt`]).
fn adopt(hv: &dyn Hypervisor, spec: &VmSpec) -> Result<VmStatus, VmmError> {
    hv.adopt(spec)
}

fn now_text(now: OffsetDateTime) -> String {
    nitrile_audit::format_time(now)
}

impl Instances {
    /// Loads the records under `state_dir` (creating the directories), and
    /// re-adopts every instance recorded as running or pending: its state
    /// becomes what the hypervisor reports. Volumes are kept in `volumes`,
    /// their keys made and released by `volume_keys` (without it the host
    /// has no volumes); `backend` (`qemu` or `kvm`) decides the format of
    /// the volumes it makes and takes.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        host: Name,
        state_dir: &Path,
        images: ImageStore,
        hypervisor: Result<Arc<dyn Hypervisor>, String>,
        backend: &'static str,
        volumes: VolumeStore,
        volume_keys: Option<Arc<dyn VolumeKeySource>>,
        network: Option<Arc<HostNet>>,
        limits: CapacityLimits,
        now: OffsetDateTime,
    ) -> Result<Self, InstanceError> {
        let instances_dir = state_dir.join("instances");
        private_dir(&instances_dir)?;
        // Paths handed to the hypervisor must be absolute and normalized; a
        // config's relative `state = "."` resolves to `<dir>/.`.
        let state_dir = &std::fs::canonicalize(state_dir).map_err(io(state_dir))?;
        let instances_dir = state_dir.join("instances");
        let host_file = state_dir.join(HOST_FILE);
        let drained = match std::fs::metadata(&host_file) {
            Ok(_) => {
                let bytes = read_bounded(&host_file, MAX_RECORD_LEN)?;
                let s: HostState =
                    serde_json::from_slice(&bytes).map_err(|e| InstanceError::Damaged {
                        path: host_file.clone(),
                        reason: e.to_string(),
                    })?;
                s.placement == PlacementState::Drained
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(&host_file)(e)),
        };
        let mut table = BTreeMap::new();
        for entry in std::fs::read_dir(&instances_dir).map_err(io(&instances_dir))? {
            let entry = entry.map_err(io(&instances_dir))?;
            let Some(name) = entry.file_name().to_str().and_then(|n| Name::new(n).ok()) else {
                continue;
            };
            let path = entry.path().join(RECORD_FILE);
            if !path.exists() {
                continue; // a launch that never got its first record written
            }
            let bytes = read_bounded(&path, MAX_RECORD_LEN)?;
            let record: InstanceDescription =
                serde_json::from_slice(&bytes).map_err(|e| InstanceError::Damaged {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if record.instance != name {
                return Err(InstanceError::Damaged {
                    path,
                    reason: format!("names instance {}", record.instance),
                });
            }
            table.insert(name, record);
        }
        let this = Self {
            host,
            state_dir: state_dir.to_owned(),
            images,
            hypervisor,
            volume_keys,
            volumes,
            network,
            format: format_of(backend),
            backend,
            limits,
            table: Mutex::new(table),
            locks: Mutex::new(BTreeMap::new()),
            launch_gate: tokio::sync::Mutex::new(()),
            drained: AtomicBool::new(drained),
        };
        this.readopt(now)?;
        Ok(this)
    }

    fn readopt(&self, now: OffsetDateTime) -> Result<(), InstanceError> {
        let live: Vec<InstanceDescription> = self
            .table()
            .values()
            .filter(|r| matches!(r.state, InstanceState::Running | InstanceState::Pending))
            .cloned()
            .collect();
        for mut record in live {
            let network_before = record.network.clone();
            let (state, reason) = match &self.hypervisor {
                Err(reason) => (
                    InstanceState::Failed,
                    Some(format!("no usable hypervisor backend: {reason}")),
                ),
                Ok(hv) => match self.load_spec(&record.instance) {
                    Err(e) => (InstanceState::Failed, Some(e.reason())),
                    Ok(spec) => match adopt(hv.as_ref(), &spec) {
                        Ok(VmStatus::Running | VmStatus::Created) => (InstanceState::Running, None),
                        Ok(VmStatus::Stopped) => (
                            InstanceState::Stopped,
                            Some("its VM was not running when the host agent started".to_owned()),
                        ),
                        Ok(VmStatus::Failed { reason }) => (InstanceState::Failed, Some(reason)),
                        Ok(other) => (InstanceState::Failed, Some(format!("{other:?}"))),
                        Err(VmmError::UnknownVm(_)) => (
                            InstanceState::Stopped,
                            Some("no trace of its VM when the host agent started".to_owned()),
                        ),
                        Err(e) => (
                            InstanceState::Failed,
                            Some(format!("could not re-adopt its VM: {e}")),
                        ),
                    },
                },
            };
            if state != InstanceState::Running {
                // Its VMM is gone, and with it the instance-store disk's key.
                self.remove_scratch(&record.instance);
            } else if let Err(e) = self.connect(&mut record) {
                tracing::error!(instance = %record.instance, error = %e.reason(), "could not connect a re-adopted instance to its network");
            }
            tracing::info!(instance = %record.instance, ?state, "re-adopted instance");
            // Its ports may be published elsewhere now (the ones it had
            // were taken): the record says where they are.
            if state != record.state || reason != record.reason || record.network != network_before
            {
                record.state = state;
                record.reason = reason.map(|r| clip_text(&r, MAX_REASON_LEN));
                record.updated_at = now_text(now);
                self.save(&record)?;
            }
        }
        Ok(())
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<Name, InstanceDescription>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_of(&self, name: &Name) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(locks.entry(name.clone()).or_default())
    }

    fn dir(&self, name: &Name) -> PathBuf {
        self.state_dir.join("instances").join(name.as_str())
    }

    /// The volume store.
    pub fn volume_store(&self) -> &VolumeStore {
        &self.volumes
    }

    /// The backing file of an instance's instance-store disk (present
    /// while its VM runs).
    pub fn scratch_file(&self, name: &Name) -> PathBuf {
        self.dir(name).join(SCRATCH_FILE)
    }

    /// Removes an instance's instance-store disk (the backend removes it
    /// too when the VM ends; this covers a VMM that died with no backend
    /// watching).
    fn remove_scratch(&self, name: &Name) {
        let path = self.scratch_file(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "could not remove the instance-store disk");
            }
        }
    }

    /// The backing file of a volume (its ciphertext).
    pub fn volume_file(&self, volume: &Name) -> PathBuf {
        self.volumes.disk_path(volume)
    }

    fn hv(&self) -> Result<Arc<dyn Hypervisor>, InstanceError> {
        self.hypervisor
            .as_ref()
            .map(Arc::clone)
            .map_err(|reason| InstanceError::NoHypervisor {
                reason: reason.clone(),
            })
    }

    /// Whether a hypervisor backend is usable.
    pub fn hypervisor_ok(&self) -> bool {
        self.hypervisor.is_ok()
    }

    /// Whether the host takes launches.
    pub fn placement(&self) -> PlacementState {
        if self.drained.load(Ordering::SeqCst) {
            PlacementState::Drained
        } else {
            PlacementState::Accepting
        }
    }

    /// Drains (`true`) or undrains the host, persisting the flag first.
    pub async fn set_drained(&self, drained: bool) -> Result<(), InstanceError> {
        // Serialized with launches, so none starts on a host being drained.
        let _gate = self.launch_gate.lock().await;
        let placement = if drained {
            PlacementState::Drained
        } else {
            PlacementState::Accepting
        };
        let path = self.state_dir.join(HOST_FILE);
        let bytes = serde_json::to_vec(&HostState { placement })
            .unwrap_or_else(|_| unreachable!("plain enum serializes"));
        tokio::task::spawn_blocking(move || write_private(&path, &bytes))
            .await
            .map_err(InstanceError::Task)??;
        self.drained.store(drained, Ordering::SeqCst);
        Ok(())
    }

    /// The host's capacity limits.
    pub fn limits(&self) -> CapacityLimits {
        self.limits
    }

    /// What the instances that are not terminated use.
    pub fn allocated(&self) -> Allocated {
        let mut a = Allocated::default();
        for r in self.table().values() {
            if r.state != InstanceState::Terminated {
                a.vcpus += u32::from(r.vcpus);
                a.memory_mib += u64::from(r.memory_mib);
                a.instances += 1;
            }
        }
        a
    }

    /// Instances by state (terminated tombstones included).
    pub fn count_by_state(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> =
            ["pending", "running", "stopped", "failed", "terminated"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for r in self.table().values() {
            *out.entry(state_name(r.state)).or_default() += 1;
        }
        out
    }

    fn save(&self, record: &InstanceDescription) -> Result<(), InstanceError> {
        let dir = self.dir(&record.instance);
        private_dir(&dir)?;
        let path = dir.join(RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(record)
            .unwrap_or_else(|_| unreachable!("a description serializes"));
        write_private(&path, &bytes)?;
        self.table().insert(record.instance.clone(), record.clone());
        Ok(())
    }

    fn load_spec(&self, name: &Name) -> Result<VmSpec, InstanceError> {
        let path = self.dir(name).join(SPEC_FILE);
        let bytes = read_bounded(&path, nitrile_vmm::MAX_SPEC_LEN as u64)?;
        Ok(VmSpec::parse_json(&bytes)?)
    }

    fn key_source(&self) -> Result<Arc<dyn VolumeKeySource>, InstanceError> {
        self.volume_keys
            .as_ref()
            .map(Arc::clone)
            .ok_or(InstanceError::NoKeySource)
    }

    /// The host's instance network, if it has a data path.
    pub fn network(&self) -> Option<&HostNet> {
        self.network.as_deref()
    }

    /// `network.update`: the other hosts' announcements (each verified)
    /// and the cell's routes replace what the data path had.
    pub fn update_network(
        &self,
        update: &nitrile_api::network::NetworkUpdate,
    ) -> Result<nitrile_api::network::HostNetwork, InstanceError> {
        let net = self.network.as_ref().ok_or(InstanceError::NoNetwork)?;
        net.update(update).map_err(|e| match e {
            NetError::Peer { .. } => InstanceError::Network(e.to_string()),
            e => InstanceError::NetworkFailed(e),
        })
    }

    fn save_port(&self, name: &Name, port: &InstancePort) -> Result<(), InstanceError> {
        let bytes = serde_json::to_vec_pretty(port)
            .unwrap_or_else(|_| unreachable!("names, numbers and strings serialize"));
        write_private(&self.dir(name).join(NETWORK_FILE), &bytes)
    }

    fn load_port(&self, name: &Name) -> Result<Option<InstancePort>, InstanceError> {
        let path = self.dir(name).join(NETWORK_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = read_bounded(&path, MAX_RECORD_LEN * 4)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| InstanceError::Damaged {
                path,
                reason: e.to_string(),
            })
    }

    /// Connects a running instance with a NIC to the data path: its port,
    /// its metadata, its published ports (kept in `network.json`).
    fn connect(&self, record: &mut InstanceDescription) -> Result<(), InstanceError> {
        let Some(mut port) = self.load_port(&record.instance)? else {
            return Ok(());
        };
        let net = self.network.as_ref().ok_or(InstanceError::NoNetwork)?;
        let shown = net
            .connect(&record.instance, &mut port)
            .map_err(InstanceError::NetworkFailed)?;
        self.save_port(&record.instance, &port)?;
        record.network = Some(shown);
        Ok(())
    }

    fn record(&self, name: &Name) -> Result<InstanceDescription, InstanceError> {
        self.table()
            .get(name)
            .cloned()
            .ok_or_else(|| InstanceError::NoSuchInstance(name.clone()))
    }

    /// The record of `name` with its state refreshed from the hypervisor
    /// (a VMM that died shows `failed` with the VMM's reason). While another
    /// operation on the instance runs, the last record is returned.
    pub fn describe(
        &self,
        name: &Name,
        now: OffsetDateTime,
    ) -> Result<InstanceDescription, InstanceError> {
        let record = self.record(name)?;
        Ok(self.refresh(record, now))
    }

    /// Every instance that is not terminated, by name, refreshed like
    /// [`Instances::describe`].
    pub fn list(&self, now: OffsetDateTime) -> Vec<InstanceDescription> {
        let records: Vec<_> = self
            .table()
            .values()
            .filter(|r| r.state != InstanceState::Terminated)
            .cloned()
            .collect();
        records.into_iter().map(|r| self.refresh(r, now)).collect()
    }

    fn refresh(&self, record: InstanceDescription, now: OffsetDateTime) -> InstanceDescription {
        if record.state != InstanceState::Running {
            return record;
        }
        let Ok(hv) = self.hv() else { return record };
        let lock = self.lock_of(&record.instance);
        let Ok(_guard) = lock.try_lock() else {
            return record;
        };
        let id = VmId::new(record.instance.clone());
        let (state, reason) = match hv.status(&id) {
            Ok(VmStatus::Running | VmStatus::Created) => return record,
            Ok(VmStatus::Stopped) => (InstanceState::Stopped, "the guest powered off".to_owned()),
            Ok(VmStatus::Failed { reason }) => (InstanceState::Failed, reason),
            Ok(other) => (InstanceState::Failed, format!("{other:?}")),
            Err(VmmError::UnknownVm(_)) => (
                InstanceState::Failed,
                "the hypervisor has no VM for it".to_owned(),
            ),
            Err(e) => {
                tracing::warn!(instance = %record.instance, error = %e, "status failed");
                return record;
            }
        };
        let mut updated = record.clone();
        updated.state = state;
        updated.reason = Some(clip_text(&reason, MAX_REASON_LEN));
        updated.updated_at = now_text(now);
        if let Err(e) = self.save(&updated) {
            tracing::error!(instance = %record.instance, error = %e, "could not record state");
        }
        updated
    }

    /// Launches an instance: checks placement, name, image and capacity,
    /// persists its record (pending), attaches its volumes (each available,
    /// of this backend's format, under the volume's lock), creates its VM,
    /// has the key service seal each volume's key to its VMM under
    /// `volume_token` (the caller's `volume.attach` grant, which the key
    /// service checks itself), starts it, and records it running (or
    /// failed, with the reason; its volumes stay attached to it).
    pub async fn launch(
        &self,
        req: &LaunchRequest,
        now: OffsetDateTime,
        volume_token: Option<&str>,
    ) -> Result<InstanceDescription, InstanceError> {
        let _gate = self.launch_gate.lock().await;
        let name = req.instance.clone();
        let lock = self.lock_of(&name);
        let _guard = lock.lock().await;
        if self.drained.load(Ordering::SeqCst) {
            return Err(InstanceError::Drained);
        }
        if self
            .table()
            .get(&name)
            .is_some_and(|r| r.state != InstanceState::Terminated)
        {
            return Err(InstanceError::Exists(name));
        }
        if req.network.is_some() && self.network.is_none() {
            return Err(InstanceError::NoNetwork);
        }
        let hv = self.hv()?;
        let keys = if req.volumes.is_empty() {
            None
        } else {
            Some(self.key_source()?)
        };
        let image = self.image(req.image).await?;
        let used = self.allocated();
        let free_vcpus = self.limits.vcpus.saturating_sub(used.vcpus);
        let free_memory_mib = self.limits.memory_mib.saturating_sub(used.memory_mib);
        if u32::from(req.vcpus) > free_vcpus || u64::from(req.memory_mib) > free_memory_mib {
            return Err(InstanceError::Capacity {
                vcpus: u32::from(req.vcpus),
                memory_mib: u64::from(req.memory_mib),
                free_vcpus,
                free_memory_mib,
            });
        }
        // The volumes, attached to the new instance under their locks (in
        // id order, so that two hosts never wait on each other); a volume
        // that cannot be attached undoes the ones before it.
        let attachment = VolumeAttachment {
            host: self.host.clone(),
            instance: name.clone(),
        };
        let volumes = {
            let this_store = self.volumes.clone();
            let ids = req.volumes.clone();
            let format = self.format;
            let backend = self.backend;
            let attachment = attachment.clone();
            tokio::task::spawn_blocking(move || {
                attach_all(&this_store, &ids, format, backend, &attachment)
            })
            .await
            .map_err(InstanceError::Task)??
        };
        let seeds = match self.seeds_of(&volumes).await {
            Ok(s) => s,
            Err(e) => {
                self.detach_quietly(&volumes, &attachment).await;
                return Err(e);
            }
        };
        // The store's root may be configured as `../../images`: the spec
        // takes absolute, normalized paths only.
        let kernel = std::fs::canonicalize(image.kernel()).map_err(io(image.kernel()))?;
        let initramfs = std::fs::canonicalize(image.initramfs()).map_err(io(image.initramfs()))?;
        let mut spec_json = serde_json::json!({
            "instance": name.as_str(),
            "image": {
                "digest": image.digest().to_hex(),
                "kernel": kernel,
                "initramfs": initramfs,
                "cmdline": image.cmdline().as_str(),
            },
            "vcpus": req.vcpus,
            "memory_mib": req.memory_mib,
            "volumes": self.spec_volumes(&volumes, &seeds),
        });
        if let Some(mib) = req.scratch_mib {
            spec_json["scratch"] = serde_json::json!({
                "path": self.scratch_file(&name),
                "size_mib": mib,
            });
        }
        let port = match &req.network {
            None => None,
            Some(attachment) => {
                let Some(net) = &self.network else {
                    self.detach_quietly(&volumes, &attachment_of(self, &name))
                        .await;
                    return Err(InstanceError::NoNetwork);
                };
                let tap = tap_name(&name);
                spec_json["net"] = serde_json::json!({
                    "tap": tap,
                    "netns": net.netns_path(),
                    "mac": attachment.mac.to_string(),
                });
                let identity_document = net
                    .identity_document(&name, req.image, attachment, &now_text(now), now)
                    .map_err(InstanceError::NetworkFailed)?;
                Some(InstancePort {
                    attachment: attachment.clone(),
                    tap,
                    published: Vec::new(),
                    identity_document,
                })
            }
        };
        let spec = match VmSpec::parse_json(
            &serde_json::to_vec(&spec_json).unwrap_or_else(|_| unreachable!("json value")),
        ) {
            Ok(spec) => spec,
            Err(e) => {
                self.detach_quietly(&volumes, &attachment).await;
                return Err(e.into());
            }
        };

        // A terminated tombstone of the same name is replaced.
        let dir = self.dir(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        let record = InstanceDescription {
            instance: name.clone(),
            host: self.host.clone(),
            image: req.image,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            volumes: volumes
                .iter()
                .map(|v| AttachedVolume {
                    id: v.volume.clone(),
                    size_mib: v.size_mib,
                })
                .collect(),
            scratch_mib: req.scratch_mib,
            network: None,
            state: InstanceState::Pending,
            reason: None,
            launched_at: now_text(now),
            updated_at: now_text(now),
        };
        self.save(&record)?;
        let spec_path = dir.join(SPEC_FILE);
        write_private(&spec_path, &spec.to_json())?;
        if let Some(port) = &port {
            self.save_port(&name, port)?;
        }
        let wrapped = self.wrapped_of(&volumes)?;
        let token = volume_token.map(str::to_owned);
        let result = tokio::task::spawn_blocking(move || {
            bring_up(
                hv.as_ref(),
                keys.as_deref(),
                &spec,
                &wrapped,
                token.as_deref(),
            )
        })
        .await
        .map_err(InstanceError::Task)?;
        self.record_started(record, result, now)
    }

    /// Image `digest` of this host's store, its files re-hashed against it.
    async fn image(&self, digest: Sha256Hex) -> Result<nitrile_image::ImageRef, InstanceError> {
        let store = self.images.clone();
        let d = nitrile_image::Digest::from_bytes(*digest.as_bytes());
        tokio::task::spawn_blocking(move || store.get(&d))
            .await
            .map_err(InstanceError::Task)?
            .map_err(|source| InstanceError::UnknownImage {
                digest,
                source: Box::new(source),
            })
    }

    /// Checks that image `digest` of this host's store can seed a volume of
    /// `size_mib`: it has a root disk of exactly that size.
    async fn check_seed(
        &self,
        volume: &Name,
        digest: Sha256Hex,
        size_mib: u64,
    ) -> Result<(), InstanceError> {
        let image = self.image(digest).await?;
        let bad = |reason: String| InstanceError::BadSeed {
            volume: volume.clone(),
            digest,
            reason,
        };
        match image.root_disk_mib() {
            None => Err(bad("the image has no root disk".to_owned())),
            Some(mib) if mib != size_mib => Err(bad(format!(
                "its root disk is {mib} MiB, the volume {size_mib} MiB: they must be equal"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The root disks that seed `records` whose ciphertext does not exist
    /// yet, checked against their images' digests, by volume.
    async fn seeds_of(
        &self,
        records: &[VolumeRecord],
    ) -> Result<BTreeMap<Name, PathBuf>, InstanceError> {
        let mut out = BTreeMap::new();
        for r in records {
            let Some(digest) = r.seed_image else { continue };
            if self.volumes.disk_path(&r.volume).exists() {
                continue;
            }
            let image = self.image(digest).await?;
            let Some(path) = image.root_disk() else {
                return Err(InstanceError::BadSeed {
                    volume: r.volume.clone(),
                    digest,
                    reason: "the image has no root disk".to_owned(),
                });
            };
            out.insert(
                r.volume.clone(),
                std::fs::canonicalize(path).map_err(io(path))?,
            );
        }
        Ok(out)
    }

    /// The spec's `volumes` for `records`: each volume's ciphertext in the
    /// store, and the root disk that seeds it when it is still to be made.
    fn spec_volumes(
        &self,
        records: &[VolumeRecord],
        seeds: &BTreeMap<Name, PathBuf>,
    ) -> Vec<serde_json::Value> {
        records
            .iter()
            .map(|v| {
                let mut spec = serde_json::json!({
                    "id": v.volume.as_str(),
                    "path": self.volumes.disk_path(&v.volume),
                    "size_mib": v.size_mib,
                });
                if let Some(seed) = seeds.get(&v.volume) {
                    spec["seed"] = serde_json::json!(seed);
                }
                spec
            })
            .collect()
    }

    /// The wrapped keys of `records`, by volume.
    fn wrapped_of(
        &self,
        records: &[VolumeRecord],
    ) -> Result<BTreeMap<Name, WrappedVolumeKey>, InstanceError> {
        let mut out = BTreeMap::new();
        for r in records {
            let path = self.volumes.dir().join(r.volume.as_str());
            out.insert(r.volume.clone(), r.wrapped(&path)?);
        }
        Ok(out)
    }

    /// Undoes the attachments of a launch that did not get as far as its
    /// record; failures are logged (the volumes then show the attachment,
    /// which `volume.detach` clears).
    async fn detach_quietly(&self, records: &[VolumeRecord], attachment: &VolumeAttachment) {
        let store = self.volumes.clone();
        let ids: Vec<Name> = records.iter().map(|r| r.volume.clone()).collect();
        let attachment = attachment.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in ids {
                if let Err(e) = detach_if(&store, &id, &attachment) {
                    tracing::error!(volume = %id, error = %e, "could not undo an attachment");
                }
            }
        })
        .await;
    }

    /// Stops a running instance: its VMM process ends, and with it every
    /// key it held; its volumes stay attached, its instance-store disk is
    /// removed.
    pub async fn stop(
        &self,
        name: &Name,
        now: OffsetDateTime,
        reason: Option<&str>,
    ) -> Result<InstanceDescription, InstanceError> {
        let lock = self.lock_of(name);
        let _guard = lock.lock().await;
        let mut record = self.record(name)?;
        if !matches!(
            record.state,
            InstanceState::Running | InstanceState::Pending | InstanceState::Failed
        ) {
            return Err(InstanceError::WrongState {
                instance: name.clone(),
                state: record.state,
                op: "stop",
            });
        }
        let hv = self.hv()?;
        if let Some(net) = &self.network {
            net.disconnect(name);
        }
        let id = VmId::new(name.clone());
        tokio::task::spawn_blocking(move || stop_and_forget(hv.as_ref(), &id))
            .await
            .map_err(InstanceError::Task)?
            .map_err(InstanceError::Hypervisor)?;
        self.remove_scratch(name);
        record.state = InstanceState::Stopped;
        record.reason = reason.map(str::to_owned);
        record.updated_at = now_text(now);
        self.save(&record)?;
        Ok(record)
    }

    /// Starts a stopped (or failed) instance again from its persisted spec
    /// with the volumes attached to it now, after checking its image again:
    /// a new VMM, to whose recipients the key service seals the volumes'
    /// keys anew under `volume_token`, and an empty instance-store disk.
    pub async fn start(
        &self,
        name: &Name,
        now: OffsetDateTime,
        volume_token: Option<&str>,
    ) -> Result<InstanceDescription, InstanceError> {
        let lock = self.lock_of(name);
        let _guard = lock.lock().await;
        let mut record = self.record(name)?;
        if !matches!(record.state, InstanceState::Stopped | InstanceState::Failed) {
            return Err(InstanceError::WrongState {
                instance: name.clone(),
                state: record.state,
                op: "start",
            });
        }
        let hv = self.hv()?;
        let old = self.load_spec(name)?;
        let mut volumes = Vec::new();
        for v in &record.volumes {
            volumes.push(self.volumes.read(&v.id)?);
        }
        let mut spec_json: serde_json::Value =
            serde_json::from_slice(&old.to_json()).map_err(|e| InstanceError::Damaged {
                path: self.dir(name).join(SPEC_FILE),
                reason: e.to_string(),
            })?;
        let seeds = self.seeds_of(&volumes).await?;
        spec_json["volumes"] = serde_json::Value::Array(self.spec_volumes(&volumes, &seeds));
        let spec = VmSpec::parse_json(
            &serde_json::to_vec(&spec_json).unwrap_or_else(|_| unreachable!("json value")),
        )?;
        let wrapped = self.wrapped_of(&volumes)?;
        let keys = if volumes.is_empty() {
            None
        } else {
            Some(self.key_source()?)
        };
        self.image(record.image).await?;
        write_private(&self.dir(name).join(SPEC_FILE), &spec.to_json())?;
        // Recorded pending before the VM exists: if the agent dies before
        // it records the outcome, the next one re-adopts the VM instead of
        // leaving it running behind a `stopped` record.
        record.state = InstanceState::Pending;
        record.reason = None;
        record.updated_at = now_text(now);
        self.save(&record)?;
        let id = VmId::new(name.clone());
        let token = volume_token.map(str::to_owned);
        let result = tokio::task::spawn_blocking(move || {
            stop_and_forget(hv.as_ref(), &id).map_err(InstanceError::Hypervisor)?;
            bring_up(
                hv.as_ref(),
                keys.as_deref(),
                &spec,
                &wrapped,
                token.as_deref(),
            )
        })
        .await
        .map_err(InstanceError::Task)?;
        self.record_started(record, result, now)
    }

    /// Records how bringing up an instance's VM ended: running, or failed
    /// with the reason.
    fn record_started(
        &self,
        mut record: InstanceDescription,
        result: Result<(), InstanceError>,
        now: OffsetDateTime,
    ) -> Result<InstanceDescription, InstanceError> {
        record.updated_at = now_text(now);
        let result = result.and_then(|()| self.connect(&mut record));
        match result {
            Ok(()) => {
                record.state = InstanceState::Running;
                record.reason = None;
                self.save(&record)?;
                Ok(record)
            }
            Err(e) => {
                record.state = InstanceState::Failed;
                record.reason = Some(e.reason());
                self.save(&record)?;
                Err(e)
            }
        }
    }

    /// Terminates an instance: destroys its VM, erases its instance store,
    /// detaches its volumes (they stay, encrypted, for `volume.delete` to
    /// crypto-erase or another instance to attach) and keeps a tombstone
    /// record saying `terminated`.
    pub async fn terminate(
        &self,
        name: &Name,
        now: OffsetDateTime,
    ) -> Result<InstanceDescription, InstanceError> {
        let lock = self.lock_of(name);
        let _guard = lock.lock().await;
        let mut record = self.record(name)?;
        if record.state == InstanceState::Terminated {
            return Err(InstanceError::WrongState {
                instance: name.clone(),
                state: record.state,
                op: "terminate",
            });
        }
        let hv = self.hv()?;
        if let Some(net) = &self.network {
            net.disconnect(name);
        }
        let id = VmId::new(name.clone());
        tokio::task::spawn_blocking(move || stop_and_forget(hv.as_ref(), &id))
            .await
            .map_err(InstanceError::Task)?
            .map_err(InstanceError::Hypervisor)?;
        self.remove_scratch(name);
        let attachment = VolumeAttachment {
            host: self.host.clone(),
            instance: name.clone(),
        };
        let store = self.volumes.clone();
        let ids: Vec<Name> = record.volumes.iter().map(|v| v.id.clone()).collect();
        let spec_path = self.dir(name).join(SPEC_FILE);
        // The network file holds the customer's SSH keys and user data:
        // gone with the instance.
        let port_path = self.dir(name).join(NETWORK_FILE);
        tokio::task::spawn_blocking(move || -> Result<(), InstanceError> {
            for id in &ids {
                match detach_if(&store, id, &attachment) {
                    Ok(()) | Err(InstanceError::Volume(VolumeStoreError::NoSuchVolume(_))) => {}
                    Err(e) => return Err(e),
                }
            }
            for path in [&spec_path, &port_path] {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(path)(e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(InstanceError::Task)??;
        record.state = InstanceState::Terminated;
        record.reason = None;
        record.volumes.clear();
        record.updated_at = now_text(now);
        self.save(&record)?;
        Ok(record)
    }

    /// `volume.create`: reserves the id in the volume store, has the key
    /// service make the data key under the requested key (relaying
    /// `caller_token`, the caller's `volume.create` token) and writes the
    /// record with the key wrapped. A refusal of the key service leaves no
    /// trace in the store.
    pub async fn create_volume(
        &self,
        req: &VolumeCreateRequest,
        now: OffsetDateTime,
        caller_token: &str,
    ) -> Result<VolumeDescription, InstanceError> {
        let source = self.key_source()?;
        if let Some(digest) = req.seed_image {
            self.check_seed(&req.volume, digest, req.size_mib).await?;
        }
        let store = self.volumes.clone();
        let format = self.format.to_owned();
        let req = req.clone();
        let token = caller_token.to_owned();
        let created_at = now_text(now);
        tokio::task::spawn_blocking(move || {
            let lock = store.reserve(&req.volume)?;
            let kms_key = req
                .kms_key
                .clone()
                .unwrap_or_else(|| Name::new("default").unwrap_or_else(|_| unreachable!()));
            let wrapped = match source.generate(&req.volume, &kms_key, &token) {
                Ok(w) => w,
                Err(source) => {
                    store.abandon(&req.volume, lock);
                    return Err(InstanceError::VolumeKey {
                        volume: req.volume.clone(),
                        source,
                    });
                }
            };
            let record = VolumeRecord {
                volume: req.volume.clone(),
                size_mib: req.size_mib,
                kms_key,
                format,
                wrapped_key: hex::encode(wrapped.as_bytes()),
                attachment: None,
                created_at,
                seed_image: req.seed_image,
            };
            store.write(&lock, &record)?;
            Ok(record.describe())
        })
        .await
        .map_err(InstanceError::Task)?
    }

    /// `volume.describe`.
    pub async fn describe_volume(&self, id: &Name) -> Result<VolumeDescription, InstanceError> {
        let store = self.volumes.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || Ok(store.read(&id)?.describe()))
            .await
            .map_err(InstanceError::Task)?
    }

    /// `volume.list`: every volume of the store.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeDescription>, InstanceError> {
        let store = self.volumes.clone();
        tokio::task::spawn_blocking(move || {
            Ok(store.list()?.iter().map(VolumeRecord::describe).collect())
        })
        .await
        .map_err(InstanceError::Task)?
    }

    /// `volume.attach`: attaches an available volume of this backend's
    /// format to a stopped (or failed) instance of this host. Its key is
    /// released at the instance's next start.
    pub async fn attach_volume(
        &self,
        id: &Name,
        instance: &Name,
        now: OffsetDateTime,
    ) -> Result<VolumeDescription, InstanceError> {
        let lock = self.lock_of(instance);
        let _guard = lock.lock().await;
        let mut record = self.record(instance)?;
        if !matches!(record.state, InstanceState::Stopped | InstanceState::Failed) {
            return Err(InstanceError::WrongState {
                instance: instance.clone(),
                state: record.state,
                op: "attach a volume",
            });
        }
        if record.volumes.len() >= MAX_INSTANCE_VOLUMES {
            return Err(InstanceError::TooManyVolumes(instance.clone()));
        }
        let store = self.volumes.clone();
        let attachment = VolumeAttachment {
            host: self.host.clone(),
            instance: instance.clone(),
        };
        let (format, backend) = (self.format, self.backend);
        let ids = vec![id.clone()];
        let mut attached = tokio::task::spawn_blocking(move || {
            attach_all(&store, &ids, format, backend, &attachment)
        })
        .await
        .map_err(InstanceError::Task)??;
        let volume = attached.remove(0);
        record.volumes.push(AttachedVolume {
            id: volume.volume.clone(),
            size_mib: volume.size_mib,
        });
        record.updated_at = now_text(now);
        self.save(&record)?;
        Ok(volume.describe())
    }

    /// `volume.detach`: detaches a volume from its instance of this host,
    /// which must not be running.
    pub async fn detach_volume(
        &self,
        id: &Name,
        now: OffsetDateTime,
    ) -> Result<VolumeDescription, InstanceError> {
        let current = {
            let store = self.volumes.clone();
            let id = id.clone();
            tokio::task::spawn_blocking(move || store.read(&id))
                .await
                .map_err(InstanceError::Task)??
        };
        let Some(attachment) = current.attachment.clone() else {
            return Err(InstanceError::VolumeNotAttached(id.clone()));
        };
        if attachment.host != self.host {
            return Err(InstanceError::VolumeElsewhere {
                volume: id.clone(),
                host: attachment.host,
            });
        }
        let lock = self.lock_of(&attachment.instance);
        let _guard = lock.lock().await;
        let record = self.table().get(&attachment.instance).cloned();
        if let Some(r) = &record
            && matches!(r.state, InstanceState::Running | InstanceState::Pending)
        {
            return Err(InstanceError::WrongState {
                instance: r.instance.clone(),
                state: r.state,
                op: "detach a volume",
            });
        }
        let store = self.volumes.clone();
        let vid = id.clone();
        let att = attachment.clone();
        let volume = tokio::task::spawn_blocking(move || {
            detach_if(&store, &vid, &att)?;
            Ok::<_, InstanceError>(store.read(&vid)?)
        })
        .await
        .map_err(InstanceError::Task)??;
        if let Some(mut r) = record
            && r.volumes.iter().any(|v| v.id == *id)
        {
            r.volumes.retain(|v| v.id != *id);
            r.updated_at = now_text(now);
            self.save(&r)?;
        }
        Ok(volume.describe())
    }

    /// `volume.delete`: crypto-erases an available volume: the key service
    /// destroys its key record (relaying `caller_token`, the caller's
    /// `volume.delete` token) before the ciphertext and the record are
    /// removed. A refusal of the key service removes nothing.
    pub async fn delete_volume(
        &self,
        id: &Name,
        caller_token: &str,
    ) -> Result<VolumeDescription, InstanceError> {
        let source = self.key_source()?;
        let store = self.volumes.clone();
        let id = id.clone();
        let token = caller_token.to_owned();
        tokio::task::spawn_blocking(move || {
            let lock = store.lock(&id)?;
            let record = store.read(&id)?;
            if let Some(a) = &record.attachment {
                return Err(InstanceError::VolumeAttached {
                    volume: id.clone(),
                    instance: a.instance.clone(),
                    host: a.host.clone(),
                });
            }
            source
                .destroy(&id, &token)
                .map_err(|source| InstanceError::VolumeKey {
                    volume: id.clone(),
                    source,
                })?;
            store.remove(&id, lock)?;
            let mut d = record.describe();
            d.state = VolumeState::Deleted;
            Ok(d)
        })
        .await
        .map_err(InstanceError::Task)?
    }

    /// Stops every running instance, recording `reason` (the host agent
    /// shutting down with `--stop-instances-on-exit`).
    pub async fn stop_all(&self, now: OffsetDateTime, reason: &str) {
        let names: Vec<Name> = self
            .table()
            .values()
            .filter(|r| matches!(r.state, InstanceState::Running | InstanceState::Pending))
            .map(|r| r.instance.clone())
            .collect();
        for name in names {
            if let Err(e) = self.stop(&name, now, Some(reason)).await {
                tracing::error!(instance = %name, error = %e, "could not stop instance");
            }
        }
    }
}

/// Creates the VM of `spec`, has `keys` seal each volume's data key (from
/// its wrapped key) to the recipient the VMM made for it under
/// `volume_token`, relays the sealed keys and starts the VM. The host sees
/// the wrapped and the sealed keys, never a data key. On failure the VM is
/// destroyed.
fn bring_up(
    hv: &dyn Hypervisor,
    keys: Option<&dyn VolumeKeySource>,
    spec: &VmSpec,
    wrapped: &BTreeMap<Name, WrappedVolumeKey>,
    volume_token: Option<&str>,
) -> Result<(), InstanceError> {
    let created = hv.create(spec).map_err(InstanceError::Hypervisor)?;
    let result = (|| {
        if !created.recipients.is_empty() {
            let source = keys.ok_or(InstanceError::NoKeySource)?;
            let mut sealed = SealedVolumeKeys::new();
            for r in &created.recipients {
                let w = wrapped
                    .get(&r.volume)
                    .ok_or_else(|| InstanceError::Damaged {
                        path: PathBuf::from(SPEC_FILE),
                        reason: format!("no wrapped key for volume {}", r.volume),
                    })?;
                let s = source
                    .unwrap_sealed(&r.volume, w, &r.key, volume_token.unwrap_or_default())
                    .map_err(|source| InstanceError::VolumeKey {
                        volume: r.volume.clone(),
                        source,
                    })?;
                sealed.insert(r.volume.clone(), s);
            }
            hv.supply_keys(&created.id, sealed)
                .map_err(InstanceError::Hypervisor)?;
        }
        hv.start(&created.id).map_err(InstanceError::Hypervisor)
    })();
    if result.is_err() {
        let _ = stop_and_forget(hv, &created.id);
    }
    result
}

/// The volume format a backend makes and takes.
fn format_of(backend: &str) -> &'static str {
    match backend {
        "kvm" => "xts",
        _ => "luks",
    }
}

/// Attaches each of `ids` (available, of `format`) as `attachment`, in id
/// order under each volume's lock; on a failure the ones attached before
/// are detached again. Returns the records as attached, in `ids`' order.
fn attach_all(
    store: &VolumeStore,
    ids: &[Name],
    format: &'static str,
    backend: &'static str,
    attachment: &VolumeAttachment,
) -> Result<Vec<VolumeRecord>, InstanceError> {
    let mut order: Vec<&Name> = ids.iter().collect();
    order.sort();
    let mut done: Vec<VolumeRecord> = Vec::new();
    let mut result = Ok(());
    for id in order {
        match attach_one(store, id, format, backend, attachment) {
            Ok(r) => done.push(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Err(e) = result {
        for r in &done {
            if let Err(e) = detach_if(store, &r.volume, attachment) {
                tracing::error!(volume = %r.volume, error = %e, "could not undo an attachment");
            }
        }
        return Err(e);
    }
    Ok(ids
        .iter()
        .filter_map(|id| done.iter().find(|r| r.volume == *id).cloned())
        .collect())
}

fn attach_one(
    store: &VolumeStore,
    id: &Name,
    format: &'static str,
    backend: &'static str,
    attachment: &VolumeAttachment,
) -> Result<VolumeRecord, InstanceError> {
    let lock: VolumeLock = store.lock(id)?;
    let mut record = store.read(id)?;
    if let Some(a) = &record.attachment {
        return Err(InstanceError::VolumeAttached {
            volume: id.clone(),
            instance: a.instance.clone(),
            host: a.host.clone(),
        });
    }
    if record.format != format {
        return Err(InstanceError::VolumeFormat {
            volume: id.clone(),
            format: record.format.clone(),
            backend,
            expected: format,
        });
    }
    record.attachment = Some(attachment.clone());
    store.write(&lock, &record)?;
    Ok(record)
}

/// Clears a volume's attachment if it is `attachment`.
fn detach_if(
    store: &VolumeStore,
    id: &Name,
    attachment: &VolumeAttachment,
) -> Result<(), InstanceError> {
    let lock = store.lock(id)?;
    let mut record = store.read(id)?;
    if record.attachment.as_ref() == Some(attachment) {
        record.attachment = None;
        store.write(&lock, &record)?;
    }
    Ok(())
}

/// Stops the VM if it runs and drops the backend's state of it (volumes
/// stay); a VM the backend does not know is already gone.
fn stop_and_forget(hv: &dyn Hypervisor, id: &VmId) -> Result<(), VmmError> {
    match hv.destroy(id) {
        Ok(()) | Err(VmmError::UnknownVm(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The wire name of a state.
pub fn state_name(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Pending => "pending",
        InstanceState::Running => "running",
        InstanceState::Stopped => "stopped",
        InstanceState::Failed => "failed",
        InstanceState::Terminated => "terminated",
    }
}
