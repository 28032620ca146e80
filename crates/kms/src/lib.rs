//! nitrile's key service (`nitrile kms`): key-encryption keys (KEKs,
//! `kms-key/<name>`) that never leave it, per-volume data keys that exist
//! outside it only wrapped or sealed to one recipient, and crypto-erase;
//! the core ([`Kms`]) and the service around it ([`KmsServer`]).
//!
//! The core guarantees that:
//! - A KEK is 256 random bits from the operating system, kept in memory only
//!   in buffers zeroized on drop, written once to its own file (`0600`, in a
//!   `0700` state directory) and returned by no function of the crate but
//!   the test exports; [`Kms::describe_key`] and [`Kms::list_keys`] return
//!   metadata only, and no `Debug` output shows key material.
//! - [`Kms::generate_volume_key`] makes a fresh 512-bit AES-256-XTS data key
//!   (DEK) and a 256-bit per-volume secret, stores the volume record (the
//!   secret, never the DEK) durably, and returns the DEK only wrapped
//!   ([`WrappedKey`], format version 1): AES-256-GCM under a key derived by
//!   HKDF-SHA256 from the KEK with the per-volume secret as salt and an info
//!   naming the version and the volume, a random 96-bit nonce, and as
//!   associated data the format version, the volume id and the KEK name. A
//!   wrapped key moved onto another volume or KEK, or changed in any bit,
//!   does not open.
//! - [`Kms::unwrap_sealed`] releases a DEK only sealed with HPKE (RFC 9180,
//!   base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; the
//!   `hpke` crate) to the recipient's X25519 public key, with an info naming
//!   the purpose and the volume, so a sealed key opens only with the
//!   recipient's private key and only as that volume's key
//!   ([`Recipient::open`]). It refuses, with a typed error, an unknown or
//!   destroyed volume, a KEK that is disabled or pending deletion (naming
//!   the key), a wrapped key of another volume or KEK, and a recipient key
//!   that gives no shared secret. It reads no file and writes nothing.
//! - [`Kms::destroy_volume`] removes the volume record durably (the file
//!   overwritten, removed, its directory fsynced) before it returns. Opening
//!   a wrapped key needs the per-volume secret that only that record held,
//!   so the volume's data is then unrecoverable even to someone holding the
//!   KEK and a copy of the wrapped key. [`Kms::sweep`] destroys every KEK
//!   whose deletion window (7 to 30 days) has ended, with every volume
//!   record under it.
//! - One state directory is used by one process at a time (an exclusive
//!   `flock`); loading refuses a malformed, oversized or unexpected file,
//!   naming its path. Every file is read within a named `MAX_*` bound, as
//!   is every wrapped or sealed key decoded.
//!
//! The service ([`service`], protocol in `nitrile_kms_api`) guarantees
//! that:
//! - A host's volume-key call (generate, unwrap, destroy) runs only for a
//!   peer whose mTLS certificate is a host's, relaying a token that
//!   verifies against the pinned issuer keys with that host as audience,
//!   for the route's operation (`volume.create`, `volume.attach`,
//!   `volume.delete`) on exactly `volume/<id>`, unexpired, used once per
//!   (token, operation, volume) in the service's own replay cache (rebuilt
//!   from its journal at start), and, under a customer's key, whose
//!   subject is that key's owner.
//! - With `[attestation]`, an unwrap releases a key only to a host whose
//!   attestation document verifies under the cell CA, names that host,
//!   binds the recipient key, is recent, and shows the reference PCR
//!   values: one file's, or the host's own entry in one of the newest
//!   signed releases that verify from the pinned TUF root and CI key
//!   (`host-references.json`); while no such release is believed, no key
//!   is released.
//! - Key management runs only for a token of the caller's own with
//!   audience `kms`, admitted by `nitrile_gate::Admission`; a customer's key
//!   is changed by its owner only and seen by its owner and the provider's
//!   principals; a customer sees and changes no key but its own.
//! - Every request, refusal, failure, start, default key and sweep is in
//!   the service's write-ahead journal, durable before the answer; a
//!   request runs only after its request record is durable, a key is
//!   released only after its outcome record is, and a volume key whose
//!   outcome cannot be journaled is destroyed again rather than kept.
//!
//! The core does not authenticate callers or journal: every operation
//! returns what it did, for the service to journal before it answers. Time
//! comes in as a `now` argument or a `nitrile_token::Clock`. Plaintext
//! exports for tests (`*_for_tests`) exist only with the
//! `danger-test-export` feature, which no release build enables.

#![forbid(unsafe_code)]

mod error;
mod key;
mod kms;
mod seal;
mod secret;
pub mod service;
mod store;
mod time_format;
mod wrap;

pub use error::{ErrorClass, KmsError, Malformed, StoreError, SweepError};
pub use key::{
    DEFAULT_DELETION_WINDOW_DAYS, DEFAULT_KEY, KEY_RESOURCE_KIND, KeyMetadata, KeyName,
    KeyNameError, KeyState, MAX_DELETION_WINDOW_DAYS, MIN_DELETION_WINDOW_DAYS,
};
#[cfg(feature = "danger-test-export")]
pub use kms::VolumeSecretsForTests;
pub use kms::{
    GeneratedVolumeKey, KeyTransition, Kms, OpenReport, SweepReport, SweptKey, VolumeMetadata,
};
pub use seal::{
    HPKE_AEAD_ID, HPKE_KDF_ID, HPKE_KEM_ID, OpenError, RECIPIENT_KEY_LEN, Recipient,
    RecipientKeyError, RecipientPublicKey, SEALED_KEY_LEN, SEALED_KEY_MAGIC, SEALED_KEY_VERSION,
    SealedKey, SealedKeyError, seal_info,
};
pub use store::{MAX_KEY_FILE_LEN, MAX_KEYS, MAX_VOLUME_FILE_LEN, MAX_VOLUMES};
pub use wrap::{
    MAX_WRAPPED_KEY_LEN, WRAPPED_KEY_MAGIC, WRAPPED_KEY_VERSION, WrappedKey, WrappedKeyError,
    wrap_info,
};

pub use service::{
    AttestationPolicy, KmsConfig, KmsOptions, KmsServer, KmsServerError, ReferenceSource,
    ReleaseReferences,
};

// The protocol's bounds are this crate's formats.
const _: () = {
    assert!(nitrile_kms_api::MAX_WRAPPED_KEY_LEN == MAX_WRAPPED_KEY_LEN);
    assert!(nitrile_kms_api::SEALED_KEY_LEN == SEALED_KEY_LEN);
    assert!(nitrile_kms_api::RECIPIENT_KEY_LEN == RECIPIENT_KEY_LEN);
};

/// Length of a volume's data key: 512 bits, an AES-256-XTS key pair.
pub const DEK_LEN: usize = 64;

/// Length of a key-encryption key: 256 bits.
pub const KEK_LEN: usize = 32;

/// Length of a volume's secret, the HKDF salt its wrapping key needs.
pub const VOLUME_SECRET_LEN: usize = 32;
