//! `nitrile pki enroll-host`: the CA enrolls a host with a TPM. The
//! certificate it issues is for a TLS key that lives in the host's TPM and
//! signs only while the host runs what the reference values describe; no
//! quote that matches, no certificate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use nitrile_api::{PrincipalId, PrincipalKind};
use nitrile_attest::Tpm;
use nitrile_attest::enroll;
use nitrile_pki::KeyPurpose;
use serde::Serialize;
use time::OffsetDateTime;

use crate::Global;
use crate::output::{Output, print_json};

/// `nitrile pki enroll-host`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnrollArgs {
    /// Directory holding the cell CA.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The host agent's config (`hostd.toml`): the host enrolled is the one
    /// it names; its certificate, TPM key and attestation key pin are
    /// written beside it, under `tpm/`, and the config is updated to use
    /// them.
    #[arg(long, value_name = "FILE")]
    host_config: PathBuf,
    /// The host's TPM as tpm2-tss names it (`swtpm:host=H,port=P` for a host
    /// in a box, `device:/dev/tpmrm0` on the host itself).
    #[arg(long, value_name = "TCTI")]
    tcti: String,
    /// The reference values the host must measure: `reference.json` of
    /// `nitrile image build-host` (PCRs 4, 11 and 15).
    #[arg(long, value_name = "FILE")]
    reference: PathBuf,
    /// The TPM manufacturers' CA certificates (PEM) the endorsement key's
    /// certificate must be signed by (swtpm's local CA in tests).
    #[arg(long, value_name = "FILE")]
    ek_ca: PathBuf,
}

#[derive(Debug, Serialize)]
struct Enrolled {
    host: String,
    certificate: String,
    tls_key: String,
    document_certificate: String,
    attestation_key: String,
    pcrs: nitrile_attest::Pcrs,
    millis: u128,
}

fn pem_certs(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = nitrile_fs::read_bounded(path, 1 << 20)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

pub(crate) fn run(args: EnrollArgs, global: &Global) -> anyhow::Result<()> {
    let started = Instant::now();
    let now = OffsetDateTime::now_utc();
    let mut config = nitrile_hostd::HostdConfig::load(&args.host_config)
        .with_context(|| format!("cannot read the host config {}", args.host_config.display()))?;
    let reference = crate::cmd::host_attest::reference(&args.reference)?;
    let ek_cas = pem_certs(&args.ek_ca)?;
    let ca = nitrile_pki::CellCa::load(&args.dir, &config.cell, now)
        .with_context(|| format!("cannot load the cell CA from {}", args.dir.display()))?;
    let principal = PrincipalId::new(
        config.cell.clone(),
        PrincipalKind::Host,
        config.host.clone(),
    );

    crate::output::errln!("enrolling {}: reading its TPM's keys", config.host)?;
    let mut tpm =
        Tpm::open(&args.tcti).with_context(|| format!("cannot open the TPM at {}", args.tcti))?;
    let (evidence, tls) = enroll::host_evidence(&mut tpm).context("the host's TPM")?;
    enroll::check_evidence(&evidence, &ek_cas).context("refused")?;
    crate::output::errln!("  endorsement key certified by a pinned manufacturer CA")?;
    let (challenge, secret) = enroll::challenge(&evidence).context("making the credential")?;
    let proof = enroll::host_proof(&mut tpm, &tls, &challenge).context("the host's TPM")?;
    drop(tpm);
    let enrolled = enroll::check_proof(&evidence, &challenge, &secret, &proof, &reference)
        .context("refused: no certificate issued")?;
    crate::output::errln!(
        "  credential activated, quote verified, PCRs {:?} match the reference, TLS key bound to them",
        nitrile_attest::HOST_PCRS
    )?;

    let cert = ca
        .issue_for_key(&principal, &enrolled.tls_point, KeyPurpose::Tls, None, now)
        .context("issuing the host certificate")?;
    let document = ca
        .issue_for_key(
            &principal,
            &enrolled.document_point,
            KeyPurpose::Attestation,
            None,
            now,
        )
        .context("issuing the document key's certificate")?;
    let ca_pem = std::fs::read_to_string(args.dir.join(nitrile_pki::CA_CERT_FILE))
        .context("reading the CA certificate")?;

    let dir = args
        .host_config
        .parent()
        .unwrap_or(Path::new("."))
        .join("tpm");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8], mode: u32| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        nitrile_fs::write_atomic(&p, bytes, mode)
            .with_context(|| format!("cannot write {}", p.display()))?;
        Ok(p)
    };
    let tls_key = write("tls-key.json", &serde_json::to_vec_pretty(&tls)?, 0o600)?;
    let cert_path = write("host.pem", cert.as_bytes(), 0o644)?;
    let doc_path = write(
        "document.pem",
        format!("{document}{ca_pem}").as_bytes(),
        0o644,
    )?;
    let ak_hex = hex::encode(&enrolled.attestation_key.tpmt_public);
    let ak_path = write("attestation-key", format!("{ak_hex}\n").as_bytes(), 0o644)?;
    write(
        "enrollment.json",
        &serde_json::to_vec_pretty(&serde_json::json!({
            "host": principal.to_string(),
            "enrolled_at": nitrile_audit::format_time(now),
            "attestation_key": ak_hex,
            "ek_certificate_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&evidence.ek_certificate)),
            "pcrs": enrolled.pcrs,
        }))?,
        0o644,
    )?;

    config.cert = cert_path.clone();
    let mut t = config
        .tpm
        .clone()
        .unwrap_or(nitrile_hostd::config::TpmConfig {
            tcti: args.tcti.clone(),
            event_log: None,
            document_certificate: None,
            tls_key: None,
        });
    t.tcti = args.tcti.clone();
    t.tls_key = Some(tls_key.clone());
    t.document_certificate = Some(doc_path.clone());
    config.tpm = Some(t);
    config
        .write(&args.host_config)
        .with_context(|| format!("cannot update {}", args.host_config.display()))?;

    let shown = Enrolled {
        host: principal.to_string(),
        certificate: cert_path.display().to_string(),
        tls_key: tls_key.display().to_string(),
        document_certificate: doc_path.display().to_string(),
        attestation_key: ak_path.display().to_string(),
        pcrs: enrolled.pcrs,
        millis: started.elapsed().as_millis(),
    };
    match global.output {
        Output::Json => print_json(&shown),
        Output::Table => Ok(crate::output::print_pairs(&[
            ("host".to_owned(), shown.host.clone()),
            (
                "certificate".to_owned(),
                format!("{} (its key is in the TPM)", shown.certificate),
            ),
            ("tls key".to_owned(), shown.tls_key.clone()),
            (
                "document certificate".to_owned(),
                shown.document_certificate.clone(),
            ),
            (
                "attestation key".to_owned(),
                format!("{} (pin it for verify-attestation)", shown.attestation_key),
            ),
            ("took".to_owned(), format!("{} ms", shown.millis)),
        ])?),
    }
}
