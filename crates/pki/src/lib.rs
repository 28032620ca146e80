//! Cell certificate authority, principal certificates and the one TLS
//! configuration builder of nitrile.
//!
//! This crate guarantees that:
//! - every certificate it issues names exactly one principal of the CA's own
//!   cell in a `nitrile://<cell>/<kind>/<name>` URI SAN, with a bounded
//!   lifetime ([`MAX_HUMAN_LIFETIME`] for operators and auditors,
//!   [`MAX_MACHINE_LIFETIME`] for services and hosts) that never outlives the CA;
//! - a peer certificate is only turned into a [`PeerIdentity`] when it names
//!   exactly one principal of the expected cell, and parsing never panics on
//!   untrusted bytes (at most [`MAX_CERT_DER`] bytes are looked at);
//! - every TLS configuration of nitrile is built by [`tls`]: TLS 1.3 only,
//!   mutual authentication required, trust anchored in the cell CA alone, with
//!   the `ring` provider chosen explicitly. No parameter weakens that; the
//!   weakened configurations that tests need to attack a server live in
//!   [`tls::danger`].
//! - key files are written with mode 0600, atomically (temporary file, fsync,
//!   rename, fsync of the directory).
//!
//! It does not do networking, revocation (certificates are short-lived
//! instead) or key storage in hardware; the CA key is a PEM file protected by
//! file permissions only. [`PeerIdentity::from_der`] does not verify a
//! certificate chain: it reads the identity out of a certificate that the TLS
//! handshake has already verified against the cell CA.

#![forbid(unsafe_code)]

mod ca;
mod duration;
mod error;
mod fsutil;
mod identity;
pub mod sign;
pub mod tls;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CA_LIFETIME, CellCa, DEFAULT_HUMAN_LIFETIME,
    DEFAULT_MACHINE_LIFETIME, IssuedCert, KeyPurpose, MAX_HUMAN_LIFETIME, MAX_MACHINE_LIFETIME,
    cert_and_key_paths, default_lifetime, max_lifetime, write_cert_and_key,
};
pub use duration::{DurationError, MAX_DURATION_TEXT, format_duration, parse_duration};
pub use error::PkiError;
pub use identity::{
    CertInfo, MAX_CERT_DER, PeerIdentity, cert_der_from_pem, cert_sha256, server_dns_name,
};
