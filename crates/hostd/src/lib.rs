//! The host agent of nitrile (`nitrile hostd`): the only management
//! interface of a host.
//!
//! This first part is [`admission`]: the host's half of claims 5 and 6. It
//! guarantees that an admin request is admitted only with a token that the
//! host itself verified offline (pinned issuer keys, expiry, audience = this
//! host, operation, exact resource, binding to the caller's client
//! certificate, single use for mutations), and only after a request record is
//! durable in the host's write-ahead journal; every refusal is journaled with
//! the step and reason. If the journal cannot be written, nothing is admitted.
//!
//! It does not serve HTTP yet and executes nothing itself: the caller runs the
//! admitted operation and reports its outcome with
//! [`admission::Admission::complete`].

#![forbid(unsafe_code)]

pub mod admission;
pub mod config;

pub use config::{BackendName, CapacityConfig, ConfigError, HostdConfig, HypervisorConfig};
