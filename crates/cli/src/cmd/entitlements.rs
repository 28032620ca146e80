//! `nitrile entitlements`: validate, digest, sign, explain and compare
//! entitlement bundles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId, ResourceKind};
use nitrile_policy::{Bundle, Entitlements, ReviewerKey, ReviewerSet, verify_bundle};

use crate::Global;
use crate::output::{Output, Stream, errln, outln, print_json, print_text};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Validate a bundle strictly and print a summary; with --reviewers also
    /// check that enough distinct reviewers signed its current content.
    ///
    /// Example: `nitrile entitlements check entitlements/ --reviewers reviewers.toml`
    Check {
        /// The bundle directory.
        dir: PathBuf,
        /// Reviewer set (TOML: [[reviewer]] name, public_key).
        #[arg(long, value_name = "FILE")]
        reviewers: Option<PathBuf>,
    },
    /// Print the digest reviewers sign (SHA-256 over every file but
    /// signatures/, bundle.toml and rules/ included) and the bundle's serial.
    ///
    /// Example: `nitrile entitlements digest entitlements/`
    Digest {
        /// The bundle directory.
        dir: PathBuf,
    },
    /// Create a reviewer key pair: PREFIX.key (mode 0600) and PREFIX.pub.
    ///
    /// Example: `nitrile entitlements keygen --reviewer rita --out ~/.nitrile/rita`
    Keygen {
        /// The reviewer's name.
        #[arg(long)]
        reviewer: Name,
        /// Path prefix of the two files written.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Sign the bundle's current content, its serial and monitor rules
    /// included: writes DIR/signatures/NAME.sig. The bundle must load (its
    /// policies, quotas and rules); raise `serial` in bundle.toml before
    /// signing a change, or services refuse it.
    ///
    /// Example: `nitrile entitlements sign --key rita.key --reviewer rita entitlements/`
    Sign {
        /// The reviewer's private key (PKCS#8 PEM).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The reviewer's name.
        #[arg(long)]
        reviewer: Name,
        /// The bundle directory.
        dir: PathBuf,
    },
    /// Explain the decision on one operation: which group slice was used and
    /// which policies permit or forbid, with file:line.
    ///
    /// Example: `nitrile entitlements explain entitlements/ --principal operator/alice --op host.drain --resource host/h1`
    Explain {
        /// The bundle directory.
        dir: PathBuf,
        /// `nitrile://cell/kind/name`, or `kind/name`.
        #[arg(long)]
        principal: String,
        /// The operation, e.g. host.drain.
        #[arg(long)]
        op: Operation,
        /// The resource, e.g. host/h1 or instance/i-7.
        #[arg(long)]
        resource: ResourceId,
        /// The host the token would be for (default: the resource, for hosts;
        /// logd for logs; required for instances and volumes).
        #[arg(long)]
        audience: Option<Audience>,
    },
    /// Show the changes between two bundles: their serials (and whether the
    /// serial rises, as it must for services to accept the new one),
    /// added/removed grants, and monitor rule files added, removed or
    /// changed.
    ///
    /// Example: `nitrile entitlements diff old/ entitlements/`
    Diff {
        /// The bundle before.
        old: PathBuf,
        /// The bundle after.
        new: PathBuf,
    },
    /// Print the fixed schema every bundle carries as schema.cedarschema.
    ///
    /// Example: `nitrile entitlements schema > entitlements/schema.cedarschema`
    Schema,
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    match command {
        Command::Check { dir, reviewers } => check(dir, reviewers, global.output),
        Command::Digest { dir } => {
            let bundle = Bundle::read(&dir)?;
            let digest = bundle.digest();
            match global.output {
                Output::Json => print_json(&serde_json::json!({
                    "digest": digest.to_hex(),
                    "serial": bundle.serial().get(),
                })),
                Output::Table => {
                    outln!("{digest}")?;
                    errln!("serial {}", bundle.serial())?;
                    Ok(())
                }
            }
        }
        Command::Keygen { reviewer, out } => {
            let key = ReviewerKey::generate(reviewer.clone());
            let (key_path, pub_path) = key.write(&out)?;
            errln!("wrote {} (secret, mode 0600)", key_path.display())?;
            errln!("wrote {}", pub_path.display())?;
            errln!("add to the cell's reviewer set:")?;
            outln!("[[reviewer]]")?;
            outln!("name = \"{reviewer}\"")?;
            outln!("public_key = \"{}\"", key.public_key_base64())?;
            Ok(())
        }
        Command::Sign { key, reviewer, dir } => {
            // Validate before signing: a reviewer signs what loads.
            let loaded =
                Bundle::load(&dir).context("refusing to sign a bundle that does not load")?;
            monitor_of(&dir)
                .context("refusing to sign a bundle whose monitor rules do not load")?;
            let key = ReviewerKey::load(&key, reviewer.clone())?;
            let digest = key.sign_dir(&dir)?;
            errln!(
                "signed {digest} (serial {}) as {reviewer}: {}",
                loaded.serial(),
                dir.join("signatures")
                    .join(format!("{reviewer}.sig"))
                    .display()
            )?;
            Ok(())
        }
        Command::Explain {
            dir,
            principal,
            op,
            resource,
            audience,
        } => explain(dir, &principal, op, resource, audience, global.output),
        Command::Diff { old, new } => diff(&old, &new, global.output),
        Command::Schema => {
            print_text(Stream::Stdout, nitrile_policy::SCHEMA_TEXT)?;
            Ok(())
        }
    }
}

/// The monitor rule files of two bundles: added, removed and changed.
fn rule_changes(old: &Bundle, new: &Bundle) -> Vec<String> {
    let old_rules: BTreeMap<&str, &[u8]> = old.rule_files().collect();
    let new_rules: BTreeMap<&str, &[u8]> = new.rule_files().collect();
    let mut out = Vec::new();
    for (path, bytes) in &new_rules {
        match old_rules.get(path) {
            None => out.push(format!("+ rule file {path}")),
            Some(before) if before != bytes => out.push(format!("~ rule file {path} changed")),
            Some(_) => {}
        }
    }
    for path in old_rules.keys() {
        if !new_rules.contains_key(path) {
            out.push(format!("- rule file {path}"));
        }
    }
    out
}

fn diff(old_dir: &Path, new_dir: &Path, output: Output) -> anyhow::Result<()> {
    let load = |dir: &Path| -> anyhow::Result<(Bundle, Entitlements)> {
        let bundle = Bundle::read(dir).with_context(|| format!("loading {}", dir.display()))?;
        let loaded = Bundle::load(dir).with_context(|| format!("loading {}", dir.display()))?;
        Ok((bundle, loaded))
    };
    let (old_bundle, old) = load(old_dir)?;
    let (new_bundle, new) = load(new_dir)?;
    let changes = nitrile_policy::diff(&old, &new);
    let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
    let rules = rule_changes(&old_bundle, &new_bundle);
    let rises = new.serial() > old.serial();
    let serial_note = if rises {
        String::new()
    } else if old.digest() == new.digest() {
        "the same bundle".to_owned()
    } else {
        format!(
            "the serial does not rise ({} -> {}): services that loaded the old bundle refuse \
             the new one; raise serial in bundle.toml above {} and sign again",
            old.serial(),
            new.serial(),
            old.serial()
        )
    };
    match output {
        Output::Json => print_json(&serde_json::json!({
            "old_digest": old.digest().to_hex(),
            "new_digest": new.digest().to_hex(),
            "old_serial": old.serial().get(),
            "new_serial": new.serial().get(),
            "serial_rises": rises,
            "changes": lines,
            "rule_changes": rules,
        })),
        Output::Table => {
            outln!("serial {} -> {}", old.serial(), new.serial())?;
            if !serial_note.is_empty() {
                errln!("warning: {serial_note}")?;
            }
            if lines.is_empty() {
                outln!("no change in access")?;
            }
            for l in lines {
                outln!("{l}")?;
            }
            for r in rules {
                outln!("{r}")?;
            }
            Ok(())
        }
    }
}

fn check(dir: PathBuf, reviewers: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let entitlements = match reviewers {
        Some(path) => {
            let set = ReviewerSet::load(&path)?;
            let reviewed = verify_bundle(&dir, &set, nitrile_policy::MIN_REVIEWERS)?;
            for r in reviewed.rejected() {
                errln!("warning: signature not counted: {r}")?;
            }
            Entitlements::from_reviewed(reviewed)?
        }
        None => Bundle::load(&dir)?,
    };
    let monitor = monitor_of(&dir)?;
    let s = entitlements.summary();
    match output {
        Output::Json => print_json(&s),
        Output::Table => {
            outln!("digest     {}", s.digest)?;
            outln!("serial     {}", s.serial)?;
            if s.reviewers.is_empty() {
                outln!("reviewed   not checked (pass --reviewers FILE)")?;
            } else {
                outln!("reviewed   by {}", s.reviewers.join(", "))?;
            }
            outln!(
                "contents   {} groups, {} principals, {} resource sets, {} policies, {} quotas",
                s.groups.len(),
                s.principals,
                s.resource_sets.len(),
                s.policies,
                s.quotas
            )?;
            outln!(
                "rules      {} monitor rule(s) in {} file(s)",
                monitor.rules().count(),
                s.rule_files.len()
            )?;
            outln!()?;
            let rows: Vec<Vec<String>> = s
                .groups
                .iter()
                .map(|g| {
                    vec![
                        g.name.clone(),
                        g.members.join(" "),
                        g.policies.to_string(),
                        g.quotas.join(" "),
                    ]
                })
                .collect();
            crate::output::print_table(&["GROUP", "MEMBERS", "POLICIES", "QUOTAS"], &rows)?;
            outln!()?;
            let rows: Vec<Vec<String>> = s
                .resource_sets
                .iter()
                .map(|(name, members)| vec![name.clone(), members.join(" ")])
                .collect();
            crate::output::print_table(&["RESOURCE SET", "MEMBERS"], &rows)?;
            Ok(())
        }
    }
}

fn parse_principal(s: &str) -> anyhow::Result<PrincipalId> {
    if s.starts_with("nitrile://") {
        return Ok(PrincipalId::parse(s)?);
    }
    let (kind, name) = s
        .split_once('/')
        .with_context(|| format!("principal {s:?} is not nitrile://cell/kind/name or kind/name"))?;
    // The bundle does not depend on the cell; any valid cell name will do.
    Ok(PrincipalId::new(
        Name::new("local")?,
        kind.parse()?,
        Name::new(name)?,
    ))
}

fn explain(
    dir: PathBuf,
    principal: &str,
    op: Operation,
    resource: ResourceId,
    audience: Option<Audience>,
    output: Output,
) -> anyhow::Result<()> {
    let principal = parse_principal(principal)?;
    let audience = match (audience, resource.kind) {
        (Some(a), _) => a,
        (None, ResourceKind::Host) => Audience::new(resource.name.as_str())?,
        (None, ResourceKind::Log) => Audience::new("logd")?,
        (None, kind) => anyhow::bail!(
            "--audience HOST is required for {kind} resources: policies scope them by the host they run on"
        ),
    };
    let e = Bundle::load(&dir)?;
    let x = e.explain(&principal, op, &resource, &audience);
    if output == Output::Json {
        return print_json(&x);
    }
    outln!(
        "{} {} on {} at {}",
        x.principal,
        x.operation,
        x.resource,
        x.audience
    )?;
    if let Some(refused) = &x.refused_early {
        outln!("DENY: {refused}")?;
        return Ok(());
    }
    let mut allowed_by = None;
    for g in &x.groups {
        outln!(
            "group {} (slice of {} policies): {}",
            g.group,
            g.slice_policies,
            if g.allowed { "ALLOW" } else { "DENY" }
        )?;
        for p in &g.permits {
            outln!("  permit  {p}")?;
        }
        for p in &g.forbids {
            outln!("  forbid  {p}")?;
        }
        for err in &g.errors {
            outln!("  error   {err}")?;
        }
        if g.permits.is_empty() && g.forbids.is_empty() && g.errors.is_empty() {
            outln!("  no policy applies")?;
        }
        if g.allowed && allowed_by.is_none() {
            allowed_by = Some(g.group.clone());
        }
    }
    match allowed_by {
        Some(g) => outln!("decision: ALLOW as group {g}")?,
        None => outln!("decision: DENY")?,
    }
    Ok(())
}
/// The monitor of the rules of the bundle in `dir` (its `rules/`), as logd
/// loads them from a reviewed bundle.
fn monitor_of(dir: &Path) -> anyhow::Result<nitrile_monitor::Monitor> {
    let bundle = Bundle::read(dir)?;
    nitrile_monitor::Monitor::from_rule_files(bundle.rule_files())
        .with_context(|| format!("monitor rules of the entitlement bundle {}", dir.display()))
}
