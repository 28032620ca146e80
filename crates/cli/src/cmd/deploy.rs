//! `nitrile deploy`: roll a signed release out to the cell's hosts through
//! the deployment service.

use std::time::Duration;

use anyhow::Context;
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Operation};
use nitrile_deployd_api::{
    DEPLOYER_SERVICE, DeployClient, Deployment, StartRequest, deployer_principal,
    deployment_resource,
};

use crate::Global;
use crate::config::Loaded;
use crate::hostapi::UsageError;
use crate::output::{Output, errln, print_json, print_table};
use crate::service::block_on;

/// How often `--wait` asks how the rollout stands.
const WATCH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Start rolling VERSION out to every host of the cell, in waves.
    ///
    /// The deployment service calls each host with `host.update VERSION`;
    /// the host fetches the release from its own pinned repository, checks
    /// signatures, attestation and environment, and hands over to it live.
    /// A wave's hosts must serve VERSION before the wave bakes; the first
    /// host that does not stops the rollout, and later hosts are not
    /// called.
    ///
    /// Example: `nitrile deploy start 0.2.0 --waves 1,2 --bake 30 --wait`
    Start {
        /// The release version (MAJOR.MINOR.PATCH).
        #[arg(value_name = "VERSION")]
        release: String,
        /// Wave sizes in hosts, comma-separated; the last repeats (default:
        /// the service's).
        #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
        waves: Vec<u32>,
        /// Seconds each wave bakes before the next (default: the service's).
        #[arg(long, value_name = "SECS")]
        bake: Option<u64>,
        /// Follow the rollout until it ends (progress on a terminal); exit 1
        /// unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// How the rollout in progress, or the last one, stands.
    ///
    /// Example: `nitrile deploy status --wait`
    Status {
        /// Follow it until it ends; exit 1 unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Stop the rollout in progress before its next host (hosts already
    /// updated keep the new version).
    ///
    /// Example: `nitrile deploy abort`
    Abort,
}

enum Call {
    Start(StartRequest),
    Describe,
    Abort,
}

async fn call(loaded: &Loaded, call: &Call) -> anyhow::Result<Deployment> {
    let me = nitrile_api::PrincipalId::parse(&loaded.config.principal)
        .with_context(|| format!("principal in {}", loaded.path.display()))?;
    let addr = loaded.config.endpoints.deployer.clone().ok_or_else(|| {
        UsageError(format!(
            "{} names no deployment service ([endpoints] deployer); is it an operator config \
             written by `nitrile up`?",
            loaded.path.display()
        ))
    })?;
    let operation = match call {
        Call::Start(_) => Operation::DeploymentStart,
        Call::Describe => Operation::DeploymentDescribe,
        Call::Abort => Operation::DeploymentAbort,
    };
    let tls = loaded.tls()?;
    let ask = TokenRequest {
        operations: vec![operation],
        resources: vec![deployment_resource(&me.cell)],
        audience: Audience::new(DEPLOYER_SERVICE)
            .unwrap_or_else(|_| unreachable!("`deployer` is an audience")),
        group: None,
        lifetime_secs: None,
    };
    let granted = crate::tokenapi::obtain(loaded, tls.clone(), &ask).await?;
    let mut client = DeployClient::connect(&addr, &deployer_principal(&me.cell), tls)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the deployment service at {addr}: {e}; is the cell running \
                 (`nitrile up`)?"
            )
        })?;
    let token = granted.token.as_str();
    let answer = match call {
        Call::Start(req) => client.start(req, token).await,
        Call::Describe => client.describe(token).await,
        Call::Abort => client.abort(token).await,
    };
    Ok(answer?)
}

fn hosts_line(d: &Deployment) -> String {
    let all: Vec<_> = d.waves.iter().flat_map(|w| &w.hosts).collect();
    let healthy = all
        .iter()
        .filter(|h| h.state == nitrile_deployd_api::StepState::Healthy)
        .count();
    format!(
        "deployment {} of {}: {} ({healthy} of {} hosts serve it)",
        d.id,
        d.version,
        d.state.as_str(),
        all.len()
    )
}

fn print(d: &Deployment, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(d);
    }
    let mut rows = Vec::new();
    for (w, wave) in d.waves.iter().enumerate() {
        for h in &wave.hosts {
            rows.push(vec![
                (w + 1).to_string(),
                h.host.to_string(),
                h.state.as_str().to_owned(),
                h.from.clone().unwrap_or_default(),
                h.now.clone().unwrap_or_default(),
                h.detail.clone().unwrap_or_default(),
            ]);
        }
    }
    print_table(&["WAVE", "HOST", "STATE", "FROM", "NOW", "DETAIL"], &rows)?;
    errln!("{}", hosts_line(d))?;
    if let Some(r) = &d.reason {
        errln!("reason: {r}")?;
    }
    Ok(())
}

/// How many calls in a row may fail while following before giving up.
const FOLLOW_RETRIES: u32 = 5;

/// Follows the rollout until it ends, a line on stderr at each change. A
/// call that fails (the cell busy, a service restarting) is retried a few
/// times before giving up; the rollout itself goes on either way.
async fn follow(loaded: &Loaded, mut d: Deployment) -> anyhow::Result<Deployment> {
    let mut last = String::new();
    let mut failures = 0;
    loop {
        let line = hosts_line(&d);
        if line != last {
            errln!("{line}")?;
            last = line;
        }
        if d.state.is_final() {
            return Ok(d);
        }
        tokio::time::sleep(WATCH_EVERY).await;
        match call(loaded, &Call::Describe).await {
            Ok(now) => {
                d = now;
                failures = 0;
            }
            Err(e) if failures < FOLLOW_RETRIES => {
                failures += 1;
                errln!("cannot ask how the rollout stands ({e:#}); retrying")?;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "lost track of deployment {} (it goes on: `nitrile deploy status`)",
                    d.id
                )));
            }
        }
    }
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let (c, wait) = match command {
        Command::Start {
            release,
            waves,
            bake,
            wait,
        } => {
            let req = StartRequest {
                version: release,
                waves,
                bake_secs: bake,
            };
            req.validate().map_err(|e| UsageError(format!("{e}")))?;
            (Call::Start(req), wait)
        }
        Command::Status { wait } => (Call::Describe, wait),
        Command::Abort => (Call::Abort, false),
    };
    let d = block_on(async {
        let d = call(&loaded, &c).await?;
        if wait {
            follow(&loaded, d).await
        } else {
            Ok(d)
        }
    })??;
    print(&d, global.output)?;
    if wait && d.state != nitrile_deployd_api::DeploymentState::Succeeded {
        anyhow::bail!("deployment {} {}", d.id, d.state.as_str());
    }
    Ok(())
}
