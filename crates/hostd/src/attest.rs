//! `host.attest`: what the host's TPM says about the software it runs.
//!
//! The quote covers PCR 4 (the firmware's measurement of the boot
//! application, the UKI), PCR 11 (the UKI stub's measurement of its
//! sections) and PCR 15 (what `nitrile host-init` loaded: hostd's config,
//! the pinned issuer keys, the trust roots), with the caller's nonce. The
//! event log of PCR 15 comes along so that a verifier can see what each
//! digest is; with a certificate for the TPM's document key the same PCRs
//! and nonce also come as an attestation document of the Nitro layout.

use std::path::Path;

use nitrile_api::Name;
use nitrile_api::admin::{
    HostAttestation, MeasuredEvent, Measurement, PcrValue, Sha256Hex, TpmQuote,
};
use nitrile_attest::{HOST_PCRS, Tpm};

use crate::config::TpmConfig;

/// The most events read from an event log.
const MAX_EVENTS: usize = 256;

/// Why `host.attest` failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestFailure {
    /// The TPM refused or is unreachable.
    #[error("TPM: {0}")]
    Tpm(#[from] nitrile_attest::AttestError),
    /// A file of `[tpm]` could not be read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Reads the event log (JSON lines); a missing file is an empty log.
pub fn event_log(path: Option<&Path>) -> Result<Vec<MeasuredEvent>, AttestFailure> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = match nitrile_fs::read_bounded(path, 1 << 20) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(nitrile_fs::FsError::Io { error: source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(AttestFailure::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            });
        }
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(MAX_EVENTS)
        .map(|l| {
            serde_json::from_str::<MeasuredEvent>(l).map_err(|e| AttestFailure::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        })
        .collect()
}

fn certificates(path: &Path) -> Result<Vec<Vec<u8>>, AttestFailure> {
    use rustls_pki_types::pem::PemObject as _;
    let bad = |reason: String| AttestFailure::File {
        path: path.display().to_string(),
        reason,
    };
    let pem = nitrile_fs::read_bounded(path, 64 << 10).map_err(|e| bad(e.to_string()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate".into()));
    }
    Ok(certs)
}

/// The PCR values the host measured, for `host.describe` (`tpm-pcr<n>`).
pub fn measurements(tpm: &TpmConfig) -> Result<Vec<Measurement>, AttestFailure> {
    let pcrs = Tpm::open(&tpm.tcti)?.pcrs(&HOST_PCRS)?;
    Ok(pcrs
        .0
        .iter()
        .map(|(i, v)| Measurement {
            name: format!("tpm-pcr{i}"),
            sha256: Sha256Hex::from_bytes(*v),
        })
        .collect())
}

/// Answers `host.attest` (blocking: it talks to the TPM).
pub fn attest(
    config: &TpmConfig,
    host: &Name,
    nonce: &[u8],
    now_ms: u64,
) -> Result<HostAttestation, AttestFailure> {
    let mut tpm = Tpm::open(&config.tcti)?;
    let ak = tpm.attestation_key()?;
    let quote = tpm.quote(nonce, &HOST_PCRS)?;
    let document = match &config.document_certificate {
        None => None,
        Some(path) => {
            let mut certs = certificates(path)?;
            let leaf = certs.remove(0);
            certs.reverse();
            let payload = nitrile_attest::cose::payload(
                host.as_str(),
                now_ms,
                &quote.pcrs,
                &leaf,
                &certs,
                None,
                None,
                Some(nonce),
            );
            let signature = tpm.sign_document(&nitrile_attest::cose::to_be_signed(&payload))?;
            Some(hex::encode(nitrile_attest::cose::sign1(
                &payload, &signature,
            )))
        }
    };
    Ok(HostAttestation {
        host: host.clone(),
        attestation_key: hex::encode(&ak.tpmt_public),
        quote: TpmQuote {
            message: hex::encode(&quote.message),
            signature: hex::encode(&quote.signature),
            pcrs: quote
                .pcrs
                .0
                .iter()
                .map(|(i, v)| PcrValue {
                    index: *i,
                    sha256: Sha256Hex::from_bytes(*v),
                })
                .collect(),
        },
        event_log: event_log(config.event_log.as_deref())?,
        document,
    })
}

/// An attestation document binding `public_key` (a volume's recipient key),
/// for the key service: the PCRs, no nonce (the key service checks the
/// time), signed by the TPM's document key.
pub fn document_for(
    config: &TpmConfig,
    host: &Name,
    public_key: &[u8],
) -> Result<Vec<u8>, AttestFailure> {
    let path = config
        .document_certificate
        .as_ref()
        .ok_or_else(|| AttestFailure::File {
            path: "[tpm] document_certificate".into(),
            reason: "not enrolled: no certificate for the TPM's document key".into(),
        })?;
    let mut certs = certificates(path)?;
    let leaf = certs.remove(0);
    certs.reverse();
    let mut tpm = Tpm::open(&config.tcti)?;
    let pcrs = tpm.pcrs(&HOST_PCRS)?;
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX);
    let payload = nitrile_attest::cose::payload(
        host.as_str(),
        now_ms,
        &pcrs,
        &leaf,
        &certs,
        Some(public_key),
        None,
        None,
    );
    let signature = tpm.sign_document(&nitrile_attest::cose::to_be_signed(&payload))?;
    Ok(nitrile_attest::cose::sign1(&payload, &signature))
}
