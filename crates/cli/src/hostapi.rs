//! Calling a host's admin API: choose the host, get a token for exactly the
//! call from the token service, make the call over mutual TLS.

use std::fmt;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use nitrile_api::admin::AdminRequest;
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, PrincipalId, PrincipalKind};
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
    let op = req.operation();
    let tls = loaded.tls()?;
    let audience = Audience::new(target.host.as_str())
        .with_context(|| format!("host id {} is not a token audience", target.host))?;
    let ask = TokenRequest {
        operations: vec![op],
        resources: vec![req.resource(&target.host)],
        audience,
        group: None,
        lifetime_secs: None,
    };
    let granted = crate::tokenapi::obtain(loaded, tls.clone(), &ask).await?;

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
    let mut client = nitrile_net::Client::connect(&target.addr, &server, tls)
        .await
        .map_err(unreachable)?;
    let body = req.body();
    let mut builder = Request::builder()
        .method(Method::from_bytes(req.method().as_bytes()).context("HTTP method")?)
        .uri(req.path())
        .header(header::ACCEPT, "application/json");
    if !body.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    let mut bearer = HeaderValue::from_str(&format!("Bearer {}", granted.token))
        .map_err(|_| anyhow::anyhow!("tokend returned a token that is not a header value"))?;
    bearer.set_sensitive(true);
    let request = builder
        .header(header::AUTHORIZATION, bearer)
        .body(Bytes::from(body))
        .context("cannot build the request")?;
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
}
