//! Which journals the log takes, and whether a record fits the source that
//! shipped it: the pure core of source admission (no I/O).
//!
//! A cell declares its journal sources in logd.toml (`[sources]`): its
//! hosts, its token service and, by name, any other cell service. logd
//! ingests a journal only from a declared source (its mTLS principal, which
//! must also be the journal's source) and only records whose content fits
//! that source's role ([`check_record`]):
//!
//! - every record is an [`AuditRecord`] whose `source` is the shipping
//!   journal's source, and every principal it names belongs to this cell;
//! - a host's records are about that host: their audience, when present, is
//!   the host itself, every `host/...` resource is that host, every resource
//!   is a host, an instance or a volume, and every operation is one a host
//!   serves (none of the audit log's);
//! - the token service's records may name any operation, resource and
//!   audience (it decides for the whole cell), but no principal of another
//!   cell;
//! - another declared service's records are checked as the token service's.
//!
//! So a principal that writes no journal (an operator, `placement`) cannot
//! ship one, and no source can put a record in another's mouth: a host
//! cannot journal a call executed on another host, and a journal cannot
//! claim another source in its records.

use std::collections::BTreeMap;

use nitrile_api::{Name, PrincipalId, PrincipalKind, ResourceKind};
use nitrile_audit::AuditRecord;
use serde::{Deserialize, Serialize};

/// Most sources a cell may declare.
pub const MAX_DECLARED_SOURCES: usize = 4096;

/// The `[sources]` section of logd.toml: the journals this log takes.
///
/// ```toml
/// [sources]
/// hosts = ["h1", "h2"]        # nitrile://<cell>/host/<name>
/// token_service = "tokend"    # nitrile://<cell>/service/tokend
/// services = []               # other cell services that ship a journal
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// The cell's hosts.
    #[serde(default)]
    pub hosts: Vec<Name>,
    /// The token service's service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_service: Option<Name>,
    /// Other cell services that ship a journal, by service name.
    #[serde(default)]
    pub services: Vec<Name>,
}

impl SourcesConfig {
    /// How many sources it declares.
    pub fn len(&self) -> usize {
        self.hosts.len() + usize::from(self.token_service.is_some()) + self.services.len()
    }

    /// Whether it declares none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a declared source is, which decides what its records may say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourceRole {
    /// A host agent: its records are about itself.
    Host,
    /// The token service: its records are token decisions for the cell.
    TokenService,
    /// Another cell service named in the config.
    Service,
    /// The log service itself (its own journal, ingested in-process only).
    Log,
}

/// The journal sources of a cell, by principal URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredSources {
    cell: Name,
    roles: BTreeMap<String, SourceRole>,
}

impl DeclaredSources {
    /// The sources `config` declares for `cell`; the log service `me` is
    /// always one (its own journal).
    pub fn new(cell: &Name, me: &PrincipalId, config: &SourcesConfig) -> Self {
        let mut roles = BTreeMap::new();
        let service = |n: &Name| PrincipalId::new(cell.clone(), PrincipalKind::Service, n.clone());
        for h in &config.hosts {
            let p = PrincipalId::new(cell.clone(), PrincipalKind::Host, h.clone());
            roles.insert(p.uri(), SourceRole::Host);
        }
        for s in &config.services {
            roles.insert(service(s).uri(), SourceRole::Service);
        }
        if let Some(t) = &config.token_service {
            roles.insert(service(t).uri(), SourceRole::TokenService);
        }
        roles.insert(me.uri(), SourceRole::Log);
        Self {
            cell: cell.clone(),
            roles,
        }
    }

    /// The role of `principal`, if it is a declared source.
    pub fn role(&self, principal: &PrincipalId) -> Option<SourceRole> {
        if principal.cell != self.cell {
            return None;
        }
        self.roles.get(&principal.uri()).copied()
    }

    /// The declared sources' URIs, for messages.
    pub fn uris(&self) -> impl Iterator<Item = (&str, SourceRole)> {
        self.roles.iter().map(|(u, r)| (u.as_str(), *r))
    }
}

/// A record that does not fit the source that shipped it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ContentViolation {
    /// the payload is not an audit record
    #[error("record {seq} is not an audit record")]
    NotARecord {
        /// The record.
        seq: u64,
    },
    /// the record names another source than the journal it is in
    #[error("record {seq} says it was written by {claimed}, not by the journal's source")]
    OtherSource {
        /// The record.
        seq: u64,
        /// The source the record names.
        claimed: String,
    },
    /// the record names a principal of another cell
    #[error("record {seq} names {principal}, a principal of another cell")]
    ForeignPrincipal {
        /// The record.
        seq: u64,
        /// The principal.
        principal: String,
    },
    /// a host's record names another audience than the host
    #[error("record {seq} of a host names audience {audience}, not the host itself")]
    OtherAudience {
        /// The record.
        seq: u64,
        /// The audience named.
        audience: String,
    },
    /// a host's record is about another host, or a resource no host has
    #[error("record {seq} of a host names resource {resource}, which is not on that host")]
    OtherResource {
        /// The record.
        seq: u64,
        /// The resource named.
        resource: String,
    },
    /// a host's record names an operation no host serves
    #[error("record {seq} of a host names operation {operation}, which no host serves")]
    NotAHostOperation {
        /// The record.
        seq: u64,
        /// The operation named.
        operation: String,
    },
}

impl ContentViolation {
    /// The record at fault.
    pub fn seq(&self) -> u64 {
        match self {
            Self::NotARecord { seq }
            | Self::OtherSource { seq, .. }
            | Self::ForeignPrincipal { seq, .. }
            | Self::OtherAudience { seq, .. }
            | Self::OtherResource { seq, .. }
            | Self::NotAHostOperation { seq, .. } => *seq,
        }
    }
}

/// Checks that the record `seq` with payload `payload`, shipped by
/// `source` in `role`, fits that source (see the module docs).
pub fn check_record(
    role: SourceRole,
    source: &PrincipalId,
    seq: u64,
    payload: &[u8],
) -> Result<(), ContentViolation> {
    let record = AuditRecord::decode(payload).map_err(|_| ContentViolation::NotARecord { seq })?;
    if record.source != *source {
        return Err(ContentViolation::OtherSource {
            seq,
            claimed: record.source.uri(),
        });
    }
    if let Some(p) = &record.principal
        && p.cell != source.cell
    {
        return Err(ContentViolation::ForeignPrincipal {
            seq,
            principal: p.uri(),
        });
    }
    if role != SourceRole::Host {
        return Ok(());
    }
    if let Some(a) = &record.audience
        && a.as_str() != source.name.as_str()
    {
        return Err(ContentViolation::OtherAudience {
            seq,
            audience: a.as_str().to_owned(),
        });
    }
    for r in &record.resources {
        let on_host = match r.kind {
            ResourceKind::Host => r.name == source.name,
            ResourceKind::Instance | ResourceKind::Volume => true,
            // The log, the key service's keys, customers' images and the
            // placement service are no host's business.
            ResourceKind::Log
            | ResourceKind::KmsKey
            | ResourceKind::Kms
            | ResourceKind::Image
            | ResourceKind::Placement
            | ResourceKind::Deployment => false,
        };
        if !on_host {
            return Err(ContentViolation::OtherResource {
                seq,
                resource: r.to_string(),
            });
        }
    }
    if let Some(op) = record.operations.iter().find(|op| {
        op.is_customer()
            || matches!(
                op.resource_kind(),
                ResourceKind::Log | ResourceKind::KmsKey | ResourceKind::Kms
            )
    }) {
        return Err(ContentViolation::NotAHostOperation {
            seq,
            operation: op.as_str().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrile_api::wire::RefusalStep;
    use nitrile_api::{Audience, Operation, ResourceId};
    use nitrile_audit::{Outcome, RequestId};

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn principal(uri: &str) -> PrincipalId {
        PrincipalId::parse(uri).unwrap()
    }

    fn at() -> time::OffsetDateTime {
        time::macros::datetime!(2026-12-01 00:00 UTC)
    }

    fn drain_by(source: &str, principal_uri: &str, host: &str) -> Vec<u8> {
        AuditRecord::outcome(
            at(),
            principal(source),
            RequestId::from_bytes([7; 16]),
            Outcome::Executed,
        )
        .with_principal(principal(principal_uri))
        .with_operations([Operation::HostDrain])
        .with_resources([ResourceId::parse(&format!("host/{host}")).unwrap()])
        .with_audience(Audience::new(host).unwrap())
        .encode()
        .unwrap()
    }

    #[test]
    fn only_declared_sources_of_this_cell_have_a_role() {
        let me = principal("nitrile://local/service/logd");
        let d = DeclaredSources::new(
            &name("local"),
            &me,
            &SourcesConfig {
                hosts: vec![name("h1")],
                token_service: Some(name("tokend")),
                services: vec![name("kms")],
            },
        );
        assert_eq!(
            d.role(&principal("nitrile://local/host/h1")),
            Some(SourceRole::Host)
        );
        assert_eq!(
            d.role(&principal("nitrile://local/service/tokend")),
            Some(SourceRole::TokenService)
        );
        assert_eq!(
            d.role(&principal("nitrile://local/service/kms")),
            Some(SourceRole::Service)
        );
        assert_eq!(d.role(&me), Some(SourceRole::Log));
        for not in [
            "nitrile://local/host/h2",
            "nitrile://local/service/placement",
            "nitrile://local/operator/bob",
            "nitrile://other/host/h1",
            "nitrile://local/service/h1",
        ] {
            assert_eq!(d.role(&principal(not)), None, "{not}");
        }
    }

    #[test]
    fn a_host_journals_only_what_happened_on_it() {
        let h1 = principal("nitrile://local/host/h1");
        let ok = drain_by(
            "nitrile://local/host/h1",
            "nitrile://local/operator/bob",
            "h1",
        );
        assert_eq!(check_record(SourceRole::Host, &h1, 1, &ok), Ok(()));
        // A drain of h2 in h1's journal.
        let other = drain_by(
            "nitrile://local/host/h1",
            "nitrile://local/operator/bob",
            "h2",
        );
        assert!(matches!(
            check_record(SourceRole::Host, &h1, 2, &other),
            Err(ContentViolation::OtherAudience { seq: 2, .. })
        ));
        // A record that claims another writer.
        let claimed = drain_by(
            "nitrile://local/host/h2",
            "nitrile://local/operator/bob",
            "h1",
        );
        assert!(matches!(
            check_record(SourceRole::Host, &h1, 3, &claimed),
            Err(ContentViolation::OtherSource { seq: 3, .. })
        ));
        // A principal of another cell.
        let foreign = drain_by(
            "nitrile://local/host/h1",
            "nitrile://evil/operator/bob",
            "h1",
        );
        assert!(matches!(
            check_record(SourceRole::Host, &h1, 4, &foreign),
            Err(ContentViolation::ForeignPrincipal { seq: 4, .. })
        ));
        // Not an audit record at all.
        assert_eq!(
            check_record(SourceRole::Host, &h1, 5, br#"{"n":1}"#),
            Err(ContentViolation::NotARecord { seq: 5 })
        );
        // An audit-log read in a host's journal.
        let read = AuditRecord::refusal(
            at(),
            h1.clone(),
            RequestId::from_bytes([1; 16]),
            RefusalStep::Token,
            "no",
        )
        .with_operations([Operation::AuditRead])
        .encode()
        .unwrap();
        assert!(matches!(
            check_record(SourceRole::Host, &h1, 6, &read),
            Err(ContentViolation::NotAHostOperation { seq: 6, .. })
        ));
        // A host resource that is another host, without an audience.
        let res = AuditRecord::request(at(), h1.clone(), RequestId::from_bytes([2; 16]))
            .with_resources([ResourceId::parse("host/h2").unwrap()])
            .encode()
            .unwrap();
        assert!(matches!(
            check_record(SourceRole::Host, &h1, 7, &res),
            Err(ContentViolation::OtherResource { seq: 7, .. })
        ));
    }

    #[test]
    fn the_token_service_decides_for_the_whole_cell() {
        let t = principal("nitrile://local/service/tokend");
        let grant = drain_by(
            "nitrile://local/service/tokend",
            "nitrile://local/operator/bob",
            "h2",
        );
        assert_eq!(
            check_record(SourceRole::TokenService, &t, 1, &grant),
            Ok(())
        );
        let claimed = drain_by(
            "nitrile://local/host/h2",
            "nitrile://local/operator/bob",
            "h2",
        );
        assert!(matches!(
            check_record(SourceRole::TokenService, &t, 2, &claimed),
            Err(ContentViolation::OtherSource { .. })
        ));
        let foreign = drain_by(
            "nitrile://local/service/tokend",
            "nitrile://x/operator/bob",
            "h2",
        );
        assert!(matches!(
            check_record(SourceRole::Service, &t, 3, &foreign),
            Err(ContentViolation::ForeignPrincipal { .. })
        ));
    }
}
