//! The fixed nitrile Cedar schema and the mapping from nitrile names to Cedar
//! entities.

use std::str::FromStr;
use std::sync::OnceLock;

use cedar_policy::{EntityId, EntityTypeName, EntityUid, Schema};
use nitrile_api::{Audience, Operation, PrincipalId, PrincipalKind, ResourceId, ResourceKind};

/// The schema every bundle must carry byte for byte as `schema.cedarschema`.
pub const SCHEMA_TEXT: &str = include_str!("schema.cedarschema");

/// The Cedar namespace of every nitrile entity type.
pub const NAMESPACE: &str = "Nitrile";

/// The parsed schema. It is part of this build, so failing to parse it is a
/// bug caught by the tests, not a runtime condition.
pub(crate) fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        #[allow(clippy::expect_used)]
        Schema::from_cedarschema_str(SCHEMA_TEXT)
            .map(|(s, _warnings)| s)
            .expect("the built-in nitrile schema parses (tested)")
    })
}

/// The entity types of the schema, by their unqualified name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum EntityKind {
    Group,
    Operator,
    Service,
    Auditor,
    Customer,
    ResourceSet,
    Host,
    Instance,
    Volume,
    Log,
    KmsKey,
    Kms,
    Image,
    Placement,
    Deployment,
}

impl EntityKind {
    pub(crate) const ALL: [EntityKind; 15] = [
        Self::Group,
        Self::Operator,
        Self::Service,
        Self::Auditor,
        Self::Customer,
        Self::ResourceSet,
        Self::Host,
        Self::Instance,
        Self::Volume,
        Self::Log,
        Self::KmsKey,
        Self::Kms,
        Self::Image,
        Self::Placement,
        Self::Deployment,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Group => "Group",
            Self::Operator => "Operator",
            Self::Service => "Service",
            Self::Auditor => "Auditor",
            Self::Customer => "Customer",
            Self::ResourceSet => "ResourceSet",
            Self::Host => "Host",
            Self::Instance => "Instance",
            Self::Volume => "Volume",
            Self::Log => "Log",
            Self::KmsKey => "KmsKey",
            Self::Kms => "Kms",
            Self::Image => "Image",
            Self::Placement => "Placement",
            Self::Deployment => "Deployment",
        }
    }

    /// The lowercase word used in diffs and summaries.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Operator => "operator",
            Self::Service => "service",
            Self::Auditor => "auditor",
            Self::Customer => "customer",
            Self::ResourceSet => "resource-set",
            Self::Host => "host",
            Self::Instance => "instance",
            Self::Volume => "volume",
            Self::Log => "log",
            Self::KmsKey => "kms-key",
            Self::Kms => "kms",
            Self::Image => "image",
            Self::Placement => "placement",
            Self::Deployment => "deployment",
        }
    }

    pub(crate) fn type_name(self) -> EntityTypeName {
        static NAMES: OnceLock<Vec<EntityTypeName>> = OnceLock::new();
        let names = NAMES.get_or_init(|| {
            EntityKind::ALL
                .iter()
                .map(|k| {
                    #[allow(clippy::expect_used)]
                    EntityTypeName::from_str(&format!("{NAMESPACE}::{}", k.as_str()))
                        .expect("fixed entity type names parse")
                })
                .collect()
        });
        names[self as usize].clone()
    }

    /// The kind of a Cedar type name, if it is one of ours.
    pub(crate) fn of(name: &EntityTypeName) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.type_name() == *name)
    }

    pub(crate) fn uid(self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.type_name(), EntityId::new(id))
    }

    pub(crate) fn is_principal(self) -> bool {
        matches!(
            self,
            Self::Operator | Self::Service | Self::Auditor | Self::Customer
        )
    }

    pub(crate) fn of_principal(kind: PrincipalKind) -> Option<Self> {
        match kind {
            PrincipalKind::Operator => Some(Self::Operator),
            PrincipalKind::Service => Some(Self::Service),
            PrincipalKind::Auditor => Some(Self::Auditor),
            PrincipalKind::Customer => Some(Self::Customer),
            // Hosts are principals of the cell (they call logd) but hold no
            // admin entitlements.
            PrincipalKind::Host => None,
        }
    }

    pub(crate) fn of_resource(kind: ResourceKind) -> Self {
        match kind {
            ResourceKind::Host => Self::Host,
            ResourceKind::Instance => Self::Instance,
            ResourceKind::Volume => Self::Volume,
            ResourceKind::Log => Self::Log,
            ResourceKind::KmsKey => Self::KmsKey,
            ResourceKind::Kms => Self::Kms,
            ResourceKind::Image => Self::Image,
            ResourceKind::Placement => Self::Placement,
            ResourceKind::Deployment => Self::Deployment,
        }
    }
}

/// The Cedar entity of a principal, if its kind can hold entitlements.
pub(crate) fn principal_uid(p: &PrincipalId) -> Option<EntityUid> {
    EntityKind::of_principal(p.kind).map(|k| k.uid(p.name.as_str()))
}

/// The Cedar entity of a resource.
pub(crate) fn resource_uid(r: &ResourceId) -> EntityUid {
    EntityKind::of_resource(r.kind).uid(r.name.as_str())
}

/// The Cedar entity of the customer that owns the entity `kind`/`id` (an
/// instance, volume or image named `<customer>--<name>`: the part before
/// the first `--`, as `ResourceId::owner` reads it), its parent in every
/// request.
pub(crate) fn owner_uid(kind: EntityKind, id: &str) -> Option<EntityUid> {
    if !matches!(
        kind,
        EntityKind::Instance | EntityKind::Volume | EntityKind::Image
    ) {
        return None;
    }
    let (owner, rest) = id.split_once(nitrile_api::OWNER_SEPARATOR)?;
    (!owner.is_empty() && !rest.is_empty()).then(|| EntityKind::Customer.uid(owner))
}

/// The Cedar entity of a token audience (`context.host`).
pub(crate) fn audience_uid(a: &Audience) -> EntityUid {
    EntityKind::Host.uid(a.as_str())
}

/// The Cedar action of an operation.
pub(crate) fn action_uid(op: Operation) -> EntityUid {
    static ACTIONS: OnceLock<Vec<EntityUid>> = OnceLock::new();
    let actions = ACTIONS.get_or_init(|| {
        Operation::ALL
            .iter()
            .map(|op| {
                #[allow(clippy::expect_used)]
                EntityUid::from_str(&format!("{NAMESPACE}::Action::\"{}\"", op.as_str()))
                    .expect("fixed action names parse")
            })
            .collect()
    });
    let index = Operation::ALL.iter().position(|o| *o == op).unwrap_or(0);
    actions[index].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_parses_and_has_every_operation_with_its_resource_kind() {
        let s = schema();
        for op in Operation::ALL {
            let action = action_uid(op);
            let resources: Vec<_> = s
                .resources_for_action(&action)
                .expect("action exists")
                .cloned()
                .collect();
            assert_eq!(
                resources,
                vec![EntityKind::of_resource(op.resource_kind()).type_name()],
                "{op}"
            );
        }
        // Only the operations and the four action groups.
        assert_eq!(s.actions().count(), Operation::ALL.len() + 4);
        for k in EntityKind::ALL {
            assert_eq!(EntityKind::of(&k.type_name()), Some(k));
        }
    }
}
