//! Authorization decisions and explanations.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use cedar_policy::{
    Context, Decision, Entities, Entity, EntityUid, PolicySet, Request, Response,
    RestrictedExpression,
};
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};

use crate::Location;
use crate::load::Entitlements;
use crate::schema::{EntityKind, action_uid, audience_uid, owner_uid, principal_uid, resource_uid};

/// A request that every policy check allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The group the principal acts as.
    pub group: Name,
    /// The policies that permitted the (operation, resource) pairs, sorted.
    pub policy_ids: Vec<String>,
}

/// The first (operation, resource) pair a group's policies did not allow.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupDenial {
    /// The group tried.
    pub group: Name,
    /// The operation denied.
    pub operation: Operation,
    /// The resource it was denied on.
    pub resource: ResourceId,
    /// Forbid policies that applied (empty when no permit applied).
    pub forbidden_by: Vec<String>,
    /// Policies that failed to evaluate (an error denies).
    pub errors: Vec<String>,
}

impl fmt::Display for GroupDenial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "group {}: {} on {} ",
            self.group, self.operation, self.resource
        )?;
        if !self.errors.is_empty() {
            write!(f, "failed to evaluate ({})", self.errors.join("; "))
        } else if !self.forbidden_by.is_empty() {
            write!(f, "is forbidden by {}", self.forbidden_by.join(", "))
        } else {
            f.write_str("is not permitted by any policy")
        }
    }
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// the request names no operation or no resource
    #[error("the request names no operation or no resource")]
    EmptyRequest,
    /// an operation is paired with a resource of another kind
    #[error("{operation} acts on a {} resource, not on {resource}", operation.resource_kind())]
    KindMismatch {
        /// The operation.
        operation: Operation,
        /// The resource of the wrong kind.
        resource: ResourceId,
    },
    /// the principal is in no group of the bundle
    #[error("{principal} holds no entitlement (it is in no group)")]
    NoEntitlement {
        /// The principal.
        principal: PrincipalId,
    },
    /// the requested group is not one of the principal's
    #[error("{principal} is not a member of group {group}")]
    NotAMember {
        /// The principal.
        principal: PrincipalId,
        /// The group asked for.
        group: Name,
    },
    /// no group of the principal allows every (operation, resource) pair
    #[error("{principal}: no group allows the whole request: {}", join(tried))]
    NotPermitted {
        /// The principal.
        principal: PrincipalId,
        /// Each group tried and its first denied pair.
        tried: Vec<GroupDenial>,
    },
}

fn join(tried: &[GroupDenial]) -> String {
    tried
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A policy and where it is written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRef {
    /// The policy id (`@id`, else `<file stem>#<n>`).
    pub id: String,
    /// Where it starts.
    pub at: Location,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id, self.at)
    }
}

/// How one group's slice decided one (operation, resource).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupExplanation {
    /// The group whose slice was evaluated.
    pub group: Name,
    /// Policies in the slice (the group's own plus those without a group scope).
    pub slice_policies: usize,
    /// Whether the slice allows the request.
    pub allowed: bool,
    /// Permit policies that apply.
    pub permits: Vec<PolicyRef>,
    /// Forbid policies that apply.
    pub forbids: Vec<PolicyRef>,
    /// Evaluation errors (an error denies).
    pub errors: Vec<String>,
}

/// The answer of [`Entitlements::explain`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The principal asked about.
    pub principal: PrincipalId,
    /// The operation.
    pub operation: Operation,
    /// The resource.
    pub resource: ResourceId,
    /// The audience (`context.host`).
    pub audience: Audience,
    /// The principal's groups, in name order.
    pub groups_of_principal: Vec<Name>,
    /// A refusal that happens before any policy is evaluated.
    #[serde(serialize_with = "ser_display_opt")]
    pub refused_early: Option<Denied>,
    /// Each group's slice and its decision.
    pub groups: Vec<GroupExplanation>,
}

fn ser_display_opt<S: serde::Serializer>(v: &Option<Denied>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.collect_str(d),
        None => s.serialize_none(),
    }
}

/// The outcome of evaluating one (operation, resource) pair.
pub(crate) struct PairOutcome {
    pub(crate) allowed: bool,
    pub(crate) reasons: Vec<String>,
    pub(crate) errors: Vec<String>,
}

impl PairOutcome {
    fn of(response: &Response) -> Self {
        let mut reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        reasons.sort();
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        errors.sort();
        Self {
            // Fail closed: an error in any policy denies, even a forbid
            // that Cedar would skip.
            allowed: response.decision() == Decision::Allow && errors.is_empty(),
            reasons,
            errors,
        }
    }
}

impl Entitlements {
    /// The groups `principal` is a member of, in name order. Empty for a
    /// principal the bundle does not list (and for host principals).
    pub fn groups_of(&self, principal: &PrincipalId) -> Vec<Name> {
        let Some(kind) = EntityKind::of_principal(principal.kind) else {
            return Vec::new();
        };
        self.model
            .principals
            .get(&(kind, principal.name.clone()))
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Decides whether `principal` may perform every operation of `ops` on
    /// every resource of `resources` at `audience`, acting as `group` (which
    /// must be one of its groups) or else as the first of its groups, in name
    /// order, that allows everything.
    ///
    /// Each pair is evaluated with the principal a member of the chosen group
    /// only, against that group's slice of the policies. A pair whose
    /// resource kind is not the operation's is denied.
    pub fn authorize(
        &self,
        principal: &PrincipalId,
        group: Option<&Name>,
        ops: &[Operation],
        resources: &[ResourceId],
        audience: &Audience,
    ) -> Result<Authorized, Denied> {
        if ops.is_empty() || resources.is_empty() {
            return Err(Denied::EmptyRequest);
        }
        for &operation in ops {
            if let Some(r) = resources
                .iter()
                .find(|r| r.kind != operation.resource_kind())
            {
                return Err(Denied::KindMismatch {
                    operation,
                    resource: r.clone(),
                });
            }
        }
        let groups = self.groups_of(principal);
        let Some(p_uid) = principal_uid(principal).filter(|_| !groups.is_empty()) else {
            return Err(Denied::NoEntitlement {
                principal: principal.clone(),
            });
        };
        let candidates: Vec<Name> = match group {
            Some(g) if groups.contains(g) => vec![g.clone()],
            Some(g) => {
                return Err(Denied::NotAMember {
                    principal: principal.clone(),
                    group: g.clone(),
                });
            }
            None => groups,
        };
        let host = audience_uid(audience);
        let res_uids: Vec<EntityUid> = resources.iter().map(resource_uid).collect();
        let mut tried = Vec::new();
        for g in candidates {
            let entities = self.request_entities(&p_uid, &g, res_uids.iter().chain([&host]));
            let slice = self.slice(&g);
            match self.check_all(slice, &entities, &p_uid, ops, resources, &res_uids, &host) {
                Ok(policy_ids) => {
                    return Ok(Authorized {
                        group: g,
                        policy_ids,
                    });
                }
                Err((operation, resource, outcome)) => tried.push(GroupDenial {
                    group: g,
                    operation,
                    resource,
                    forbidden_by: if outcome.errors.is_empty() {
                        outcome.reasons
                    } else {
                        Vec::new()
                    },
                    errors: outcome.errors,
                }),
            }
        }
        Err(Denied::NotPermitted {
            principal: principal.clone(),
            tried,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn check_all(
        &self,
        slice: &PolicySet,
        entities: &Entities,
        principal: &EntityUid,
        ops: &[Operation],
        resources: &[ResourceId],
        res_uids: &[EntityUid],
        host: &EntityUid,
    ) -> Result<Vec<String>, (Operation, ResourceId, PairOutcome)> {
        let mut ids = BTreeSet::new();
        for &op in ops {
            for (r, r_uid) in resources.iter().zip(res_uids) {
                let outcome = self.evaluate(slice, entities, principal, op, r_uid, host);
                if !outcome.allowed {
                    return Err((op, r.clone(), outcome));
                }
                ids.extend(outcome.reasons);
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// The policies evaluated for a member of `group`.
    pub(crate) fn slice(&self, group: &Name) -> &PolicySet {
        self.slices.get(group).unwrap_or(&self.unscoped)
    }

    /// The entities of one request: the principal as a member of `group`
    /// alone, the resources and audience host with their resource sets as the
    /// bundle lists them, and the schema's actions.
    pub(crate) fn request_entities<'a>(
        &self,
        principal: &EntityUid,
        group: &Name,
        others: impl Iterator<Item = &'a EntityUid>,
    ) -> Entities {
        let mut entities: Vec<Entity> = self.actions.clone();
        entities.push(Entity::new_no_attrs(
            principal.clone(),
            HashSet::from([EntityKind::Group.uid(group.as_str())]),
        ));
        let mut seen = HashSet::new();
        for uid in others {
            if uid == principal || !seen.insert(uid.clone()) {
                continue;
            }
            entities.push(self.listed_entity(uid));
        }
        // Every uid is distinct and no parent relation is cyclic (the schema
        // allows depth one), so building cannot fail; if it did, an empty
        // store makes every membership test false, which only denies more.
        Entities::from_entities(entities, None).unwrap_or_else(|_| Entities::empty())
    }

    /// A host, log, instance, volume or image entity with its parents: the
    /// resource sets the bundle lists, and for an instance, volume or image
    /// named `<customer>--<name>` the customer that owns it.
    pub(crate) fn listed_entity(&self, uid: &EntityUid) -> Entity {
        let kind = EntityKind::of(uid.type_name());
        let mut parents: HashSet<EntityUid> = kind
            .zip(Name::new(uid.id().unescaped()).ok())
            .and_then(|key| self.model.resources.get(&key))
            .map(|sets| {
                sets.iter()
                    .map(|s| EntityKind::ResourceSet.uid(s.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(owner) = kind.and_then(|k| owner_uid(k, uid.id().unescaped())) {
            parents.insert(owner);
        }
        Entity::new_no_attrs(uid.clone(), parents)
    }

    /// Evaluates one (operation, resource) pair against `set`.
    pub(crate) fn evaluate(
        &self,
        set: &PolicySet,
        entities: &Entities,
        principal: &EntityUid,
        op: Operation,
        resource: &EntityUid,
        host: &EntityUid,
    ) -> PairOutcome {
        let context = Context::from_pairs([(
            "host".to_owned(),
            RestrictedExpression::new_entity_uid(host.clone()),
        )]);
        let request = context.ok().and_then(|c| {
            Request::new(principal.clone(), action_uid(op), resource.clone(), c, None).ok()
        });
        match request {
            Some(request) => {
                PairOutcome::of(&self.authorizer.is_authorized(&request, set, entities))
            }
            None => PairOutcome {
                allowed: false,
                reasons: Vec::new(),
                errors: vec!["request could not be built".to_owned()],
            },
        }
    }

    fn policy_ref(&self, id: &str) -> PolicyRef {
        let at = self
            .meta
            .get(&cedar_policy::PolicyId::new(id))
            .map(|m| m.at.clone())
            .unwrap_or_else(|| Location::line("?", 1));
        PolicyRef {
            id: id.to_owned(),
            at,
        }
    }

    /// Explains the decision on one (operation, resource) at `audience` for
    /// each of the principal's groups: which slice was evaluated, which
    /// policies permit and forbid, and any evaluation errors.
    pub fn explain(
        &self,
        principal: &PrincipalId,
        operation: Operation,
        resource: &ResourceId,
        audience: &Audience,
    ) -> Explanation {
        let groups_of_principal = self.groups_of(principal);
        let mut out = Explanation {
            principal: principal.clone(),
            operation,
            resource: resource.clone(),
            audience: audience.clone(),
            groups_of_principal: groups_of_principal.clone(),
            refused_early: None,
            groups: Vec::new(),
        };
        if resource.kind != operation.resource_kind() {
            out.refused_early = Some(Denied::KindMismatch {
                operation,
                resource: resource.clone(),
            });
            return out;
        }
        let Some(p_uid) = principal_uid(principal).filter(|_| !groups_of_principal.is_empty())
        else {
            out.refused_early = Some(Denied::NoEntitlement {
                principal: principal.clone(),
            });
            return out;
        };
        let host = audience_uid(audience);
        let r_uid = resource_uid(resource);
        for g in groups_of_principal {
            let slice = self.slice(&g);
            let entities = self.request_entities(&p_uid, &g, [&r_uid, &host].into_iter());
            let whole = self.evaluate(slice, &entities, &p_uid, operation, &r_uid, &host);
            let (permits, forbids) = split_by_effect(slice);
            let permitting = self.evaluate(&permits, &entities, &p_uid, operation, &r_uid, &host);
            let forbidding = self.evaluate(&forbids, &entities, &p_uid, operation, &r_uid, &host);
            out.groups.push(GroupExplanation {
                group: g,
                slice_policies: slice.policies().count(),
                allowed: whole.allowed,
                permits: permitting
                    .reasons
                    .iter()
                    .map(|id| self.policy_ref(id))
                    .collect(),
                forbids: forbidding
                    .reasons
                    .iter()
                    .map(|id| self.policy_ref(id))
                    .collect(),
                errors: whole.errors,
            });
        }
        out
    }
}

fn split_by_effect(set: &PolicySet) -> (PolicySet, PolicySet) {
    let mut permits = PolicySet::new();
    let mut forbids = PolicySet::new();
    for p in set.policies() {
        let target = match p.effect() {
            cedar_policy::Effect::Permit => &mut permits,
            cedar_policy::Effect::Forbid => &mut forbids,
        };
        let _ = target.add(p.clone());
    }
    (permits, forbids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bundle;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const GROUPS: usize = 8;

    /// A synthetic bundle plus policies without a group scope, some naming
    /// principals or resources directly.
    fn bundle() -> &'static Entitlements {
        static E: OnceLock<(tempfile::TempDir, Entitlements)> = OnceLock::new();
        &E.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            crate::synth::write_bundle(dir.path(), GROUPS, 300).unwrap();
            std::fs::write(
                dir.path().join("unscoped.cedar"),
                r#"
permit(principal == Nitrile::Operator::"op3", action == Nitrile::Action::"host.update", resource);
forbid(principal, action == Nitrile::Action::"host.drain", resource == Nitrile::Host::"h5");
permit(principal is Nitrile::Service, action == Nitrile::Action::"instance.list", resource)
  when { principal in Nitrile::Group::"g2" };
forbid(principal, action in Nitrile::Action::"mutate", resource is Nitrile::Instance)
  unless { context.host in Nitrile::ResourceSet::"rs1" || principal in Nitrile::Group::"g4" };
permit(principal, action == Nitrile::Action::"audit.read", resource == Nitrile::Log::"local")
  when { principal in Nitrile::Group::"g1" };
"#,
            )
            .unwrap();
            let e = Bundle::load(dir.path()).unwrap();
            (dir, e)
        })
        .1
    }

    fn principal_strategy() -> impl Strategy<Value = PrincipalId> {
        (0..3usize, 0..GROUPS + 2).prop_map(|(kind, n)| {
            let (k, prefix) = [("operator", "op"), ("service", "svc"), ("auditor", "op")][kind];
            PrincipalId::parse(&format!("nitrile://c/{k}/{prefix}{n}")).unwrap()
        })
    }

    fn resource_strategy(op: Operation) -> impl Strategy<Value = ResourceId> {
        let kind = op.resource_kind();
        (0..110usize).prop_map(move |n| {
            let name = match kind {
                nitrile_api::ResourceKind::Log | nitrile_api::ResourceKind::Kms if n % 2 == 0 => {
                    "local".to_owned()
                }
                nitrile_api::ResourceKind::Host => format!("h{n}"),
                _ => format!("x{n}"),
            };
            ResourceId::parse(&format!("{kind}/{name}")).unwrap()
        })
    }

    fn request_strategy() -> impl Strategy<Value = (PrincipalId, Operation, ResourceId, Audience)> {
        (
            principal_strategy(),
            prop::sample::select(Operation::ALL.to_vec()),
            0..110usize,
        )
            .prop_flat_map(|(p, op, host)| {
                (
                    Just(p),
                    Just(op),
                    resource_strategy(op),
                    Just(Audience::new(&format!("h{host}")).unwrap()),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Evaluating a group's slice decides exactly as evaluating every
        /// policy of the bundle, for every group of the principal.
        #[test]
        fn slice_evaluation_agrees_with_the_whole_policy_set(
            (p, op, r, a) in request_strategy()
        ) {
            let e = bundle();
            let host = audience_uid(&a);
            let r_uid = resource_uid(&r);
            let groups = e.groups_of(&p);
            for g in &groups {
                let p_uid = principal_uid(&p).unwrap();
                let entities = e.request_entities(&p_uid, g, [&r_uid, &host].into_iter());
                let sliced = e.evaluate(e.slice(g), &entities, &p_uid, op, &r_uid, &host);
                let whole = e.evaluate(&e.all, &entities, &p_uid, op, &r_uid, &host);
                prop_assert_eq!(sliced.allowed, whole.allowed);
                prop_assert_eq!(sliced.reasons, whole.reasons);
                prop_assert_eq!(sliced.errors, whole.errors);
            }
            // And authorize agrees with some group allowing it.
            let any = groups.iter().any(|g| {
                let p_uid = principal_uid(&p).unwrap();
                let entities = e.request_entities(&p_uid, g, [&r_uid, &host].into_iter());
                e.evaluate(&e.all, &entities, &p_uid, op, &r_uid, &host).allowed
            });
            prop_assert_eq!(e.authorize(&p, None, &[op], &[r], &a).is_ok(), any);
        }
    }

    #[test]
    fn slices_are_smaller_than_the_whole_set() {
        let e = bundle();
        let whole = e.all.policies().count();
        for g in e.groups() {
            assert!(e.slice(g).policies().count() * 4 < whole, "{g}");
        }
    }
}
