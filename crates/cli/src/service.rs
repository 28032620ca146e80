//! What every service verb shares: logging and the async runtime.
//!
//! Log lines carry strings from peers (a journal source, a refused path, a
//! peer's error): they reach the terminal escaped like everything else the
//! binary prints (see `crate::output`). In the text format every field
//! value and the message are escaped by [`EscapedFields`] (the level,
//! target and time are ours, and keep their colours); in the JSON format
//! `serde_json` escapes C0 controls and [`crate::output::JsonSafeWriter`]
//! the rest.

use std::future::Future;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::util::SubscriberInitExt;

use crate::output::{self, Stream};

/// How services write their log lines (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The fields of a text log line (the message, `key=value` pairs, span
/// fields) as `tracing-subscriber` formats them, then escaped with
/// [`output::escape`]: a newline or an escape sequence in a value cannot
/// start a line or act on the terminal.
#[derive(Debug, Default)]
pub(crate) struct EscapedFields(DefaultFields);

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut raw = String::new();
        self.0.format_fields(Writer::new(&mut raw), fields)?;
        writer.write_str(&output::escape(&raw))
    }
}

/// A [`MakeWriter`] of [`output::JsonSafeWriter`]s around `M`'s writers.
struct JsonSafe<M>(M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for JsonSafe<M> {
    type Writer = output::JsonSafeWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        output::JsonSafeWriter(self.0.make_writer())
    }
}

/// The subscriber of `format` writing to `make_writer`, with colours when
/// `ansi` (text format only).
fn subscriber<W>(
    format: LogFormat,
    ansi: bool,
    filter: tracing_subscriber::EnvFilter,
    make_writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => Box::new(
            builder
                .fmt_fields(EscapedFields::default())
                .with_ansi(ansi)
                .with_writer(make_writer)
                .finish(),
        ),
        LogFormat::Json => Box::new(builder.json().with_writer(JsonSafe(make_writer)).finish()),
    }
}

/// Starts structured logging to stderr; `RUST_LOG` overrides the level
/// (default `info`).
pub(crate) fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::env::var_os("NO_COLOR").is_none() && Stream::Stderr.is_terminal();
    // Also routes the `log` records of dependencies (rustls) here.
    let _ = subscriber(format, ansi, filter, output::log_stderr).try_init();
}

/// Runs `f` on a multi-threaded tokio runtime.
pub(crate) fn block_on<F: Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// Asks for SIGTERM when the supervisor `parent` (the process that started
/// this one) exits, and fails if it is already gone: a service started by
/// `nitrile up` does not outlive it.
pub(crate) fn exit_with_parent(parent: i32) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Set first, then check: a parent that died in between is seen by the
    // check.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("cannot ask for a signal when the parent exits")?;
    if nix::unistd::getppid().as_raw() != parent {
        anyhow::bail!("the supervisor (pid {parent}) is gone; not starting");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    /// A peer's string: an OSC title, a screen clear, a fake next line, a
    /// right-to-left override, a C1 CSI.
    const EVIL: &str = "\x1b]0;pwned\x07\x1b[2J\nFAKE LINE\u{202e}\u{9b}";

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_evil(format: LogFormat, ansi: bool) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let sub = subscriber(
            format,
            ansi,
            tracing_subscriber::EnvFilter::new("info"),
            move || writer.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("ingest", source = %EVIL);
            let _entered = span.enter();
            tracing::warn!(path = %EVIL, debug = ?EVIL, "refused {}", EVIL);
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_log_lines_escape_what_peers_put_in_fields_and_messages() {
        for ansi in [false, true] {
            let text = log_evil(LogFormat::Text, ansi);
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(!text.contains("\x07"), "{text}");
            assert!(
                !text.contains('\u{202e}') && !text.contains('\u{9b}'),
                "{text}"
            );
            assert!(text.contains("pwned"), "{text}");
            if !ansi {
                assert!(!text.contains('\x1b'), "{text}");
            } else {
                // Only the colours of level and target are escape sequences.
                assert!(
                    !text.contains("\x1b]") && !text.contains("\x1b[2J"),
                    "{text}"
                );
            }
            assert!(text.contains("\\u{202e}"), "{text}");
        }
    }

    #[test]
    fn json_log_lines_stay_json_with_no_control_character() {
        let text = log_evil(LogFormat::Json, false);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            !text.trim_end_matches('\n').chars().any(output::is_unsafe),
            "{text}"
        );
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["fields"]["path"], EVIL, "{line}");
        assert_eq!(line["span"]["source"], EVIL, "{line}");
    }
}
