//! `nitrile pki`: the cell CA and principals' certificates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nitrile_api::{Name, PrincipalId};
use nitrile_pki::{
    CA_CERT_FILE, CA_KEY_FILE, CellCa, CertInfo, IssuedCert, cert_and_key_paths, cert_der_from_pem,
    parse_duration,
};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Global;
use crate::output::{Output, print_json, print_table};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Create the cell CA in DIR, or show it if it already exists.
    ///
    /// Writes DIR/ca.pem (0644) and DIR/ca.key (0600); ECDSA P-256, valid for
    /// 10 years. An existing CA is loaded and checked, never replaced.
    ///
    /// Example: `nitrile pki init --dir /var/lib/nitrile/ca --cell prod-1`
    Init {
        /// Directory holding the CA (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Name of the cell.
        #[arg(long, value_name = "NAME")]
        cell: Name,
    },
    /// Issue a certificate and fresh key for a principal of the CA's cell.
    ///
    /// Writes PREFIX.pem (0644) and PREFIX.key (0600). Default lifetime:
    /// 8h for operators and auditors (at most 24h), 7d for services and
    /// hosts (at most 30d). Refuses to overwrite existing files without
    /// --force.
    ///
    /// Example: `nitrile pki issue --dir ca --principal nitrile://prod-1/operator/alice --lifetime 8h --out alice`
    Issue {
        /// Directory holding the CA.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The principal, `nitrile://<cell>/<kind>/<name>`.
        #[arg(long, value_name = "URI")]
        principal: PrincipalId,
        /// Lifetime, e.g. 30m, 8h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse_lifetime)]
        lifetime: Option<Duration>,
        /// Output path prefix: writes PREFIX.pem and PREFIX.key.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// Overwrite PREFIX.pem and PREFIX.key if they exist.
        #[arg(long)]
        force: bool,
    },
    /// Re-issue a certificate of this CA for the same principal, with a
    /// fresh key.
    ///
    /// The old certificate may have expired but must have been issued by the
    /// CA in DIR. Writes PREFIX.pem and PREFIX.key (0600), replacing them
    /// atomically if they exist.
    ///
    /// Example: `nitrile pki renew --dir ca --cert h1.pem --out h1`
    Renew {
        /// Directory holding the CA.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The certificate to renew (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Lifetime, e.g. 30m, 8h, 7d; by default that of the principal's kind.
        #[arg(long, value_name = "DURATION", value_parser = parse_lifetime)]
        lifetime: Option<Duration>,
        /// Output path prefix: writes PREFIX.pem and PREFIX.key.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Enroll a host with a TPM: its endorsement key's certificate is
    /// checked against the TPM manufacturers' CAs, a credential only that
    /// TPM can open proves its attestation key is there, a quote with a
    /// fresh nonce must match the reference values of the host image, and
    /// its TLS key, made in the TPM and usable only while the PCRs hold
    /// those values, is certified by the attestation key. Only then is a
    /// host certificate issued, for that key. No quote, no certificate.
    ///
    /// A host reached by its TPM directly (`--host-config` and `--tcti`)
    /// gets its files beside its config; a booted host waiting for
    /// enrollment (`--address` and `--host`; an image built with
    /// `nitrile image build-host --enroll`) gets them over the network,
    /// checks them against its pinned cell CA and keeps them on its state
    /// disk.
    ///
    /// Example: `nitrile pki enroll-host --dir ca --host-config hosts/h1/hostd.toml --tcti swtpm:host=127.0.0.1,port=2321 --reference out/reference.json --ek-ca tpm-ca.pem`
    ///
    /// Example: `nitrile pki enroll-host --dir ca --address 10.0.0.5:7443 --host h1 --reference host-image/reference.json --ek-ca tpm-ca.pem --ek-sha256 <hex>`
    EnrollHost(crate::cmd::pki_enroll::EnrollArgs),
    /// Show what a certificate says: principal, fingerprint, validity.
    ///
    /// Example: `nitrile pki show alice.pem -o json`
    Show {
        /// The certificate (PEM).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    match command {
        Command::Init { dir, cell } => {
            let existed = dir.join(CA_CERT_FILE).exists() || dir.join(CA_KEY_FILE).exists();
            let ca = CellCa::init_or_load(&dir, &cell, now)
                .with_context(|| format!("cannot set up the cell CA in {}", dir.display()))?;
            let shown = CaShown {
                cell: ca.cell().to_string(),
                created: !existed,
                certificate: dir.join(CA_CERT_FILE).display().to_string(),
                key: dir.join(CA_KEY_FILE).display().to_string(),
                sha256: hex(&ca.cert_sha256()),
                not_before: rfc3339(ca.not_before())?,
                not_after: rfc3339(ca.not_after())?,
            };
            match global.output {
                Output::Json => print_json(&shown),
                Output::Table => {
                    print_table(
                        &["FIELD", "VALUE"],
                        &[
                            row("cell", &shown.cell),
                            row("status", if shown.created { "created" } else { "existing" }),
                            row("certificate", &shown.certificate),
                            row("key", &shown.key),
                            row("sha256", &shown.sha256),
                            row("not_before", &shown.not_before),
                            row("not_after", &shown.not_after),
                        ],
                    )?;
                    Ok(())
                }
            }
        }
        Command::Issue {
            dir,
            principal,
            lifetime,
            out,
            force,
        } => {
            let (cert_path, key_path) = cert_and_key_paths(&out);
            if !force {
                for p in [&cert_path, &key_path] {
                    if p.exists() {
                        bail!(
                            "{} exists; choose another --out or pass --force to replace it",
                            p.display()
                        );
                    }
                }
            }
            let ca = load_ca(&dir, &principal.cell, now)?;
            let issued = ca
                .issue(&principal, lifetime, now)
                .with_context(|| format!("cannot issue a certificate for {principal}"))?;
            write_and_report(&issued, &cert_path, &key_path, global.output)
        }
        Command::Renew {
            dir,
            cert,
            lifetime,
            out,
        } => {
            let pem =
                std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let der = cert_der_from_pem(&pem)
                .with_context(|| format!("{} holds no PEM certificate", cert.display()))?;
            let info = CertInfo::from_der(&der)
                .with_context(|| format!("{} is not a usable certificate", cert.display()))?;
            let Some(principal) = info.principal else {
                bail!(
                    "{} names no nitrile principal; nothing to renew",
                    cert.display()
                );
            };
            let ca = load_ca(&dir, &principal.cell, now)?;
            let issued = ca
                .renew(&der, lifetime, now)
                .with_context(|| format!("cannot renew {}", cert.display()))?;
            let (cert_path, key_path) = cert_and_key_paths(&out);
            write_and_report(&issued, &cert_path, &key_path, global.output)
        }
        Command::EnrollHost(args) => crate::cmd::pki_enroll::run(args, global),
        Command::Show { file } => {
            let pem =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let der = cert_der_from_pem(&pem)
                .with_context(|| format!("{} holds no PEM certificate", file.display()))?;
            let info = CertInfo::from_der(&der)
                .with_context(|| format!("{} is not a usable certificate", file.display()))?;
            let shown = CertShown::new(&info, now)?;
            match global.output {
                Output::Json => print_json(&shown),
                Output::Table => {
                    print_table(
                        &["FIELD", "VALUE"],
                        &[
                            row("principal", shown.principal.as_deref().unwrap_or("-")),
                            row("subject", shown.subject.as_deref().unwrap_or("-")),
                            row("issuer", shown.issuer.as_deref().unwrap_or("-")),
                            row("ca", if shown.is_ca { "yes" } else { "no" }),
                            row("dns_names", &shown.dns_names.join(",")),
                            row("sha256", &shown.sha256),
                            row("not_before", &shown.not_before),
                            row("not_after", &shown.not_after),
                            row("status", &shown.status),
                        ],
                    )?;
                    Ok(())
                }
            }
        }
    }
}

fn load_ca(dir: &Path, cell: &Name, now: OffsetDateTime) -> anyhow::Result<CellCa> {
    if !dir.join(CA_CERT_FILE).exists() && !dir.join(CA_KEY_FILE).exists() {
        bail!(
            "no cell CA in {}; create it with `nitrile pki init --dir {} --cell {cell}`",
            dir.display(),
            dir.display()
        );
    }
    CellCa::load(dir, cell, now)
        .with_context(|| format!("cannot load the cell CA of {cell} from {}", dir.display()))
}

fn write_and_report(
    issued: &IssuedCert,
    cert_path: &Path,
    key_path: &Path,
    output: Output,
) -> anyhow::Result<()> {
    issued
        .write_files(cert_path, key_path)
        .context("cannot write the certificate and key")?;
    let shown = IssuedShown {
        principal: issued.principal.to_string(),
        certificate: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        sha256: hex(&issued.cert_sha256()),
        not_after: rfc3339(issued.not_after)?,
    };
    match output {
        Output::Json => print_json(&shown),
        Output::Table => {
            print_table(
                &["FIELD", "VALUE"],
                &[
                    row("principal", &shown.principal),
                    row("certificate", &shown.certificate),
                    row("key", &shown.key),
                    row("sha256", &shown.sha256),
                    row("not_after", &shown.not_after),
                ],
            )?;
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct CaShown {
    cell: String,
    created: bool,
    certificate: String,
    key: String,
    sha256: String,
    not_before: String,
    not_after: String,
}

#[derive(Serialize)]
struct IssuedShown {
    principal: String,
    certificate: String,
    key: String,
    sha256: String,
    not_after: String,
}

#[derive(Serialize)]
struct CertShown {
    principal: Option<String>,
    subject: Option<String>,
    issuer: Option<String>,
    is_ca: bool,
    dns_names: Vec<String>,
    sha256: String,
    not_before: String,
    not_after: String,
    /// `valid`, `expired` or `not_yet_valid` at the time of the call.
    status: String,
}

impl CertShown {
    fn new(info: &CertInfo, now: OffsetDateTime) -> anyhow::Result<Self> {
        let status = if now > info.not_after {
            "expired"
        } else if now < info.not_before {
            "not_yet_valid"
        } else {
            "valid"
        };
        Ok(Self {
            principal: info.principal.as_ref().map(ToString::to_string),
            subject: info.subject_cn.clone(),
            issuer: info.issuer_cn.clone(),
            is_ca: info.is_ca,
            dns_names: info.dns_names.clone(),
            sha256: info.sha256_hex(),
            not_before: rfc3339(info.not_before)?,
            not_after: rfc3339(info.not_after)?,
            status: status.to_owned(),
        })
    }
}

fn row(field: &str, value: &str) -> Vec<String> {
    vec![field.to_owned(), value.to_owned()]
}

fn rfc3339(t: OffsetDateTime) -> anyhow::Result<String> {
    t.format(&Rfc3339).context("time cannot be formatted")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
