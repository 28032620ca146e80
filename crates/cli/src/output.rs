//! Everything the `nitrile` binary prints, and how: tables, key/value
//! pairs and lines for people, JSON for scripts, progress and prompts on
//! standard error, error messages and service log lines.
//!
//! What this module guarantees:
//!
//! - **It is the only way out.** `crates/cli/clippy.toml` disallows
//!   `println!`, `print!`, `eprintln!`, `eprint!`, `std::io::stdout`,
//!   `std::io::stderr` and indicatif's progress bars everywhere else in the
//!   crate, so every byte that reaches standard output or standard error
//!   passes through a function below.
//! - **Text for people is escaped, always.** Strings from outside (requests,
//!   journals, logs, peers, files, echoed arguments) may hold control
//!   characters; [`escape`] makes each one visible instead of letting it act
//!   on the terminal: C0 controls (`\t`, `\n`, `\r`, `\x1b`, ...), DEL
//!   (`\x7f`), C1 controls (`\u{9b}`, ...), and the invisible formatting
//!   characters of Unicode (general category Cf: bidi overrides and
//!   isolates, zero-width characters, ...; and the line and paragraph
//!   separators), e.g. `\u{202e}`. Every line, table cell, pair and error
//!   message is escaped as a whole: our own text holds none of those
//!   characters, so escaping it changes nothing, and no call site has to
//!   tell which part came from outside. A newline is written only where this
//!   module ends a line, or between the lines of a multi-line text of our
//!   own ([`print_text`]). Escaping happens whether or not the stream is a
//!   terminal: output piped to a file or to `less -R` reaches a terminal
//!   later, and ordinary text (any other Unicode, multi-byte or not) is left
//!   as it is. A backslash is not escaped, so `\x1b` on screen is either the
//!   escaped byte or those four characters; it never acts on the terminal.
//!   Look-alike letters (homoglyphs) are not escaped: identities are checked
//!   names where they are parsed, not here. The zero-width joiner is
//!   escaped too, so an emoji sequence built with it shows as its parts.
//! - **JSON stays JSON.** `-o json` output is serialized by `serde_json`,
//!   which escapes C0 controls, `"` and `\`; [`json_safe`] then writes DEL,
//!   C1 controls and the invisible formatting characters as `\uXXXX`
//!   escapes. A JSON parser reads back exactly the string that was sent, and
//!   a terminal that shows the JSON sees no control character.
//! - **A failed write is an error, never a panic.** Every function returns
//!   [`OutputError`] when a write fails; a reader that went away (a closed
//!   pipe, `nitrile audit tail | head`) is [`OutputError::is_closed`], and
//!   `main` ends the program then without a message, with status
//!   [`EXIT_CLOSED_PIPE`]. Progress bars and the [`Spinner`] ignore failed
//!   writes: they only decorate.

#![allow(clippy::disallowed_macros, clippy::disallowed_methods)]

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io::{self, IsTerminal, Write};

use serde::Serialize;

/// Exit status after a write to a closed pipe: 128 + SIGPIPE, the status a
/// shell reports for `git log | head` or `yes | head` (which die of the
/// signal). Not 0: the output the verb meant to give was not all read, and
/// `set -o pipefail` scripts see it as they see git's.
pub(crate) const EXIT_CLOSED_PIPE: u8 = 141;

/// How a client verb prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// Human-readable table or text.
    Table,
    /// JSON with stable field names.
    Json,
}

/// Standard output or standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// Data: what scripts read.
    Stdout,
    /// Diagnostics, progress, prompts and errors.
    Stderr,
}

impl Stream {
    /// Whether it is a terminal.
    pub(crate) fn is_terminal(self) -> bool {
        match self {
            Self::Stdout => io::stdout().is_terminal(),
            Self::Stderr => io::stderr().is_terminal(),
        }
    }
}

/// A write to standard output or standard error failed.
#[derive(Debug)]
pub(crate) struct OutputError {
    stream: Stream,
    source: io::Error,
}

impl OutputError {
    /// Whether the reader went away (the pipe is closed): not worth a
    /// message, and there is nowhere to write one.
    pub(crate) fn is_closed(&self) -> bool {
        self.source.kind() == io::ErrorKind::BrokenPipe
    }

    /// The stream that failed.
    pub(crate) fn stream(&self) -> Stream {
        self.stream
    }
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.stream {
            Stream::Stdout => "cannot write to standard output",
            Stream::Stderr => "cannot write to standard error",
        })
    }
}

impl std::error::Error for OutputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether `e` (or an error it wraps) is a write to a closed pipe.
pub(crate) fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<OutputError>()
            .is_some_and(OutputError::is_closed)
    })
}

// ------------------------------------------------------------ escaping

/// Characters that are not control characters but act invisibly: Unicode
/// general category Cf (bidi marks, embeddings, overrides and isolates,
/// zero-width space and joiners, invisible operators, the byte order mark,
/// interlinear annotations, tags, ...), plus the line and paragraph
/// separators (U+2028, U+2029), as inclusive ranges.
const INVISIBLE: &[(char, char)] = &[
    ('\u{ad}', '\u{ad}'),
    ('\u{600}', '\u{605}'),
    ('\u{61c}', '\u{61c}'),
    ('\u{6dd}', '\u{6dd}'),
    ('\u{70f}', '\u{70f}'),
    ('\u{890}', '\u{891}'),
    ('\u{8e2}', '\u{8e2}'),
    ('\u{180e}', '\u{180e}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{2028}', '\u{202e}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{fff9}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0001}', '\u{e0001}'),
    ('\u{e0020}', '\u{e007f}'),
];

/// Whether `c` must not reach a terminal as it is: a C0 control, DEL, a
/// C1 control, or an invisible formatting character.
pub(crate) fn is_unsafe(c: char) -> bool {
    c.is_control() || INVISIBLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Writes the visible escape of `c`.
fn push_escape(out: &mut String, c: char) {
    let _ = match c {
        '\t' => out.write_str("\\t"),
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        c if c.is_ascii() => write!(out, "\\x{:02x}", u32::from(c)),
        c => write!(out, "\\u{{{:x}}}", u32::from(c)),
    };
}

/// `text` with every unsafe character (see [`is_unsafe`]) as a visible
/// escape, newlines included: one line stays one line. Ordinary text comes
/// back as it is, without a copy.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    escape_but(text, &[])
}

/// [`escape`], but newlines are kept: for a multi-line text of our own.
pub(crate) fn escape_keeping_newlines(text: &str) -> Cow<'_, str> {
    escape_but(text, &['\n'])
}

/// [`escape`], but the characters of `keep` are kept.
fn escape_but<'a>(text: &'a str, keep: &[char]) -> Cow<'a, str> {
    let unsafe_char = |c: char| is_unsafe(c) && !keep.contains(&c);
    let Some(first) = text.find(unsafe_char) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 16);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        if unsafe_char(c) {
            push_escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Serialized JSON with DEL, C1 controls and invisible formatting
/// characters written as `\uXXXX` escapes (surrogate pairs beyond the
/// BMP). In JSON text such characters can only stand inside strings
/// (everything outside is ASCII), where the escape means the same
/// character: a parser reads the same value. `serde_json` already escapes
/// C0 controls; a raw newline of pretty output is structure and stays.
pub(crate) fn json_safe(json: &str) -> Cow<'_, str> {
    let needs = |c: char| u32::from(c) >= 0x7f && is_unsafe(c);
    let Some(first) = json.find(needs) else {
        return Cow::Borrowed(json);
    };
    let mut out = String::with_capacity(json.len() + 16);
    out.push_str(&json[..first]);
    for c in json[first..].chars() {
        if needs(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`json_safe`] over bytes, for writers that get JSON in pieces (service
/// log lines); bytes that are not UTF-8 are written as they are.
pub(crate) fn json_safe_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    match std::str::from_utf8(bytes) {
        Ok(text) => match json_safe(text) {
            Cow::Borrowed(_) => Cow::Borrowed(bytes),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        },
        Err(_) => {
            let mut out = Vec::with_capacity(bytes.len());
            for chunk in bytes.utf8_chunks() {
                out.extend_from_slice(json_safe(chunk.valid()).as_bytes());
                out.extend_from_slice(chunk.invalid());
            }
            Cow::Owned(out)
        }
    }
}

// ------------------------------------------------------------ writing

/// Runs `f` on the locked stream, buffered, and flushes: the one place
/// that writes to standard output or standard error.
fn write_to(
    stream: Stream,
    f: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), OutputError> {
    let written = match stream {
        Stream::Stdout => {
            let mut out = io::BufWriter::new(io::stdout().lock());
            f(&mut out).and_then(|()| out.flush())
        }
        Stream::Stderr => {
            let mut err = io::BufWriter::new(io::stderr().lock());
            f(&mut err).and_then(|()| err.flush())
        }
    };
    written.map_err(|source| OutputError { stream, source })
}

/// Writes `text` escaped and a newline.
fn line_to(w: &mut dyn Write, text: &str) -> io::Result<()> {
    w.write_all(escape(text).as_bytes())?;
    w.write_all(b"\n")
}

/// One line, escaped (see [`escape`]); use [`outln!`] and [`errln!`].
pub(crate) fn line(stream: Stream, args: fmt::Arguments<'_>) -> Result<(), OutputError> {
    let text = match args.as_str() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(args.to_string()),
    };
    write_to(stream, |w| line_to(w, &text))
}

/// Prints one line on standard output, escaped as a whole (a newline in
/// it too); returns an [`OutputError`] when it cannot be written.
macro_rules! outln {
    () => {
        $crate::output::line($crate::output::Stream::Stdout, format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line($crate::output::Stream::Stdout, format_args!($($arg)*))
    };
}

/// Prints one line on standard error, escaped as a whole (a newline in it
/// too); returns an [`OutputError`] when it cannot be written.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::line($crate::output::Stream::Stderr, format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};

/// A multi-line text of our own (a schema, a config file, a completion
/// script): everything escaped but its newlines, written as it is
/// otherwise (no newline added).
pub(crate) fn print_text(stream: Stream, text: &str) -> Result<(), OutputError> {
    write_to(stream, |w| {
        w.write_all(escape_keeping_newlines(text).as_bytes())
    })
}

/// Help or version text of clap: our own text (no argument is echoed in
/// it), so written with its colours when `stream` is a terminal and
/// `NO_COLOR` is unset, plain otherwise; escaped but for newlines either
/// way when plain.
pub(crate) fn print_help(
    stream: Stream,
    help: &clap::builder::StyledStr,
) -> Result<(), OutputError> {
    if stream.is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        let styled = help.ansi().to_string();
        write_to(stream, |w| w.write_all(styled.as_bytes()))
    } else {
        print_text(stream, &help.to_string())
    }
}

/// `error: <message>` on standard error, escaped: the error chain holds
/// reasons from peers.
pub(crate) fn print_error(e: &anyhow::Error) -> Result<(), OutputError> {
    errln!("error: {e:#}")
}

/// A question on standard error without a newline, for an answer typed on
/// the same line.
pub(crate) fn prompt(args: fmt::Arguments<'_>) -> Result<(), OutputError> {
    let text = args.to_string();
    write_to(Stream::Stderr, |w| w.write_all(escape(&text).as_bytes()))
}

/// Prints `value` as pretty JSON on stdout (see [`json_safe`]).
pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_to(Stream::Stdout, |w| {
        w.write_all(json_safe(&text).as_bytes())?;
        w.write_all(b"\n")
    })?;
    Ok(())
}

/// Prints values as JSON lines on stdout, one compact object per line (see
/// [`json_safe`]), each written as it is serialized.
pub(crate) fn print_json_lines<T: Serialize>(
    values: impl IntoIterator<Item = T>,
) -> anyhow::Result<()> {
    let mut failed = None;
    write_to(Stream::Stdout, |w| {
        for v in values {
            match serde_json::to_string(&v) {
                Ok(line) => {
                    w.write_all(json_safe(&line).as_bytes())?;
                    w.write_all(b"\n")?;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        Ok(())
    })?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Writes rows as an aligned table with a header, every cell escaped.
fn table_to(w: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let header: Vec<Cow<'_, str>> = header.iter().map(|h| escape(h)).collect();
    let rows: Vec<Vec<Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|c| escape(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut line = |cells: &[Cow<'_, str>]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        w.write_all(s.trim_end().as_bytes())?;
        w.write_all(b"\n")
    };
    line(&header)?;
    for row in &rows {
        line(row)?;
    }
    Ok(())
}

/// Prints rows as an aligned table with a header on stdout, every cell
/// escaped.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<(), OutputError> {
    write_to(Stream::Stdout, |w| table_to(w, header, rows))
}

/// Prints rows without a header (more rows of a table already printed),
/// cells separated by two spaces, escaped.
pub(crate) fn print_rows(rows: &[Vec<String>]) -> Result<(), OutputError> {
    write_to(Stream::Stdout, |w| {
        for r in rows {
            line_to(w, &r.join("  "))?;
        }
        Ok(())
    })
}

/// Writes `key value` lines with the values aligned, escaped.
fn pairs_to(w: &mut dyn Write, pairs: &[(String, String)]) -> io::Result<()> {
    let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> =
        pairs.iter().map(|(k, v)| (escape(k), escape(v))).collect();
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in &pairs {
        writeln!(w, "{k:<width$}  {v}")?;
    }
    Ok(())
}

/// Prints `key value` lines with the values aligned on stdout, escaped.
pub(crate) fn print_pairs(pairs: &[(String, String)]) -> Result<(), OutputError> {
    write_to(Stream::Stdout, |w| pairs_to(w, pairs))
}

/// Writes a script that the caller made from our own definitions and that
/// a program reads (a shell completion script): everything escaped but its
/// newlines and tabs, so it reaches the shell unchanged.
pub(crate) fn print_script(script: &str) -> Result<(), OutputError> {
    let text = escape_but(script, &['\n', '\t']);
    write_to(Stream::Stdout, |w| w.write_all(text.as_bytes()))
}

/// A size in MiB for people: `256 MiB`, `1 GiB`, `1.5 GiB`.
pub(crate) fn format_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else if mib >= 1024 {
        format!("{:.1} GiB", mib as f64 / 1024.0)
    } else {
        format!("{mib} MiB")
    }
}

// ------------------------------------------------------------ services

/// A duplicate of standard error, for a child process to write to (the
/// host agent that `nitrile up` runs prints through its own copy of this
/// module).
pub(crate) fn stderr_fd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    io::stderr().as_fd().try_clone_to_owned()
}

/// Standard error for service log lines already escaped by the log
/// formatter (`crate::service`); see [`JsonSafeWriter`] for the JSON ones.
pub(crate) fn log_stderr() -> io::Stderr {
    io::stderr()
}

/// A writer of JSON log lines to standard error that applies [`json_safe`]
/// to what it is given (a whole line per write by `tracing-subscriber`).
#[derive(Debug)]
pub(crate) struct JsonSafeWriter<W>(pub(crate) W);

impl<W: Write> Write for JsonSafeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&json_safe_bytes(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

// ------------------------------------------------------------ progress

/// A progress bar on standard error when it is a terminal, nothing when it
/// is piped. Its messages are escaped; drawing never fails the work (a
/// failed draw is ignored by indicatif).
#[derive(Debug)]
pub(crate) struct Progress(indicatif::ProgressBar);

impl Progress {
    /// A bar of `len` steps drawn with the indicatif `template`, showing
    /// `message`.
    pub(crate) fn new(len: u64, template: &str, message: &str) -> Self {
        if !Stream::Stderr.is_terminal() {
            return Self(indicatif::ProgressBar::hidden());
        }
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(escape(message).into_owned());
        Self(bar)
    }

    /// Shows `message` (escaped).
    pub(crate) fn set_message(&self, message: &str) {
        self.0.set_message(escape(message).into_owned());
    }

    /// One more step done.
    pub(crate) fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Removes the bar.
    pub(crate) fn finish_and_clear(&self) {
        self.0.finish_and_clear();
    }
}

/// A line on stderr that turns while long work runs, only when stderr is a
/// terminal; nothing at all when it is piped. A failed write stops it
/// quietly.
#[derive(Debug)]
pub(crate) struct Spinner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    /// Starts turning next to `message` (escaped), if stderr is a terminal.
    pub(crate) fn start(message: &str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        if !Stream::Stderr.is_terminal() {
            return Self { stop, thread: None };
        }
        let message = escape(message).into_owned();
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let started = std::time::Instant::now();
            let mut i = 0;
            while !flag.load(Ordering::Relaxed) {
                let frame = format!(
                    "\r{} {message} ({}s)",
                    frames[i % frames.len()],
                    started.elapsed().as_secs()
                );
                if write_to(Stream::Stderr, |w| w.write_all(frame.as_bytes())).is_err() {
                    return;
                }
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(120));
            }
            // Clear the line.
            let _ = write_to(Stream::Stderr, |w| w.write_all(b"\r\x1b[2K"));
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an attacker would send: an OSC window title, a screen clear,
    /// a right-to-left override.
    const EVIL: &str = "\x1b]0;pwned\x07\x1b[2J\u{202e}";

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(format_mib(256), "256 MiB");
        assert_eq!(format_mib(1024), "1 GiB");
        assert_eq!(format_mib(1536), "1.5 GiB");
        assert_eq!(format_mib(4096), "4 GiB");
    }

    #[test]
    fn ordinary_text_is_untouched_and_not_copied() {
        for text in [
            "",
            "OK: the log local.nitrile/log (logd at 127.0.0.1:7445) verifies",
            "nitrile://local/operator/alice",
            "C:\\path\\x1b is a backslash, not an escape",
            "żółć Ωμέγα 日本語",
            "emoji 🎉 and math ∑",
        ] {
            let shown = escape(text);
            assert!(matches!(shown, Cow::Borrowed(_)), "{text}");
            assert_eq!(shown, text);
        }
    }

    #[test]
    fn every_c0_control_and_del_become_visible() {
        for b in (0u8..0x20).chain([0x7f]) {
            let c = char::from(b);
            let shown = escape(&format!("a{c}b")).into_owned();
            let want = match c {
                '\t' => "a\\tb".to_owned(),
                '\n' => "a\\nb".to_owned(),
                '\r' => "a\\rb".to_owned(),
                _ => format!("a\\x{b:02x}b"),
            };
            assert_eq!(shown, want);
        }
        assert_eq!(escape("\x1b[2J"), "\\x1b[2J");
        assert_eq!(escape("\x07"), "\\x07");
        assert_eq!(escape("\0"), "\\x00");
    }

    #[test]
    fn every_c1_control_becomes_visible() {
        for u in 0x80u32..=0x9f {
            let c = char::from_u32(u).unwrap();
            assert_eq!(escape(&c.to_string()), format!("\\u{{{u:x}}}"));
        }
        // CSI as one 8-bit control: ESC [ without the ESC.
        assert_eq!(escape("\u{9b}2J"), "\\u{9b}2J");
    }

    #[test]
    fn bidi_and_invisible_formatting_characters_become_visible() {
        for c in [
            '\u{61c}',
            '\u{200e}',
            '\u{200f}',
            '\u{202a}',
            '\u{202b}',
            '\u{202c}',
            '\u{202d}',
            '\u{202e}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{200b}',
            '\u{200d}',
            '\u{2060}',
            '\u{feff}',
            '\u{ad}',
            '\u{2028}',
            '\u{2029}',
            '\u{e0041}',
        ] {
            let shown = escape(&format!("x{c}y")).into_owned();
            assert_eq!(shown, format!("x\\u{{{:x}}}y", u32::from(c)));
        }
    }

    #[test]
    fn multi_byte_text_around_escapes_is_kept_whole() {
        let text = format!("żółć{EVIL}日本語\u{9b}🎉");
        let shown = escape(&text).into_owned();
        assert_eq!(
            shown,
            "żółć\\x1b]0;pwned\\x07\\x1b[2J\\u{202e}日本語\\u{9b}🎉"
        );
        assert!(!shown.chars().any(is_unsafe));
        // Escaping what is escaped changes nothing.
        assert_eq!(escape(&shown), shown);
    }

    #[test]
    fn newlines_stay_only_where_asked() {
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape_keeping_newlines("a\nb\x1b\n"), "a\nb\\x1b\n");
    }

    #[test]
    fn json_keeps_its_value_and_loses_its_controls() {
        let value = serde_json::json!({ "source": EVIL, "del\u{7f}": "c1\u{85} tag\u{e0041}" });
        let raw = serde_json::to_string_pretty(&value).unwrap();
        // serde_json alone lets the override, DEL, C1 and tags through.
        assert!(raw.contains('\u{202e}') && raw.contains('\u{85}'));
        let safe = json_safe(&raw).into_owned();
        assert!(!safe.chars().any(|c| c != '\n' && is_unsafe(c)), "{safe}");
        assert!(safe.contains("\\u202e") && safe.contains("\\udb40\\udc41"));
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
        // Ordinary JSON is not copied.
        assert!(matches!(json_safe("{\"a\": \"żółć\"}"), Cow::Borrowed(_)));
        assert_eq!(&*json_safe_bytes(raw.as_bytes()), safe.as_bytes());
    }

    #[test]
    fn tables_escape_every_cell_and_align_on_what_is_shown() {
        let rows = vec![
            vec!["1".to_owned(), EVIL.to_owned(), "ok".to_owned()],
            vec!["22".to_owned(), "a\nFAKE ROW".to_owned(), "-".to_owned()],
        ];
        let mut out = Vec::new();
        table_to(&mut out, &["N", "SOURCE", "RESULT"], &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.chars().any(|c| c != '\n' && is_unsafe(c)), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], "1   \\x1b]0;pwned\\x07\\x1b[2J\\u{202e}  ok");
        assert_eq!(lines[2], "22  a\\nFAKE ROW                      -");
        // The columns line up on the escaped text.
        let col = |l: &str| l.find("ok").or_else(|| l.rfind('-')).unwrap();
        assert_eq!(col(lines[1]), col(lines[2]));
    }

    #[test]
    fn pairs_escape_keys_and_values() {
        let mut out = Vec::new();
        pairs_to(
            &mut out,
            &[
                ("source".to_owned(), EVIL.to_owned()),
                ("k\u{202e}".to_owned(), "v".to_owned()),
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "source     \\x1b]0;pwned\\x07\\x1b[2J\\u{202e}\nk\\u{202e}  v\n"
        );
    }

    #[test]
    fn a_closed_pipe_is_told_apart_from_other_failures() {
        let closed = OutputError {
            stream: Stream::Stdout,
            source: io::Error::from(io::ErrorKind::BrokenPipe),
        };
        assert!(closed.is_closed());
        let e = anyhow::Error::new(closed).context("printing the table");
        assert!(is_closed_pipe(&e));
        let full = OutputError {
            stream: Stream::Stdout,
            source: io::Error::from(io::ErrorKind::StorageFull),
        };
        assert!(!full.is_closed());
        assert!(!is_closed_pipe(&anyhow::Error::new(full)));
        // A peer that closed a socket is not our stdout.
        let peer = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!is_closed_pipe(&peer));
    }
}
