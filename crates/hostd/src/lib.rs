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
//! [`nitrile_vmm::Hypervisor`] ([`instances`]); their records and volume keys
//! are persisted under the host state directory, and VMs outlive the agent
//! so that the next one re-adopts them.
//!
//! It does not decide who is entitled to what (the token service does), has
//! no endpoint that runs a command, opens a shell or reads guest memory,
//! disk or console, and does not yet wrap volume keys with a key management
//! service (they are stored owner-only, see [`instances`]).

#![forbid(unsafe_code)]

pub mod config;
pub mod instances;
pub mod metrics;
pub mod service;

pub use config::{BackendName, CapacityConfig, ConfigError, HostdConfig, HypervisorConfig};
pub use service::{Hostd, HostdError, HostdOptions, SHUTDOWN_REASON};
