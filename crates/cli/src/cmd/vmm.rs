//! `nitrile vmm`: one microVM in this process, started by the host agent's
//! `kvm` backend (see `nitrile_vmm::kvm`), not by hand.

/// Run one microVM (started by the host agent, not by hand).
///
/// Everything comes in on inherited file descriptors: the VM spec (JSON)
/// on `--spec-fd`, the control channel on `--control-fd` (over which it
/// offers a recipient key per volume and receives the volumes' sealed keys,
/// never a plaintext key), the serial console file on `--serial-fd`, the
/// tap device (if any) on `--tap-fd`. The working directory becomes the
/// process's root; it drops to `--uid`/`--gid` before the guest runs.
///
/// Example (as the host agent does it): `nitrile vmm --spec-fd 3
/// --control-fd 5 --serial-fd 6 --uid 65534 --gid 65534`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Inherited pipe holding the VM spec.
    #[arg(long, value_name = "FD")]
    spec_fd: i32,
    /// Inherited Unix socket of the control channel.
    #[arg(long, value_name = "FD")]
    control_fd: i32,
    /// Inherited serial console file.
    #[arg(long, value_name = "FD")]
    serial_fd: i32,
    /// Inherited tap device, when the spec has a network device.
    #[arg(long, value_name = "FD")]
    tap_fd: Option<i32>,
    /// Unprivileged uid to run the guest as.
    #[arg(long, default_value_t = 65534)]
    uid: u32,
    /// Unprivileged gid to run the guest as.
    #[arg(long, default_value_t = 65534)]
    gid: u32,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let process = nitrile_vmm_kvm::process::ProcessArgs {
        spec_fd: args.spec_fd,
        control_fd: args.control_fd,
        serial_fd: args.serial_fd,
        tap_fd: args.tap_fd,
        uid: args.uid,
        gid: args.gid,
    };
    match nitrile_vmm_kvm::process::run_from_fds(process) {
        Ok(never) => match never {},
        Err(e) => Err(anyhow::Error::new(e).context("nitrile vmm")),
    }
}
