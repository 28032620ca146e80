//! `nitrile customer`: a customer's instances and images, through the
//! placement service only (never a host's admin API).
//!
//! Every verb gets a token for exactly its call from the token service
//! (audience `placement`, the resource named from the config's own
//! customer: `instance/<customer>--<name>`, `image/<customer>--<24 hex>`,
//! `placement/<cell>` for the lists), then calls the placement service
//! over mutual TLS. Names are typed and shown without the `<customer>--`
//! prefix.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId, ResourceKind};
use nitrile_image::{Cmdline, Digest};
use nitrile_placed_api::wire::{CustomerImage, CustomerInstance, RunRequest};
use nitrile_placed_api::{
    PLACEMENT_SERVICE, PlacedClient, PlacedClientError, customer_of, image_resource,
    instance_resource, placement_principal, upload,
};

use crate::Global;
use crate::cmd::instance::{confirm, interactive, parse_size_mib};
use crate::config::Loaded;
use crate::hostapi::UsageError;
use crate::output::{Output, Progress, Spinner, print_json, print_pairs, print_table};
use crate::service::block_on;

/// The kernel command line of an import without `--cmdline`.
const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Run an instance of one of your images; placement picks the host.
    ///
    /// The instance gets an address on your own network (`10.80.0.0/24`,
    /// apart from every other customer's), your SSH keys and user data
    /// through its metadata service (169.254.169.254), and each
    /// `--publish` port reachable on its host's address (`describe` shows
    /// where); nothing else from outside reaches it.
    ///
    /// Example: `nitrile customer run web1 --image DIGEST --ssh-key ~/.ssh/id_ed25519.pub --publish 22`
    Run(RunArgs),
    /// List your instances.
    ///
    /// Example: `nitrile customer list -o json`
    List,
    /// Show an instance: its host, state, address and published endpoints.
    ///
    /// Example: `nitrile customer describe web1`
    Describe(NameArg),
    /// Stop an instance; its address stays yours.
    ///
    /// Example: `nitrile customer stop web1`
    Stop(NameArg),
    /// Start a stopped instance again.
    ///
    /// Example: `nitrile customer start web1`
    Start(NameArg),
    /// Terminate an instance; its address is free again. On a terminal it
    /// asks first unless `--yes`; when not on a terminal it does not ask.
    ///
    /// Example: `nitrile customer terminate web1 --yes`
    Terminate {
        /// The instance's name.
        name: Name,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Import, list, describe and delete your images.
    #[command(subcommand)]
    Image(ImageCommand),
}

/// `nitrile customer run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The instance's name (without your `<customer>--` prefix).
    name: Name,
    /// The image digest (one you imported: `nitrile customer image list`).
    #[arg(long, value_name = "DIGEST")]
    image: Digest,
    /// Memory (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size_mib)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// An SSH public key file (OpenSSH `.pub`), served to the instance by
    /// its metadata service; repeatable.
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<PathBuf>,
    /// A file of user data (text, at most 16 KiB), served to the instance
    /// by its metadata service only: no answer of placement or the host
    /// ever shows it.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// An instance TCP port to publish on the host's address; repeatable.
    #[arg(long = "publish", value_name = "PORT")]
    publish: Vec<u16>,
    /// One of your key service keys (`nitrile kms-key create NAME`): the
    /// instance's root volume, its copy of the image's root disk, is
    /// encrypted under a data key it wraps, and disabling the key stops
    /// the volume from being opened. Needed when the image has a root disk.
    #[arg(long, value_name = "NAME")]
    kms_key: Option<Name>,
}

/// The instance a verb acts on.
#[derive(Debug, clap::Args)]
pub(crate) struct NameArg {
    /// The instance's name (without your `<customer>--` prefix).
    name: Name,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ImageCommand {
    /// Import an image (kernel, initramfs, command line, and optionally a
    /// root disk) into the cell's image store, visible only to you; runs
    /// name its digest.
    ///
    /// A root disk (a raw disk image, a whole number of MiB, at most 256
    /// MiB) is copied, for each instance run from the image, into a new
    /// volume encrypted under a key of yours (`run --kms-key`); the guest
    /// sees it as its first disk.
    ///
    /// The upload is refused, and nothing of it kept, when the kernel is
    /// not a loadable ELF or bzImage, a part is too large, or the parts do
    /// not add up to `--digest` (when given; else the digest is computed
    /// here).
    ///
    /// Example: `nitrile customer image import --kernel vmlinux --initramfs initramfs --cmdline "console=ttyS0 panic=-1"`
    Import {
        /// The kernel (an ELF vmlinux or a bzImage).
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// The initramfs.
        #[arg(long, value_name = "FILE")]
        initramfs: PathBuf,
        /// The kernel command line.
        #[arg(long, value_name = "TEXT", default_value = DEFAULT_CMDLINE)]
        cmdline: String,
        /// A root disk: a raw disk image, a whole number of MiB.
        #[arg(long, value_name = "FILE")]
        root_disk: Option<PathBuf>,
        /// The digest you expect the image to have: the placement service
        /// refuses the upload unless its parts add up to it.
        #[arg(long, value_name = "DIGEST")]
        digest: Option<Digest>,
    },
    /// List your images.
    ///
    /// Example: `nitrile customer image list`
    List,
    /// Show an image's digests, sizes and kernel format.
    ///
    /// Example: `nitrile customer image describe DIGEST`
    Describe {
        /// The image digest.
        digest: Digest,
    },
    /// Delete one of your images (refused while an instance of yours runs
    /// it). On a terminal it asks first unless `--yes`.
    ///
    /// Example: `nitrile customer image delete DIGEST --yes`
    Delete {
        /// The image digest.
        digest: Digest,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// One call to the placement service, ready to be made.
enum Call {
    Run(RunRequest),
    List,
    Describe(Name),
    Stop(Name),
    Start(Name),
    Terminate(Name),
    Import(Vec<u8>, u64),
    ListImages,
    DescribeImage(Digest),
    DeleteImage(Digest),
}

enum Answer {
    Instance(CustomerInstance),
    Instances(Vec<CustomerInstance>),
    Image(CustomerImage),
    Images(Vec<CustomerImage>),
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let me = PrincipalId::parse(&loaded.config.principal)
        .with_context(|| format!("principal in {}", loaded.path.display()))?;
    let Some(customer) = customer_of(&me).cloned() else {
        return Err(UsageError(format!(
            "{} is the config of {me}, not of a customer; the customer verbs need a customer's \
             config (e.g. clients/customer-acme.toml of `nitrile up`)",
            loaded.path.display()
        ))
        .into());
    };
    let cell = me.cell.clone();
    let instance = |n: &Name| -> anyhow::Result<(Name, ResourceId)> {
        let bare = strip_own_prefix(&customer, n)?;
        let r = instance_resource(&customer, &bare)
            .with_context(|| format!("instance name {n} with your prefix {customer}--"))?;
        Ok((bare, r))
    };
    let image = |d: &Digest| {
        image_resource(&customer, d).with_context(|| format!("image {d} of customer {customer}"))
    };
    let placement = ResourceId::new(ResourceKind::Placement, cell.clone());
    let (operation, resource, call) = match command {
        Command::Run(args) => {
            let req = run_request(&customer, args)?;
            let r = instance_resource(&customer, &req.name)?;
            (Operation::CustomerInstanceRun, r, Call::Run(req))
        }
        Command::List => (Operation::CustomerInstanceList, placement, Call::List),
        Command::Describe(a) => {
            let (n, r) = instance(&a.name)?;
            (Operation::CustomerInstanceDescribe, r, Call::Describe(n))
        }
        Command::Stop(a) => {
            let (n, r) = instance(&a.name)?;
            (Operation::CustomerInstanceStop, r, Call::Stop(n))
        }
        Command::Start(a) => {
            let (n, r) = instance(&a.name)?;
            (Operation::CustomerInstanceStart, r, Call::Start(n))
        }
        Command::Terminate { name, yes } => {
            let (n, r) = instance(&name)?;
            if interactive()
                && !yes
                && !confirm(format_args!(
                    "Terminate your instance {n}? Its address is freed and it cannot be \
                     started again. [y/N] "
                ))?
            {
                anyhow::bail!("not terminated");
            }
            (Operation::CustomerInstanceTerminate, r, Call::Terminate(n))
        }
        Command::Image(ImageCommand::Import {
            kernel,
            initramfs,
            cmdline,
            root_disk,
            digest,
        }) => {
            let (body, digest, size) =
                read_upload(&kernel, &initramfs, root_disk.as_deref(), &cmdline, digest)?;
            (
                Operation::CustomerImageImport,
                image(&digest)?,
                Call::Import(body, size),
            )
        }
        Command::Image(ImageCommand::List) => {
            (Operation::CustomerImageList, placement, Call::ListImages)
        }
        Command::Image(ImageCommand::Describe { digest }) => (
            Operation::CustomerImageDescribe,
            image(&digest)?,
            Call::DescribeImage(digest),
        ),
        Command::Image(ImageCommand::Delete { digest, yes }) => {
            if interactive()
                && !yes
                && !confirm(format_args!(
                    "Delete your image {digest}? Instances can no longer be run from it. [y/N] "
                ))?
            {
                anyhow::bail!("not deleted");
            }
            (
                Operation::CustomerImageDelete,
                image(&digest)?,
                Call::DeleteImage(digest),
            )
        }
    };
    let answer = block_on(call_placement(&loaded, &cell, operation, resource, call))??;
    match (answer, global.output) {
        (Answer::Instance(i), Output::Json) => print_json(&i),
        (Answer::Instances(l), Output::Json) => print_json(&l),
        (Answer::Image(i), Output::Json) => print_json(&i),
        (Answer::Images(l), Output::Json) => print_json(&l),
        (Answer::Instance(i), Output::Table) => Ok(print_pairs(&instance_lines(&i))?),
        (Answer::Image(i), Output::Table) => Ok(print_pairs(&image_lines(&i))?),
        (Answer::Instances(l), Output::Table) => {
            let rows: Vec<Vec<String>> = l
                .iter()
                .map(|i| {
                    vec![
                        i.name.to_string(),
                        i.state.as_str().to_owned(),
                        i.host.to_string(),
                        i.address.clone(),
                        endpoints(i),
                        short(&i.image),
                    ]
                })
                .collect();
            Ok(print_table(
                &["NAME", "STATE", "HOST", "ADDRESS", "PUBLISHED", "IMAGE"],
                &rows,
            )?)
        }
        (Answer::Images(l), Output::Table) => {
            let rows: Vec<Vec<String>> = l
                .iter()
                .map(|i| {
                    vec![
                        i.digest.to_string(),
                        i.kernel_format.clone(),
                        crate::output::format_mib(i.kernel_size.div_ceil(1024 * 1024)),
                        crate::output::format_mib(i.initramfs_size.div_ceil(1024 * 1024)),
                        i.imported.clone(),
                    ]
                })
                .collect();
            Ok(print_table(
                &[
                    "DIGEST",
                    "KERNEL",
                    "KERNEL SIZE",
                    "INITRAMFS SIZE",
                    "IMPORTED",
                ],
                &rows,
            )?)
        }
    }
}

/// `name` without the caller's own `<customer>--` prefix, if it has it.
fn strip_own_prefix(customer: &Name, name: &Name) -> anyhow::Result<Name> {
    match name.as_str().strip_prefix(&format!("{customer}--")) {
        Some(rest) => Ok(Name::new(rest)?),
        None => Ok(name.clone()),
    }
}

/// The run request of `args`, its files read and bounded here (placement
/// bounds them again).
fn run_request(customer: &Name, args: RunArgs) -> anyhow::Result<RunRequest> {
    use nitrile_placed_api::wire::{MAX_SSH_KEY_LEN, MAX_USER_DATA, ssh_key_ok};
    let mut keys = Vec::new();
    for path in &args.ssh_keys {
        let text = nitrile_fs::read_bounded_to_string(path, MAX_SSH_KEY_LEN as u64 * 4)
            .with_context(|| format!("SSH key file {}", path.display()))?;
        let mut found = false;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !ssh_key_ok(line) {
                return Err(UsageError(format!(
                    "{} holds a line that is not an OpenSSH public key (give the .pub file)",
                    path.display()
                ))
                .into());
            }
            keys.push(line.to_owned());
            found = true;
        }
        if !found {
            return Err(UsageError(format!("{} holds no public key", path.display())).into());
        }
    }
    let user_data = match &args.user_data {
        Some(path) => Some(
            nitrile_fs::read_bounded_to_string(path, MAX_USER_DATA as u64).with_context(|| {
                format!("user data file {} (text, at most 16 KiB)", path.display())
            })?,
        ),
        None => None,
    };
    let memory_mib = u32::try_from(args.memory)
        .map_err(|_| UsageError(format!("--memory {} MiB is too large", args.memory)))?;
    Ok(RunRequest {
        name: strip_own_prefix(customer, &args.name)?,
        image: args.image,
        memory_mib,
        vcpus: args.vcpus,
        ssh_public_keys: keys,
        user_data,
        publish: args.publish,
        kms_key: args.kms_key,
    })
}

/// Reads an image's parts (with progress on a terminal) and frames the
/// upload; the digest is `stated` or, without it, computed from the parts.
fn read_upload(
    kernel: &Path,
    initramfs: &Path,
    root_disk: Option<&Path>,
    cmdline: &str,
    stated: Option<Digest>,
) -> anyhow::Result<(Vec<u8>, Digest, u64)> {
    let cmd = Cmdline::new(cmdline).map_err(|e| UsageError(format!("--cmdline: {e}")))?;
    let len = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let (klen, ilen) = (len(kernel)?, len(initramfs)?);
    let rlen = root_disk.map(len).transpose()?.unwrap_or(0);
    if !rlen.is_multiple_of(nitrile_image::ROOT_DISK_ALIGN) {
        return Err(UsageError(format!(
            "--root-disk: {} is {rlen} bytes, not a whole number of MiB; pad it (truncate -s)",
            root_disk
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        ))
        .into());
    }
    let progress = Progress::new(
        klen + ilen + rlen,
        "{msg} [{bar:30}] {bytes}/{total_bytes}",
        "reading the image",
    );
    let read = |p: &Path, max: u64, what: &str| -> anyhow::Result<Vec<u8>> {
        let bytes = nitrile_fs::read_bounded(p, max)
            .with_context(|| format!("the {what} {} (at most {max} bytes)", p.display()))?;
        progress.inc(bytes.len() as u64);
        Ok(bytes)
    };
    let k = read(kernel, upload::MAX_KERNEL, "kernel")?;
    let i = read(initramfs, upload::MAX_INITRAMFS, "initramfs")?;
    let r = root_disk
        .map(|p| read(p, upload::MAX_ROOT_DISK, "root disk"))
        .transpose()?;
    progress.finish_and_clear();
    let digest = stated.unwrap_or_else(|| upload::digest_of(&cmd, &k, &i, r.as_deref()));
    let body = upload::encode(cmdline, digest, &k, &i, r.as_deref());
    let size = body.len() as u64;
    Ok((body, digest, size))
}

/// Gets a token for exactly this call (audience `placement`) and makes it.
async fn call_placement(
    loaded: &Loaded,
    cell: &Name,
    operation: Operation,
    resource: ResourceId,
    call: Call,
) -> anyhow::Result<Answer> {
    let addr = loaded.config.endpoints.placement.clone().ok_or_else(|| {
        UsageError(format!(
            "{} names no placement service ([endpoints] placement); is it a customer config \
             written by `nitrile up`?",
            loaded.path.display()
        ))
    })?;
    let tls = loaded.tls()?;
    let ask = TokenRequest {
        operations: vec![operation],
        resources: vec![resource.clone()],
        audience: Audience::new(PLACEMENT_SERVICE)
            .unwrap_or_else(|_| unreachable!("`placement` is an audience")),
        group: None,
        lifetime_secs: None,
    };
    let granted = crate::tokenapi::obtain(loaded, tls.clone(), &ask).await?;
    let token = granted.token.as_str();
    let mut client = PlacedClient::connect(&addr, &placement_principal(cell), tls)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the placement service at {addr}: {e}; is the cell running \
                 (`nitrile up`)?"
            )
        })?;
    let result = match call {
        Call::Run(req) => {
            let _spin = Spinner::start(&format!("placing and booting {}", req.name));
            client.run(&req, token).await.map(Answer::Instance)
        }
        Call::List => client
            .list(token)
            .await
            .map(|l| Answer::Instances(l.instances)),
        Call::Describe(n) => client.describe(&n, token).await.map(Answer::Instance),
        Call::Stop(n) => client.stop(&n, token).await.map(Answer::Instance),
        Call::Start(n) => client.start(&n, token).await.map(Answer::Instance),
        Call::Terminate(n) => client.terminate(&n, token).await.map(Answer::Instance),
        Call::Import(body, size) => {
            let _spin = Spinner::start(&format!(
                "uploading {} to the placement service",
                crate::output::format_mib(size.div_ceil(1024 * 1024))
            ));
            client.import(body, token).await.map(Answer::Image)
        }
        Call::ListImages => client
            .list_images(token)
            .await
            .map(|l| Answer::Images(l.images)),
        Call::DescribeImage(d) => client.describe_image(&d, token).await.map(Answer::Image),
        Call::DeleteImage(d) => client.delete_image(&d, token).await.map(Answer::Image),
    };
    result.map_err(|e| match e {
        PlacedClientError::Refused { status, refusal } => anyhow::anyhow!(
            "the placement service refused {operation} on {resource} at step {}",
            refusal.with_status(status)
        ),
        e => anyhow::Error::new(e).context(format!("{operation} on {resource}")),
    })
}

/// The published endpoints of an instance, `22->127.0.0.1:40022,...`.
fn endpoints(i: &CustomerInstance) -> String {
    if i.published.is_empty() {
        return if i.publish.is_empty() {
            "-".to_owned()
        } else {
            i.publish
                .iter()
                .map(|p| format!("{p}->?"))
                .collect::<Vec<_>>()
                .join(",")
        };
    }
    i.published
        .iter()
        .map(|p| format!("{}->{}", p.instance_port, p.endpoint))
        .collect::<Vec<_>>()
        .join(",")
}

/// The first 16 hex digits of a digest, for tables.
fn short(d: &Digest) -> String {
    d.to_hex()[..16].to_owned()
}

/// Key/value lines of an instance.
fn instance_lines(i: &CustomerInstance) -> Vec<(String, String)> {
    let mut lines = vec![
        ("instance".to_owned(), i.name.to_string()),
        ("customer".to_owned(), i.customer.to_string()),
        ("state".to_owned(), i.state.as_str().to_owned()),
        ("host".to_owned(), i.host.to_string()),
        ("image".to_owned(), i.image.to_string()),
        ("vcpus".to_owned(), i.vcpus.to_string()),
        (
            "memory".to_owned(),
            crate::output::format_mib(u64::from(i.memory_mib)),
        ),
        ("network".to_owned(), format!("vni {}", i.vni)),
        ("address".to_owned(), i.address.clone()),
        ("mac".to_owned(), i.mac.clone()),
    ];
    if i.published.is_empty() {
        for p in &i.publish {
            lines.push((
                format!("port {p}"),
                "published (endpoint not known yet)".into(),
            ));
        }
    }
    for p in &i.published {
        lines.push((format!("port {}", p.instance_port), p.endpoint.clone()));
    }
    if let Some(r) = &i.root_volume {
        lines.push((
            "root volume".to_owned(),
            format!(
                "{} ({}, under kms-key/{})",
                r.volume,
                crate::output::format_mib(r.size_mib),
                r.kms_key
            ),
        ));
    }
    lines.push(("created".to_owned(), i.created.clone()));
    lines
}

/// Key/value lines of an image.
fn image_lines(i: &CustomerImage) -> Vec<(String, String)> {
    let mut lines = vec![
        ("image".to_owned(), i.digest.to_string()),
        ("customer".to_owned(), i.customer.to_string()),
        (
            "kernel".to_owned(),
            format!(
                "{} ({}, {} bytes)",
                i.kernel_sha256, i.kernel_format, i.kernel_size
            ),
        ),
    ];
    if let Some(r) = &i.kernel_release {
        lines.push(("kernel release".to_owned(), r.clone()));
    }
    lines.push((
        "initramfs".to_owned(),
        format!("{} ({} bytes)", i.initramfs_sha256, i.initramfs_size),
    ));
    lines.push(("cmdline sha256".to_owned(), i.cmdline_sha256.to_string()));
    if let (Some(sha), Some(size)) = (&i.root_disk_sha256, i.root_disk_size) {
        lines.push(("root disk".to_owned(), format!("{sha} ({size} bytes)")));
    }
    lines.push(("imported".to_owned(), i.imported.clone()));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_typed_without_the_customer_prefix() {
        let acme = Name::new("acme").unwrap();
        let n = |s: &str| Name::new(s).unwrap();
        assert_eq!(strip_own_prefix(&acme, &n("web1")).unwrap(), n("web1"));
        assert_eq!(
            strip_own_prefix(&acme, &n("acme--web1")).unwrap(),
            n("web1")
        );
        // Another customer's prefix stays, and names a resource of acme's.
        assert_eq!(
            strip_own_prefix(&acme, &n("globex--db")).unwrap(),
            n("globex--db")
        );
        assert_eq!(
            instance_resource(&acme, &n("globex--db"))
                .unwrap()
                .to_string(),
            "instance/acme--globex--db"
        );
    }
}
