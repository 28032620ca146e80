//! Signed releases of what a host runs (claim 7).
//!
//! A release is a set of files (the `nitrile` binary, the guest image, the
//! entitlement schema) named by a [`ReleaseManifest`] that states its
//! version and the one environment it is for (`dev`, `staging`, `prod`,
//! ...), with a **test attestation**: an in-toto Statement v1 (predicate
//! `https://in-toto.io/attestation/test-result/v0.1`) in a DSSE envelope
//! signed by the cell's CI key, saying that the test suite passed on
//! exactly these file digests ([`attest`]).
//!
//! Releases are published in a **TUF repository**, one per environment
//! ([`repo`]): root, targets, snapshot and timestamp metadata with
//! versions and expiries, consistent snapshots, Ed25519 keys. The targets
//! role's keys are the release signers and its threshold is k (2 by
//! default): a release exists for a client only once k of the n signers
//! have signed the targets metadata that lists it. Snapshot and timestamp
//! are signed by the repository's online key. The metadata is written with
//! `tough`'s schema types and canonical JSON; a host reads it with `tough`'s
//! client ([`client`]), which checks the root chain, signatures and
//! thresholds, expiry (freeze attacks), versions against what it saw
//! before (rollback attacks) and every file's length and hash. On top of
//! that the host checks the manifest's environment and version and the
//! attestation against its pinned CI key.
//!
//! A release may carry **host references** ([`references`]): for each host
//! it is built for, the PCR values that host shows when it runs the
//! release's host image. They are one more file of the release, so the
//! manifest, the attestation and the signers cover them; a key service
//! reads them with [`client::newest_host_references`] to decide which
//! hosts it releases volume keys to.
//!
//! Keys ([`keys`]) are Ed25519 in PKCS#8 PEM files (mode 0600); their
//! public halves are TUF key objects in JSON.
//!
//! Layout of a repository directory:
//!
//! ```text
//! metadata/<n>.root.json        every root version (clients walk the chain)
//! metadata/root.json            the newest root (what a host pins)
//! metadata/<n>.targets.json     signed by k of the release signers
//! metadata/<n>.snapshot.json    signed by the online key
//! metadata/timestamp.json       signed by the online key
//! targets/<sha256>.v<version>-<file>
//! staged/targets.json           the next targets metadata, collecting signatures
//! repository.json               environment, expiry periods (not trusted by clients)
//! ```

#![forbid(unsafe_code)]

pub mod attest;
pub mod client;
mod error;
pub mod keys;
pub mod manifest;
pub mod references;
pub mod repo;
pub mod transport;
mod version;

pub use error::ReleaseError;
pub use manifest::{FileDigest, MANIFEST_FORMAT, ReleaseManifest};
pub use references::{HOST_REFERENCES_FILE, HostReference, HostReferences};
pub use version::{Environment, Version};

/// The TUF specification version the metadata states.
pub const SPEC_VERSION: &str = "1.0.31";
