//! `nitrile token`: inspect admin tokens.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, PrincipalId};
use nitrile_token::{
    Claims, Clock, IssuerKeys, MAX_TOKEN_LEN, SystemClock, VerifyingKey, danger_decode_unverified,
};
use serde::Serialize;

use crate::Global;
use crate::output::{Output, errln, outln, print_json, print_table};
use crate::tokenapi::join;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Ask the token service for a token for exactly these operations on
    /// exactly these resources at one host, and print it on stdout.
    ///
    /// The request is authenticated with the client certificate of the
    /// client config (`nitrile config show`); the token is bound to that
    /// certificate and useless from any other. Refusals say which step
    /// refused (tls, entitlement, quota, journal) and why.
    ///
    /// Example: `nitrile token request --op host.describe --resource host/h1 --audience h1`
    Request {
        /// An operation the token should allow (repeatable), e.g. host.describe.
        #[arg(long = "op", value_name = "OP", required = true)]
        ops: Vec<nitrile_api::Operation>,
        /// An exact resource (repeatable), e.g. host/h1 or instance/i-7.
        #[arg(long = "resource", value_name = "KIND/ID", required = true)]
        resources: Vec<nitrile_api::ResourceId>,
        /// The host that will accept the token.
        #[arg(long, value_name = "HOST")]
        audience: Audience,
        /// The entitlement group to act as (default: the first that allows it all).
        #[arg(long)]
        group: Option<String>,
        /// Token lifetime, e.g. 2m (default 5m, at most 5m or the token
        /// service's lower maximum).
        #[arg(long, value_name = "DURATION")]
        lifetime: Option<String>,
    },
    /// Decode an admin token and say what it allows. With `--issuer-key`,
    /// also verify its signature and validity time; without, the output is
    /// labelled UNVERIFIED. The token is read from a file or standard input,
    /// never from the command line.
    ///
    /// Example: `nitrile token inspect token.txt --issuer-key tokend.pub --audience h1`
    Inspect {
        /// File holding the token, or `-` for standard input.
        #[arg(value_name = "FILE|-", default_value = "-")]
        file: String,
        /// PEM public key of the token service (repeat for keys in rotation).
        #[arg(long = "issuer-key", value_name = "PUBKEY_PEM")]
        issuer_keys: Vec<PathBuf>,
        /// The token service's published key set (`issuer-keys.toml`); pins
        /// its issuer too.
        #[arg(long = "issuer-keys", value_name = "FILE", conflicts_with_all = ["issuer_keys", "issuer"])]
        issuer_key_set: Option<PathBuf>,
        /// The token service principal the keys belong to; by default the
        /// issuer the token claims.
        #[arg(long, value_name = "PRINCIPAL")]
        issuer: Option<PrincipalId>,
        /// Refuse the token unless it is for this host.
        #[arg(long, value_name = "H")]
        audience: Option<Audience>,
    },
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    match command {
        Command::Request {
            ops,
            resources,
            audience,
            group,
            lifetime,
        } => request(global, ops, resources, audience, group, lifetime),
        Command::Inspect {
            file,
            issuer_keys,
            issuer_key_set,
            issuer,
            audience,
        } => {
            let token = read_token(&file)?;
            if let Some(path) = issuer_key_set {
                let set = nitrile_tokend::IssuerFile::load(&path)?;
                let keys: Vec<VerifyingKey> = set
                    .key_ids()
                    .filter_map(|id| set.get(id).copied())
                    .collect();
                let report = inspect(
                    &token,
                    &keys,
                    Some(set.issuer().clone()),
                    audience.as_ref(),
                    &SystemClock,
                )?;
                return print_report(&report, global.output);
            }
            let keys = issuer_keys
                .iter()
                .map(|p| {
                    VerifyingKey::load(p)
                        .with_context(|| format!("cannot use issuer key {}", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let report = inspect(&token, &keys, issuer, audience.as_ref(), &SystemClock)?;
            print_report(&report, global.output)
        }
    }
}

/// Reads a token from a file or stdin, bounded, without trailing whitespace.
fn read_token(file: &str) -> anyhow::Result<String> {
    let limit = (MAX_TOKEN_LEN + 64) as u64;
    let mut text = String::new();
    if file == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_string(&mut text)
            .context("cannot read the token from standard input")?;
    } else {
        let path = Path::new(file);
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_string(&mut text))
            .with_context(|| format!("cannot read the token from {}", path.display()))?;
    }
    let token = text.trim();
    if token.len() > MAX_TOKEN_LEN {
        bail!("input is longer than the {MAX_TOKEN_LEN} bytes a token can have");
    }
    if token.is_empty() {
        bail!("no token in the input");
    }
    Ok(token.to_owned())
}

/// How far the token was checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
enum Status {
    /// Signature, issuer and validity time verified at `checked_at`.
    Verified {
        issuer: String,
        issuer_pinned: bool,
        checked_at: String,
    },
    /// Nothing verified.
    Unverified,
}

#[derive(Debug, Serialize)]
struct Report {
    verified: bool,
    #[serde(flatten)]
    status: Status,
    key_id: String,
    claims: Claims,
    allows: String,
}

fn inspect(
    token: &str,
    keys: &[VerifyingKey],
    issuer: Option<PrincipalId>,
    audience: Option<&Audience>,
    clock: &dyn Clock,
) -> anyhow::Result<Report> {
    let decoded = danger_decode_unverified(token)
        .map_err(|e| anyhow::anyhow!("{e} ({})", e.code()))
        .context("not a nitrile admin token")?;
    let (status, key_id, claims) = if keys.is_empty() {
        (
            Status::Unverified,
            decoded.unverified_key_id(),
            decoded.unverified_claims().clone(),
        )
    } else {
        let issuer_pinned = issuer.is_some();
        let issuer = issuer.unwrap_or_else(|| decoded.unverified_claims().issuer().clone());
        let pinned = IssuerKeys::with_keys(issuer.clone(), keys.iter().copied())?;
        let signed = pinned
            .verify_signature_only(token, clock)
            .map_err(|e| anyhow::anyhow!("{e} ({})", e.code()))
            .context("token does NOT verify")?;
        (
            Status::Verified {
                issuer: issuer.to_string(),
                issuer_pinned,
                checked_at: format_rfc3339(&clock.now()),
            },
            signed.key_id(),
            signed.claims().clone(),
        )
    };
    if let Some(expected) = audience
        && claims.audience() != expected
    {
        bail!(
            "token is for {}, not for {expected} (wrong_audience); request a token for {expected}",
            claims.audience()
        );
    }
    let allows = allows_line(&claims);
    Ok(Report {
        verified: matches!(status, Status::Verified { .. }),
        status,
        key_id: key_id.to_string(),
        claims,
        allows,
    })
}

fn format_rfc3339(t: &time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn claim_str(claims: &Claims, field: &str) -> String {
    serde_json::to_value(claims)
        .ok()
        .and_then(|v| v.get(field).and_then(|s| s.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

fn allows_line(claims: &Claims) -> String {
    format!(
        "allows {} on {} at {} until {}, only from the client certificate {}",
        join(claims.operations()),
        join(claims.resources()),
        claims.audience(),
        claim_str(claims, "exp"),
        claims.cert()
    )
}

fn print_report(report: &Report, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(report),
        Output::Table => {
            match &report.status {
                Status::Verified {
                    issuer,
                    issuer_pinned,
                    checked_at,
                } => {
                    let whose = if *issuer_pinned {
                        format!("of {issuer}")
                    } else {
                        format!("(issuer {issuer} as the token claims it; pin it with --issuer)")
                    };
                    outln!(
                        "VERIFIED: signed by a given key {whose}, valid at {checked_at}; audience, operation, resource and certificate are checked by the host"
                    )?
                }
                Status::Unverified => outln!(
                    "UNVERIFIED: no --issuer-key given; nothing below is checked, anyone could have written it"
                )?,
            }
            let c = &report.claims;
            let rows = vec![
                vec!["issuer".into(), c.issuer().to_string()],
                vec!["subject".into(), c.subject().to_string()],
                vec!["group".into(), c.group().to_string()],
                vec!["audience".into(), c.audience().to_string()],
                vec!["operations".into(), join(c.operations())],
                vec!["resources".into(), join(c.resources())],
                vec!["issued at".into(), claim_str(c, "iat")],
                vec!["not before".into(), claim_str(c, "nbf")],
                vec!["expires".into(), claim_str(c, "exp")],
                vec!["token id".into(), c.token_id().to_string()],
                vec!["bound to".into(), c.cert().to_string()],
                vec!["key id".into(), report.key_id.clone()],
            ];
            print_table(&["CLAIM", "VALUE"], &rows)?;
            let prefix = if report.verified { "" } else { "UNVERIFIED: " };
            outln!("{prefix}{}", report.allows)?;
            Ok(())
        }
    }
}

fn request(
    global: &Global,
    operations: Vec<nitrile_api::Operation>,
    resources: Vec<nitrile_api::ResourceId>,
    audience: Audience,
    group: Option<String>,
    lifetime: Option<String>,
) -> anyhow::Result<()> {
    let lifetime_secs = match lifetime {
        None => None,
        Some(text) => Some(nitrile_pki::parse_duration(&text)?.as_secs()),
    };
    let loaded = crate::config::load(global)?;
    let tls = loaded.tls()?;
    let body = TokenRequest {
        operations,
        resources,
        audience,
        group,
        lifetime_secs,
    };
    let granted = crate::service::block_on(crate::tokenapi::obtain(&loaded, tls, &body))??;
    match global.output {
        Output::Json => crate::output::print_json(&granted),
        Output::Table => {
            outln!("{}", granted.token)?;
            errln!(
                "token {} for group {}, expires {}",
                granted.token_id,
                granted.group,
                granted.expires_at
            )?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrile_api::{Name, Operation, ResourceId};
    use nitrile_token::{CertThumbprint, ClaimsInput, FixedClock, SigningKey, TokenIssuer};

    const NOW: time::OffsetDateTime = time::macros::datetime!(2030-01-01 12:00 UTC);

    fn mint(key: SigningKey, audience: &str) -> (String, Claims) {
        let issuer = TokenIssuer::new(
            PrincipalId::parse("nitrile://c1/service/tokend").unwrap(),
            key,
        );
        let input = ClaimsInput {
            subject: PrincipalId::parse("nitrile://c1/operator/alice").unwrap(),
            group: Name::new("oncall").unwrap(),
            audience: Audience::new(audience).unwrap(),
            operations: vec![Operation::HostDescribe],
            resources: vec![ResourceId::parse("host/h1").unwrap()],
            cert: CertThumbprint::from_sha256([0xab; 32]),
            lifetime: None,
        };
        issuer.mint(input, NOW, &mut rand_core::OsRng).unwrap()
    }

    #[test]
    fn token_is_read_from_a_file_and_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "v4.public.abc\n").unwrap();
        assert_eq!(read_token(path.to_str().unwrap()).unwrap(), "v4.public.abc");
        std::fs::write(&path, "A".repeat(MAX_TOKEN_LEN + 1)).unwrap();
        assert!(read_token(path.to_str().unwrap()).is_err());
        std::fs::write(&path, "  \n").unwrap();
        assert!(read_token(path.to_str().unwrap()).is_err());
    }

    #[test]
    fn without_keys_the_report_is_unverified() {
        let (token, claims) = mint(SigningKey::generate(&mut rand_core::OsRng), "h1");
        let clock = FixedClock::new(NOW);
        let report = inspect(&token, &[], None, None, &clock).unwrap();
        assert!(!report.verified);
        assert_eq!(report.status, Status::Unverified);
        assert_eq!(report.claims, claims);
        assert_eq!(
            report.allows,
            format!(
                "allows host.describe on host/h1 at h1 until 2030-01-01T12:05:00Z, only from the client certificate sha256:{}",
                "ab".repeat(32)
            )
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["status"], "unverified");
        assert_eq!(json["claims"]["aud"], "h1");
        print_report(&report, Output::Table).unwrap();
        print_report(&report, Output::Json).unwrap();
    }

    #[test]
    fn with_keys_the_signature_and_time_are_verified() {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let pk = key.verifying_key();
        let (token, _) = mint(key, "h1");
        let clock = FixedClock::new(NOW);
        let report = inspect(
            &token,
            &[pk],
            None,
            Some(&Audience::new("h1").unwrap()),
            &clock,
        )
        .unwrap();
        assert!(report.verified);
        assert_eq!(report.key_id, pk.key_id().to_string());
        print_report(&report, Output::Table).unwrap();

        // Another key, a tampered token, expiry, another audience, another
        // pinned issuer: all refused.
        let other = SigningKey::generate(&mut rand_core::OsRng).verifying_key();
        assert!(inspect(&token, &[other], None, None, &clock).is_err());
        let mut tampered = token.clone().into_bytes();
        tampered[20] ^= 1;
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(inspect(&tampered, &[pk], None, None, &clock).is_err());
        let late = FixedClock::new(NOW + time::Duration::minutes(5));
        let err = inspect(&token, &[pk], None, None, &late).unwrap_err();
        assert!(format!("{err:#}").contains("expired"), "{err:#}");
        let err = inspect(
            &token,
            &[pk],
            None,
            Some(&Audience::new("h2").unwrap()),
            &clock,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("wrong_audience"), "{err:#}");
        let rogue = PrincipalId::parse("nitrile://c2/service/tokend").unwrap();
        assert!(inspect(&token, &[pk], Some(rogue), None, &clock).is_err());
    }

    #[test]
    fn garbage_is_not_a_token() {
        let clock = FixedClock::new(NOW);
        assert!(inspect("v4.public.AAAA", &[], None, None, &clock).is_err());
        assert!(inspect("hello", &[], None, None, &clock).is_err());
    }
}
