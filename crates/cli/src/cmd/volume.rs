//! `nitrile volume`: create, list, describe, attach, detach and delete
//! encrypted volumes in a host's volume store, through its admin API.
//!
//! Every verb answers with metadata only (ids, sizes, key names, states,
//! times); no verb reads, copies, exports or snapshots a volume's blocks,
//! or shrinks one, because the admin API has no such operation.

use nitrile_api::Name;
use nitrile_api::admin::{
    AdminRequest, MAX_VOLUME_SIZE_MIB, VolumeAttachRequest, VolumeCreateRequest, VolumeDescription,
    VolumeList, VolumeState,
};

use crate::Global;
use crate::cmd::host::HostFlag;
use crate::cmd::instance::{confirm, interactive, parse_size_mib};
use crate::hostapi::{Target, UsageError, call, target};
use crate::output::{Output, OutputError, format_mib, print_json, print_pairs, print_table};
use crate::service::block_on;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Create an encrypted volume in the host's volume store, available to
    /// attach.
    ///
    /// The key service makes the volume's data key under a key of its own
    /// (`--kms-key`, else the cell's key `kms-key/default`) and gives the
    /// host only the wrapped key, which the host cannot open. The data key
    /// is released, sealed, only to the VMM of an instance the volume boots
    /// with. A disabled key refuses every new release: the next launch or
    /// start with the volume fails, naming the key; an instance already
    /// running with it keeps running until it stops or the volume is
    /// detached.
    ///
    /// Like every host verb it first gets a token for exactly this call from
    /// the token service (an entitlement of your group), then calls the host
    /// over mutual TLS; refusals say which service and which step refused.
    ///
    /// Example: `nitrile volume create data --size 64M --kms-key acme-data`
    Create {
        /// The volume's id, unique in the volume store.
        #[arg(value_name = "ID")]
        volume: Name,
        /// Its size, e.g. 64M or 10G (never changed afterwards).
        #[arg(long, value_name = "SIZE", value_parser = parse_volume_size)]
        size: u64,
        /// The key service's key that wraps the data key, by name (`NAME`
        /// for `kms-key/NAME`) [default: default, the cell's key].
        #[arg(long, value_name = "NAME")]
        kms_key: Option<Name>,
        #[command(flatten)]
        host: HostFlag,
    },
    /// List the volumes of the host's volume store: id, size, state,
    /// attachment, key and format.
    ///
    /// Example: `nitrile volume list -o json`
    List(HostFlag),
    /// Show one volume's metadata (never its contents or its key, wrapped
    /// or not).
    ///
    /// Example: `nitrile volume describe data`
    Describe {
        /// The volume.
        #[arg(value_name = "ID")]
        volume: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Attach an available volume to a stopped instance of the host.
    ///
    /// The attachment is recorded now; the data key is released to the
    /// instance's VMM at its next `nitrile instance start`, which asks for
    /// it. A disabled key refuses that release, naming the key. Nothing of
    /// the volume's contents passes through the host agent.
    ///
    /// Example: `nitrile volume attach data --instance web1`
    Attach {
        /// The volume.
        #[arg(value_name = "ID")]
        volume: Name,
        /// The stopped instance to attach it to.
        #[arg(long, value_name = "NAME")]
        instance: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Detach a volume from its stopped instance, keeping it.
    ///
    /// The instance must be stopped, failed or terminated (its VMM, and the
    /// key it held, are gone). The volume stays encrypted and becomes
    /// available to attach again, on this host or another host of the
    /// cell.
    ///
    /// Example: `nitrile volume detach data`
    Detach {
        /// The volume.
        #[arg(value_name = "ID")]
        volume: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Delete an available volume for good: crypto-erase.
    ///
    /// The key service destroys the volume's key first, then the host
    /// removes the ciphertext. No copy of the ciphertext, the wrapped key
    /// or the host's state can be decrypted afterwards; detach the volume
    /// first if it is attached.
    ///
    /// On a terminal it asks first unless `--yes`; when not on a terminal
    /// it does not ask.
    ///
    /// Example: `nitrile volume delete data --yes`
    Delete {
        /// The volume.
        #[arg(value_name = "ID")]
        volume: Name,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        host: HostFlag,
    },
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let (req, host) = match command {
        Command::Create {
            volume,
            size,
            kms_key,
            host,
        } => {
            let create = VolumeCreateRequest {
                volume,
                size_mib: size,
                kms_key,
                seed_image: None,
            };
            create
                .validate()
                .map_err(|e| UsageError(format!("invalid volume: {e}")))?;
            (AdminRequest::VolumeCreate(create), host)
        }
        Command::List(host) => {
            let target = target(&loaded, host.host.as_ref())?;
            let list: VolumeList = block_on(call(&loaded, &target, &AdminRequest::VolumeList))??;
            return match global.output {
                Output::Json => print_json(&list),
                Output::Table => Ok(print_list(&list)?),
            };
        }
        Command::Describe { volume, host } => (AdminRequest::VolumeDescribe(volume), host),
        Command::Attach {
            volume,
            instance,
            host,
        } => (
            AdminRequest::VolumeAttach(volume, VolumeAttachRequest { instance }),
            host,
        ),
        Command::Detach { volume, host } => (AdminRequest::VolumeDetach(volume), host),
        Command::Delete { volume, yes, host } => {
            let target = target(&loaded, host.host.as_ref())?;
            if interactive() && !yes && !confirm_delete(&volume, &target)? {
                anyhow::bail!("not deleted");
            }
            let described: VolumeDescription =
                block_on(call(&loaded, &target, &AdminRequest::VolumeDelete(volume)))??;
            return print_volume(&described, global.output);
        }
    };
    let target = target(&loaded, host.host.as_ref())?;
    let described: VolumeDescription = block_on(call(&loaded, &target, &req))??;
    print_volume(&described, global.output)
}

fn confirm_delete(volume: &Name, target: &Target) -> anyhow::Result<bool> {
    confirm(format_args!(
        "Delete volume {volume} on {}? Its key is destroyed; the data cannot be recovered. [y/N] ",
        target.host
    ))
}

/// A volume size on the command line, e.g. `64M` or `10G`, in MiB: 1 MiB
/// to [`MAX_VOLUME_SIZE_MIB`].
pub(crate) fn parse_volume_size(s: &str) -> Result<u64, String> {
    let mib = parse_size_mib(s)?;
    if mib > MAX_VOLUME_SIZE_MIB {
        return Err(format!(
            "{s:?} is larger than the largest volume, {MAX_VOLUME_SIZE_MIB} MiB"
        ));
    }
    Ok(mib)
}

pub(crate) fn state(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Available => "available",
        VolumeState::Attached => "attached",
        VolumeState::Deleted => "deleted",
    }
}

/// Where a volume is attached, for people: `web1 on h1`, or `-`.
fn attachment(d: &VolumeDescription) -> String {
    d.attachment.as_ref().map_or_else(
        || "-".to_owned(),
        |a| format!("{} on {}", a.instance, a.host),
    )
}

fn print_volume(d: &VolumeDescription, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(d);
    }
    let pairs = vec![
        ("volume".to_owned(), d.volume.to_string()),
        ("size".to_owned(), format_mib(d.size_mib)),
        ("state".to_owned(), state(d.state).to_owned()),
        ("attached to".to_owned(), attachment(d)),
        ("kms key".to_owned(), format!("kms-key/{}", d.kms_key)),
        ("format".to_owned(), d.format.clone()),
        ("created".to_owned(), d.created_at.clone()),
    ];
    print_pairs(&pairs)?;
    Ok(())
}

fn print_list(list: &VolumeList) -> Result<(), OutputError> {
    let rows: Vec<Vec<String>> = list
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.volume.to_string(),
                format_mib(v.size_mib),
                state(v.state).to_owned(),
                attachment(v),
                v.kms_key.to_string(),
                v.format.clone(),
                v.created_at.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "VOLUME",
            "SIZE",
            "STATE",
            "ATTACHED TO",
            "KMS KEY",
            "FORMAT",
            "CREATED",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn volume_sizes_are_bounded() {
        assert_eq!(parse_volume_size("64M"), Ok(64));
        assert_eq!(parse_volume_size("10G"), Ok(10 * 1024));
        assert_eq!(parse_volume_size("16T"), Ok(MAX_VOLUME_SIZE_MIB));
        for bad in ["0", "0M", "17T", "1K", "64Q", "-1M", "", "1.5G"] {
            assert!(parse_volume_size(bad).is_err(), "{bad}");
        }
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Command,
        }
        let mut argv = vec!["volume"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    #[test]
    fn verbs_parse_ids_sizes_keys_and_hosts() {
        match parse(&[
            "create",
            "data",
            "--size",
            "64M",
            "--kms-key",
            "acme-data",
            "--host",
            "h2",
        ])
        .unwrap()
        {
            Command::Create {
                volume,
                size,
                kms_key,
                host,
            } => {
                assert_eq!(volume.as_str(), "data");
                assert_eq!(size, 64);
                assert_eq!(kms_key.unwrap().as_str(), "acme-data");
                assert_eq!(host.host.unwrap().as_str(), "h2");
            }
            other => panic!("{other:?}"),
        }
        match parse(&["create", "data", "--size", "1G"]).unwrap() {
            Command::Create { kms_key, host, .. } => {
                assert!(kms_key.is_none() && host.host.is_none());
            }
            other => panic!("{other:?}"),
        }
        match parse(&["attach", "data", "--instance", "web1"]).unwrap() {
            Command::Attach {
                volume, instance, ..
            } => assert_eq!((volume.as_str(), instance.as_str()), ("data", "web1")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["delete", "data", "-y"]).unwrap(),
            Command::Delete { yes: true, .. }
        ));
        // A size is required, an attach names its instance, ids and key
        // names are names.
        assert!(parse(&["create", "data"]).is_err());
        assert!(parse(&["create", "data", "--size", "0"]).is_err());
        assert!(parse(&["attach", "data"]).is_err());
        assert!(parse(&["create", "../x", "--size", "1G"]).is_err());
        assert!(parse(&["create", "data", "--size", "1G", "--kms-key", "a/b"]).is_err());
        assert!(parse(&["describe", "da\u{0}ta"]).is_err());
    }
}
