//! Strict loading of a bundle into [`Entitlements`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Entity, EntityUid, PolicyId, PolicySet, PrincipalConstraint, ResourceConstraint,
    ValidationMode, Validator,
};
use miette::Diagnostic;
use nitrile_api::Name;

use crate::bundle::{Bundle, BundleDigest, FileRole};
use crate::manifest::{BundleSerial, BundleVersion};
use crate::quota::Quotas;
use crate::review::{ReviewedBundle, ReviewerSet, verify_bundle};
use crate::schema::{EntityKind, SCHEMA_TEXT, schema};
use crate::{Location, MIN_REVIEWERS, PolicyError};

/// Most policies a bundle may hold.
pub const MAX_POLICIES: usize = 20_000;

/// Most entities (groups, principals, resource sets, hosts, logs) a bundle may list.
pub const MAX_ENTITIES: usize = 100_000;

/// What the entities files say: who is in which group, which host and log is
/// in which resource set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Model {
    pub(crate) groups: BTreeSet<Name>,
    pub(crate) resource_sets: BTreeSet<Name>,
    /// Principals (operator, service, auditor) and their groups.
    pub(crate) principals: BTreeMap<(EntityKind, Name), BTreeSet<Name>>,
    /// Hosts and logs and their resource sets.
    pub(crate) resources: BTreeMap<(EntityKind, Name), BTreeSet<Name>>,
}

/// Where a policy is and which group slice it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct PolicyMeta {
    pub(crate) at: Location,
    pub(crate) group: Option<Name>,
}

/// A loaded, strictly validated entitlement bundle, ready to answer
/// authorization questions.
#[derive(Debug)]
pub struct Entitlements {
    pub(crate) digest: BundleDigest,
    pub(crate) serial: BundleSerial,
    pub(crate) rule_files: Vec<String>,
    pub(crate) reviewers: Vec<Name>,
    pub(crate) model: Model,
    pub(crate) all: PolicySet,
    pub(crate) meta: HashMap<PolicyId, PolicyMeta>,
    /// The policies of each group that has any, plus every policy without a
    /// group in its principal scope.
    pub(crate) slices: HashMap<Name, PolicySet>,
    /// Policies without a group scope: the slice of a group that has none.
    pub(crate) unscoped: PolicySet,
    pub(crate) actions: Vec<Entity>,
    pub(crate) quotas: Quotas,
    pub(crate) authorizer: Authorizer,
}

/// What `nitrile entitlements check` prints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The bundle digest.
    pub digest: String,
    /// The bundle serial (`bundle.toml`).
    pub serial: u64,
    /// The monitor rule files the bundle carries (`rules/*.yml`).
    pub rule_files: Vec<String>,
    /// Reviewers whose signatures were verified, if the bundle was loaded reviewed.
    pub reviewers: Vec<String>,
    /// Groups: name, members, number of policies in their slice, quotas.
    pub groups: Vec<GroupSummary>,
    /// Number of principals listed.
    pub principals: usize,
    /// Resource sets and their members.
    pub resource_sets: Vec<(String, Vec<String>)>,
    /// Number of policies.
    pub policies: usize,
    /// Number of quotas.
    pub quotas: usize,
}

/// One group in a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupSummary {
    /// The group.
    pub name: String,
    /// Its members, `kind/name`.
    pub members: Vec<String>,
    /// Policies scoped to this group.
    pub policies: usize,
    /// Quotas on this group, `operation<=max/window`.
    pub quotas: Vec<String>,
}

impl Bundle {
    /// Reads and strictly validates the bundle at `dir`, without checking
    /// reviewer signatures. For tools (`check`, `diff`, `explain`); the token
    /// service loads with [`Entitlements::load_reviewed`].
    pub fn load(dir: &Path) -> Result<Entitlements, PolicyError> {
        Entitlements::from_bundle(&Bundle::read(dir)?, Vec::new())
    }
}

impl Entitlements {
    /// Verifies that the bundle at `dir` is signed by at least
    /// [`MIN_REVIEWERS`] distinct reviewers of `reviewers`, then loads it.
    pub fn load_reviewed(dir: &Path, reviewers: &ReviewerSet) -> Result<Self, PolicyError> {
        Self::from_reviewed(verify_bundle(dir, reviewers, MIN_REVIEWERS)?)
    }

    /// Loads a bundle whose signatures were verified. The bytes loaded are the
    /// bytes whose digest was signed.
    pub fn from_reviewed(reviewed: ReviewedBundle) -> Result<Self, PolicyError> {
        let reviewers = reviewed.reviewers().to_vec();
        Self::from_bundle(reviewed.bundle(), reviewers)
    }

    /// The digest of the loaded bundle.
    pub fn digest(&self) -> BundleDigest {
        self.digest
    }

    /// The serial of the loaded bundle.
    pub fn serial(&self) -> BundleSerial {
        self.serial
    }

    /// The serial and digest together.
    pub fn version(&self) -> BundleVersion {
        BundleVersion {
            serial: self.serial,
            digest: self.digest,
        }
    }

    /// The monitor rule files of the bundle, by relative path.
    pub fn rule_files(&self) -> &[String] {
        &self.rule_files
    }

    /// The reviewers whose signatures were verified (empty for an unreviewed load).
    pub fn reviewers(&self) -> &[Name] {
        &self.reviewers
    }

    /// The quotas of the bundle.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Every group listed, in name order.
    pub fn groups(&self) -> impl Iterator<Item = &Name> {
        self.model.groups.iter()
    }

    /// Every resource set listed, in name order.
    pub fn resource_sets(&self) -> impl Iterator<Item = &Name> {
        self.model.resource_sets.iter()
    }

    /// Number of policies.
    pub fn policy_count(&self) -> usize {
        self.meta.len()
    }

    /// A summary for people.
    pub fn summary(&self) -> Summary {
        let groups = self
            .model
            .groups
            .iter()
            .map(|g| GroupSummary {
                name: g.to_string(),
                members: self
                    .model
                    .principals
                    .iter()
                    .filter(|(_, gs)| gs.contains(g))
                    .map(|((k, n), _)| format!("{}/{n}", k.word()))
                    .collect(),
                policies: self
                    .meta
                    .values()
                    .filter(|m| m.group.as_ref() == Some(g))
                    .count(),
                quotas: self
                    .quotas
                    .iter()
                    .filter(|q| q.group == *g)
                    .map(|q| format!("{}<={}/{}", q.operation, q.max_resources, q.window))
                    .collect(),
            })
            .collect();
        let resource_sets = self
            .model
            .resource_sets
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    self.model
                        .resources
                        .iter()
                        .filter(|(_, sets)| sets.contains(s))
                        .map(|((k, n), _)| format!("{}/{n}", k.word()))
                        .collect(),
                )
            })
            .collect();
        Summary {
            digest: self.digest.to_hex(),
            serial: self.serial.get(),
            rule_files: self.rule_files.clone(),
            reviewers: self.reviewers.iter().map(ToString::to_string).collect(),
            groups,
            principals: self.model.principals.len(),
            resource_sets,
            policies: self.all.num_of_policies(),
            quotas: self.quotas.iter().count(),
        }
    }

    pub(crate) fn from_bundle(bundle: &Bundle, reviewers: Vec<Name>) -> Result<Self, PolicyError> {
        check_schema(bundle)?;
        let model = load_entities(bundle)?;
        let (all, meta) = load_policies(bundle, &model)?;
        let quotas = match bundle.files.get("quotas.toml") {
            Some(f) => Quotas::parse("quotas.toml", utf8("quotas.toml", &f.bytes)?, &model.groups)?,
            None => Quotas::default(),
        };

        let mut unscoped = PolicySet::new();
        let mut slices: HashMap<Name, PolicySet> = HashMap::new();
        for policy in all.policies() {
            let m = &meta[policy.id()];
            match &m.group {
                Some(g) => add(slices.entry(g.clone()).or_default(), policy),
                None => add(&mut unscoped, policy),
            }
        }
        for slice in slices.values_mut() {
            for policy in unscoped.policies() {
                add(slice, policy);
            }
        }
        #[allow(clippy::expect_used)]
        let actions = schema()
            .action_entities()
            .expect("the built-in schema's action entities are well-formed (tested)")
            .iter()
            .cloned()
            .collect();
        Ok(Self {
            digest: bundle.digest(),
            serial: bundle.serial(),
            rule_files: bundle.rule_files().map(|(p, _)| p.to_owned()).collect(),
            reviewers,
            model,
            all,
            meta,
            slices,
            unscoped,
            actions,
            quotas,
            authorizer: Authorizer::new(),
        })
    }
}

/// Adds a policy whose id is unique in the bundle (checked at load).
fn add(set: &mut PolicySet, policy: &cedar_policy::Policy) {
    // Ids are unique in the bundle and each slice receives each policy at most
    // once, so adding cannot fail.
    let _ = set.add(policy.clone());
}

pub(crate) fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, PolicyError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let text = std::str::from_utf8(valid).unwrap_or_default();
        PolicyError::NotUtf8 {
            at: Location::at_offset(file, text, text.len()),
        }
    })
}

fn check_schema(bundle: &Bundle) -> Result<(), PolicyError> {
    let file = bundle
        .files_of(FileRole::Schema)
        .next()
        .ok_or(PolicyError::MissingSchema)?
        .1;
    let text = utf8("schema.cedarschema", &file.bytes)?;
    if text == SCHEMA_TEXT {
        return Ok(());
    }
    let mut theirs = text.lines();
    let mut ours = SCHEMA_TEXT.lines();
    let mut line = 1;
    loop {
        match (theirs.next(), ours.next()) {
            (Some(a), Some(b)) if a == b => line += 1,
            (None, None) => break,
            _ => {
                return Err(PolicyError::SchemaMismatch {
                    at: Location::line("schema.cedarschema", line),
                });
            }
        }
    }
    // Same lines, different line endings or final newline.
    Err(PolicyError::SchemaMismatch {
        at: Location::line("schema.cedarschema", line),
    })
}

fn load_entities(bundle: &Bundle) -> Result<Model, PolicyError> {
    let mut model = Model::default();
    let mut seen: HashMap<EntityUid, Location> = HashMap::new();
    let mut parents_to_check: Vec<(Location, EntityUid)> = Vec::new();
    for (path, file) in bundle.files_of(FileRole::Entities) {
        let text = utf8(path, &file.bytes)?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|source| PolicyError::Json {
                at: Location {
                    file: path.clone(),
                    line: source.line().max(1),
                    column: Some(source.column().max(1)),
                },
                source,
            })?;
        let serde_json::Value::Array(items) = value else {
            return Err(PolicyError::EntitiesNotAnArray {
                at: Location::line(path, 1),
            });
        };
        let offsets = array_element_offsets(text);
        for (i, item) in items.into_iter().enumerate() {
            let at = Location::at_offset(path, text, offsets.get(i).copied().unwrap_or(0));
            let entity = Entity::from_json_value(item, Some(schema())).map_err(|source| {
                PolicyError::Entity {
                    at: at.clone(),
                    source: Box::new(source),
                }
            })?;
            let (uid, _attrs, parents) = entity.into_inner();
            let kind = match EntityKind::of(uid.type_name()) {
                Some(
                    k @ (EntityKind::Instance
                    | EntityKind::Volume
                    | EntityKind::KmsKey
                    | EntityKind::Image),
                ) => {
                    return Err(PolicyError::UnlistedKind {
                        at,
                        kind: k.as_str(),
                    });
                }
                Some(k) => k,
                None => {
                    return Err(PolicyError::UnlistedKind { at, kind: "Action" });
                }
            };
            let raw_id = uid.id().unescaped();
            let name = Name::new(raw_id).map_err(|source| PolicyError::BadEntityId {
                at: at.clone(),
                id: raw_id.chars().take(80).collect(),
                source,
            })?;
            if let Some(first) = seen.get(&uid) {
                return Err(PolicyError::DuplicateEntity {
                    at,
                    uid: uid.to_string(),
                    first: first.clone(),
                });
            }
            seen.insert(uid.clone(), at.clone());
            if seen.len() > MAX_ENTITIES {
                return Err(PolicyError::TooManyEntities { max: MAX_ENTITIES });
            }
            let mut parent_names = BTreeSet::new();
            for parent in parents {
                // The schema allows only groups (for principals) and resource
                // sets (for hosts and logs) as parents, and their ids must be
                // listed too (checked below).
                if let Ok(n) = Name::new(parent.id().unescaped()) {
                    parent_names.insert(n);
                }
                parents_to_check.push((at.clone(), parent));
            }
            match kind {
                EntityKind::Group => {
                    model.groups.insert(name);
                }
                EntityKind::ResourceSet => {
                    model.resource_sets.insert(name);
                }
                k if k.is_principal() => {
                    model.principals.insert((k, name), parent_names);
                }
                k => {
                    model.resources.insert((k, name), parent_names);
                }
            }
        }
    }
    for (at, parent) in parents_to_check {
        if !seen.contains_key(&parent) {
            return Err(PolicyError::UndeclaredParent {
                at,
                parent: parent.to_string(),
            });
        }
    }
    Ok(model)
}

/// The byte offsets where the elements of the top-level JSON array of `text`
/// start. `text` has already been parsed as JSON.
fn array_element_offsets(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut expecting = false;
    for (i, c) in text.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expecting && c != b']' {
            out.push(i);
            expecting = false;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    out
}

/// The byte offsets where each statement of a Cedar policy file starts:
/// the first character that is not whitespace or a comment after the previous
/// `;`.
fn statement_starts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_statement = false;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if !in_statement {
            out.push(i);
            in_statement = true;
        }
        match c {
            b'"' => in_string = true,
            b';' => in_statement = false,
            _ => {}
        }
        i += 1;
    }
    out
}

/// The first byte offset a Cedar diagnostic points at.
fn first_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset())
}

/// The statement index of a policy parsed from a whole file (`policyN`).
fn statement_index(id: &PolicyId) -> Option<usize> {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
}

const MAX_POLICY_ID_LEN: usize = 128;

fn load_policies(
    bundle: &Bundle,
    model: &Model,
) -> Result<(PolicySet, HashMap<PolicyId, PolicyMeta>), PolicyError> {
    let mut all = PolicySet::new();
    let mut meta: HashMap<PolicyId, PolicyMeta> = HashMap::new();
    let mut texts: HashMap<PolicyId, (&str, &str)> = HashMap::new();
    for (path, file) in bundle.files_of(FileRole::Policies) {
        let text = utf8(path, &file.bytes)?;
        let set = PolicySet::from_str(text).map_err(|source| PolicyError::PolicySyntax {
            at: match first_offset(&source) {
                Some(off) => Location::at_offset(path, text, off),
                None => Location::line(path, 1),
            },
            source: Box::new(source),
        })?;
        let starts = statement_starts(text);
        let at_statement = |id: &PolicyId| {
            let off = statement_index(id)
                .and_then(|i| starts.get(i).copied())
                .unwrap_or(0);
            Location::at_offset(path, text, off)
        };
        if let Some(t) = set.templates().next() {
            return Err(PolicyError::Template {
                at: at_statement(t.id()),
            });
        }
        let stem = path.strip_suffix(".cedar").unwrap_or(path);
        let mut policies: Vec<_> = set.policies().collect();
        policies.sort_by_key(|p| statement_index(p.id()));
        for policy in policies {
            let at = at_statement(policy.id());
            let id = match policy.annotation("id") {
                Some(id) => {
                    if id.is_empty()
                        || id.len() > MAX_POLICY_ID_LEN
                        || id.chars().any(char::is_control)
                    {
                        return Err(PolicyError::BadPolicyId { at });
                    }
                    id.to_owned()
                }
                None => format!(
                    "{stem}#{}",
                    statement_index(policy.id()).map_or(0, |i| i + 1)
                ),
            };
            let id = PolicyId::new(id);
            if let Some(first) = meta.get(&id) {
                return Err(PolicyError::DuplicatePolicyId {
                    at,
                    id: id.to_string(),
                    first: first.at.clone(),
                });
            }
            let policy = policy.new_id(id.clone());
            let group = group_scope(&policy);
            check_named_entities(&policy, model, &at)?;
            meta.insert(id.clone(), PolicyMeta { at, group });
            texts.insert(id, (path.as_str(), text));
            if meta.len() > MAX_POLICIES {
                return Err(PolicyError::TooManyPolicies { max: MAX_POLICIES });
            }
            add(&mut all, &policy);
        }
    }

    let locate = |policy: &PolicyId, d: &dyn Diagnostic| -> Location {
        match (texts.get(policy), first_offset(d)) {
            (Some((path, text)), Some(off)) => Location::at_offset(path, text, off),
            _ => meta
                .get(policy)
                .map(|m| m.at.clone())
                .unwrap_or_else(|| Location::line("?", 1)),
        }
    };
    let validator = Validator::new(schema().clone());
    let result = validator.validate(&all, ValidationMode::Strict);
    let mut errors: Vec<_> = result
        .validation_errors()
        .map(|e| (locate(e.policy_id(), e), e))
        .collect();
    errors.sort_by(|a, b| a.0.cmp(&b.0));
    let more = errors.len().saturating_sub(1);
    if let Some((at, e)) = errors.into_iter().next() {
        return Err(PolicyError::Validation {
            at,
            policy: e.policy_id().to_string(),
            source: Box::new(e.clone()),
            more,
        });
    }
    let mut warnings: Vec<_> = result
        .validation_warnings()
        .map(|w| (locate(w.policy_id(), w), w))
        .collect();
    warnings.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((at, w)) = warnings.into_iter().next() {
        return Err(PolicyError::ValidationWarning {
            at,
            policy: w.policy_id().to_string(),
            source: Box::new(w.clone()),
        });
    }
    Ok((all, meta))
}

/// The group a policy's principal scope names (`principal in Group::"g"` or
/// `principal is T in Group::"g"`), if any.
pub(crate) fn group_scope(policy: &cedar_policy::Policy) -> Option<Name> {
    let uid = match policy.principal_constraint() {
        PrincipalConstraint::In(uid) | PrincipalConstraint::IsIn(_, uid) => uid,
        _ => return None,
    };
    if EntityKind::of(uid.type_name()) != Some(EntityKind::Group) {
        return None;
    }
    Name::new(uid.id().unescaped()).ok()
}

/// Refuses policies that name a group or resource set no entities file lists:
/// such a policy is a typo that would silently grant or forbid nothing.
fn check_named_entities(
    policy: &cedar_policy::Policy,
    model: &Model,
    at: &Location,
) -> Result<(), PolicyError> {
    let mut named: Vec<EntityUid> = policy.entity_literals();
    match policy.principal_constraint() {
        PrincipalConstraint::In(u)
        | PrincipalConstraint::IsIn(_, u)
        | PrincipalConstraint::Eq(u) => {
            named.push(u);
        }
        PrincipalConstraint::Any | PrincipalConstraint::Is(_) => {}
    }
    match policy.resource_constraint() {
        ResourceConstraint::In(u) | ResourceConstraint::IsIn(_, u) | ResourceConstraint::Eq(u) => {
            named.push(u);
        }
        ResourceConstraint::Any | ResourceConstraint::Is(_) => {}
    }
    for uid in named {
        let listed =
            |set: &BTreeSet<Name>| Name::new(uid.id().unescaped()).is_ok_and(|n| set.contains(&n));
        let ok = match EntityKind::of(uid.type_name()) {
            Some(EntityKind::Group) => listed(&model.groups),
            Some(EntityKind::ResourceSet) => listed(&model.resource_sets),
            _ => true,
        };
        if !ok {
            return Err(PolicyError::UndeclaredEntity {
                at: at.clone(),
                policy: policy.id().to_string(),
                entity: uid.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_offsets_find_each_element() {
        let text = "[\n {\"a\": [1, \"x,]\"]},\n  2 , \"s\" ,{}\n]";
        let offs = array_element_offsets(text);
        let starts: Vec<char> = offs
            .iter()
            .map(|&o| text[o..].chars().next().unwrap())
            .collect();
        assert_eq!(starts, vec!['{', '2', '"', '{']);
        assert!(array_element_offsets("[]").is_empty());
    }

    #[test]
    fn statement_starts_skip_comments_and_strings() {
        let text = "// c;\n@id(\"a;b\")\npermit(principal, action, resource);\n\n  forbid(principal, action, resource) when { \"//;\" == \"x\" };\n// end\n";
        let starts = statement_starts(text);
        assert_eq!(starts.len(), 2);
        assert!(text[starts[0]..].starts_with("@id"));
        assert!(text[starts[1]..].starts_with("forbid"));
    }
}
