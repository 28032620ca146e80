//! `nitrile host attest` and `nitrile host verify-attestation`: what a
//! host's TPM says it runs, and the check of it against reference values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nitrile_api::admin::{AdminRequest, HostAttestRequest, HostAttestation};
use nitrile_attest::{AkPublic, Pcrs, Quote, compare, replay, verify_quote};

use crate::Global;
use crate::hostapi::{UsageError, call, target};
use crate::output::{Output, escape, print_json};
use crate::service::block_on;

/// `nitrile host attest`.
#[derive(Debug, clap::Args)]
pub(crate) struct AttestArgs {
    /// The nonce the TPM signs into its quote (hex, 16 to 64 bytes;
    /// default: 32 fresh random bytes).
    #[arg(long, value_name = "HEX")]
    nonce: Option<String>,
    #[command(flatten)]
    flag: crate::cmd::host::HostFlag,
}

/// `nitrile host verify-attestation`.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The reference values: a JSON file with `pcr<N>` keys (or a `pcrs`
    /// object of index to value), 64 hex digits each, as `nitrile image
    /// build-host` writes them in `reference.json`.
    #[arg(long, value_name = "FILE")]
    reference: PathBuf,
    /// The host's attestation key (the hex of its TPMT_PUBLIC, or a file
    /// holding it) as pinned when the host was enrolled. Required: a quote
    /// by a key nobody pinned proves nothing about which TPM made it.
    #[arg(long, value_name = "HEX|FILE")]
    attestation_key: String,
    /// Check a saved answer of `nitrile host attest -o json` instead of
    /// calling the host; needs --nonce, the nonce it was asked with.
    #[arg(long, value_name = "FILE", requires = "nonce")]
    from: Option<PathBuf>,
    /// The nonce of the saved answer (hex).
    #[arg(long, value_name = "HEX")]
    nonce: Option<String>,
    /// The cell CA certificate the attestation document's certificate must
    /// be issued by (default: the `ca` of your config).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    #[command(flatten)]
    flag: crate::cmd::host::HostFlag,
}

fn fresh_nonce() -> String {
    let mut n = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut n);
    hex::encode(n)
}

fn ask(
    global: &Global,
    flag: &crate::cmd::host::HostFlag,
    nonce: &str,
) -> anyhow::Result<HostAttestation> {
    let req = HostAttestRequest {
        nonce: nonce.to_owned(),
    };
    req.nonce_bytes()
        .map_err(|e| UsageError(format!("--nonce: {e}")))?;
    let loaded = crate::config::load(global)?;
    let target = target(&loaded, flag.host.as_ref())?;
    block_on(call(&loaded, &target, &AdminRequest::HostAttest(req)))?
}

pub(crate) fn attest(args: AttestArgs, global: &Global) -> anyhow::Result<()> {
    let nonce = args.nonce.unwrap_or_else(fresh_nonce);
    let a = ask(global, &args.flag, &nonce)?;
    match global.output {
        Output::Json => print_json(&a),
        Output::Table => {
            let mut lines = vec![
                ("host".to_owned(), a.host.to_string()),
                ("nonce".to_owned(), nonce.clone()),
                (
                    "attestation key".to_owned(),
                    escape(&a.attestation_key).into_owned(),
                ),
            ];
            for p in &a.quote.pcrs {
                lines.push((format!("pcr {}", p.index), p.sha256.to_string()));
            }
            for e in &a.event_log {
                lines.push((
                    "event".to_owned(),
                    format!("pcr {} {} {}", e.pcr, escape(&e.name), e.sha256),
                ));
            }
            lines.push((
                "document".to_owned(),
                match &a.document {
                    Some(d) => format!("COSE_Sign1, {} bytes (-o json shows it)", d.len() / 2),
                    None => "none (the host holds no certificate for its document key)".to_owned(),
                },
            ));
            Ok(crate::output::print_pairs(&lines)?)
        }
    }
}

/// Reads reference PCR values.
pub(crate) fn reference(path: &Path) -> anyhow::Result<BTreeMap<u8, [u8; 32]>> {
    let bytes = nitrile_fs::read_bounded(path, 1 << 20)
        .with_context(|| format!("reading the reference values {}", path.display()))?;
    nitrile_attest::reference_values(&bytes)
        .map_err(|e| UsageError(format!("{}: {e}", escape(&path.display().to_string()))).into())
}

/// The first certificate (DER) of a PEM file.
pub(crate) fn first_cert(path: &Path) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = nitrile_fs::read_bounded(path, 1 << 20)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cert = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| UsageError(format!("{} holds no certificate", path.display())))?
        .with_context(|| format!("{}: not PEM", path.display()))?;
    Ok(cert.as_ref().to_vec())
}

fn attestation_key(arg: &str) -> anyhow::Result<AkPublic> {
    let text = if Path::new(arg).is_file() {
        String::from_utf8_lossy(&nitrile_fs::read_bounded(Path::new(arg), 64 << 10)?)
            .trim()
            .to_owned()
    } else {
        arg.trim().to_owned()
    };
    let ak = AkPublic {
        tpmt_public: hex::decode(&text)
            .map_err(|_| UsageError("--attestation-key: neither a file nor hex".to_owned()))?,
    };
    ak.point()
        .map_err(|e| UsageError(format!("--attestation-key: {e}")))?;
    Ok(ak)
}

/// The outcome of the checks, one line each.
#[derive(Debug, serde::Serialize)]
struct Verdict {
    host: String,
    verified: bool,
    checks: Vec<Check>,
}

#[derive(Debug, serde::Serialize)]
struct Check {
    check: String,
    ok: bool,
    detail: String,
}

pub(crate) fn verify(args: VerifyArgs, global: &Global) -> anyhow::Result<()> {
    let reference = reference(&args.reference)?;
    let ak = attestation_key(&args.attestation_key)?;
    let (a, nonce_hex) = match &args.from {
        Some(file) => {
            let bytes = nitrile_fs::read_bounded(file, 1 << 20)?;
            let a: HostAttestation = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not an answer of host.attest", file.display()))?;
            (a, args.nonce.clone().unwrap_or_default())
        }
        None => {
            let nonce = args.nonce.clone().unwrap_or_else(fresh_nonce);
            (ask(global, &args.flag, &nonce)?, nonce)
        }
    };
    let nonce = hex::decode(&nonce_hex).map_err(|_| UsageError("--nonce: not hex".to_owned()))?;
    let mut checks = Vec::new();
    let mut push = |check: &str, ok: bool, detail: String| {
        checks.push(Check {
            check: check.to_owned(),
            ok,
            detail,
        });
    };
    let key_matches = hex::encode(&ak.tpmt_public) == a.attestation_key;
    push(
        "attestation key",
        key_matches,
        if key_matches {
            "the pinned one".into()
        } else {
            "NOT the pinned key".into()
        },
    );
    let quote = Quote {
        message: hex::decode(&a.quote.message).unwrap_or_default(),
        signature: hex::decode(&a.quote.signature).unwrap_or_default(),
        pcrs: Pcrs(
            a.quote
                .pcrs
                .iter()
                .map(|p| (p.index, *p.sha256.as_bytes()))
                .collect(),
        ),
    };
    let quoted = verify_quote(&ak, &quote, &nonce);
    push(
        "quote",
        quoted.is_ok(),
        match &quoted {
            Ok(info) => format!(
                "signed by the pinned key over PCRs {:?} with this nonce (TPM clock {} ms, {} resets)",
                info.pcrs, info.clock, info.reset_count
            ),
            Err(e) => e.to_string(),
        },
    );
    for m in compare(&quote.pcrs, &reference) {
        push(
            &format!("pcr {}", m.index),
            quoted.is_ok() && m.matched,
            if m.matched {
                format!("matches {}", m.expected)
            } else {
                format!("is {}, expected {}", m.measured, m.expected)
            },
        );
    }
    // The event log must replay to the quoted PCR 15.
    let events: Vec<[u8; 32]> = a
        .event_log
        .iter()
        .filter(|e| e.pcr == nitrile_attest::INIT_PCR)
        .map(|e| *e.sha256.as_bytes())
        .collect();
    if !events.is_empty() {
        let replayed = replay(events.iter().copied());
        let ok = quote.pcrs.0.get(&nitrile_attest::INIT_PCR) == Some(&replayed);
        push(
            "event log",
            ok,
            format!(
                "{} events {} the quoted PCR {}",
                events.len(),
                if ok { "replay to" } else { "do NOT replay to" },
                nitrile_attest::INIT_PCR
            ),
        );
    }
    // The attestation document, when there is one: signed by a key the
    // cell CA certified, over the same PCRs and this nonce.
    if let Some(doc) = &a.document {
        let ca_path = match &args.ca {
            Some(p) => Some(p.clone()),
            None => crate::config::load(global)
                .ok()
                .map(|l| l.config.ca.clone()),
        };
        let outcome = (|| -> Result<String, String> {
            let ca_path = ca_path.ok_or("no cell CA: give --ca")?;
            let root = crate::cmd::host_attest::first_cert(&ca_path).map_err(|e| e.to_string())?;
            let bytes = hex::decode(doc).map_err(|_| "not hex".to_owned())?;
            let opened =
                nitrile_attest::cose::open(&bytes, nitrile_attest::cose::verify_with_root(&root))
                    .map_err(|e| e.to_string())?;
            if opened.pcrs != quote.pcrs {
                return Err("its PCRs are not the quote's".into());
            }
            if opened.nonce.as_deref() != Some(nonce_hex.as_str()) {
                return Err("its nonce is not the one asked for".into());
            }
            if opened.module_id != a.host.as_str() {
                return Err(format!("it is for module {}", opened.module_id));
            }
            Ok("COSE_Sign1 (ES384, Nitro layout) signed by the TPM's document key, certified by the cell CA, over the same PCRs and nonce".to_owned())
        })();
        match outcome {
            Ok(d) => push("document", true, d),
            Err(e) => push("document", false, e),
        }
    }
    let verified = checks.iter().all(|c| c.ok);
    let verdict = Verdict {
        host: a.host.to_string(),
        verified,
        checks,
    };
    match global.output {
        Output::Json => print_json(&verdict)?,
        Output::Table => {
            let mut lines: Vec<(String, String)> = verdict
                .checks
                .iter()
                .map(|c| {
                    (
                        c.check.clone(),
                        format!(
                            "{} {}",
                            if c.ok { "ok" } else { "FAILED" },
                            escape(&c.detail)
                        ),
                    )
                })
                .collect();
            lines.push((
                "verdict".to_owned(),
                if verified {
                    "the host runs what the reference describes".into()
                } else {
                    "NOT verified".into()
                },
            ));
            crate::output::print_pairs(&lines)?;
        }
    }
    if verified {
        Ok(())
    } else {
        anyhow::bail!(
            "host {} did not verify against {}",
            escape(&verdict.host),
            args.reference.display()
        )
    }
}
