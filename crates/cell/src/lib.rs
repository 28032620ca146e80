//! The state of a nitrile cell on disk, and how a one-machine cell
//! (`nitrile up`) is brought into being.
//!
//! This crate guarantees that [`bootstrap`] is idempotent and keeps secrets
//! owner-only: it creates the cell CA on first use, the cell's entitlement
//! reviewer keys and reviewer set, a copy of the sample entitlement bundle
//! (serial 1, the audit log monitor's rules included) signed by two distinct
//! reviewers (a bundle of a cell made before serials is migrated once, and
//! only if its signatures verify), fresh short-lived certificates for the
//! services and sample principals on every start, and an operator config
//! ([`ClientConfig`]) per principal. [`provision_host`] does the same for a
//! host agent: its certificate, its owner-only state directory and the token
//! issuer keys it pins; [`provision_logd`], [`provision_kms`] and
//! [`provision_witness`] for the audit log service, the key service and the
//! log's checkpoint witness, each in a state directory of its own. Running any of them again reuses everything that
//! exists and is still valid.
//!
//! A one-machine cell holds its reviewer keys locally for convenience; a real
//! cell keeps each reviewer's key with that reviewer and only the public
//! reviewer set on the token service's machine.

#![forbid(unsafe_code)]

mod bootstrap;
mod config;
mod layout;
pub mod sample;

pub use bootstrap::{
    Bootstrapped, CellError, KMS, PLACEMENT, ProvisionedHost, ProvisionedKms, ProvisionedLogd,
    ProvisionedPlaced, ProvisionedWitness, SAMPLE_PRINCIPALS, WITNESS, bootstrap,
    provision_deployd, provision_host, provision_kms, provision_logd, provision_placed,
    provision_witness, write_client_configs,
};
pub use config::{ClientConfig, ConfigError, Endpoints, MAX_CONFIG_LEN};
pub use layout::CellLayout;
