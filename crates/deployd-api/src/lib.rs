//! The API of nitrile's deployment service (`nitrile deployd`) as both
//! sides speak it: the routes ([`ROUTES`]) and the one parser of a request
//! ([`DeployRequest::parse`]), the JSON bodies with their bounds, and
//! [`DeployClient`], the mTLS client the CLI calls it with. The CLI needs
//! only this crate, never the deployment service's.
//!
//! Every call carries the caller's own token for audience
//! [`DEPLOYER_SERVICE`] naming `deployment/<cell>`
//! ([`deployment_resource`]); the sample entitlements give them to on-call
//! operators, and a guardrail keeps starting and aborting rollouts to
//! operators. Every refusal is a [`nitrile_api::wire::Refusal`].
//!
//! What it guarantees: a body is read up to [`MAX_REQUEST_BODY`] bytes,
//! unknown fields refused; a version is `MAJOR.MINOR.PATCH`; at most
//! [`MAX_WAVES`] waves, each of 1 to [`MAX_WAVE_SIZE`] hosts; a bake time
//! of at most [`MAX_BAKE_SECS`].

#![forbid(unsafe_code)]

mod client;

use std::sync::Arc;

use nitrile_api::{Name, Operation, PrincipalId, PrincipalKind, ResourceId, ResourceKind};
use serde::{Deserialize, Serialize};

pub use client::{DeployClient, DeployClientError};

/// The deployment service's name: its principal is
/// `nitrile://<cell>/service/deployer` and the audience of its callers'
/// tokens is `deployer`.
pub const DEPLOYER_SERVICE: &str = "deployer";
/// Largest request body.
pub const MAX_REQUEST_BODY: usize = 4096;
/// Most waves of a rollout.
pub const MAX_WAVES: usize = 16;
/// Most hosts of one wave.
pub const MAX_WAVE_SIZE: u32 = 1024;
/// Longest bake time.
pub const MAX_BAKE_SECS: u64 = 24 * 3600;
/// Longest version string.
pub const MAX_VERSION_LEN: usize = 32;

/// The principal of the deployment service of `cell`.
pub fn deployer_principal(cell: &Name) -> PrincipalId {
    PrincipalId::new(
        cell.clone(),
        PrincipalKind::Service,
        Name::new(DEPLOYER_SERVICE).unwrap_or_else(|_| unreachable!("`deployer` is a name")),
    )
}

/// The resource every call names: `deployment/<cell>`.
pub fn deployment_resource(cell: &Name) -> ResourceId {
    ResourceId::new(ResourceKind::Deployment, cell.clone())
}

/// One route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method.
    pub method: &'static str,
    /// The path.
    pub path: &'static str,
    /// The operation the caller's token must grant.
    pub operation: Operation,
}

/// Every route of the API; there is no other.
pub const ROUTES: [Route; 3] = [
    Route {
        method: "POST",
        path: "/v1/deployments",
        operation: Operation::DeploymentStart,
    },
    Route {
        method: "GET",
        path: "/v1/deployments/current",
        operation: Operation::DeploymentDescribe,
    },
    Route {
        method: "POST",
        path: "/v1/deployments/current/abort",
        operation: Operation::DeploymentAbort,
    },
];

/// `POST /v1/deployments`: roll `version` out in waves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The release version, `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// Wave sizes, in hosts: the first wave's, the second's, ...; the last
    /// size repeats until every host had its turn. Empty: the service's
    /// default.
    #[serde(default)]
    pub waves: Vec<u32>,
    /// Seconds a wave bakes (its hosts watched) before the next starts;
    /// none: the service's default.
    #[serde(default)]
    pub bake_secs: Option<u64>,
}

impl StartRequest {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), RequestError> {
        let v = &self.version;
        let parts: Vec<&str> = v.split('.').collect();
        if v.len() > MAX_VERSION_LEN
            || parts.len() != 3
            || parts
                .iter()
                .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9)
        {
            return Err(RequestError::Body(format!(
                "version {:?} is not MAJOR.MINOR.PATCH",
                v.chars().take(MAX_VERSION_LEN).collect::<String>()
            )));
        }
        if self.waves.len() > MAX_WAVES {
            return Err(RequestError::Body(format!(
                "{} waves; at most {MAX_WAVES}",
                self.waves.len()
            )));
        }
        if self.waves.iter().any(|w| *w == 0 || *w > MAX_WAVE_SIZE) {
            return Err(RequestError::Body(format!(
                "a wave of 0 or more than {MAX_WAVE_SIZE} hosts"
            )));
        }
        if self.bake_secs.is_some_and(|b| b > MAX_BAKE_SECS) {
            return Err(RequestError::Body(format!(
                "bake time above {MAX_BAKE_SECS} s"
            )));
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Updating hosts or baking a wave.
    Running,
    /// Every host runs the version.
    Succeeded,
    /// Stopped at a host that failed; the hosts after it untouched.
    Failed,
    /// Stopped by `deployment.abort`; the hosts after it untouched.
    Aborted,
    /// The service stopped during the rollout.
    Interrupted,
}

impl DeploymentState {
    /// Whether the rollout is over.
    pub fn is_final(self) -> bool {
        self != Self::Running
    }

    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
            Self::Interrupted => "interrupted",
        }
    }
}

/// Where one host of a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Its wave has not started.
    Pending,
    /// host.update sent; waiting for the new version to serve.
    Updating,
    /// It serves the version (and kept serving it through the bake).
    Healthy,
    /// It refused the release, did not serve it in time, rolled back, or
    /// stopped serving it during the bake.
    Failed,
    /// The rollout stopped before its turn: never called.
    Untouched,
}

impl StepState {
    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Updating => "updating",
            Self::Healthy => "healthy",
            Self::Failed => "failed",
            Self::Untouched => "untouched",
        }
    }
}

/// One host of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostStep {
    /// The host.
    pub host: Name,
    /// Where it stands.
    pub state: StepState,
    /// The version it ran before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The version it reports now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<String>,
    /// Why it failed, or what it is waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Its hosts.
    pub hosts: Vec<HostStep>,
}

/// A rollout: `deployment.start`'s and `deployment.describe`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Its number (1, 2, ... per deployment service).
    pub id: u64,
    /// The release version.
    pub version: String,
    /// Where it stands.
    pub state: DeploymentState,
    /// Who started it.
    pub started_by: String,
    /// When (RFC 3339).
    pub started_at: String,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Seconds each wave baked.
    pub bake_secs: u64,
    /// Its waves, in order.
    pub waves: Vec<Wave>,
    /// Why it stopped, when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A parsed request: exactly one of the routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployRequest {
    /// `POST /v1/deployments`.
    Start(StartRequest),
    /// `GET /v1/deployments/current`.
    Describe,
    /// `POST /v1/deployments/current/abort`.
    Abort,
}

/// Why a request is not one of the API's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No such route.
    #[error("no route {method} {path}; the deployment service serves {}", routes())]
    NoRoute {
        /// The method (clipped).
        method: String,
        /// The path (clipped).
        path: String,
    },
    /// A bad body.
    #[error("bad request body: {0}")]
    Body(String),
}

fn routes() -> String {
    ROUTES
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect::<Vec<_>>()
        .join(", ")
}

impl RequestError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoRoute { .. } => 404,
            Self::Body(_) => 400,
        }
    }

    /// The refusal code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } => "no_route",
            Self::Body(_) => "bad_body",
        }
    }
}

impl DeployRequest {
    /// Parses a request; the only parser.
    pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Self, RequestError> {
        let clip = |s: &str| s.chars().take(120).collect::<String>();
        match (method, path) {
            ("POST", "/v1/deployments") => {
                if body.len() > MAX_REQUEST_BODY {
                    return Err(RequestError::Body(format!(
                        "{} bytes; at most {MAX_REQUEST_BODY}",
                        body.len()
                    )));
                }
                let req: StartRequest = serde_json::from_slice(body)
                    .map_err(|e| RequestError::Body(clip(&e.to_string())))?;
                req.validate()?;
                Ok(Self::Start(req))
            }
            ("GET", "/v1/deployments/current") if body.is_empty() => Ok(Self::Describe),
            ("POST", "/v1/deployments/current/abort") if body.is_empty() => Ok(Self::Abort),
            _ => Err(RequestError::NoRoute {
                method: clip(method),
                path: clip(path),
            }),
        }
    }

    /// The operation the request needs.
    pub fn operation(&self) -> Operation {
        match self {
            Self::Start(_) => Operation::DeploymentStart,
            Self::Describe => Operation::DeploymentDescribe,
            Self::Abort => Operation::DeploymentAbort,
        }
    }
}

/// The client configuration type the client takes.
pub type ClientTls = Arc<rustls::ClientConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_routes_parse() {
        let start = br#"{"version":"1.2.3","waves":[1,2],"bake_secs":5}"#;
        assert!(matches!(
            DeployRequest::parse("POST", "/v1/deployments", start),
            Ok(DeployRequest::Start(_))
        ));
        assert_eq!(
            DeployRequest::parse("GET", "/v1/deployments/current", b""),
            Ok(DeployRequest::Describe)
        );
        assert_eq!(
            DeployRequest::parse("POST", "/v1/deployments/current/abort", b""),
            Ok(DeployRequest::Abort)
        );
        for (m, p) in [
            ("GET", "/v1/deployments"),
            ("DELETE", "/v1/deployments/current"),
            ("POST", "/v1/deployments/1/abort"),
            ("GET", "/v1/host"),
        ] {
            assert_eq!(DeployRequest::parse(m, p, b"").unwrap_err().status(), 404);
        }
    }

    #[test]
    fn bad_bodies_are_refused() {
        for body in [
            &br#"{"version":"1.2"}"#[..],
            br#"{"version":"1.2.3.4"}"#,
            br#"{"version":"1.x.3"}"#,
            br#"{"version":"1.2.3","waves":[0]}"#,
            br#"{"version":"1.2.3","bake_secs":999999999}"#,
            br#"{"version":"1.2.3","binary":"/bin/sh"}"#,
            br#"{"version":"1.2.3","waves":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}"#,
            b"not json",
        ] {
            let e = DeployRequest::parse("POST", "/v1/deployments", body).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(body));
        }
        let big = vec![b' '; MAX_REQUEST_BODY + 1];
        assert!(DeployRequest::parse("POST", "/v1/deployments", &big).is_err());
    }
}
