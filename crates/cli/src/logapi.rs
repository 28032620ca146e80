//! Reading the cell's audit log as an auditor: get an `audit.read` token for
//! `log/<cell>` at audience `logd` from the token service, then make reads of
//! logd's API over mutual TLS with it.
//!
//! Reads are not mutations, so logd accepts the one token for every read
//! of a verb until it expires; logd journals each read.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use nitrile_api::wire::TokenRequest;
use nitrile_api::{
    Audience, Name, Operation, PrincipalId, PrincipalKind, ResourceId, ResourceKind,
};
use nitrile_tlog::{KeyKind, NoteVerifier, Storage, StorageError};
use serde::de::DeserializeOwned;

use crate::config::Loaded;
use crate::hostapi::{UsageError, describe_refusal};

/// The service name (and token audience) of the audit log service.
pub(crate) const LOGD: &str = "logd";

/// The audit log service principal of `cell`.
pub(crate) fn logd_principal(cell: &Name) -> PrincipalId {
    PrincipalId::new(
        cell.clone(),
        PrincipalKind::Service,
        Name::new(LOGD).unwrap_or_else(|_| unreachable!("`logd` is a valid name")),
    )
}

/// The log's verifier key: from `--log-key FILE` when given, else the
/// client config's `log_vkey`.
pub(crate) fn log_verifier(
    loaded: Option<&Loaded>,
    flag: Option<&Path>,
) -> anyhow::Result<NoteVerifier> {
    let vkey = match (flag, loaded.and_then(|l| l.config.log_vkey.clone())) {
        (Some(file), _) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the log key {}", file.display()))?,
        (None, Some(vkey)) => vkey,
        (None, None) => {
            return Err(UsageError(
                "no log key: pass --log-key FILE (logd writes log.vkey in its state directory) \
                 or add `log_vkey` to the client config"
                    .into(),
            )
            .into());
        }
    };
    NoteVerifier::from_vkey(vkey.trim()).context("the log key is not a signed-note verifier key")
}

/// The witnesses' cosignature keys the client config names
/// (`witness_vkeys`); a checkpoint must carry a cosignature of one of them.
pub(crate) fn witness_verifiers(loaded: Option<&Loaded>) -> anyhow::Result<Vec<NoteVerifier>> {
    let Some(loaded) = loaded else {
        return Ok(Vec::new());
    };
    loaded
        .config
        .witness_vkeys
        .iter()
        .map(|vkey| {
            let v = NoteVerifier::from_vkey(vkey.trim()).with_context(|| {
                format!(
                    "witness_vkeys in {}: {vkey:?} is not a signed-note verifier key",
                    loaded.path.display()
                )
            })?;
            if v.kind() != KeyKind::CosignatureV1 {
                anyhow::bail!(
                    "witness_vkeys in {}: {} is not a witness cosignature key",
                    loaded.path.display(),
                    v.name()
                );
            }
            Ok(v)
        })
        .collect()
}

/// A connection to logd with a read token.
pub(crate) struct LogReader {
    client: nitrile_net::Client,
    bearer: HeaderValue,
    addr: String,
    cell: Name,
}

impl LogReader {
    /// Gets a read token from the token service and connects to logd.
    pub(crate) async fn connect(loaded: &Loaded) -> anyhow::Result<Self> {
        let addr = loaded.config.endpoints.logd.clone().ok_or_else(|| {
            UsageError(format!(
                "{} names no audit log service ([endpoints] logd = \"host:port\"); is it a \
                 config written by `nitrile up`?",
                loaded.path.display()
            ))
        })?;
        let cell = Name::new(&loaded.config.cell)
            .with_context(|| format!("cell name in {}", loaded.path.display()))?;
        let tls = loaded.tls()?;
        let ask = TokenRequest {
            operations: vec![Operation::AuditRead],
            resources: vec![ResourceId::new(ResourceKind::Log, cell.clone())],
            audience: Audience::new(LOGD).context("`logd` is a token audience")?,
            group: None,
            lifetime_secs: None,
        };
        let granted = crate::cmd::token::obtain(loaded, tls.clone(), &ask).await?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", granted.token))
            .map_err(|_| anyhow::anyhow!("tokend returned a token that is not a header value"))?;
        bearer.set_sensitive(true);
        let client = nitrile_net::Client::connect(&addr, &logd_principal(&cell), tls)
            .await
            .map_err(|e| unreachable(&addr, &e))?;
        Ok(Self {
            client,
            bearer,
            addr,
            cell,
        })
    }

    /// The cell.
    pub(crate) fn cell(&self) -> &Name {
        &self.cell
    }

    /// Where logd is, as the auditor's memory records it: `logd at <addr>`.
    pub(crate) fn source(&self) -> String {
        format!("logd at {}", self.addr)
    }

    /// `GET path`: the body, `None` for a 404, an error naming the step
    /// for any other refusal.
    pub(crate) async fn get(&mut self, path: &str) -> anyhow::Result<Option<Bytes>> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::AUTHORIZATION, self.bearer.clone())
            .body(Bytes::new())
            .context("cannot build the request")?;
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| unreachable(&self.addr, &e))?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status.is_success() {
            match response.refusal() {
                Some(r) => anyhow::bail!(
                    "logd refused the read {path} at step {}",
                    describe_refusal(&r, response.status)
                ),
                None => anyhow::bail!(
                    "logd answered {} to the read {path} without saying why",
                    response.status
                ),
            }
        }
        Ok(Some(response.body))
    }

    /// `GET path` as JSON; a 404 is an error.
    pub(crate) async fn get_json<T: DeserializeOwned>(&mut self, path: &str) -> anyhow::Result<T> {
        let body = self
            .get(path)
            .await?
            .with_context(|| format!("logd has no {path}"))?;
        serde_json::from_slice(&body)
            .with_context(|| format!("logd's answer to {path} is not what its API says"))
    }

    /// The latest checkpoint note, if logd published one.
    pub(crate) async fn checkpoint(&mut self) -> anyhow::Result<Option<String>> {
        match self.get("/v1/log/checkpoint").await? {
            Some(b) => Ok(Some(
                String::from_utf8(b.to_vec()).context("the checkpoint is not text")?,
            )),
            None => Ok(None),
        }
    }

    /// A tile or entry bundle by its tlog-tiles path (`tile/...`).
    pub(crate) async fn tile(&mut self, path: &str) -> anyhow::Result<Option<Bytes>> {
        self.get(&format!("/v1/log/{path}")).await
    }
}

fn unreachable(addr: &str, e: &nitrile_net::NetError) -> anyhow::Error {
    let hint = if e.is_tls() {
        "the TLS handshake failed: is logd's certificate from this cell's CA, and ours?"
    } else {
        "is the audit log service running (`nitrile up`)?"
    };
    anyhow::anyhow!("cannot read the audit log at {addr}: {e}; {hint}")
}

/// Log objects held in memory: what `nitrile audit verify` fetched from
/// logd, audited like a log directory.
#[derive(Debug, Default)]
pub(crate) struct MemStorage(Mutex<BTreeMap<String, Vec<u8>>>);

impl Storage for MemStorage {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
            .cloned())
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned(), bytes.to_vec());
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}
