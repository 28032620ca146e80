//! `nitrile kms-key`: create, list, describe, disable, enable and schedule
//! or cancel the deletion of keys of the key service.

use anyhow::Context;
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, Operation, ResourceId, ResourceKind};
use nitrile_kms_api::wire::KeyDescription;
use nitrile_kms_api::{KMS_SERVICE, KmsClient, KmsClientError, kms_principal};

use crate::Global;
use crate::config::Loaded;
use crate::hostapi::UsageError;
use crate::output::{Output, print_json, print_pairs, print_table};
use crate::service::block_on;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Create a key of the key service, owned by you (`kms-key/NAME`). Its
    /// material never leaves the key service.
    ///
    /// Like every key verb it first gets a token for exactly this call from
    /// the token service (audience `kms`), then calls the key service over
    /// mutual TLS; refusals say which service and which step refused.
    ///
    /// Example: `nitrile kms-key create acme-data`
    Create(KeyArg),
    /// List the keys you may see (a customer sees its own).
    ///
    /// Example: `nitrile kms-key list -o json`
    List,
    /// Show a key's owner, state, deletion date and number of volume keys.
    ///
    /// Example: `nitrile kms-key describe acme-data`
    Describe(KeyArg),
    /// Disable a key: every new attach of a volume under it is refused,
    /// naming the key. Volumes attached before keep running until they are
    /// detached.
    ///
    /// Example: `nitrile kms-key disable acme-data`
    Disable(KeyArg),
    /// Enable a disabled key again. Only the key's owner may.
    ///
    /// Example: `nitrile kms-key enable acme-data`
    Enable(KeyArg),
    /// Schedule the destruction of a key and of every volume key under it
    /// (those volumes are crypto-erased) after a waiting period of 7 to 30
    /// days; the key is refused from now on. Only the key's owner may.
    ///
    /// Example: `nitrile kms-key schedule-deletion acme-data --days 7`
    ScheduleDeletion {
        /// The key's name.
        name: Name,
        /// Days until the destruction (7 to 30) [default: 30].
        #[arg(long, value_name = "N")]
        days: Option<u32>,
    },
    /// Cancel a scheduled destruction; the key stays disabled until
    /// enabled.
    ///
    /// Example: `nitrile kms-key cancel-deletion acme-data`
    CancelDeletion(KeyArg),
}

/// The key a verb acts on.
#[derive(Debug, clap::Args)]
pub(crate) struct KeyArg {
    /// The key's name (`kms-key/<name>`).
    name: Name,
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let loaded = crate::config::load(global)?;
    let cell = Name::new(&loaded.config.cell)
        .with_context(|| format!("cell name in {}", loaded.path.display()))?;
    let key = |n: &Name| ResourceId::new(ResourceKind::KmsKey, n.clone());
    let (operation, resource) = match &command {
        Command::Create(k) => (Operation::KmsKeyCreate, key(&k.name)),
        Command::List => (
            Operation::KmsKeyList,
            ResourceId::new(ResourceKind::Kms, cell.clone()),
        ),
        Command::Describe(k) => (Operation::KmsKeyDescribe, key(&k.name)),
        Command::Disable(k) => (Operation::KmsKeyDisable, key(&k.name)),
        Command::Enable(k) => (Operation::KmsKeyEnable, key(&k.name)),
        Command::ScheduleDeletion { name, .. } => (Operation::KmsKeyScheduleDeletion, key(name)),
        Command::CancelDeletion(k) => (Operation::KmsKeyCancelDeletion, key(&k.name)),
    };
    let answer = block_on(call(&loaded, &cell, operation, resource, command))??;
    match (answer, global.output) {
        (Answer::One(k), Output::Json) => print_json(&k),
        (Answer::Many(keys), Output::Json) => print_json(&keys),
        (Answer::One(k), Output::Table) => Ok(print_pairs(&key_lines(&k))?),
        (Answer::Many(keys), Output::Table) => {
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.name.to_string(),
                        k.owner.to_string(),
                        k.state.as_str().to_owned(),
                        k.delete_at.clone().unwrap_or_else(|| "-".into()),
                        k.volumes.to_string(),
                    ]
                })
                .collect();
            Ok(print_table(
                &["NAME", "OWNER", "STATE", "DELETE AT", "VOLUMES"],
                &rows,
            )?)
        }
    }
}

enum Answer {
    One(KeyDescription),
    Many(Vec<KeyDescription>),
}

/// Key/value lines of a key.
fn key_lines(k: &KeyDescription) -> Vec<(String, String)> {
    let mut lines = vec![
        ("key".to_owned(), format!("kms-key/{}", k.name)),
        ("owner".to_owned(), k.owner.to_string()),
        ("state".to_owned(), k.state.as_str().to_owned()),
    ];
    if let Some(at) = &k.delete_at {
        lines.push(("delete at".to_owned(), at.clone()));
    }
    lines.push(("volume keys".to_owned(), k.volumes.to_string()));
    lines.push(("created".to_owned(), k.created.clone()));
    lines.push(("updated".to_owned(), k.updated.clone()));
    lines
}

/// Gets a token for exactly this call (audience `kms`) and makes it.
async fn call(
    loaded: &Loaded,
    cell: &Name,
    operation: Operation,
    resource: ResourceId,
    command: Command,
) -> anyhow::Result<Answer> {
    let addr = loaded.config.endpoints.kms.clone().ok_or_else(|| {
        UsageError(format!(
            "{} names no key service ([endpoints] kms); is it a config written by `nitrile up`?",
            loaded.path.display()
        ))
    })?;
    let tls = loaded.tls()?;
    let ask = TokenRequest {
        operations: vec![operation],
        resources: vec![resource.clone()],
        audience: Audience::new(KMS_SERVICE)
            .unwrap_or_else(|_| unreachable!("`kms` is an audience")),
        group: None,
        lifetime_secs: None,
    };
    let granted = crate::tokenapi::obtain(loaded, tls.clone(), &ask).await?;
    let token = granted.token.as_str();
    let mut client = KmsClient::connect(&addr, &kms_principal(cell), tls)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the key service at {addr}: {e}; is the cell running (`nitrile up`)?"
            )
        })?;
    let result = match command {
        Command::Create(k) => client.create_key(&k.name, token).await.map(Answer::One),
        Command::List => client.list_keys(token).await.map(|l| Answer::Many(l.keys)),
        Command::Describe(k) => client.describe_key(&k.name, token).await.map(Answer::One),
        Command::Disable(k) => client.disable_key(&k.name, token).await.map(Answer::One),
        Command::Enable(k) => client.enable_key(&k.name, token).await.map(Answer::One),
        Command::ScheduleDeletion { name, days } => client
            .schedule_key_deletion(&name, days, token)
            .await
            .map(Answer::One),
        Command::CancelDeletion(k) => client
            .cancel_key_deletion(&k.name, token)
            .await
            .map(Answer::One),
    };
    result.map_err(|e| match e {
        KmsClientError::Refused { status, refusal } => anyhow::anyhow!(
            "the key service refused {operation} on {resource} at step {}",
            refusal.with_status(status)
        ),
        e => anyhow::Error::new(e).context(format!("{operation} on {resource}")),
    })
}
