//! `nitrile audit tail|prove|verify|alerts`: the auditor's reads of the
//! cell's transparency log, checked locally.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use nitrile_audit::AuditRecord;
use nitrile_logclient::audit::{
    AuditedLog, FetchProgress, audit_log, fetch_log, store_dir, stored_consistency_proof,
};
use nitrile_logclient::protocol::EntryBody;
use nitrile_logclient::{LogReader, error_chain};
use nitrile_tlog::{AuditFailure, FileStorage, NoteVerifier, Storage, open_checkpoint};
use serde::Serialize;

use crate::Global;
use crate::anchor::{Accepted, AnchorArgs, Anchors, Step, witnessed};
use crate::config::Loaded;
use crate::hostapi::UsageError;
use crate::logapi::{log_verifier, witness_verifiers};
use crate::output::{
    Output, Progress, errln, outln, print_json, print_json_lines, print_pairs, print_rows,
    print_table,
};
use crate::service::block_on;

/// How often `tail --follow` asks for new entries.
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// How long `prove` waits for a checkpoint that covers the record.
const PROVE_WAIT: Duration = Duration::from_secs(10);
/// How many polls of `tail --follow` between two checks of the log's
/// checkpoint against the remembered one.
const FOLLOW_CHECK_EVERY: u32 = 10;

/// Arguments of `nitrile audit tail`.
#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    /// Keep printing records as they enter the log.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only records of this principal (`operator/alice` or its full URI).
    #[arg(long, value_name = "P")]
    principal: Option<String>,
    /// Only records shipped by host H or naming resource `host/H`.
    #[arg(long, value_name = "H")]
    host: Option<String>,
    /// Print only the last N matching records.
    #[arg(short = 'n', long = "lines", value_name = "N")]
    lines: Option<usize>,
    /// The log's verifier key file (else `log_vkey` of the client config).
    #[arg(long, value_name = "FILE")]
    log_key: Option<PathBuf>,
    #[command(flatten)]
    anchor: AnchorArgs,
}

/// Arguments of `nitrile audit prove`.
#[derive(Debug, clap::Args)]
pub(crate) struct ProveArgs {
    /// The record: its index in the log, or `<kind>/<name>:<seq>` (e.g.
    /// `host/h1:17`, record 17 of host h1's journal).
    #[arg(long, value_name = "ID")]
    record: String,
    /// The log's verifier key file (else `log_vkey` of the client config).
    #[arg(long, value_name = "FILE")]
    log_key: Option<PathBuf>,
    #[command(flatten)]
    anchor: AnchorArgs,
}

/// Arguments of `nitrile audit verify`.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// Audit a log directory (logd's `log/`, or its state directory)
    /// instead of fetching from logd.
    #[arg(long, value_name = "DIR", conflicts_with = "postgres")]
    store: Option<PathBuf>,
    /// Audit the log logd keeps in this PostgreSQL database (a libpq
    /// connection string, as `[storage] postgres` in logd.toml) instead of
    /// fetching from logd. It may not hold a password (nothing secret goes
    /// on a command line): connect over the unix socket with peer or trust
    /// authentication. Example: `--postgres "host=/run/postgresql
    /// dbname=nitrile" --log-name local --log-key log.vkey`.
    #[arg(long, value_name = "CONNINFO")]
    postgres: Option<String>,
    /// The log's name in the database (default: the cell of the client
    /// config, as logd's default).
    #[arg(long, value_name = "NAME", requires = "postgres")]
    log_name: Option<String>,
    /// The log's verifier key file (else `log_vkey` of the client config,
    /// else `log.vkey` beside the store).
    #[arg(long, value_name = "FILE")]
    log_key: Option<PathBuf>,
    #[command(flatten)]
    anchor: AnchorArgs,
}

/// Arguments of `nitrile audit forget`.
#[derive(Debug, clap::Args)]
pub(crate) struct ForgetArgs {
    /// The log's origin (e.g. `local.nitrile/log`), as the refusal names it.
    #[arg(long = "log", value_name = "ORIGIN")]
    origin: String,
    #[command(flatten)]
    anchor: AnchorArgs,
}

// ---------------------------------------------------------- checkpoints

/// A checkpoint accepted by [`Checker`].
struct Anchored {
    /// What the auditor's memory made of it.
    accepted: Accepted,
    /// The witnesses (of those the client config names) that cosigned it.
    witnessed_by: Vec<String>,
}

impl Anchored {
    /// `witnessed by` for people.
    fn witnessed_text(&self, named: usize) -> String {
        if named == 0 {
            "- (the client config names no witness key)".to_owned()
        } else {
            self.witnessed_by.join(", ")
        }
    }
}

/// Accepts a log's checkpoint as this auditor: signed by the log's key,
/// cosigned by one of the witnesses the client config names (when it
/// names any), and the checkpoint remembered or a tree that a verified
/// consistency proof links to it (see [`crate::anchor`]); then it is
/// remembered.
struct Checker<'a> {
    anchors: &'a Anchors,
    log: &'a NoteVerifier,
    witnesses: &'a [NoteVerifier],
}

impl Checker<'_> {
    /// Fetches logd's latest checkpoint and accepts it.
    async fn latest(&self, reader: &mut LogReader) -> anyhow::Result<()> {
        let note = reader.checkpoint().await?;
        self.remote(reader, note.as_deref()).await?;
        Ok(())
    }

    /// Accepts `note`, logd's latest checkpoint (`None`: logd has none),
    /// asking logd for the consistency proof from the remembered one.
    async fn remote(&self, reader: &mut LogReader, note: Option<&str>) -> anyhow::Result<Anchored> {
        let witnessed_by = match note {
            Some(n) => witnessed(n, self.witnesses)?,
            None => Vec::new(),
        };
        let source = reader.source();
        let held = self.anchors.lock(self.log)?;
        let proof = match held.check(note, &source)? {
            Step::Extends { from, to } if from > 0 => reader.consistency_proof(from, to).await?,
            _ => None,
        };
        let accepted = held.accept(
            note,
            proof.as_deref(),
            &source,
            time::OffsetDateTime::now_utc(),
        )?;
        Ok(Anchored {
            accepted,
            witnessed_by,
        })
    }

    /// Accepts the latest checkpoint of a stored log (audited already),
    /// computing the consistency proof from the remembered one from its
    /// level-0 tiles.
    fn stored(&self, storage: &dyn Storage, source: &str) -> anyhow::Result<Anchored> {
        let note = storage
            .read("checkpoint")
            .with_context(|| format!("cannot read the checkpoint of {source}"))?
            .map(String::from_utf8)
            .transpose()
            .context("the checkpoint is not text")?;
        let witnessed_by = match &note {
            Some(n) => witnessed(n, self.witnesses)?,
            None => Vec::new(),
        };
        let held = self.anchors.lock(self.log)?;
        let proof = match held.check(note.as_deref(), source)? {
            Step::Extends { from, to } if from > 0 => {
                Some(stored_consistency_proof(storage, from, to)?)
            }
            _ => None,
        };
        let accepted = held.accept(
            note.as_deref(),
            proof.as_deref(),
            source,
            time::OffsetDateTime::now_utc(),
        )?;
        Ok(Anchored {
            accepted,
            witnessed_by,
        })
    }
}

/// Forgets what this auditor remembers of a log: its next verification is
/// a first use again.
pub(crate) fn forget(args: ForgetArgs, global: &Global) -> anyhow::Result<()> {
    let anchors = Anchors::open(&args.anchor)?;
    let forgotten = anchors.forget(&args.origin)?;
    match global.output {
        Output::Json => print_json(&forgotten)?,
        Output::Table => {
            if forgotten.is_empty() {
                errln!(
                    "nothing remembered of {} in {}",
                    args.origin,
                    anchors.dir().display()
                )?;
            }
            for r in &forgotten {
                outln!("forgot the checkpoint of {} ({})", r.origin, r.describe())?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- tail

/// Whether an entry passes the filters.
fn matches(e: &EntryBody, cell: &str, principal: Option<&str>, host: Option<&str>) -> bool {
    let record = e.record.as_ref();
    if let Some(p) = principal {
        let found = record
            .and_then(|r| r.get("principal"))
            .and_then(|v| v.as_str());
        let ok = found.is_some_and(|f| f == p || f == format!("nitrile://{cell}/{p}"));
        if !ok {
            return false;
        }
    }
    if let Some(h) = host {
        let source = e.source == format!("nitrile://{cell}/host/{h}");
        let resource = record
            .and_then(|r| r.get("resources"))
            .and_then(|v| v.as_array())
            .is_some_and(|rs| rs.iter().any(|r| r.as_str() == Some(&format!("host/{h}"))));
        if !source && !resource {
            return false;
        }
    }
    true
}

fn row(e: &EntryBody) -> Vec<String> {
    let short_source = e
        .source
        .strip_prefix("nitrile://")
        .and_then(|s| s.split_once('/'))
        .map_or(e.source.as_str(), |(_, rest)| rest)
        .to_owned();
    let record = e
        .record
        .clone()
        .and_then(|v| serde_json::from_value::<AuditRecord>(v).ok());
    let Some(r) = record else {
        return vec![
            e.index.to_string(),
            short_source,
            e.seq.to_string(),
            "-".into(),
            "(not an audit record)".into(),
        ];
    };
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    let result = match (r.step, r.outcome) {
        (Some(step), _) => format!("refused:{}", step.as_str()),
        (None, Some(o)) => o.as_str().to_owned(),
        (None, None) => "-".to_owned(),
    };
    vec![
        e.index.to_string(),
        short_source,
        e.seq.to_string(),
        nitrile_audit::format_time(r.time),
        r.kind.as_str().to_owned(),
        r.principal
            .map_or_else(|| "-".to_owned(), |p| p.to_string()),
        join(r.operations.iter().map(ToString::to_string).collect()),
        join(r.resources.iter().map(ToString::to_string).collect()),
        result,
    ]
}

const TAIL_HEADER: [&str; 9] = [
    "INDEX",
    "SOURCE",
    "SEQ",
    "TIME",
    "KIND",
    "PRINCIPAL",
    "OPERATIONS",
    "RESOURCES",
    "RESULT",
];

fn print_entries(entries: &[EntryBody], output: Output, header: bool) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json_lines(entries)?,
        Output::Table => {
            let rows: Vec<Vec<String>> = entries.iter().map(row).collect();
            if header {
                print_table(&TAIL_HEADER, &rows)?;
            } else {
                print_rows(&rows)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn tail(args: TailArgs, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let verifier = log_verifier(Some(&loaded), args.log_key.as_deref())?;
    let witnesses = witness_verifiers(Some(&loaded))?;
    let anchors = Anchors::open(&args.anchor)?;
    let output = global.output;
    block_on(async move {
        let mut reader = crate::logapi::connect(&loaded).await?;
        let check = Checker {
            anchors: &anchors,
            log: &verifier,
            witnesses: &witnesses,
        };
        check.latest(&mut reader).await?;
        let cell = reader.cell().to_string();
        let (p, h) = (args.principal.as_deref(), args.host.as_deref());
        let mut kept: VecDeque<EntryBody> = VecDeque::new();
        let mut next = 0;
        reader
            .read_entries(&mut next, |e| {
                if matches(&e, &cell, p, h) && args.lines != Some(0) {
                    kept.push_back(e);
                    if args.lines.is_some_and(|n| kept.len() > n) {
                        kept.pop_front();
                    }
                }
            })
            .await?;
        print_entries(kept.make_contiguous(), output, true)?;
        if !args.follow {
            return anyhow::Ok(());
        }
        let signal = nitrile_net::shutdown_signal();
        tokio::pin!(signal);
        let mut polls = 0u32;
        loop {
            tokio::select! {
                () = &mut signal => return Ok(()),
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
            polls += 1;
            if polls.is_multiple_of(FOLLOW_CHECK_EVERY) {
                // A log cut or replaced while followed stops the follow.
                if check.latest(&mut reader).await.is_err() {
                    reader = crate::logapi::connect(&loaded).await?;
                    check.latest(&mut reader).await?;
                }
            }
            let mut fresh = Vec::new();
            let mut keep = |e: EntryBody| {
                if matches(&e, &cell, p, h) {
                    fresh.push(e);
                }
            };
            if reader.read_entries(&mut next, &mut keep).await.is_err() {
                // The token expired or the connection dropped: a new token
                // and connection, once.
                reader = crate::logapi::connect(&loaded).await?;
                reader.read_entries(&mut next, &mut keep).await?;
            }
            print_entries(&fresh, output, false)?;
        }
    })?
}

// ---------------------------------------------------------------- prove

/// What `prove --record` names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RecordId {
    /// A leaf index.
    Index(u64),
    /// A journal record: source `<kind>/<name>` and sequence number.
    Journal { source: String, seq: u64 },
}

fn parse_record_id(s: &str) -> Result<RecordId, UsageError> {
    if let Ok(i) = s.parse::<u64>() {
        return Ok(RecordId::Index(i));
    }
    let bad = || {
        UsageError(format!(
            "--record {s:?} is neither a log index nor <kind>/<name>:<seq> (e.g. host/h1:17)"
        ))
    };
    let (source, seq) = s.rsplit_once(':').ok_or_else(bad)?;
    let seq = seq.parse::<u64>().map_err(|_| bad())?;
    let (kind, name) = source.split_once('/').ok_or_else(bad)?;
    if kind.is_empty() || name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    Ok(RecordId::Journal {
        source: source.to_owned(),
        seq,
    })
}

#[derive(Serialize)]
struct Proven {
    ok: bool,
    index: u64,
    source: String,
    seq: u64,
    leaf_hash: String,
    tree_size: u64,
    root: String,
    proof_hashes: usize,
    witnessed_by: Vec<String>,
    remembered: Accepted,
    record: Option<serde_json::Value>,
}

pub(crate) fn prove(args: ProveArgs, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let id = parse_record_id(&args.record)?;
    let verifier = log_verifier(Some(&loaded), args.log_key.as_deref())?;
    let witnesses = witness_verifiers(Some(&loaded))?;
    let anchors = Anchors::open(&args.anchor)?;
    let origin = verifier.name().to_owned();
    let output = global.output;
    block_on(async move {
        let mut reader = crate::logapi::connect(&loaded).await?;
        let check = Checker {
            anchors: &anchors,
            log: &verifier,
            witnesses: &witnesses,
        };
        let cell = reader.cell().to_string();
        let index = match &id {
            RecordId::Index(i) => *i,
            RecordId::Journal { source, seq } => {
                let want = format!("nitrile://{cell}/{source}");
                let found = reader.find_record(&want, *seq).await?;
                found.with_context(|| {
                    format!(
                        "the log holds no record {seq} of {want} (yet); see `nitrile audit tail`"
                    )
                })?
            }
        };
        // The checkpoint that covers it (checkpoints follow within an interval).
        let deadline = tokio::time::Instant::now() + PROVE_WAIT;
        let (cp, anchored) = loop {
            let note = reader.checkpoint().await?;
            let cp = match &note {
                Some(n) => Some(
                    open_checkpoint(n, &origin, &verifier)
                        .context("logd's checkpoint does not verify against the log key")?,
                ),
                None => None,
            };
            // Each checkpoint seen is held against the remembered one: a
            // log cut short or replaced is refused at once.
            let anchored = check.remote(&mut reader, note.as_deref()).await?;
            match cp {
                Some(cp) if cp.size > index => break (cp, anchored),
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Some(cp) => anyhow::bail!(
                    "record {index} is not covered by a checkpoint yet (the latest has {} \
                     records); try again in a moment",
                    cp.size
                ),
                None => {
                    anyhow::bail!("logd has published no checkpoint yet; try again in a moment")
                }
            }
        };
        let proven = reader.prove(index, &cp).await?;
        let (leaf, proof) = (proven.leaf, proven.proof);
        if let RecordId::Journal { source, seq } = &id
            && (leaf.source != format!("nitrile://{cell}/{source}") || leaf.seq != *seq)
        {
            anyhow::bail!(
                "leaf {index} is record {} of {}, not the one asked for",
                leaf.seq,
                leaf.source
            );
        }
        let proven = Proven {
            ok: true,
            index,
            source: leaf.source.clone(),
            seq: leaf.seq,
            leaf_hash: hex::encode(proven.leaf_hash),
            tree_size: cp.size,
            root: hex::encode(cp.root),
            proof_hashes: proof.len(),
            witnessed_by: anchored.witnessed_by.clone(),
            remembered: anchored.accepted.clone(),
            record: serde_json::from_slice(&leaf.payload).ok(),
        };
        match output {
            Output::Json => print_json(&proven)?,
            Output::Table => {
                outln!(
                    "OK: record {index} ({} seq {}) is in the log",
                    leaf.source,
                    leaf.seq
                )?;
                print_pairs(&[
                    ("index".into(), index.to_string()),
                    ("source".into(), leaf.source),
                    ("seq".into(), leaf.seq.to_string()),
                    ("leaf hash".into(), proven.leaf_hash.clone()),
                    ("checkpoint".into(), format!("{origin} size {}", cp.size)),
                    ("root".into(), proven.root.clone()),
                    (
                        "proof".into(),
                        format!("{} hashes, verified locally", proof.len()),
                    ),
                    (
                        "witnessed by".into(),
                        anchored.witnessed_text(witnesses.len()),
                    ),
                    ("remembered".into(), anchored.accepted.describe()),
                ])?;
            }
        }
        anyhow::Ok(())
    })?
}

// ---------------------------------------------------------------- verify

/// A progress bar of a fetch of the whole log on standard error when it
/// is a terminal; nothing when it is piped.
#[derive(Default)]
struct FetchBar(Option<Progress>);

impl FetchProgress for FetchBar {
    fn start(&mut self, objects: u64) {
        self.0 = Some(Progress::new(
            objects,
            "{msg:24} [{bar:30}] {pos}/{len} tiles and bundles, {eta} left",
            "checkpoints",
        ));
    }

    fn message(&mut self, text: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(text);
        }
    }

    fn advance(&mut self) {
        if let Some(bar) = &self.0 {
            bar.inc(1);
        }
    }
}

impl Drop for FetchBar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

#[derive(Serialize)]
struct Verified {
    ok: bool,
    origin: String,
    source: String,
    size: u64,
    root: String,
    checkpoints: u64,
    bundles: u64,
    tiles: u64,
    journals: usize,
    records: u64,
    witnessed_by: Vec<String>,
    remembered: Accepted,
}

#[derive(Serialize)]
struct NotVerified {
    ok: bool,
    origin: String,
    source: String,
    path: String,
    index: Option<u64>,
    error: String,
}

pub(crate) fn verify(args: VerifyArgs, global: &Global) -> anyhow::Result<()> {
    let output = global.output;
    let anchors = Anchors::open(&args.anchor)?;
    if let Some(conninfo) = &args.postgres {
        return verify_postgres(conninfo, &args, &anchors, global);
    }
    let (verifier, witnesses, source, result, anchored) = match &args.store {
        Some(dir) => {
            let loaded = crate::config::load(global).ok();
            let dir = store_dir(dir);
            let verifier = match (
                &args.log_key,
                loaded.as_ref().and_then(|l| l.config.log_vkey.as_ref()),
            ) {
                (None, None) => {
                    let beside = [dir.join("log.vkey"), dir.join("../log.vkey")]
                        .into_iter()
                        .find(|p| p.exists());
                    log_verifier(None, beside.as_deref())?
                }
                _ => log_verifier(loaded.as_ref(), args.log_key.as_deref())?,
            };
            let witnesses = witness_verifiers(loaded.as_ref())?;
            let storage = FileStorage::open(&dir)
                .with_context(|| format!("cannot open the log store {}", dir.display()))?;
            let result = audit_log(&storage, &verifier);
            let source = dir.display().to_string();
            let anchored = result.is_ok().then(|| {
                Checker {
                    anchors: &anchors,
                    log: &verifier,
                    witnesses: &witnesses,
                }
                .stored(&storage, &source)
            });
            (verifier, witnesses, source, result, anchored)
        }
        None => {
            let loaded: Loaded = crate::config::load(global)?;
            let verifier = log_verifier(Some(&loaded), args.log_key.as_deref())?;
            let witnesses = witness_verifiers(Some(&loaded))?;
            let source = loaded.config.endpoints.logd.clone().unwrap_or_default();
            let (result, anchored) = block_on(async {
                let mut reader = crate::logapi::connect(&loaded).await?;
                let mem = fetch_log(&mut reader, &mut FetchBar::default()).await?;
                let result = audit_log(&mem, &verifier);
                let anchored = match &result {
                    Ok(_) => {
                        let note = mem
                            .read("checkpoint")?
                            .map(String::from_utf8)
                            .transpose()
                            .context("logd's checkpoint is not text")?;
                        let check = Checker {
                            anchors: &anchors,
                            log: &verifier,
                            witnesses: &witnesses,
                        };
                        Some(check.remote(&mut reader, note.as_deref()).await)
                    }
                    Err(_) => None,
                };
                anyhow::Ok((result, anchored))
            })??;
            (
                verifier,
                witnesses,
                format!("logd at {source}"),
                result,
                anchored,
            )
        }
    };
    report(
        &verifier,
        witnesses.len(),
        &source,
        result,
        anchored,
        output,
    )
}

/// `audit verify --postgres`: the whole-log audit over the rows of the log
/// in the database.
fn verify_postgres(
    conninfo: &str,
    args: &VerifyArgs,
    anchors: &Anchors,
    global: &Global,
) -> anyhow::Result<()> {
    // Parsed by logd's own parser: never echoed, only its host and database.
    let conninfo = nitrile_logclient::Conninfo::new(conninfo)
        .map_err(|e| UsageError(format!("--postgres: {e}")))?;
    if conninfo.has_password() {
        return Err(UsageError(
            "--postgres holds a password, and nothing secret goes on a command line: connect              over the unix socket with peer or trust authentication"
                .into(),
        )
        .into());
    }
    let loaded = crate::config::load(global).ok();
    let verifier = log_verifier(loaded.as_ref(), args.log_key.as_deref())?;
    let witnesses = witness_verifiers(loaded.as_ref())?;
    let log_name = match (&args.log_name, &loaded) {
        (Some(n), _) => n.clone(),
        (None, Some(l)) => l.config.cell.as_str().to_owned(),
        (None, None) => {
            return Err(UsageError(
                "no log name: pass --log-name NAME (logd's `[storage] log_name`, else its cell)"
                    .into(),
            )
            .into());
        }
    };
    let source = format!("log `{log_name}` in PostgreSQL {}", conninfo.target());
    let storage = nitrile_tlog::PgStorage::connect(conninfo.danger_full_text(), &log_name)
        .with_context(|| format!("cannot open {source}"))?;
    // An empty log verifies; a mistyped log name must not.
    let objects = storage
        .list("")
        .with_context(|| format!("cannot read {source}"))?;
    if objects.is_empty() {
        anyhow::bail!("there is no {source} (is --log-name right?)");
    }
    let result = audit_log(&storage, &verifier);
    let anchored = result.is_ok().then(|| {
        Checker {
            anchors,
            log: &verifier,
            witnesses: &witnesses,
        }
        .stored(&storage, &source)
    });
    report(
        &verifier,
        witnesses.len(),
        &source,
        result,
        anchored,
        global.output,
    )
}

/// Reports the audit of a log and, when it passed, what the auditor's
/// memory made of its latest checkpoint (`anchored`, present exactly when
/// the audit passed); `witnesses` is how many witness keys the client
/// config names.
fn report(
    verifier: &NoteVerifier,
    witnesses: usize,
    source: &str,
    result: Result<AuditedLog, AuditFailure>,
    anchored: Option<anyhow::Result<Anchored>>,
    output: Output,
) -> anyhow::Result<()> {
    let origin = verifier.name().to_owned();
    match result {
        Ok(audited) => {
            let r = &audited.tree;
            let anchored = match anchored {
                Some(Ok(a)) => a,
                Some(Err(e)) => {
                    if output == Output::Json {
                        print_json(&NotVerified {
                            ok: false,
                            origin,
                            source: source.to_owned(),
                            path: "checkpoint".to_owned(),
                            index: None,
                            error: format!("{e:#}"),
                        })?;
                    }
                    return Err(e);
                }
                None => anyhow::bail!("the checkpoint of {source} was not checked"),
            };
            match output {
                Output::Json => print_json(&Verified {
                    ok: true,
                    origin,
                    source: source.to_owned(),
                    size: r.size,
                    root: hex::encode(r.root),
                    checkpoints: r.checkpoints,
                    bundles: r.bundles,
                    tiles: r.tiles,
                    journals: audited.journals,
                    records: audited.records,
                    witnessed_by: anchored.witnessed_by,
                    remembered: anchored.accepted,
                })?,
                Output::Table => {
                    outln!("OK: the log {origin} ({source}) verifies")?;
                    print_pairs(&[
                        ("size".into(), r.size.to_string()),
                        ("root".into(), hex::encode(r.root)),
                        ("checkpoints".into(), format!("{} verified", r.checkpoints)),
                        ("entry bundles".into(), r.bundles.to_string()),
                        ("hash tiles".into(), r.tiles.to_string()),
                        (
                            "journals".into(),
                            format!(
                                "{} replayed through the log ({} records, each once, in order)",
                                audited.journals, audited.records
                            ),
                        ),
                        ("witnessed by".into(), anchored.witnessed_text(witnesses)),
                        ("remembered".into(), anchored.accepted.describe()),
                    ])?;
                }
            }
            Ok(())
        }
        Err(f) => {
            if output == Output::Json {
                print_json(&NotVerified {
                    ok: false,
                    origin: origin.clone(),
                    source: source.to_owned(),
                    path: f.path.clone(),
                    index: f.index,
                    error: error_chain(&f),
                })?;
            }
            let at = match f.index {
                Some(i) => format!("{} (entry {i})", f.path),
                None => f.path.clone(),
            };
            anyhow::bail!(
                "the log {origin} ({source}) does NOT verify: at {at}: {}",
                error_chain(&f.problem)
            )
        }
    }
}

// ---------------------------------------------------------------- alerts

/// Arguments of `nitrile audit alerts`.
#[derive(Debug, clap::Args)]
pub(crate) struct AlertsArgs {
    /// List only the alerts raised (or raised again) after this cursor.
    #[arg(long, value_name = "CURSOR", default_value_t = 0)]
    after: u64,
}

pub(crate) fn alerts(args: AlertsArgs, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let output = global.output;
    block_on(async move {
        let mut reader = crate::logapi::connect(&loaded).await?;
        let alerts = reader.alerts(args.after).await?;
        match output {
            Output::Json => print_json(&alerts)?,
            Output::Table => {
                let rows: Vec<Vec<String>> = alerts
                    .iter()
                    .map(|a| {
                        vec![
                            a.cursor.to_string(),
                            a.time.clone(),
                            a.count.to_string(),
                            a.alert.clone(),
                            a.kind.as_str().to_owned(),
                            a.source.clone().unwrap_or_else(|| "-".into()),
                            a.principal.clone().unwrap_or_else(|| "-".into()),
                            a.message.clone(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "CURSOR",
                        "TIME",
                        "COUNT",
                        "ALERT",
                        "KIND",
                        "SOURCE",
                        "PRINCIPAL",
                        "MESSAGE",
                    ],
                    &rows,
                )?;
            }
        }
        anyhow::Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_indexes_or_journal_records() {
        assert_eq!(parse_record_id("17").unwrap(), RecordId::Index(17));
        assert_eq!(
            parse_record_id("host/h1:17").unwrap(),
            RecordId::Journal {
                source: "host/h1".into(),
                seq: 17
            }
        );
        for bad in [
            "",
            "h1:17",
            "host/h1",
            "host/h1:x",
            "/h1:1",
            "host/:1",
            "a/b/c:1",
            "-1",
        ] {
            assert!(parse_record_id(bad).is_err(), "{bad}");
        }
    }
}
