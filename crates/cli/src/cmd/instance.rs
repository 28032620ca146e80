//! `nitrile instance`: launch, look at, stop, start and terminate microVM
//! instances on a host, through its admin API.

use std::io::{BufRead, IsTerminal};

use anyhow::bail;
use nitrile_api::Name;
use nitrile_api::admin::{
    AdminRequest, InstanceDescription, InstanceList, InstanceState, LaunchRequest, MAX_SCRATCH_MIB,
    Sha256Hex, VolumeRequest,
};

use crate::Global;
use crate::cmd::host::HostFlag;
use crate::hostapi::{Target, call, target};
use crate::output::{
    Output, OutputError, Spinner, format_mib, print_json, print_pairs, print_table, prompt,
};
use crate::service::block_on;

/// Largest size written on a command line, in MiB (16 TiB).
const MAX_SIZE_MIB: u64 = 16 * 1024 * 1024;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Boot a new microVM instance from a guest image in the host's store,
    /// with fresh encrypted volumes, and wait until it runs.
    ///
    /// Launching is the placement service's entitlement: use its config
    /// (`--config <state>/clients/service-placement.toml` in `nitrile up`).
    /// `nitrile host describe` lists the images a host can launch.
    /// `--scratch` adds an instance-store disk: encrypted under a key only
    /// the instance's VMM holds, empty at every start, and gone, with its
    /// contents unrecoverable, when the instance stops.
    ///
    /// Example: `nitrile instance launch web1 --image 3f2a...c9 --memory 256M --volume data=64M --scratch 1G`
    Launch {
        /// The instance's name, unique on the host.
        name: Name,
        /// Digest of the guest image (64 hex digits, `sha256:` optional).
        #[arg(long, value_name = "DIGEST", value_parser = parse_digest)]
        image: Sha256Hex,
        /// Virtual CPUs.
        #[arg(long, value_name = "N", default_value_t = 1)]
        vcpus: u8,
        /// Guest memory, e.g. 256M or 1G.
        #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
        memory: u32,
        /// An encrypted volume to create and attach, e.g. data=64M (repeatable).
        #[arg(long = "volume", value_name = "ID=SIZE", value_parser = parse_volume)]
        volumes: Vec<VolumeRequest>,
        /// An instance-store disk of this size, e.g. 64M or 1G: erased for
        /// good whenever the instance stops.
        #[arg(long, value_name = "SIZE", value_parser = parse_scratch)]
        scratch: Option<u32>,
        #[command(flatten)]
        host: HostFlag,
    },
    /// List the host's instances: name, state, size, image and launch time.
    ///
    /// Example: `nitrile instance list -o json`
    List(HostFlag),
    /// Show one instance's metadata (never its memory, disk or console).
    ///
    /// Example: `nitrile instance describe web1`
    Describe {
        /// The instance.
        name: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Stop an instance's microVM; its volumes are kept for `start`, its
    /// instance-store disk is erased.
    ///
    /// Example: `nitrile instance stop web1`
    Stop {
        /// The instance.
        name: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Boot a stopped instance again with its volumes.
    ///
    /// Example: `nitrile instance start web1`
    Start {
        /// The instance.
        name: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Stop an instance for good and crypto-erase its volumes. On a terminal
    /// it asks first unless `--yes`; when not on a terminal it does not ask.
    ///
    /// Example: `nitrile instance terminate web1 --yes`
    Terminate {
        /// The instance.
        name: Name,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        host: HostFlag,
    },
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    match command {
        Command::Launch {
            name,
            image,
            vcpus,
            memory,
            volumes,
            scratch,
            host,
        } => {
            let launch = LaunchRequest {
                instance: name,
                image,
                vcpus,
                memory_mib: memory,
                volumes,
                scratch_mib: scratch,
            };
            launch
                .validate()
                .map_err(|e| crate::hostapi::UsageError(format!("invalid launch: {e}")))?;
            let target = target(&loaded, host.host.as_ref())?;
            let spinner =
                Spinner::start(&format!("launching {} on {}", launch.instance, target.host));
            let result = block_on(call::<InstanceDescription>(
                &loaded,
                &target,
                &AdminRequest::InstanceLaunch(launch),
            ));
            drop(spinner);
            print_instance(&result??, global.output)
        }
        Command::List(host) => {
            let target = target(&loaded, host.host.as_ref())?;
            let list: InstanceList =
                block_on(call(&loaded, &target, &AdminRequest::InstanceList))??;
            match global.output {
                Output::Json => print_json(&list),
                Output::Table => {
                    print_list(&list)?;
                    Ok(())
                }
            }
        }
        Command::Describe { name, host } => one(
            &loaded,
            &target(&loaded, host.host.as_ref())?,
            AdminRequest::InstanceDescribe(name),
            global.output,
        ),
        Command::Stop { name, host } => one(
            &loaded,
            &target(&loaded, host.host.as_ref())?,
            AdminRequest::InstanceStop(name),
            global.output,
        ),
        Command::Start { name, host } => one(
            &loaded,
            &target(&loaded, host.host.as_ref())?,
            AdminRequest::InstanceStart(name),
            global.output,
        ),
        Command::Terminate { name, yes, host } => {
            let target = target(&loaded, host.host.as_ref())?;
            let interactive =
                std::io::stdin().is_terminal() && crate::output::Stream::Stderr.is_terminal();
            if interactive && !yes && !confirm(&name, &target)? {
                bail!("not terminated");
            }
            one(
                &loaded,
                &target,
                AdminRequest::InstanceTerminate(name),
                global.output,
            )
        }
    }
}

fn one(
    loaded: &crate::config::Loaded,
    target: &Target,
    req: AdminRequest,
    output: Output,
) -> anyhow::Result<()> {
    let described: InstanceDescription = block_on(call(loaded, target, &req))??;
    print_instance(&described, output)
}

fn confirm(name: &Name, target: &Target) -> anyhow::Result<bool> {
    prompt(format_args!(
        "Terminate instance {name} on {}? Its volumes are crypto-erased and cannot be recovered. [y/N] ",
        target.host
    ))?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn state(s: InstanceState) -> &'static str {
    match s {
        InstanceState::Pending => "pending",
        InstanceState::Running => "running",
        InstanceState::Stopped => "stopped",
        InstanceState::Failed => "failed",
        InstanceState::Terminated => "terminated",
    }
}

fn print_instance(d: &InstanceDescription, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(d);
    }
    let volumes = if d.volumes.is_empty() {
        "none".to_owned()
    } else {
        d.volumes
            .iter()
            .map(|v| format!("{} ({})", v.id, format_mib(v.size_mib)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pairs = vec![
        ("instance".to_owned(), d.instance.to_string()),
        ("host".to_owned(), d.host.to_string()),
        ("state".to_owned(), state(d.state).to_owned()),
        (
            "reason".to_owned(),
            d.reason.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        ("image".to_owned(), d.image.to_string()),
        ("vcpus".to_owned(), d.vcpus.to_string()),
        ("memory".to_owned(), format_mib(u64::from(d.memory_mib))),
        ("volumes".to_owned(), volumes),
        (
            "scratch".to_owned(),
            d.scratch_mib
                .map_or_else(|| "none".to_owned(), |m| format_mib(u64::from(m))),
        ),
        ("launched".to_owned(), d.launched_at.clone()),
        ("updated".to_owned(), d.updated_at.clone()),
    ];
    print_pairs(&pairs)?;
    Ok(())
}

fn print_list(list: &InstanceList) -> Result<(), OutputError> {
    let rows: Vec<Vec<String>> = list
        .instances
        .iter()
        .map(|i| {
            vec![
                i.instance.to_string(),
                state(i.state).to_owned(),
                i.vcpus.to_string(),
                format_mib(u64::from(i.memory_mib)),
                i.image.to_string()[..12].to_owned(),
                i.launched_at.clone(),
            ]
        })
        .collect();
    print_table(
        &["NAME", "STATE", "VCPUS", "MEMORY", "IMAGE", "LAUNCHED"],
        &rows,
    )
}

fn parse_digest(s: &str) -> Result<Sha256Hex, String> {
    s.strip_prefix("sha256:")
        .unwrap_or(s)
        .parse()
        .map_err(|e| format!("{e}"))
}

/// `256M`, `256MiB`, `1G`, `1GiB` or a bare number of MiB, to MiB.
fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M or 1G"))?;
    let factor = match unit {
        "" | "M" | "m" | "MiB" | "MB" => 1,
        "G" | "g" | "GiB" | "GB" => 1024,
        "T" | "t" | "TiB" | "TB" => 1024 * 1024,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use M or G")),
    };
    let mib = n
        .checked_mul(factor)
        .filter(|m| *m <= MAX_SIZE_MIB)
        .ok_or_else(|| format!("{s:?} is larger than {MAX_SIZE_MIB} MiB"))?;
    if mib == 0 {
        return Err(format!("{s:?} is zero"));
    }
    Ok(mib)
}

fn parse_memory(s: &str) -> Result<u32, String> {
    u32::try_from(parse_size_mib(s)?).map_err(|_| format!("{s:?} is too large for guest memory"))
}

fn parse_scratch(s: &str) -> Result<u32, String> {
    let mib = parse_size_mib(s)?;
    u32::try_from(mib)
        .ok()
        .filter(|m| *m <= MAX_SCRATCH_MIB)
        .ok_or_else(|| {
            format!("{s:?} is larger than the largest instance-store disk, {MAX_SCRATCH_MIB} MiB")
        })
}

fn parse_volume(s: &str) -> Result<VolumeRequest, String> {
    let (id, size) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=SIZE, e.g. data=64M"))?;
    Ok(VolumeRequest {
        id: Name::new(id).map_err(|e| format!("volume id {id:?}: {e}"))?,
        size_mib: parse_size_mib(size)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_mib() {
        assert_eq!(parse_size_mib("256M"), Ok(256));
        assert_eq!(parse_size_mib("256"), Ok(256));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        for bad in [
            "",
            "M",
            "1K",
            "-1G",
            "0M",
            "1.5G",
            "99999999999999999999G",
            "17T",
        ] {
            assert!(parse_size_mib(bad).is_err(), "{bad}");
        }
        assert!(parse_memory("4096G").is_ok());
    }

    #[test]
    fn scratch_sizes_are_bounded() {
        assert_eq!(parse_scratch("64M"), Ok(64));
        assert_eq!(parse_scratch("1T"), Ok(MAX_SCRATCH_MIB));
        assert!(parse_scratch("2T").is_err());
        assert!(parse_scratch("0").is_err());
    }

    #[test]
    fn volumes_and_digests_parse() {
        let v = parse_volume("data=64M").unwrap();
        assert_eq!((v.id.as_str(), v.size_mib), ("data", 64));
        assert!(parse_volume("data").is_err());
        assert!(parse_volume("../x=1G").is_err());
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_digest(&format!("sha256:{hex}")).unwrap(),
            parse_digest(&hex).unwrap()
        );
        assert!(parse_digest("abc").is_err());
    }
}
