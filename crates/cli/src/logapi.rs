//! Reading the cell's audit log as an auditor: the log's key and the
//! witnesses' keys from the client config, and a connection to logd with an
//! `audit.read` token for `log/<cell>` at audience `logd` from the token
//! service. The reads and their checks are the log client's
//! ([`nitrile_logclient::reader`], [`nitrile_logclient::audit`]).

use std::path::Path;

use anyhow::Context;
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, Operation, ResourceId, ResourceKind};
use nitrile_logclient::{LOGD, LogReader};
use nitrile_tlog::{KeyKind, NoteVerifier};

use crate::config::Loaded;
use crate::hostapi::UsageError;

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

/// Gets a read token from the token service and connects to logd: the
/// auditor's reads of the config's cell ([`LogReader`]).
pub(crate) async fn connect(loaded: &Loaded) -> anyhow::Result<LogReader> {
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
    let granted = crate::tokenapi::obtain(loaded, tls.clone(), &ask).await?;
    Ok(LogReader::connect(&addr, &cell, tls, &granted.token).await?)
}
