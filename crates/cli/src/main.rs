//! `nitrile`: one binary for every service of a cell and for the operators and
//! auditors who call them.
//!
//! Exit codes are stable: 0 success, 1 refused or failed, 2 usage error,
//! 141 when a reader closed the pipe of standard output (or of standard
//! error) early: the program ends there without a message, as `git log |
//! head` does (128 + SIGPIPE, what a shell reports for a program the
//! signal ended). Everything printed goes through `output`, which escapes
//! control characters from outside.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod anchor;
mod cmd;
mod config;
mod hostapi;
mod logapi;
mod output;
mod service;
mod tokenapi;

use output::Output;

/// Hosts that their own operators cannot get into.
///
/// Services (`tokend`, `hostd`, `logd`, `kms`, `placed`, `deployd`, `up`) and client verbs grouped by noun. Every verb has
/// `--help` with an example.
#[derive(Debug, Parser)]
#[command(
    name = "nitrile",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub(crate) struct Cli {
    /// Operator config file (else $NITRILE_CONFIG, else ~/.config/nitrile/config.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,

    /// Output format of client verbs.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cell certificate authority and certificates.
    #[command(subcommand)]
    Pki(cmd::pki::Command),
    /// Request and inspect admin tokens.
    #[command(subcommand)]
    Token(cmd::token::Command),
    /// Validate, compare, explain and sign entitlement bundles.
    #[command(subcommand)]
    Entitlements(cmd::entitlements::Command),
    /// Audit journal and log tools.
    #[command(subcommand)]
    Audit(cmd::audit::Command),
    /// Signed releases: keys, bundles, the test attestation and an
    /// environment's TUF repository (init, stage, sign, publish, verify).
    #[command(subcommand)]
    Release(cmd::release::Command),
    /// Guest images.
    #[command(subcommand)]
    Image(cmd::image::Command),
    /// Describe, drain and undrain a host (its admin API).
    #[command(subcommand)]
    Host(cmd::host::Command),
    /// Launch, list, describe, stop, start and terminate instances on a host.
    #[command(subcommand)]
    Instance(cmd::instance::Command),
    /// Create, list, describe, attach, detach and delete encrypted volumes.
    ///
    /// A volume lives in the cell's volume store, encrypted under a data key
    /// that the key service makes and releases, sealed, only to the VMM of
    /// an instance it boots with; the host agent keeps it only wrapped. It
    /// outlives its instances (`nitrile instance terminate` detaches it)
    /// until `nitrile volume delete` crypto-erases it. No verb, and no
    /// operation of the admin API, reads, copies, exports or snapshots a
    /// volume's contents, or shrinks a volume.
    ///
    /// A disabled key of the key service (`nitrile kms-key disable`) refuses
    /// every new release of its volumes' keys: the next launch or start with
    /// such a volume fails, naming the key. Instances already running with
    /// one keep running until they stop or the volume is detached.
    ///
    /// Example: `nitrile volume create data --size 64M && nitrile instance launch web1 --image DIGEST --volume data`
    #[command(subcommand)]
    Volume(cmd::volume::Command),
    /// Create, list, describe, disable, enable and schedule the deletion of
    /// keys of the key service.
    #[command(subcommand, name = "kms-key")]
    KmsKey(cmd::kmskey::Command),
    /// A customer's instances and images, through the placement service.
    #[command(subcommand)]
    Customer(cmd::customer::Command),
    /// Roll signed releases out to the cell's hosts, through the deployment
    /// service.
    #[command(subcommand)]
    Deploy(cmd::deploy::Command),
    /// Run the token service.
    Tokend(cmd::tokend::Args),
    Hostd(cmd::hostd::Args),
    Logd(cmd::logd::Args),
    Kms(cmd::kms::Args),
    Placed(cmd::placed::Args),
    Deployd(cmd::deployd::Args),
    /// Run a whole cell on this machine.
    Up(cmd::up::Args),
    /// Run one microVM (started by the host agent, not by hand).
    Vmm(cmd::vmm::Args),
    /// Open a VM's volume keys and exec QEMU (started by the host agent, not by hand).
    QemuLaunch(cmd::qemu_launch::Args),
    /// PID 1 of the host image (its `/init`, not run by hand).
    #[command(hide = true)]
    HostInit(cmd::host_init::Args),
    /// Show the operator configuration in effect.
    #[command(subcommand)]
    Config(cmd::config::Command),
    /// Print shell completions.
    Completion(cmd::completion::Args),
}

/// What every verb gets besides its own arguments.
#[derive(Debug)]
pub(crate) struct Global {
    pub(crate) config: Option<std::path::PathBuf>,
    pub(crate) output: Output,
}

/// A command line clap refused, or `--help`/`--version`, printed through
/// `output`. Help and version are our own text (in colour on a terminal);
/// an error message echoes the arguments, so it is rendered again without
/// styles (clap's own rendering would strip escape sequences from the
/// echoed argument rather than show them) and printed escaped but for its
/// newlines. A closed pipe ends with [`output::EXIT_CLOSED_PIPE`] for help
/// on stdout; an error keeps its status (2) when stderr is closed.
fn parse_failure(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let stream = if e.use_stderr() {
        output::Stream::Stderr
    } else {
        output::Stream::Stdout
    };
    let written = match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            output::print_help(stream, &e.render())
        }
        _ => {
            let plain = Cli::command()
                .styles(clap::builder::Styles::plain())
                .try_get_matches()
                .err()
                .map_or_else(|| e.render(), |again| again.render());
            output::print_text(stream, &plain.ansi().to_string())
        }
    };
    match written {
        Err(w) if w.is_closed() && w.stream() == output::Stream::Stdout => {
            ExitCode::from(output::EXIT_CLOSED_PIPE)
        }
        _ => ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)),
    }
}

fn main() -> ExitCode {
    // The host image's /init is this binary: as PID 1 it is the host's
    // init, whatever its arguments.
    if cmd::host_init::is_image_init() {
        cmd::host_init::run(cmd::host_init::Args {});
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e),
    };
    let global = Global {
        config: cli.config,
        output: cli.output,
    };
    let result = match cli.command {
        Command::Pki(c) => cmd::pki::run(c, &global),
        Command::Token(c) => cmd::token::run(c, &global),
        Command::Entitlements(c) => cmd::entitlements::run(c, &global),
        Command::Audit(c) => cmd::audit::run(c, &global),
        Command::Release(c) => cmd::release::run(c, &global),
        Command::Image(c) => cmd::image::run(c, &global),
        Command::Host(c) => cmd::host::run(c, &global),
        Command::Instance(c) => cmd::instance::run(c, &global),
        Command::Volume(c) => cmd::volume::run(c, &global),
        Command::Tokend(a) => cmd::tokend::run(a, &global),
        Command::Hostd(a) => cmd::hostd::run(a, &global),
        Command::Logd(a) => cmd::logd::run(a, &global),
        Command::Kms(a) => cmd::kms::run(a, &global),
        Command::Placed(a) => cmd::placed::run(a, &global),
        Command::Deployd(a) => cmd::deployd::run(a, &global),
        Command::Deploy(c) => cmd::deploy::run(c, &global),
        Command::Customer(c) => cmd::customer::run(c, &global),
        Command::KmsKey(c) => cmd::kmskey::run(c, &global),
        Command::Up(a) => cmd::up::run(a, &global),
        Command::Vmm(a) => cmd::vmm::run(a),
        Command::QemuLaunch(a) => cmd::qemu_launch::run(a),
        Command::HostInit(a) => cmd::host_init::run(a),
        Command::Config(c) => cmd::config::run(c, &global),
        Command::Completion(a) => cmd::completion::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away: nobody to tell, nothing left to do.
        Err(e) if output::is_closed_pipe(&e) => ExitCode::from(output::EXIT_CLOSED_PIPE),
        Err(e) => {
            // Where standard error is closed too, the status still tells.
            let _ = output::print_error(&e);
            if e.downcast_ref::<hostapi::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
