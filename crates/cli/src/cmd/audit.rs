//! `nitrile audit`: check and read local audit journals, read and verify
//! the cell's transparency log (as an auditor), and run a witness.

use std::collections::VecDeque;
use std::path::PathBuf;

use anyhow::Context;
use nitrile_audit::{JournalEntry, JournalError, JournalReader, verify_journal};
use serde::Serialize;

use crate::Global;
use crate::output::{Output, outln, print_json, print_json_lines, print_table};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Verify a journal file: header, contiguous sequence numbers and the hash
    /// chain. Prints the record count, last sequence number and head hash;
    /// exits 1 naming the offset and record where the journal breaks.
    ///
    /// Example: `nitrile audit verify-journal /var/lib/nitrile/journal -o json`
    VerifyJournal {
        /// The journal file.
        file: PathBuf,
    },
    /// Print a journal's records (verifying the chain as it reads), as a
    /// table or, with `-o json`, as one JSON object per line.
    ///
    /// Example: `nitrile audit show-journal /var/lib/nitrile/journal --tail 20`
    ShowJournal {
        /// The journal file.
        file: PathBuf,
        /// Print only the last N records.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Print the records of the cell's audit log (needs the auditor
    /// entitlement: an `audit.read` token for `log/<cell>`; the read is
    /// itself logged), as a table or, with `-o json`, one JSON object per
    /// line. The log's checkpoint is first checked like `audit verify`
    /// does (signature, witness, consistency with the one remembered),
    /// and again every few seconds with `--follow`.
    ///
    /// Example: `nitrile audit tail --principal operator/alice -n 20 --follow`
    Tail(super::auditlog::TailArgs),
    /// Prove that a record is in the audit log: fetch the signed checkpoint,
    /// the record's entry bundle and its inclusion proof, and verify them
    /// here against the log's key; the checkpoint must be consistent with
    /// the one this auditor remembers (see `audit verify`). Prints OK and
    /// the details, or exits 1.
    ///
    /// Example: `nitrile audit prove --record host/h1:17`
    Prove(super::auditlog::ProveArgs),
    /// Verify the whole audit log: fetch every entry bundle and hash tile,
    /// the latest checkpoint and every one published before it from logd
    /// (or read a log directory with `--store`, or a log kept in
    /// PostgreSQL with `--postgres`), recompute the tree, check every
    /// checkpoint's signature, root and consistency and every tile. Exits 1
    /// naming the path and entry where it breaks.
    ///
    /// The auditor remembers the last checkpoint it verified of each log
    /// (in --state-dir, by default $XDG_STATE_HOME/nitrile or
    /// ~/.local/state/nitrile) and refuses, exit 1, a log whose checkpoint
    /// is not that one or a larger tree a verified consistency proof links
    /// to it: a log cut short, rewritten, or deleted and started anew. When
    /// the client config names witness keys (`witness_vkeys`), the latest
    /// checkpoint must carry a cosignature of one of them.
    ///
    /// Examples: `nitrile audit verify`,
    /// `nitrile audit verify --store ./nitrile-state/logd/log`,
    /// `nitrile audit verify --postgres "host=/run/postgresql dbname=nitrile"`
    Verify(super::auditlog::VerifyArgs),
    /// Forget the checkpoint this auditor remembers of a log (under any
    /// key), so that its next verification is a first use again. Only for
    /// a log reset on purpose (e.g. a development cell started anew): a
    /// log that was cut or rewritten is evidence.
    ///
    /// Example: `nitrile audit forget --log local.nitrile/log`
    Forget(super::auditlog::ForgetArgs),
    /// Print the integrity and monitor alerts the audit log service raised.
    ///
    /// Repeats of an alert (same kind, subject and topic) are one line with
    /// their COUNT, FIRST and last TIME. The list is read from logd page by
    /// page, oldest first, so no alert is cut off however many there are; an
    /// alert raised again moves to the end. CURSOR says where each line is:
    /// `--after CURSOR` lists only what was raised after it.
    ///
    /// Example: `nitrile audit alerts -o json`, `nitrile audit alerts --after 42`
    Alerts(super::auditlog::AlertsArgs),
    /// Run a checkpoint witness (C2SP tlog-witness), or make its key.
    ///
    /// Example: `nitrile audit witness --config witness.toml`
    Witness(super::witness::Args),
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    match command {
        Command::VerifyJournal { file } => verify(&file, global.output),
        Command::ShowJournal { file, tail } => show(&file, tail, global.output),
        Command::Tail(a) => super::auditlog::tail(a, global),
        Command::Prove(a) => super::auditlog::prove(a, global),
        Command::Verify(a) => super::auditlog::verify(a, global),
        Command::Forget(a) => super::auditlog::forget(a, global),
        Command::Alerts(a) => super::auditlog::alerts(a, global),
        Command::Witness(a) => super::witness::run(a, global),
    }
}

#[derive(Serialize)]
struct VerifyFailure {
    ok: bool,
    file: String,
    error: String,
    offset: Option<u64>,
    seq: Option<u64>,
}

fn verify(file: &PathBuf, output: Output) -> anyhow::Result<()> {
    match verify_journal(file) {
        Ok(report) => match output {
            Output::Json => {
                #[derive(Serialize)]
                struct Ok<'a> {
                    ok: bool,
                    file: String,
                    #[serde(flatten)]
                    report: &'a nitrile_audit::VerifyReport,
                }
                print_json(&Ok {
                    ok: true,
                    file: file.display().to_string(),
                    report: &report,
                })
            }
            Output::Table => {
                outln!("journal:   {}", file.display())?;
                outln!("source:    {}", report.source)?;
                outln!("id:        {}", report.journal_id)?;
                outln!("records:   {}", report.records)?;
                outln!("last seq:  {}", report.last_seq)?;
                outln!("head hash: {}", report.head_hash)?;
                outln!("verified:  ok")?;
                Ok(())
            }
        },
        Err(e) => {
            if output == Output::Json {
                print_json(&VerifyFailure {
                    ok: false,
                    file: file.display().to_string(),
                    error: format_chain(&e),
                    offset: e.offset(),
                    seq: e.seq(),
                })?;
            }
            Err(e).with_context(|| format!("journal {} does not verify", file.display()))
        }
    }
}

fn format_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Serialize)]
struct Line {
    seq: u64,
    offset: u64,
    hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<nitrile_audit::AuditRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_error: Option<String>,
}

fn show(file: &PathBuf, tail: Option<usize>, output: Output) -> anyhow::Result<()> {
    let reader = JournalReader::open(file)
        .with_context(|| format!("cannot read journal {}", file.display()))?;
    let mut kept: VecDeque<JournalEntry> = VecDeque::new();
    let mut failure: Option<JournalError> = None;
    for item in reader {
        match item {
            Ok(entry) => {
                if tail == Some(0) {
                    continue;
                }
                kept.push_back(entry);
                if tail.is_some_and(|n| kept.len() > n) {
                    kept.pop_front();
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    match output {
        Output::Json => {
            print_json_lines(kept.iter().map(|e| {
                let (record, err) = match e.record() {
                    Ok(r) => (Some(r), None),
                    Err(err) => (None, Some(format_chain(&err))),
                };
                Line {
                    seq: e.seq,
                    offset: e.offset,
                    hash: e.hash.to_string(),
                    payload_hex: record.is_none().then(|| hex_of(&e.payload)),
                    record,
                    decode_error: err,
                }
            }))?;
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = kept.iter().map(row).collect();
            print_table(
                &[
                    "SEQ",
                    "TIME",
                    "KIND",
                    "REQUEST",
                    "PRINCIPAL",
                    "OPERATIONS",
                    "RESOURCES",
                    "RESULT",
                    "REASON",
                ],
                &rows,
            )?;
        }
    }
    match failure {
        None => Ok(()),
        Some(e) => Err(e).with_context(|| {
            format!(
                "journal {} does not verify past the records shown",
                file.display()
            )
        }),
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn row(e: &JournalEntry) -> Vec<String> {
    let Ok(r) = e.record() else {
        return vec![
            e.seq.to_string(),
            "-".into(),
            format!("(not an audit record, {} bytes)", e.payload.len()),
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
        e.seq.to_string(),
        nitrile_audit::format_time(r.time),
        r.kind.as_str().to_owned(),
        r.request_id.to_string()[..8].to_owned(),
        r.principal
            .map_or_else(|| "-".to_owned(), |p| p.to_string()),
        join(r.operations.iter().map(ToString::to_string).collect()),
        join(r.resources.iter().map(ToString::to_string).collect()),
        result,
        r.reason.unwrap_or_else(|| "-".to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../audit/testdata/v1-three-records.journal"
    );

    #[test]
    fn verify_and_show_accept_a_good_journal() {
        let path = PathBuf::from(VECTOR);
        verify(&path, Output::Json).unwrap();
        verify(&path, Output::Table).unwrap();
        show(&path, Some(1), Output::Json).unwrap();
        show(&path, None, Output::Table).unwrap();
    }

    #[test]
    fn verify_and_show_fail_on_a_damaged_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut bytes = std::fs::read(VECTOR).unwrap();
        let last = bytes.len() - 40;
        bytes[last] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let err = verify(&path, Output::Json).unwrap_err();
        let root = err.downcast_ref::<JournalError>().unwrap();
        assert_eq!(root.seq(), Some(3));
        assert!(show(&path, None, Output::Table).is_err());
    }
}
