//! The deployment service (`nitrile deployd`): rolls a signed release out
//! to the hosts of its cell in waves.
//!
//! Guarantees:
//! - Claims 5 and 6 as on every service: each request's token is verified
//!   offline by `nitrile_gate::Admission` for audience `deployer`, the exact
//!   operation and `deployment/<cell>`, bound to the caller's certificate,
//!   single use for mutations; the request record is durable before anything
//!   runs, every refusal and outcome is journaled, and the journal is
//!   shipped to logd. The sample entitlements give `deployment.*` to on-call
//!   operators; a guardrail keeps start and abort to operators.
//! - It is bound like any principal: it calls each host with its own
//!   identity (`service/deployer`) and a token from the token service for
//!   exactly that call (`host.update` on that host, within the deployer's
//!   quota; `host.describe` for the health check). It sends no code: a host
//!   fetches and checks the release itself from its pinned repository.
//! - A rollout goes wave by wave (sizes and bake time per rollout, else the
//!   config's): each host of a wave is described (its version before),
//!   sent `host.update`, then described until it serves the version with a
//!   healthy journal, within `health_timeout_secs`; then the wave bakes and
//!   its hosts are checked again. At the first host that refuses, does not
//!   serve the version in time, or stops serving it while baking, the
//!   rollout stops, `failed`, and no later host is called (`untouched`).
//!   `deployment.abort` stops it before its next host. One rollout at a
//!   time; every step is journaled (records with `detail.event =
//!   "deployment"`) and the rollout is recorded durably
//!   (`deployments.json`); one that was running when the service stopped
//!   is `interrupted` at its next start.

#![forbid(unsafe_code)]

pub mod config;
mod service;

pub use config::{ConfigError, DeploydConfig};
pub use service::{DeploydServer, DeploydServerError};
