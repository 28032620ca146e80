//! `[attestation] release`: each host's reference PCR values from the
//! signed releases of its environment's TUF repository.
//!
//! The repository is read with `tough`'s client from the pinned root (its
//! datastore under the service's state directory keeps the metadata it
//! accepted, so older metadata is refused later), and each release is
//! checked as a host checks one before it runs it
//! ([`nitrile_release::client::newest_host_references`]): listed by
//! targets metadata that k of the release signers signed, built for this
//! environment, attested by the pinned CI key, every file's signed digest
//! the manifest's, and its `host-references.json` read through `tough`
//! (length and SHA-256) and parsed strictly. The newest `releases` that
//! pass are believed; a host's document must show every PCR of its entry
//! in one of them. A release refused for what was signed is passed over
//! for an older one; a release whose files in the repository are not the
//! signed ones keeps its place among the newest and is not believed, so
//! that damaging the newest release's files does not bring back values a
//! newer release retired.
//!
//! The repository is read at start, then when a check finds the last read
//! older than `refresh_secs`, and when a host's lookup fails (not listed,
//! other values, nothing believed), at most once per [`RETRY`]. A
//! repository that cannot be read or holds no such release leaves nothing
//! believed: every unwrap is refused, saying why, until a read succeeds.
//! Each change of what is believed is journaled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nitrile_api::Name;
use nitrile_audit::Outcome;
use nitrile_release::client::{self, Trust};
use nitrile_release::{HostReferences, ReleaseError, Version};
use time::OffsetDateTime;

use super::Service;
use super::config::ReleaseReferences;

/// The least time between two reads of the repository that a failed
/// lookup asks for.
pub(crate) const RETRY: Duration = Duration::from_secs(10);

/// Most releases not believed named in a journal record or a reason.
const MAX_NOT_BELIEVED_NAMED: usize = 8;

/// What the service believes.
#[derive(Debug, Clone)]
enum Believed {
    /// The host references of the newest verified releases, newest first
    /// (never empty).
    Releases(Arc<Vec<(Version, HostReferences)>>),
    /// None: why.
    Nothing(String),
}

impl Believed {
    /// What a journal record and the log say of it.
    fn summary(&self) -> String {
        match self {
            Self::Releases(r) => format!(
                "host references believed from signed releases {}",
                versions(r)
            ),
            Self::Nothing(why) => format!("no host references believed: {why}"),
        }
    }
}

fn versions(releases: &[(Version, HostReferences)]) -> String {
    releases
        .iter()
        .map(|(v, _)| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

struct State {
    /// When the repository was last read (the service's clock).
    read_at: Option<OffsetDateTime>,
    believed: Believed,
}

/// The host references of signed releases, read again as they age.
pub(crate) struct SignedReferences {
    config: ReleaseReferences,
    datastore: std::path::PathBuf,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for SignedReferences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedReferences")
            .field("repository", &self.config.repository)
            .field("environment", &self.config.environment)
            .finish_non_exhaustive()
    }
}

/// Why a host's values were not found.
enum Miss {
    /// Nothing is believed.
    Nothing(String),
    /// No believed release lists the host.
    NotListed(String),
    /// Each release that lists it names other values: the first PCR that
    /// differs, per release.
    Other(Vec<(Version, u8)>),
}

impl SignedReferences {
    /// Nothing believed until the first read; `datastore` is the TUF
    /// client's (persistent).
    pub(crate) fn new(config: ReleaseReferences, datastore: std::path::PathBuf) -> Self {
        Self {
            config,
            datastore,
            state: tokio::sync::Mutex::new(State {
                read_at: None,
                believed: Believed::Nothing("the repository was not read yet".to_owned()),
            }),
        }
    }

    /// Reads the repository (at start): what is believed is journaled.
    pub(crate) async fn read_now(&self, svc: &Service, now: OffsetDateTime) {
        let mut state = self.state.lock().await;
        self.read(&mut state, svc, now).await;
    }

    /// The release whose entry for `host` the measured `pcrs` show (the
    /// newest such), or why none.
    pub(crate) async fn check(
        &self,
        svc: &Service,
        host: &Name,
        pcrs: &BTreeMap<u8, [u8; 32]>,
        now: OffsetDateTime,
    ) -> Result<Version, String> {
        let mut state = self.state.lock().await;
        let due = state
            .read_at
            .is_none_or(|at| now - at >= self.config.refresh());
        if due {
            self.read(&mut state, svc, now).await;
        }
        let mut found = lookup(&state.believed, host, pcrs);
        let retry = state.read_at.is_none_or(|at| now - at >= RETRY);
        if found.is_err() && retry && !due {
            self.read(&mut state, svc, now).await;
            found = lookup(&state.believed, host, pcrs);
        }
        found.map_err(|miss| match miss {
            Miss::Nothing(why) => {
                format!("no signed release's host references are believed: {why}")
            }
            Miss::NotListed(versions) => {
                format!("{host} is in no signed release's host references (releases {versions})")
            }
            Miss::Other(per_release) => {
                let each = per_release
                    .iter()
                    .map(|(v, i)| format!("PCR {i} in {v}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "{host}'s PCRs are not its reference values in any signed release \
                     believed ({each} differ): the host does not run a signed release"
                )
            }
        })
    }

    /// Reads the repository, replaces what is believed, and journals and
    /// logs a change.
    async fn read(&self, state: &mut State, svc: &Service, now: OffsetDateTime) {
        let (believed, not_believed) = match self.load().await {
            Ok(found) => {
                let mut not_believed = found.damaged;
                not_believed.extend(found.passed_over);
                not_believed.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
                let believed = if found.releases.is_empty() {
                    Believed::Nothing(format!(
                        "no release of the repository verifies with host references{}",
                        not_believed_text(&not_believed)
                    ))
                } else {
                    Believed::Releases(Arc::new(found.releases))
                };
                (believed, not_believed)
            }
            Err(e) => (Believed::Nothing(client::chain(&e)), Vec::new()),
        };
        state.read_at = Some(now);
        let changed = believed.summary() != state.believed.summary();
        state.believed = believed;
        if !changed {
            return;
        }
        let summary = state.believed.summary();
        let named: Vec<serde_json::Value> = not_believed
            .iter()
            .take(MAX_NOT_BELIEVED_NAMED)
            .map(|(v, e)| serde_json::json!({ "release": v.to_string(), "code": e.code() }))
            .collect();
        let (outcome, releases) = match &state.believed {
            Believed::Releases(r) => {
                tracing::info!(repository = %self.config.repository.display(), "{summary}");
                let versions: Vec<String> = r.iter().map(|(v, _)| v.to_string()).collect();
                (Outcome::Executed, versions)
            }
            Believed::Nothing(_) => {
                tracing::warn!(
                    repository = %self.config.repository.display(),
                    "{summary}; volume keys are released to no host"
                );
                (Outcome::Failed, Vec::new())
            }
        };
        let record = svc
            .own_record(outcome)
            .with_reason(&summary)
            .with_detail(serde_json::json!({
                "host_references": {
                    "repository": self.config.repository.display().to_string(),
                    "environment": self.config.environment.to_string(),
                    "releases": releases,
                    "not_believed": named,
                }
            }));
        if let Err(e) = svc.append(&record).await {
            tracing::error!(error = %e, "could not journal the host references believed");
        }
    }

    /// The pinned trust and the repository as `tough` accepts it.
    async fn load(&self) -> Result<client::NewestHostReferences, ReleaseError> {
        let trust = Trust::load(
            self.config.environment.clone(),
            &self.config.root,
            &self.config.ci_key,
        )?;
        let repo = client::load(&self.config.repository, &trust, &self.datastore).await?;
        Ok(client::newest_host_references(&repo, &trust, self.config.releases()).await)
    }
}

fn not_believed_text(releases: &[(Version, ReleaseError)]) -> String {
    if releases.is_empty() {
        return String::new();
    }
    let each = releases
        .iter()
        .take(MAX_NOT_BELIEVED_NAMED)
        .map(|(v, e)| format!("{v}: {}", client::chain(e)))
        .collect::<Vec<_>>()
        .join("; ");
    format!(" ({each})")
}

/// The newest believed release whose entry for `host` the `pcrs` show.
fn lookup(
    believed: &Believed,
    host: &Name,
    pcrs: &BTreeMap<u8, [u8; 32]>,
) -> Result<Version, Miss> {
    let releases = match believed {
        Believed::Nothing(why) => return Err(Miss::Nothing(why.clone())),
        Believed::Releases(r) => r,
    };
    let mut other = Vec::new();
    for (version, references) in releases.iter() {
        let Some(reference) = references.get(host) else {
            continue;
        };
        match reference.mismatch(pcrs) {
            None => return Ok(*version),
            Some(pcr) => other.push((*version, pcr)),
        }
    }
    if other.is_empty() {
        Err(Miss::NotListed(versions(releases)))
    } else {
        Err(Miss::Other(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrile_release::HostReference;

    fn refs(hosts: &[(&str, u8, u8)]) -> HostReferences {
        HostReferences::new(
            hosts
                .iter()
                .map(|(h, pcr, b)| {
                    (
                        Name::new(h).unwrap(),
                        HostReference::new([(*pcr, [*b; 32])].into()).unwrap(),
                    )
                })
                .collect(),
        )
        .unwrap()
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn a_host_passes_on_its_entry_in_any_believed_release() {
        let believed = Believed::Releases(Arc::new(vec![
            (v("1.1.0"), refs(&[("h1", 15, 2), ("h2", 15, 9)])),
            (v("1.0.0"), refs(&[("h1", 15, 1)])),
        ]));
        let h1 = Name::new("h1").unwrap();
        let pcrs = |b: u8| BTreeMap::from([(4, [0; 32]), (15, [b; 32])]);
        assert_eq!(lookup(&believed, &h1, &pcrs(2)).ok(), Some(v("1.1.0")));
        assert_eq!(lookup(&believed, &h1, &pcrs(1)).ok(), Some(v("1.0.0")));
        // Another host's values are not h1's.
        assert!(matches!(
            lookup(&believed, &h1, &pcrs(9)),
            Err(Miss::Other(o)) if o == [(v("1.1.0"), 15), (v("1.0.0"), 15)]
        ));
        // A PCR missing from the document is not its reference value.
        assert!(lookup(&believed, &h1, &BTreeMap::new()).is_err());
        assert!(matches!(
            lookup(&believed, &Name::new("h3").unwrap(), &pcrs(2)),
            Err(Miss::NotListed(v)) if v == "1.1.0, 1.0.0"
        ));
        assert!(matches!(
            lookup(&Believed::Nothing("x".into()), &h1, &pcrs(2)),
            Err(Miss::Nothing(_))
        ));
    }
}
