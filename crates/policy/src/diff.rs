//! Semantic comparison of two bundles: who can do what on which resources.
//!
//! Grants are computed by evaluation, not by comparing text: for each group a
//! probe principal that is a member of that group only (one per principal
//! kind), for each operation, and for each target the bundle can name — every
//! listed host and log, every resource set, hosts and logs the bundle does not
//! list, and "any instance on host H" for the instance operations. A resource
//! set is reported when all its members are allowed, else its allowed members
//! one by one. Changes of membership (who is in which group, which host is in
//! which resource set) are reported too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cedar_policy::EntityUid;
use nitrile_api::{Name, Operation, ResourceKind};

use crate::load::Entitlements;
use crate::schema::EntityKind;

/// The id of probe entities: not a valid nitrile name, so it never collides
/// with a listed entity.
const PROBE: &str = "~probe";

/// What a grant allows an operation on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Every member of a resource set (for instance operations: any instance
    /// on every host of the set).
    ResourceSet(Name),
    /// One listed host or log (for instance operations: any instance on that host).
    Listed(Name),
    /// Hosts or logs the bundle does not list (for instance operations: any
    /// instance on such a host).
    Unlisted,
}

/// A grant, or a membership.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grant {
    /// Members of `group` may perform `operation` on `target`.
    Access {
        /// The group.
        group: Name,
        /// The operation.
        operation: Operation,
        /// What it may be performed on.
        target: Target,
        /// The principal kinds this holds for (`operator`, `service`,
        /// `auditor`), when not all of them.
        kinds: Vec<&'static str>,
    },
    /// `member` (`kind/name`) is in `of` (`group g` or `resource-set s`).
    Membership {
        /// The member.
        member: String,
        /// The group or resource set.
        of: String,
    },
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Access {
                group,
                operation,
                target,
                kinds,
            } => {
                let kind = operation.resource_kind();
                let on = match (kind, target) {
                    (
                        ResourceKind::Instance | ResourceKind::Volume | ResourceKind::Image,
                        Target::ResourceSet(s),
                    ) => {
                        format!("{kind}s on hosts in resource-set {s}")
                    }
                    (
                        ResourceKind::Instance | ResourceKind::Volume | ResourceKind::Image,
                        Target::Listed(h),
                    ) => {
                        format!("{kind}s on host {h}")
                    }
                    (
                        ResourceKind::Instance | ResourceKind::Volume | ResourceKind::Image,
                        Target::Unlisted,
                    ) => {
                        format!("{kind}s on unlisted hosts")
                    }
                    (_, Target::ResourceSet(s)) => format!("resource-set {s}"),
                    (_, Target::Listed(n)) => format!("{kind} {n}"),
                    (_, Target::Unlisted) => format!("unlisted {kind}s"),
                };
                write!(f, "{group}  {operation}  {on}")?;
                if !kinds.is_empty() {
                    write!(f, "  ({} only)", kinds.join(", "))?;
                }
                Ok(())
            }
            Self::Membership { member, of } => write!(f, "member  {member}  in {of}"),
        }
    }
}

/// Added or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    /// Only the old bundle has it.
    Removed,
    /// Only the new bundle has it.
    Added,
}

/// One line of a diff.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantChange {
    /// Added or removed.
    pub change: Change,
    /// The grant.
    pub grant: Grant,
}

impl fmt::Display for GrantChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.change {
            Change::Added => '+',
            Change::Removed => '-',
        };
        write!(f, "{sign} {}", self.grant)
    }
}

/// The changes in access from `old` to `new`, sorted. Empty when the bundles
/// differ only in text that does not change access.
pub fn diff(old: &Entitlements, new: &Entitlements) -> Vec<GrantChange> {
    let a: BTreeSet<Grant> = old.grants().into_iter().collect();
    let b: BTreeSet<Grant> = new.grants().into_iter().collect();
    let mut out: Vec<GrantChange> = a
        .difference(&b)
        .map(|g| GrantChange {
            change: Change::Removed,
            grant: g.clone(),
        })
        .chain(b.difference(&a).map(|g| GrantChange {
            change: Change::Added,
            grant: g.clone(),
        }))
        .collect();
    out.sort_by(|x, y| (&x.grant, x.change).cmp(&(&y.grant, y.change)));
    out
}

const PRINCIPAL_KINDS: [EntityKind; 4] = [
    EntityKind::Operator,
    EntityKind::Service,
    EntityKind::Auditor,
    EntityKind::Customer,
];

impl Entitlements {
    /// The effective grants and memberships of this bundle, sorted.
    pub fn grants(&self) -> Vec<Grant> {
        let mut out = BTreeSet::new();
        for ((kind, name), groups) in &self.model.principals {
            for g in groups {
                out.insert(Grant::Membership {
                    member: format!("{}/{name}", kind.word()),
                    of: format!("group {g}"),
                });
            }
        }
        for ((kind, name), sets) in &self.model.resources {
            for s in sets {
                out.insert(Grant::Membership {
                    member: format!("{}/{name}", kind.word()),
                    of: format!("resource-set {s}"),
                });
            }
        }
        let unlisted_host = EntityKind::Host.uid(PROBE);
        for group in &self.model.groups {
            let mut by_target: BTreeMap<(Operation, Target), Vec<&'static str>> = BTreeMap::new();
            for p_kind in PRINCIPAL_KINDS {
                let principal = p_kind.uid(PROBE);
                for op in Operation::ALL {
                    for target in self.allowed_targets(&principal, group, op, &unlisted_host) {
                        by_target
                            .entry((op, target))
                            .or_default()
                            .push(p_kind.word());
                    }
                }
            }
            for ((operation, target), kinds) in by_target {
                out.insert(Grant::Access {
                    group: group.clone(),
                    operation,
                    target,
                    kinds: if kinds.len() == PRINCIPAL_KINDS.len() {
                        Vec::new()
                    } else {
                        kinds
                    },
                });
            }
        }
        out.into_iter().collect()
    }

    /// The targets `op` is allowed on for `principal` as a member of `group`.
    fn allowed_targets(
        &self,
        principal: &EntityUid,
        group: &Name,
        op: Operation,
        unlisted_host: &EntityUid,
    ) -> Vec<Target> {
        let slice = self.slice(group);
        let kind = op.resource_kind();
        // Which listed entities a target ranges over, and how to evaluate one.
        let member_kind = match kind {
            // Key service keys are not listed: like instances and volumes
            // they range over the audiences a token may name.
            ResourceKind::Host
            | ResourceKind::Instance
            | ResourceKind::Volume
            | ResourceKind::KmsKey
            | ResourceKind::Image => EntityKind::Host,
            ResourceKind::Log => EntityKind::Log,
            ResourceKind::Kms => EntityKind::Kms,
            ResourceKind::Placement => EntityKind::Placement,
            ResourceKind::Deployment => EntityKind::Deployment,
        };
        let on_host = matches!(
            kind,
            ResourceKind::Instance
                | ResourceKind::Volume
                | ResourceKind::KmsKey
                | ResourceKind::Image
        );
        // An unlisted resource of the probe principal's own (`~probe--~probe`
        // is a child of `Customer::"~probe"`), so policies scoped to a
        // customer's own resources show in the diff.
        let probe_resource = EntityKind::of_resource(kind)
            .uid(&format!("{PROBE}{}{PROBE}", nitrile_api::OWNER_SEPARATOR));
        let allowed = |listed: &EntityUid| -> bool {
            let (resource, host) = if on_host {
                (&probe_resource, listed)
            } else if member_kind == EntityKind::Host {
                (listed, listed)
            } else {
                (listed, unlisted_host)
            };
            let entities = self.request_entities(principal, group, [resource, host].into_iter());
            self.evaluate(slice, &entities, principal, op, resource, host)
                .allowed
        };
        let members: Vec<(&Name, &BTreeSet<Name>)> = self
            .model
            .resources
            .iter()
            .filter(|((k, _), _)| *k == member_kind)
            .map(|((_, n), sets)| (n, sets))
            .collect();
        let allowed_members: BTreeSet<&Name> = members
            .iter()
            .filter(|(n, _)| allowed(&member_kind.uid(n.as_str())))
            .map(|(n, _)| *n)
            .collect();
        let mut targets = Vec::new();
        let mut covered: BTreeSet<&Name> = BTreeSet::new();
        for set in &self.model.resource_sets {
            let in_set: Vec<&Name> = members
                .iter()
                .filter(|(_, sets)| sets.contains(set))
                .map(|(n, _)| *n)
                .collect();
            if !in_set.is_empty() && in_set.iter().all(|n| allowed_members.contains(n)) {
                targets.push(Target::ResourceSet(set.clone()));
                covered.extend(in_set);
            }
        }
        for n in allowed_members {
            if !covered.contains(n) {
                targets.push(Target::Listed(n.clone()));
            }
        }
        let unlisted = if on_host {
            unlisted_host.clone()
        } else {
            member_kind.uid(PROBE)
        };
        if allowed(&unlisted) {
            targets.push(Target::Unlisted);
        }
        targets
    }
}
