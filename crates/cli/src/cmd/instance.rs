//! `nitrile instance`: launch, look at, stop, start and terminate microVM
//! instances on a host, through its admin API.

use std::fmt;
use std::io::{BufRead, IsTerminal};

use anyhow::bail;
use nitrile_api::Name;
use nitrile_api::admin::{
    AdminRequest, InstanceDescription, InstanceList, InstanceState, LaunchRequest, MAX_SCRATCH_MIB,
    Sha256Hex, VolumeCreateRequest, VolumeDescription,
};

use crate::Global;
use crate::cmd::host::HostFlag;
use crate::config::Loaded;
use crate::hostapi::{Target, UsageError, call, call_with_volumes, target};
use crate::output::{
    Output, OutputError, Spinner, format_mib, print_json, print_pairs, print_table, prompt,
};
use crate::service::block_on;

/// Largest size written on a command line, in MiB (16 TiB).
const MAX_SIZE_MIB: u64 = 16 * 1024 * 1024;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Boot a new microVM instance from a guest image in the host's store,
    /// with encrypted volumes, and wait until it runs.
    ///
    /// Launching is the placement service's entitlement: use its config
    /// (`--config <state>/clients/service-placement.toml` in `nitrile up`).
    /// `nitrile host describe` lists the images a host can launch.
    ///
    /// `--volume ID=SIZE` is a shorthand: it first creates volume ID
    /// (`nitrile volume create ID --size SIZE`, under the cell's key
    /// `kms-key/default`), then launches with it; `--volume ID` attaches an
    /// available volume made before. The launch carries a second token,
    /// `volume.attach` on every volume, under which the key service
    /// releases each volume's key, sealed, to the new VMM only; a disabled
    /// key refuses that, naming the key. If the launch fails, the volumes
    /// it created are kept and the error names them and how to delete
    /// them.
    ///
    /// `--scratch` adds an instance-store disk: encrypted under a key only
    /// the instance's VMM holds, empty at every start, and gone, with its
    /// contents unrecoverable, when the instance stops.
    ///
    /// Example: `nitrile instance launch web1 --image 3f2a...c9 --memory 256M --volume data=64M --volume logs --scratch 1G`
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
        /// A volume to boot with (repeatable): ID=SIZE, e.g. data=64M,
        /// creates it first; ID alone attaches an available volume.
        #[arg(long = "volume", value_name = "ID[=SIZE]", value_parser = parse_volume)]
        volumes: Vec<VolumeArg>,
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
    /// Boot a stopped instance again with the volumes attached to it now.
    ///
    /// It first describes the instance to learn its volumes, then starts it
    /// with a second token, `volume.attach` on each of them, under which
    /// the key service releases each volume's key, sealed, to the new VMM
    /// only. A volume whose key is disabled fails the start, naming the
    /// key.
    ///
    /// Example: `nitrile instance start web1`
    Start {
        /// The instance.
        name: Name,
        #[command(flatten)]
        host: HostFlag,
    },
    /// Stop an instance for good and erase its instance-store disk. Its
    /// volumes are detached and kept, encrypted and available:
    /// `nitrile volume delete` crypto-erases them. On a terminal it asks
    /// first unless `--yes`; when not on a terminal it does not ask.
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
    /// Check an instance identity document: what an instance's metadata
    /// service serves at `/latest/dynamic/instance-identity/document`,
    /// signed by the host that runs it with the key of its cell
    /// certificate. It verifies when that certificate chains to the cell's
    /// CA certificate, names the host the document names, and signed
    /// exactly these bytes; anyone holding the CA certificate can check it,
    /// no token or connection needed. Prints what the document states, or
    /// fails (status 1) saying why it does not verify.
    ///
    /// Inside an instance of the sample guest image:
    /// `imds get /latest/dynamic/instance-identity/document > doc.json`.
    ///
    /// Example: `nitrile instance verify-identity doc.json --ca nitrile-state/ca/ca.pem`
    VerifyIdentity {
        /// The document (`-`: standard input).
        file: std::path::PathBuf,
        /// The cell's CA certificate (default: the client config's `ca`).
        #[arg(long, value_name = "FILE")]
        ca: Option<std::path::PathBuf>,
    },
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let command = match command {
        Command::VerifyIdentity { file, ca } => return verify_identity(&file, ca, global),
        other => other,
    };
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
                volumes: volumes.iter().map(|v| v.id().clone()).collect(),
                scratch_mib: scratch,
                network: None,
            };
            // Checked before any volume is made.
            launch
                .validate()
                .map_err(|e| UsageError(format!("invalid launch: {e}")))?;
            let target = target(&loaded, host.host.as_ref())?;
            let launched = launch_with_volumes(&loaded, &target, launch, &volumes)?;
            print_instance(&launched, global.output)
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
        Command::Start { name, host } => {
            let target = target(&loaded, host.host.as_ref())?;
            let started = block_on(async {
                let described: InstanceDescription = call(
                    &loaded,
                    &target,
                    &AdminRequest::InstanceDescribe(name.clone()),
                )
                .await?;
                let volumes: Vec<Name> = described.volumes.into_iter().map(|v| v.id).collect();
                call_with_volumes::<InstanceDescription>(
                    &loaded,
                    &target,
                    &AdminRequest::InstanceStart(name),
                    &volumes,
                )
                .await
            })??;
            print_instance(&started, global.output)
        }
        Command::Terminate { name, yes, host } => {
            let target = target(&loaded, host.host.as_ref())?;
            if interactive() && !yes && !confirm_terminate(&name, &target)? {
                bail!("not terminated");
            }
            one(
                &loaded,
                &target,
                AdminRequest::InstanceTerminate(name),
                global.output,
            )
        }
        Command::VerifyIdentity { .. } => unreachable!("handled before the config is loaded"),
    }
}

/// `nitrile instance verify-identity`.
fn verify_identity(
    file: &std::path::Path,
    ca: Option<std::path::PathBuf>,
    global: &Global,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use nitrile_api::network::{MAX_IDENTITY_DOCUMENT_LEN, SignedIdentityDocument};
    let bytes = if file == std::path::Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin(), MAX_IDENTITY_DOCUMENT_LEN as u64 + 1),
            &mut buf,
        )
        .context("reading the document from standard input")?;
        if buf.len() > MAX_IDENTITY_DOCUMENT_LEN {
            bail!("the document is larger than {MAX_IDENTITY_DOCUMENT_LEN} bytes");
        }
        buf
    } else {
        nitrile_fs::read_bounded(file, MAX_IDENTITY_DOCUMENT_LEN as u64)
            .with_context(|| format!("reading {}", file.display()))?
    };
    let ca = match ca {
        Some(ca) => ca,
        None => {
            crate::config::load(global)
                .context("no --ca given, and no client config to take the cell's CA from")?
                .config
                .ca
        }
    };
    let roots = nitrile_pki::tls::CaRoots::load(&ca)
        .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
    let signed: SignedIdentityDocument = serde_json::from_slice(&bytes).context(
        "not an instance identity document (JSON with document, signature, certificate)",
    )?;
    let (identity, message, signature) = signed
        .decode()
        .map_err(|e| anyhow::anyhow!("not an instance identity document: {e}"))?;
    let signer = nitrile_pki::sign::verify_signed(
        &roots,
        &identity.cell,
        signed.certificate.as_bytes(),
        &message,
        &signature,
        rustls_pki_types::UnixTime::now(),
    )
    .map_err(|e| anyhow::anyhow!("the identity document does not verify: {e}"))?;
    if signer.kind != nitrile_api::PrincipalKind::Host || signer.name != identity.host {
        bail!(
            "the identity document does not verify: it names host {} but is signed by {signer}",
            identity.host
        );
    }
    match global.output {
        Output::Json => print_json(&serde_json::json!({
            "verified": true,
            "signer": signer.uri(),
            "identity": identity,
        })),
        Output::Table => Ok(print_pairs(&[
            (
                "verified".into(),
                format!("signed by {signer} under {}", ca.display()),
            ),
            ("instance".into(), identity.instance.to_string()),
            ("customer".into(), identity.customer.to_string()),
            ("host".into(), identity.host.to_string()),
            ("cell".into(), identity.cell.to_string()),
            ("image".into(), identity.image.to_string()),
            ("vni".into(), identity.vni.to_string()),
            ("private ipv4".into(), identity.private_ipv4.to_string()),
            ("mac".into(), identity.mac.to_string()),
            ("launched".into(), identity.launched_at.clone()),
            ("issued".into(), identity.issued_at.clone()),
        ])?),
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

/// Creates the volumes of `requested` that have a size (under the cell's
/// default key), then launches with every volume and the volume token.
/// When a creation or the launch fails, the error says which volumes were
/// created and are left available, and how to delete them.
fn launch_with_volumes(
    loaded: &Loaded,
    target: &Target,
    launch: LaunchRequest,
    requested: &[VolumeArg],
) -> anyhow::Result<InstanceDescription> {
    let spinner = Spinner::start(&format!("launching {} on {}", launch.instance, target.host));
    let result = block_on(async {
        let mut created: Vec<Name> = Vec::new();
        for v in requested {
            let VolumeArg::New { id, size_mib } = v else {
                continue;
            };
            let create = AdminRequest::VolumeCreate(VolumeCreateRequest {
                volume: id.clone(),
                size_mib: *size_mib,
                kms_key: None,
                seed_image: None,
            });
            if let Err(e) = call::<VolumeDescription>(loaded, target, &create).await {
                return Err(left_available(e, &created, target));
            }
            created.push(id.clone());
        }
        let req = AdminRequest::InstanceLaunch(launch.clone());
        call_with_volumes::<InstanceDescription>(loaded, target, &req, &launch.volumes)
            .await
            .map_err(|e| left_available(e, &created, target))
    });
    drop(spinner);
    result?
}

/// `e`, followed, when the launch created volumes before it failed, by
/// which ones were created and are kept, and how to delete them.
fn left_available(e: anyhow::Error, created: &[Name], target: &Target) -> anyhow::Error {
    if created.is_empty() {
        return e;
    }
    let h = &target.host;
    let each = |f: &dyn Fn(&Name) -> String| created.iter().map(f).collect::<Vec<_>>().join(", ");
    let (volumes, were, they, them) = if created.len() == 1 {
        ("volume", "was", "it is", "it")
    } else {
        ("volumes", "were", "they are", "them")
    };
    e.context(format!(
        "the launch failed after {volumes} {} {were} created for it on host {h}; {they} \
         kept, available unless `nitrile volume list --host {h}` shows {them} attached \
         (launch again with {}, or erase {them} with {})",
        each(&|v| v.to_string()),
        each(&|v| format!("`--volume {v}`")),
        each(&|v| format!("`nitrile volume delete {v} --host {h}`")),
    ))
}

/// Whether to ask before a destructive verb: standard input and standard
/// error are both a terminal.
pub(crate) fn interactive() -> bool {
    std::io::stdin().is_terminal() && crate::output::Stream::Stderr.is_terminal()
}

/// Asks `question` on the terminal; true for a yes.
pub(crate) fn confirm(question: fmt::Arguments<'_>) -> anyhow::Result<bool> {
    prompt(question)?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn confirm_terminate(name: &Name, target: &Target) -> anyhow::Result<bool> {
    confirm(format_args!(
        "Terminate instance {name} on {}? Its instance-store disk is erased; its volumes are \
         detached and kept (`nitrile volume delete` erases them). [y/N] ",
        target.host
    ))
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
pub(crate) fn parse_size_mib(s: &str) -> Result<u64, String> {
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

/// A `--volume` of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VolumeArg {
    /// `ID=SIZE`: create the volume, then launch with it.
    New {
        /// The new volume's id.
        id: Name,
        /// Its size in MiB.
        size_mib: u64,
    },
    /// `ID`: launch with an available volume made before.
    Existing(Name),
}

impl VolumeArg {
    fn id(&self) -> &Name {
        match self {
            VolumeArg::New { id, .. } | VolumeArg::Existing(id) => id,
        }
    }
}

/// `ID=SIZE` (a volume to create) or `ID` (one to attach).
fn parse_volume(s: &str) -> Result<VolumeArg, String> {
    let name = |id: &str| Name::new(id).map_err(|e| format!("volume id {id:?}: {e}"));
    match s.split_once('=') {
        Some((id, size)) => Ok(VolumeArg::New {
            id: name(id)?,
            size_mib: crate::cmd::volume::parse_volume_size(size)?,
        }),
        None => Ok(VolumeArg::Existing(name(s)?)),
    }
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
        let data = Name::new("data").unwrap();
        assert_eq!(
            parse_volume("data=64M").unwrap(),
            VolumeArg::New {
                id: data.clone(),
                size_mib: 64
            }
        );
        assert_eq!(
            parse_volume("data").unwrap(),
            VolumeArg::Existing(data.clone())
        );
        assert_eq!(parse_volume("data=2G").unwrap().id(), &data);
        for bad in [
            "../x=1G", "../x", "", "=64M", "data=", "data=0", "data=17T", "data=64Q", "a=b=1G",
            "da\0ta",
        ] {
            assert!(parse_volume(bad).is_err(), "{bad:?}");
        }
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_digest(&format!("sha256:{hex}")).unwrap(),
            parse_digest(&hex).unwrap()
        );
        assert!(parse_digest("abc").is_err());
    }
}
