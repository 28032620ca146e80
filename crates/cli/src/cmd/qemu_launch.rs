//! `nitrile qemu-launch`: the jailed launcher the host agent's `qemu`
//! backend starts in QEMU's place (see `nitrile_vmm::qemu::launch`), not
//! by hand.

/// Open a VM's volume keys and exec QEMU with them (started by the host
/// agent, not by hand).
///
/// Everything comes in on inherited file descriptors: the launch plan
/// (QEMU's binary and arguments, the VM spec) on `--plan-fd`, the control
/// channel on `--control-fd`, over which it offers a recipient key per
/// volume and receives the volumes' sealed keys. It opens them, creates
/// missing volumes, and execs QEMU with each key on a pipe of its own.
///
/// Example (as the host agent does it): `nitrile qemu-launch --plan-fd 3
/// --control-fd 4`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Inherited pipe holding the launch plan.
    #[arg(long, value_name = "FD")]
    plan_fd: i32,
    /// Inherited Unix socket of the control channel.
    #[arg(long, value_name = "FD")]
    control_fd: i32,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let launch = nitrile_vmm::qemu::launch::LaunchArgs {
        plan_fd: args.plan_fd,
        control_fd: args.control_fd,
    };
    match nitrile_vmm::qemu::launch::run(launch) {
        Ok(never) => match never {},
        Err(e) => Err(anyhow::Error::new(e).context("nitrile qemu-launch")),
    }
}
