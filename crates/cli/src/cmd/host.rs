//! `nitrile host`: look at a host and take it out of (or back into)
//! placement, through its admin API.

use nitrile_api::Name;
use nitrile_api::admin::{
    AdminRequest, Health, HostDescription, HostUpdate, HostUpdateRequest, PlacementState,
};

use crate::Global;
use crate::hostapi::{call, target};
use crate::output::{Output, format_mib, print_json};
use crate::service::block_on;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Show a host's placement state, health, software versions,
    /// measurements, capacity and launchable images.
    ///
    /// Like every host verb it first gets a token for exactly this call from
    /// the token service (an entitlement of your group), then calls the host
    /// over mutual TLS; refusals say which service and which step refused.
    ///
    /// Example: `nitrile host describe --host h1 -o json`
    Describe(HostFlag),
    /// Stop placing new instances on a host; running instances stay.
    ///
    /// Example: `nitrile host drain --host h1`
    Drain(HostFlag),
    /// Let a drained host take new instances again.
    ///
    /// Example: `nitrile host undrain --host h1`
    Undrain(HostFlag),
    /// Have a host check and stage release VERSION from the repository of
    /// its environment it pinned at provisioning (the deployer's verb: no
    /// other principal is entitled). The host refuses a version not higher
    /// than the one it runs, and any release whose TUF metadata,
    /// signatures, environment, test attestation or files do not check.
    ///
    /// Example: `nitrile host update 1.4.0 --host h1`
    Update {
        /// The release version (MAJOR.MINOR.PATCH).
        #[arg(value_name = "VERSION")]
        release: String,
        #[command(flatten)]
        flag: HostFlag,
    },
    /// Ask a host's TPM for a quote of its measured PCRs (4: the firmware's
    /// measurement of the host image, 11: the image's sections, 15: what
    /// its init loaded) with a fresh nonce, its event log and, when it has
    /// one, a Nitro-layout attestation document (auditors and on-call).
    ///
    /// Example: `nitrile host attest --host h1 -o json > h1-attestation.json`
    Attest(crate::cmd::host_attest::AttestArgs),
    /// Check what a host runs: a fresh quote (or a saved one, --from) is
    /// verified under the host's pinned attestation key and its PCRs
    /// compared with reference values computed from the host image; prints
    /// what matched and fails if anything did not.
    ///
    /// Example: `nitrile host verify-attestation --host h1 --reference out/reference.json --attestation-key h1.ak`
    VerifyAttestation(crate::cmd::host_attest::VerifyArgs),
    /// Power off a host running the host image (on-call operators; refused
    /// while instances run). The agent answers, stops, and the image's init
    /// powers the machine off.
    ///
    /// Example: `nitrile host shutdown --host h1`
    Shutdown(HostFlag),
    /// Boot a host image under QEMU with OVMF and a software TPM: a host in
    /// a box. The firmware measures the image into PCR 4, its stub the
    /// image's sections into PCR 11, and the image's init what it loads into
    /// PCR 15; prints where the host agent serves once it does, and stops
    /// QEMU and the TPM on Ctrl-C. Under TCG (no usable KVM) a boot takes
    /// about 20 s.
    ///
    /// Example: `nitrile host boot --image host-image --tpm-state h1-tpm --forward 7443`
    Boot(crate::cmd::host_boot::BootArgs),
}

/// The host to call.
#[derive(Debug, clap::Args)]
pub(crate) struct HostFlag {
    /// The host id (default: the only host in the config's [hosts]).
    #[arg(long, value_name = "H")]
    pub(crate) host: Option<Name>,
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    if let Command::Update { release, flag } = command {
        let req = AdminRequest::HostUpdate(HostUpdateRequest { version: release });
        if let AdminRequest::HostUpdate(u) = &req {
            u.validate()
                .map_err(|e| crate::hostapi::UsageError(format!("VERSION: {e}")))?;
        }
        let loaded = crate::config::load(global)?;
        let target = target(&loaded, flag.host.as_ref())?;
        let done: HostUpdate = block_on(call(&loaded, &target, &req))??;
        return match global.output {
            Output::Json => print_json(&done),
            Output::Table => Ok(crate::output::print_pairs(&[
                ("host".to_owned(), done.host.to_string()),
                ("running".to_owned(), done.running.clone()),
                ("staged".to_owned(), format!("{} (checked)", done.staged)),
                ("environment".to_owned(), done.environment.clone()),
                ("highest run".to_owned(), done.highest.clone()),
                ("binary sha256".to_owned(), done.binary_sha256.to_string()),
                (
                    "live update".to_owned(),
                    if done.handing_over {
                        "handing over now (host describe shows the new version once it serves)"
                    } else {
                        "no (staged only)"
                    }
                    .to_owned(),
                ),
            ])?),
        };
    }
    let (req, flag) = match command {
        Command::Describe(f) => (AdminRequest::HostDescribe, f),
        Command::Drain(f) => (AdminRequest::HostDrain, f),
        Command::Undrain(f) => (AdminRequest::HostUndrain, f),
        Command::Update { .. } => unreachable!("handled above"),
        Command::Boot(args) => return crate::cmd::host_boot::run(args),
        Command::Attest(args) => return crate::cmd::host_attest::attest(args, global),
        Command::VerifyAttestation(args) => return crate::cmd::host_attest::verify(args, global),
        Command::Shutdown(f) => (AdminRequest::HostShutdown, f),
    };
    let loaded = crate::config::load(global)?;
    let target = target(&loaded, flag.host.as_ref())?;
    let described: HostDescription = block_on(call(&loaded, &target, &req))??;
    match global.output {
        Output::Json => print_json(&described),
        Output::Table => {
            print_host(&described)?;
            Ok(())
        }
    }
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Ok => "ok",
        Health::Failed => "FAILED",
    }
}

/// Key/value lines of a host description.
pub(crate) fn host_lines(d: &HostDescription) -> Vec<(String, String)> {
    let c = &d.capacity;
    let mut lines = vec![
        ("host".to_owned(), format!("{} (cell {})", d.host, d.cell)),
        (
            "placement".to_owned(),
            match d.placement {
                PlacementState::Accepting => "accepting new instances".to_owned(),
                PlacementState::Drained => "drained (launches refused)".to_owned(),
            },
        ),
        (
            "health".to_owned(),
            format!(
                "journal {}, hypervisor {}",
                health(d.health.journal),
                health(d.health.hypervisor)
            ),
        ),
        (
            "software".to_owned(),
            format!(
                "nitrile {}, {} {}, kernel {}",
                d.software.nitrile,
                d.software.backend,
                d.software
                    .backend_version
                    .as_deref()
                    .unwrap_or("(version unknown)"),
                d.software.kernel
            ),
        ),
        (
            "vcpus".to_owned(),
            format!("{} of {} allocated", c.vcpus_allocated, c.vcpus_total),
        ),
        (
            "memory".to_owned(),
            format!(
                "{} of {} allocated",
                format_mib(c.memory_mib_allocated),
                format_mib(c.memory_mib_total)
            ),
        ),
        ("instances".to_owned(), c.instances.to_string()),
    ];
    if d.images.is_empty() {
        lines.push(("images".to_owned(), "none".to_owned()));
    }
    for i in &d.images {
        let release = i.kernel_release.as_deref().unwrap_or("kernel unknown");
        lines.push(("image".to_owned(), format!("{} ({release})", i.digest)));
    }
    for m in &d.measurements {
        lines.push(("measurement".to_owned(), format!("{} {}", m.name, m.sha256)));
    }
    lines.push(("started".to_owned(), d.started_at.clone()));
    lines
}

fn print_host(d: &HostDescription) -> Result<(), crate::output::OutputError> {
    crate::output::print_pairs(&host_lines(d))
}
