//! Calling a host's admin API: choose the host, get a token for exactly the
//! call from the token service, make the call over mutual TLS.

use std::fmt;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use nitrile_api::admin::{AdminRequest, VOLUME_TOKEN_HEADER};
use nitrile_api::wire::TokenRequest;
use nitrile_api::{
    Audience, Name, Operation, PrincipalId, PrincipalKind, ResourceId, ResourceKind,
};
use serde::de::DeserializeOwned;

use crate::config::Loaded;

/// A command line that asks for something the config does not have, or is
/// ambiguous: exit code 2, like clap's own usage errors.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The host a verb talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Its host id, also the audience of its tokens.
    pub(crate) host: Name,
    /// Its admin API address, `host:port`.
    pub(crate) addr: String,
}

/// The host named by `--host`, else the only one of the config's `[hosts]`.
pub(crate) fn target(loaded: &Loaded, flag: Option<&Name>) -> Result<Target, UsageError> {
    let hosts = &loaded.config.hosts;
    let known = || {
        if hosts.is_empty() {
            "none".to_owned()
        } else {
            hosts.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    let (host, addr) = match flag {
        Some(h) => match hosts.get(h.as_str()) {
            Some(addr) => (h.clone(), addr.clone()),
            None => {
                return Err(UsageError(format!(
                    "host {h} is not in the [hosts] of {} (known: {})",
                    loaded.path.display(),
                    known()
                )));
            }
        },
        None => {
            let mut all = hosts.iter();
            match (all.next(), all.next()) {
                (Some((h, addr)), None) => {
                    let host = Name::new(h).map_err(|e| {
                        UsageError(format!(
                            "host {h:?} in {} is not a valid host id: {e}",
                            loaded.path.display()
                        ))
                    })?;
                    (host, addr.clone())
                }
                (None, _) => {
                    return Err(UsageError(format!(
                        "{} names no host in [hosts]; is it a config written by `nitrile up`?",
                        loaded.path.display()
                    )));
                }
                (Some(_), Some(_)) => {
                    return Err(UsageError(format!(
                        "{} names several hosts ({}); choose one with --host",
                        loaded.path.display(),
                        known()
                    )));
                }
            }
        }
    };
    Ok(Target { host, addr })
}

/// Gets a token for exactly `req` on `target` from the token service and
/// sends `req` to the host with it, returning the host's JSON answer.
///
/// The token lives only in this function and the request's sensitive
/// `Authorization` header; no error message contains it.
pub(crate) async fn call<T: DeserializeOwned>(
    loaded: &Loaded,
    target: &Target,
    req: &AdminRequest,
) -> anyhow::Result<T> {
    call_with_volumes(loaded, target, req, &[]).await
}

/// [`call`], for a launch or a start that boots with `volumes`: when
/// `volumes` is not empty, a second token from the token service, granting
/// `volume.attach` on each `volume/<id>` at the same host, goes in the
/// [`VOLUME_TOKEN_HEADER`]. The host verifies it as it verifies the bearer
/// token and relays it to the key service, which releases each volume's
/// data key once under it.
///
/// Both tokens live only in this function and the request's sensitive
/// headers; no error message contains either.
pub(crate) async fn call_with_volumes<T: DeserializeOwned>(
    loaded: &Loaded,
    target: &Target,
    req: &AdminRequest,
    volumes: &[Name],
) -> anyhow::Result<T> {
    let op = req.operation();
    let tls = loaded.tls()?;
    let audience = Audience::new(target.host.as_str())
        .with_context(|| format!("host id {} is not a token audience", target.host))?;
    let ask = TokenRequest {
        operations: vec![op],
        resources: vec![req.resource(&target.host)],
        audience: audience.clone(),
        group: None,
        lifetime_secs: None,
    };
    let granted = crate::tokenapi::obtain(loaded, tls.clone(), &ask).await?;
    let volume_token = match volume_token_request(volumes, audience) {
        Some(ask) => Some(
            crate::tokenapi::obtain(loaded, tls.clone(), &ask)
                .await
                .with_context(|| {
                    format!(
                        "{op} boots with volumes {}, which needs a token for volume.attach on them too",
                        crate::tokenapi::join(volumes)
                    )
                })?
                .token,
        ),
        None => None,
    };

    let cell = Name::new(&loaded.config.cell)
        .with_context(|| format!("cell name in {}", loaded.path.display()))?;
    let server = PrincipalId::new(cell, PrincipalKind::Host, target.host.clone());
    let unreachable = |e: nitrile_net::NetError| {
        let hint = if e.is_tls() {
            "the TLS handshake failed: is the host's certificate from this cell's CA, and ours?"
        } else {
            "is the host agent running (`nitrile up`)?"
        };
        anyhow::anyhow!(
            "cannot call host {} at {} for {op}: {e}; {hint}",
            target.host,
            target.addr
        )
    };
    let request = build_request(req, &granted.token, volume_token.as_deref())?;
    let mut client = nitrile_net::Client::connect(&target.addr, &server, tls)
        .await
        .map_err(unreachable)?;
    let response = client.send(request).await.map_err(unreachable)?;
    if !response.status.is_success() {
        match response.refusal() {
            Some(r) => anyhow::bail!(
                "host {} refused {op} at step {}",
                target.host,
                r.with_status(response.status)
            ),
            None => anyhow::bail!(
                "host {} answered {} to {op} without saying why",
                target.host,
                response.status
            ),
        }
    }
    response.json().with_context(|| {
        format!(
            "host {}'s answer to {op} is not what the API says",
            target.host
        )
    })
}

/// The token request for the volume token of a call that boots with
/// `volumes`: `volume.attach` on each `volume/<id>`, at `audience` (the
/// host); none when there are no volumes.
fn volume_token_request(volumes: &[Name], audience: Audience) -> Option<TokenRequest> {
    if volumes.is_empty() {
        return None;
    }
    Some(TokenRequest {
        operations: vec![Operation::VolumeAttach],
        resources: volumes
            .iter()
            .map(|v| ResourceId::new(ResourceKind::Volume, v.clone()))
            .collect(),
        audience,
        group: None,
        lifetime_secs: None,
    })
}

/// The HTTP request of `req`, with `token` as its bearer token and
/// `volume_token`, if any, in the [`VOLUME_TOKEN_HEADER`]; both headers
/// are marked sensitive, and an error names which token was not a header
/// value, never the token.
fn build_request(
    req: &AdminRequest,
    token: &str,
    volume_token: Option<&str>,
) -> anyhow::Result<Request<Bytes>> {
    let body = req.body();
    let mut builder = Request::builder()
        .method(Method::from_bytes(req.method().as_bytes()).context("HTTP method")?)
        .uri(req.path())
        .header(header::ACCEPT, "application/json");
    if !body.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| anyhow::anyhow!("tokend returned a token that is not a header value"))?;
    bearer.set_sensitive(true);
    builder = builder.header(header::AUTHORIZATION, bearer);
    if let Some(volume_token) = volume_token {
        let mut value = HeaderValue::from_str(volume_token).map_err(|_| {
            anyhow::anyhow!("tokend returned a volume token that is not a header value")
        })?;
        value.set_sensitive(true);
        builder = builder.header(VOLUME_TOKEN_HEADER, value);
    }
    builder
        .body(Bytes::from(body))
        .context("cannot build the request")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nitrile_cell::{ClientConfig, Endpoints};

    use super::*;
    use crate::config::Source;

    fn loaded(hosts: &[(&str, &str)]) -> Loaded {
        Loaded {
            config: ClientConfig {
                cell: "local".into(),
                principal: "nitrile://local/operator/alice".into(),
                ca: "ca.pem".into(),
                cert: "a.pem".into(),
                key: "a.key".into(),
                log_vkey: None,
                witness_vkeys: Vec::new(),
                endpoints: Endpoints {
                    tokend: "127.0.0.1:7443".into(),
                    logd: None,
                    kms: None,
                    placement: None,
                    deployer: None,
                },
                hosts: hosts
                    .iter()
                    .map(|(h, a)| ((*h).to_owned(), (*a).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            },
            path: "alice.toml".into(),
            source: Source::Flag,
        }
    }

    #[test]
    fn the_only_host_is_the_default_and_several_need_a_choice() {
        let h1 = Name::new("h1").unwrap();
        let h2 = Name::new("h2").unwrap();
        let one = loaded(&[("h1", "127.0.0.1:7444")]);
        let t = target(&one, None).unwrap();
        assert_eq!((t.host.as_str(), t.addr.as_str()), ("h1", "127.0.0.1:7444"));
        assert_eq!(target(&one, Some(&h1)).unwrap(), t);
        let e = target(&one, Some(&h2)).unwrap_err();
        assert!(e.0.contains("h2") && e.0.contains("known: h1"), "{e}");

        let two = loaded(&[("h1", "127.0.0.1:7444"), ("h2", "127.0.0.1:7445")]);
        let e = target(&two, None).unwrap_err();
        assert!(e.0.contains("h1, h2") && e.0.contains("--host"), "{e}");
        assert_eq!(target(&two, Some(&h2)).unwrap().addr, "127.0.0.1:7445");

        let e = target(&loaded(&[]), None).unwrap_err();
        assert!(e.0.contains("no host"), "{e}");
    }

    fn launch(volumes: &[&str]) -> AdminRequest {
        AdminRequest::InstanceLaunch(nitrile_api::admin::LaunchRequest {
            instance: Name::new("web1").unwrap(),
            image: "ab".repeat(32).parse().unwrap(),
            vcpus: 1,
            memory_mib: 256,
            volumes: volumes.iter().map(|v| Name::new(v).unwrap()).collect(),
            scratch_mib: None,
            network: None,
        })
    }

    #[test]
    fn the_volume_token_grants_attach_on_exactly_the_volumes_at_the_host() {
        let h1 = Audience::new("h1").unwrap();
        assert!(volume_token_request(&[], h1.clone()).is_none());
        let volumes = [Name::new("data").unwrap(), Name::new("logs").unwrap()];
        let ask = volume_token_request(&volumes, h1.clone()).unwrap();
        assert_eq!(ask.operations, vec![Operation::VolumeAttach]);
        assert_eq!(
            ask.resources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["volume/data", "volume/logs"]
        );
        assert_eq!(ask.audience, h1);
        assert_eq!((ask.group, ask.lifetime_secs), (None, None));
    }

    #[test]
    fn the_volume_token_travels_in_its_own_sensitive_header() {
        let req = launch(&["data"]);
        let request = build_request(&req, "v4.public.bearer", Some("v4.public.volumes")).unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), "/v1/instances");
        let headers = request.headers();
        let bearer = &headers[header::AUTHORIZATION];
        assert_eq!(bearer, "Bearer v4.public.bearer");
        assert!(bearer.is_sensitive());
        let volume = &headers[VOLUME_TOKEN_HEADER];
        assert_eq!(volume, "v4.public.volumes");
        assert!(volume.is_sensitive());
        assert_eq!(headers.get_all(VOLUME_TOKEN_HEADER).iter().count(), 1);
        // Sensitive headers are not shown when a request is printed.
        let shown = format!("{request:?}");
        assert!(
            !shown.contains("v4.public.volumes") && !shown.contains("v4.public.bearer"),
            "{shown}"
        );
        let body: serde_json::Value = serde_json::from_slice(request.body()).unwrap();
        assert_eq!(body["volumes"], serde_json::json!(["data"]));

        // Without volumes, no such header at all.
        let request = build_request(&launch(&[]), "v4.public.bearer", None).unwrap();
        assert!(request.headers().get(VOLUME_TOKEN_HEADER).is_none());
        assert!(request.headers()[header::AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn a_token_that_is_no_header_value_is_never_echoed() {
        let req = launch(&["data"]);
        let e = build_request(&req, "ok", Some("secret\nvolume-token")).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("volume token"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let e = build_request(&req, "secret\0bearer", Some("ok")).unwrap_err();
        let text = format!("{e:#}");
        assert!(!text.contains("secret"), "{text}");
    }
}
