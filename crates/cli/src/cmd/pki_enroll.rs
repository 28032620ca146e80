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
use crate::cmd::enroll_exchange as exchange;
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
    /// them. With `--tcti`; for a host reached by its TPM directly.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tcti",
        required_unless_present = "address",
        conflicts_with = "address"
    )]
    host_config: Option<PathBuf>,
    /// The host's TPM as tpm2-tss names it (`swtpm:host=H,port=P` for a host
    /// in a box, `device:/dev/tpmrm0` on the host itself).
    #[arg(long, value_name = "TCTI", requires = "host_config")]
    tcti: Option<String>,
    /// A booted host waiting for enrollment (`nitrile hostd
    /// --await-enrollment`, as the host image runs it): the exchange runs
    /// over the network with it, and the certificates go to the host,
    /// which keeps them on its state disk. With `--host`.
    #[arg(long, value_name = "ADDR:PORT", requires = "host")]
    address: Option<std::net::SocketAddr>,
    /// The host expected at `--address`: refused when it names another.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Where the attestation key pin and the enrollment record of a host
    /// enrolled by `--address` are written (`<host>.attestation-key`,
    /// `<host>.enrollment.json`).
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// The reference values the host must measure: `reference.json` of
    /// `nitrile image build-host` (PCRs 4, 11 and 15).
    #[arg(long, value_name = "FILE")]
    reference: PathBuf,
    /// The TPM manufacturers' CA certificates (PEM) the endorsement key's
    /// certificate must be signed by (swtpm's local CA in tests).
    #[arg(long, value_name = "FILE")]
    ek_ca: PathBuf,
    /// The SHA-256 of the endorsement key certificate the host must have
    /// (from the inventory): any other TPM is refused, even a genuine one
    /// running the same image.
    #[arg(long, value_name = "HEX")]
    ek_sha256: Option<String>,
}

/// The host's half of the exchange: its TPM reached directly, or the host
/// over the network.
enum HostSide {
    Local {
        tpm: Tpm,
        tls: Option<nitrile_attest::BoundKey>,
    },
    Remote(std::net::SocketAddr),
}

impl HostSide {
    fn evidence(&mut self) -> anyhow::Result<(Option<(String, String)>, enroll::HostEvidence)> {
        match self {
            Self::Local { tpm, tls } => {
                let (evidence, key) = enroll::host_evidence(tpm).context("the host's TPM")?;
                *tls = Some(key);
                Ok((None, evidence))
            }
            Self::Remote(addr) => {
                let answer: exchange::EvidenceAnswer =
                    exchange::call(*addr, exchange::EVIDENCE_PATH, &serde_json::json!({}))?;
                Ok((Some((answer.cell, answer.host)), answer.evidence))
            }
        }
    }

    fn proof(&mut self, challenge: &enroll::Challenge) -> anyhow::Result<enroll::HostProof> {
        match self {
            Self::Local { tpm, tls } => {
                let tls = tls.as_ref().context("no evidence yet")?;
                Ok(enroll::host_proof(tpm, tls, challenge).context("the host's TPM")?)
            }
            Self::Remote(addr) => exchange::call(*addr, exchange::PROOF_PATH, challenge),
        }
    }
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
    let reference = crate::cmd::host_attest::reference(&args.reference)?;
    let ek_cas = pem_certs(&args.ek_ca)?;
    let ek_pin = match &args.ek_sha256 {
        Some(h) => Some(
            hex::decode(h.trim())
                .ok()
                .filter(|b| b.len() == 32)
                .context("--ek-sha256: expected 64 hex digits")?,
        ),
        None => None,
    };
    let (mut side, mut config) = match (&args.address, &args.host_config, &args.tcti) {
        (Some(addr), _, _) => (HostSide::Remote(*addr), None),
        (None, Some(path), Some(tcti)) => {
            let config = nitrile_hostd::HostdConfig::load(path)
                .with_context(|| format!("cannot read the host config {}", path.display()))?;
            let tpm = Tpm::open(tcti).with_context(|| format!("cannot open the TPM at {tcti}"))?;
            (HostSide::Local { tpm, tls: None }, Some(config))
        }
        _ => bail!("pass --address and --host, or --host-config and --tcti"),
    };
    crate::output::errln!(
        "enrolling {}: reading its TPM's keys",
        config.as_ref().map_or_else(
            || format!(
                "the host at {}",
                args.address.map(|a| a.to_string()).unwrap_or_default()
            ),
            |c| c.host.to_string()
        )
    )?;
    let (named, evidence) = side.evidence()?;
    let (cell, host) = match (&config, named) {
        (Some(c), _) => (c.cell.clone(), c.host.clone()),
        (None, Some((cell, host))) => {
            let cell = nitrile_api::Name::new(&cell).map_err(|e| {
                anyhow::anyhow!(
                    "the host names a bad cell: {}",
                    crate::output::escape(&e.to_string())
                )
            })?;
            let host = nitrile_api::Name::new(&host).map_err(|e| {
                anyhow::anyhow!(
                    "the host names a bad host name: {}",
                    crate::output::escape(&e.to_string())
                )
            })?;
            if args.host.as_deref() != Some(host.as_str()) {
                bail!(
                    "refused: the host at the address is {}, not {}",
                    host,
                    crate::output::escape(args.host.as_deref().unwrap_or_default())
                );
            }
            (cell, host)
        }
        (None, None) => bail!("the host named no cell"),
    };
    let ca = nitrile_pki::CellCa::load(&args.dir, &cell, now).with_context(|| {
        format!(
            "cannot load the cell CA of {cell} from {}",
            args.dir.display()
        )
    })?;
    let principal = PrincipalId::new(cell.clone(), PrincipalKind::Host, host.clone());
    let ek_sha256 = <sha2::Sha256 as sha2::Digest>::digest(&evidence.ek_certificate);
    if let Some(pin) = &ek_pin
        && pin.as_slice() != ek_sha256.as_slice()
    {
        bail!(
            "refused: the host's endorsement key certificate is {}, not the one pinned by --ek-sha256",
            hex::encode(ek_sha256)
        );
    }
    enroll::check_evidence(&evidence, &ek_cas).context("refused")?;
    crate::output::errln!(
        "  endorsement key certified by a pinned manufacturer CA (certificate sha256 {})",
        hex::encode(ek_sha256)
    )?;
    let (challenge, secret) = enroll::challenge(&evidence).context("making the credential")?;
    let proof = side.proof(&challenge)?;
    let enrolled = enroll::check_proof(&evidence, &challenge, &secret, &proof, &reference)
        .context("refused: no certificate issued")?;
    crate::output::errln!(
        "  credential activated, quote verified, PCRs {:?} match the reference, TLS and document keys bound to them",
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

    let ak_hex = hex::encode(&enrolled.attestation_key.tpmt_public);
    let record = serde_json::to_vec_pretty(&serde_json::json!({
        "host": principal.to_string(),
        "enrolled_at": nitrile_audit::format_time(now),
        "attestation_key": ak_hex,
        "ek_certificate_sha256": hex::encode(ek_sha256),
        "pcrs": enrolled.pcrs,
    }))?;
    let write = |dir: &Path, name: &str, bytes: &[u8], mode: u32| -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let p = dir.join(name);
        nitrile_fs::write_atomic(&p, bytes, mode)
            .with_context(|| format!("cannot write {}", p.display()))?;
        Ok(p)
    };
    let document_pem = format!("{document}{ca_pem}");
    let (cert_path, tls_key, doc_path, ak_path) = match (side, &mut config, &args.host_config) {
        (HostSide::Local { tls, .. }, Some(config), Some(host_config)) => {
            let tls = tls.context("no TLS key")?;
            let dir = host_config.parent().unwrap_or(Path::new(".")).join("tpm");
            let tls_key = write(
                &dir,
                "tls-key.json",
                &serde_json::to_vec_pretty(&tls)?,
                0o600,
            )?;
            let cert_path = write(&dir, "host.pem", cert.as_bytes(), 0o644)?;
            let doc_path = write(&dir, "document.pem", document_pem.as_bytes(), 0o644)?;
            let ak_path = write(
                &dir,
                "attestation-key",
                format!("{ak_hex}\n").as_bytes(),
                0o644,
            )?;
            write(&dir, "enrollment.json", &record, 0o644)?;
            let tcti = args.tcti.clone().unwrap_or_default();
            config.cert = cert_path.clone();
            let mut t = config
                .tpm
                .clone()
                .unwrap_or(nitrile_hostd::config::TpmConfig {
                    tcti: tcti.clone(),
                    event_log: None,
                    document_certificate: None,
                    tls_key: None,
                });
            t.tcti = tcti;
            t.tls_key = Some(tls_key.clone());
            t.document_certificate = Some(doc_path.clone());
            config.tpm = Some(t);
            config
                .write(host_config)
                .with_context(|| format!("cannot update {}", host_config.display()))?;
            (
                cert_path.display().to_string(),
                tls_key.display().to_string(),
                doc_path.display().to_string(),
                ak_path,
            )
        }
        (HostSide::Remote(addr), _, _) => {
            let answer: exchange::EnrolledAnswer = exchange::call(
                addr,
                exchange::CERTIFICATES_PATH,
                &exchange::Certificates {
                    certificate: cert.clone(),
                    document_certificate: document_pem.clone(),
                },
            )
            .context("delivering the certificates")?;
            if answer.enrolled != principal.to_string() {
                bail!(
                    "the host says it enrolled as {}",
                    crate::output::escape(&answer.enrolled)
                );
            }
            let ak_path = write(
                &args.out,
                &format!("{host}.attestation-key"),
                format!("{ak_hex}\n").as_bytes(),
                0o644,
            )?;
            write(
                &args.out,
                &format!("{host}.enrollment.json"),
                &record,
                0o644,
            )?;
            let on_host = "on the host's state disk".to_owned();
            (on_host.clone(), on_host.clone(), on_host, ak_path)
        }
        _ => bail!("pass --address and --host, or --host-config and --tcti"),
    };

    let shown = Enrolled {
        host: principal.to_string(),
        certificate: cert_path,
        tls_key,
        document_certificate: doc_path,
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
