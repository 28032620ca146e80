//! The host agent of nitrile (`nitrile hostd`): the only management
//! interface of a host.
//!
//! It guarantees that an admin request is executed only if it is one of the
//! closed set of [`nitrile_api::admin::AdminRequest`]s, carries a token that
//! the host itself verified offline (pinned issuer keys, expiry, audience =
//! this host, operation, exact resource, binding to the caller's client
//! certificate, single use for mutations; [`nitrile_gate::Admission`]), and only after a
//! request record is durable in the host's write-ahead journal; every
//! refusal is journaled with the step and reason, and every executed request
//! gets an outcome record. If the journal cannot be written, nothing runs
//! (503). It listens on exactly one TCP port, the mTLS one ([`Hostd`]);
//! metrics go to a file ([`metrics`]). With `[logd]` in its config it ships
//! its journal to the audit log itself, anchoring it in the log when the
//! log's key is pinned ([`nitrile_logclient::JournalShipping`]).
//!
//! Instances are microVMs driven only through
//! [`nitrile_vmm::Hypervisor`] ([`instances`]); their records are persisted
//! under the host state directory, and VMs outlive the agent so that the
//! next one re-adopts them. Volumes are resources of their own in a volume
//! store the hosts of a cell share ([`volumes`]). No plaintext volume key is
//! on the host's disk or in its memory: the key service makes each
//! ([`volume_keys::VolumeKeySource`], [`volume_keys::KmsVolumeKeys`] over
//! mTLS), the host keeps it wrapped and relays it sealed to the VMM that
//! serves the volume, which made the recipient key pair it is sealed to;
//! the key service releases it only under the caller's `volume.attach`
//! token, which the host relays and the key service checks itself.
//!
//! It does not decide who is entitled to what (the token service does), and
//! has no endpoint that runs a command, opens a shell or reads guest memory,
//! disk or console.

#![forbid(unsafe_code)]

pub mod attest;
pub mod config;
pub mod instances;
pub mod live;
pub mod metrics;
pub mod network;
pub mod service;
pub mod update;
pub mod volume_keys;
pub mod volumes;

pub use config::{
    BackendName, CapacityConfig, ConfigError, HostdConfig, HypervisorConfig, ReleaseConfig,
};
pub use live::Served;
pub use service::{Hostd, HostdError, HostdHandle, HostdOptions, SHUTDOWN_REASON};
pub use volume_keys::{KmsVolumeKeys, VolumeKeyError, VolumeKeySource, WrappedVolumeKey};
pub use volumes::{VolumeStore, VolumeStoreError};
