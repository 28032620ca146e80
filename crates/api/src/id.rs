//! Names of principals, resources and audiences.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest name accepted for a cell, principal, resource or audience.
pub const MAX_NAME_LEN: usize = 63;

/// Longest principal URI accepted (`nitrile://cell/kind/name`).
pub const MAX_PRINCIPAL_URI_LEN: usize = 10 + 3 * MAX_NAME_LEN + 2;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// name is empty
    #[error("name is empty")]
    Empty,
    /// name is longer than the maximum
    #[error("name is {0} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    /// name has a character outside `a-z 0-9 -`, or starts or ends with `-`
    #[error(
        "name {0:?} must be lowercase letters, digits and '-', starting with a letter or digit and not ending with '-'"
    )]
    BadCharacter(String),
    /// principal URI is not of the form `nitrile://<cell>/<kind>/<name>`
    #[error("principal {0:?} is not of the form nitrile://<cell>/<kind>/<name>")]
    BadPrincipalUri(String),
    /// unknown principal kind
    #[error("unknown principal kind {0:?}; expected operator, service, host, auditor or customer")]
    UnknownPrincipalKind(String),
    /// resource id is not of the form `<kind>/<name>`
    #[error("resource {0:?} is not of the form <kind>/<name>, e.g. host/h1 or instance/i-1")]
    BadResource(String),
    /// unknown resource kind
    #[error(
        "unknown resource kind {0:?}; expected host, instance, volume, log, kms-key, kms, image or placement"
    )]
    UnknownResourceKind(String),
    /// a customer's name contains the owner separator `--`
    #[error(
        "customer name {0:?} contains \"--\", which separates a customer from its resource's name"
    )]
    CustomerNameHasSeparator(String),
}

/// What separates a customer from the name of a resource it owns:
/// `instance/acme--web1` is acme's instance `web1`.
pub const OWNER_SEPARATOR: &str = "--";

/// A validated name: 1 to [`MAX_NAME_LEN`] bytes of `a-z`, `0-9` and `-`,
/// starting with a letter or digit and not ending with `-`.
///
/// Names are safe to embed in URIs, file names, Cedar entity ids and log lines.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Parses a name, failing closed on anything outside the allowed alphabet.
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-';
        let bytes = s.as_bytes();
        if !bytes.iter().all(|&c| ok_char(c)) || bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-'
        {
            return Err(IdError::BadCharacter(s.chars().take(80).collect()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// What kind of principal a certificate or token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrincipalKind {
    /// Provider staff calling the host admin API.
    Operator,
    /// A service principal (`placement`, `deployer`) or a cell service
    /// (`tokend`, `logd`, ...).
    Service,
    /// A host, identified by its host id.
    Host,
    /// Reads the audit log; cannot call the admin API.
    Auditor,
    /// A customer of the cell: owns its volumes and the key service keys
    /// that wrap them; no provider principal acts on its keys for it.
    Customer,
}

impl PrincipalKind {
    /// Every kind, in a stable order.
    pub const ALL: [PrincipalKind; 5] = [
        Self::Operator,
        Self::Service,
        Self::Host,
        Self::Auditor,
        Self::Customer,
    ];

    /// The kind's name as used in URIs and Cedar entity types.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Service => "service",
            Self::Host => "host",
            Self::Auditor => "auditor",
            Self::Customer => "customer",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PrincipalKind {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| IdError::UnknownPrincipalKind(s.chars().take(80).collect()))
    }
}

/// A principal of a cell: `nitrile://<cell>/<kind>/<name>`.
///
/// This is the identity carried in a certificate's URI SAN and in a token's
/// subject claim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrincipalId {
    /// The cell the principal belongs to.
    pub cell: Name,
    /// What the principal is.
    pub kind: PrincipalKind,
    /// Its name within the cell and kind.
    pub name: Name,
}

impl PrincipalId {
    /// Builds a principal id from its parts.
    pub fn new(cell: Name, kind: PrincipalKind, name: Name) -> Self {
        Self { cell, kind, name }
    }

    /// Parses `nitrile://<cell>/<kind>/<name>`.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadPrincipalUri(uri.chars().take(120).collect());
        if uri.len() > MAX_PRINCIPAL_URI_LEN {
            return Err(bad());
        }
        let rest = uri.strip_prefix("nitrile://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(cell), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let kind: PrincipalKind = kind.parse()?;
        let name = Name::new(name)?;
        if kind == PrincipalKind::Customer && name.as_str().contains(OWNER_SEPARATOR) {
            return Err(IdError::CustomerNameHasSeparator(name.0));
        }
        Ok(Self {
            cell: Name::new(cell)?,
            kind,
            name,
        })
    }

    /// The URI form, `nitrile://<cell>/<kind>/<name>`.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nitrile://{}/{}/{}", self.cell, self.kind, self.name)
    }
}

impl FromStr for PrincipalId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What kind of thing an admin operation acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// A host (`host/<host-id>`).
    Host,
    /// A microVM instance (`instance/<id>`).
    Instance,
    /// An encrypted volume (`volume/<id>`).
    Volume,
    /// A cell's audit log (`log/<cell>`).
    Log,
    /// A key of the key service (`kms-key/<name>`): a key-encryption key
    /// that never leaves the key service.
    KmsKey,
    /// A cell's key service as a whole (`kms/<cell>`), for listing its keys.
    Kms,
    /// A customer's guest image in the cell's image store
    /// (`image/<customer>--<first 24 hex digits of the image digest>`).
    Image,
    /// A cell's placement service as a whole (`placement/<cell>`), for a
    /// customer listing its instances and images.
    Placement,
    /// A cell's deployment service as a whole (`deployment/<cell>`): its
    /// rollouts of releases to the cell's hosts.
    Deployment,
}

impl ResourceKind {
    /// Every kind, in a stable order.
    pub const ALL: [ResourceKind; 9] = [
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

    /// The kind's name as used in resource ids.
    pub fn as_str(self) -> &'static str {
        match self {
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

    /// Whether resources of this kind can belong to a customer, named
    /// `<customer>--<name>`: instances, volumes and images.
    pub fn is_ownable(self) -> bool {
        matches!(self, Self::Instance | Self::Volume | Self::Image)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResourceKind {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| IdError::UnknownResourceKind(s.chars().take(80).collect()))
    }
}

/// One exact resource: `<kind>/<name>`, e.g. `host/h1`, `instance/i-7`.
///
/// Tokens list exact resource ids; there are no wildcards.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    /// What the resource is.
    pub kind: ResourceKind,
    /// Its id.
    pub name: Name,
}

impl ResourceId {
    /// Builds a resource id from its parts.
    pub fn new(kind: ResourceKind, name: Name) -> Self {
        Self { kind, name }
    }

    /// Parses `<kind>/<name>`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| IdError::BadResource(s.chars().take(120).collect()))?;
        Ok(Self {
            kind: kind.parse()?,
            name: Name::new(name)?,
        })
    }
}

impl ResourceId {
    /// The resource `<kind>/<customer>--<name>` that `customer` owns, if
    /// the kind can be owned and the whole is a valid name.
    pub fn owned(kind: ResourceKind, customer: &Name, name: &str) -> Result<Self, IdError> {
        if !kind.is_ownable() {
            return Err(IdError::BadResource(format!(
                "{kind}/{customer}{OWNER_SEPARATOR}{name}"
            )));
        }
        let whole = format!("{customer}{OWNER_SEPARATOR}{name}");
        Ok(Self::new(kind, Name::new(&whole)?))
    }

    /// The customer that owns this resource: the part of its name before the
    /// first `--`, for instances, volumes and images; `None` for other kinds
    /// and for names without the separator (provider resources).
    pub fn owner(&self) -> Option<Name> {
        if !self.kind.is_ownable() {
            return None;
        }
        let (owner, rest) = self.name.as_str().split_once(OWNER_SEPARATOR)?;
        if rest.is_empty() {
            return None;
        }
        Name::new(owner).ok()
    }

    /// The name within its owner: what follows the first `--`.
    pub fn owned_name(&self) -> Option<&str> {
        self.owner()?;
        self.name
            .as_str()
            .split_once(OWNER_SEPARATOR)
            .map(|(_, rest)| rest)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for ResourceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The one service instance a token is good for: a host id for the admin API,
/// or a cell service name (`logd`) for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Audience(Name);

impl Audience {
    /// Parses an audience.
    pub fn new(s: &str) -> Result<Self, IdError> {
        Name::new(s).map(Self)
    }

    /// The audience as a string slice.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Audience {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

macro_rules! string_serde {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
string_serde!(
    Name,
    PrincipalKind,
    PrincipalId,
    ResourceKind,
    ResourceId,
    Audience
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_fail_closed() {
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a b",
            "a/b",
            "a.b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(Name::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "h1", "on-call", &"a".repeat(63)] {
            assert_eq!(Name::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn principal_uri_round_trip() {
        let p = PrincipalId::parse("nitrile://cell-1/operator/alice").unwrap();
        assert_eq!(p.kind, PrincipalKind::Operator);
        assert_eq!(p.uri(), "nitrile://cell-1/operator/alice");
        for bad in [
            "nitrile://cell/operator",
            "nitrile://cell/operator/alice/x",
            "https://cell/operator/alice",
            "nitrile://cell/admin/alice",
            "nitrile://Cell/operator/alice",
        ] {
            assert!(PrincipalId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resource_round_trip() {
        let r = ResourceId::parse("instance/i-7").unwrap();
        assert_eq!(r.kind, ResourceKind::Instance);
        assert_eq!(r.to_string(), "instance/i-7");
        assert!(ResourceId::parse("disk/d1").is_err());
        assert!(ResourceId::parse("host").is_err());
        assert!(ResourceId::parse("host/*").is_err());
    }

    #[test]
    fn customer_names_cannot_hold_the_owner_separator() {
        assert!(PrincipalId::parse("nitrile://c/customer/acme").is_ok());
        assert!(PrincipalId::parse("nitrile://c/customer/ac-me").is_ok());
        assert_eq!(
            PrincipalId::parse("nitrile://c/customer/acme--x"),
            Err(IdError::CustomerNameHasSeparator("acme--x".to_owned()))
        );
        // Other kinds may: the separator only scopes customers' resources.
        assert!(PrincipalId::parse("nitrile://c/operator/a--b").is_ok());
    }

    #[test]
    fn owners_are_the_part_before_the_separator() {
        let r = ResourceId::parse("instance/acme--web1").unwrap();
        assert_eq!(r.owner().unwrap().as_str(), "acme");
        assert_eq!(r.owned_name(), Some("web1"));
        let r = ResourceId::parse("image/globex--0123456789abcdef01234567").unwrap();
        assert_eq!(r.owner().unwrap().as_str(), "globex");
        // A second separator belongs to the name, not to the owner.
        let r = ResourceId::parse("volume/acme--a--b").unwrap();
        assert_eq!(r.owner().unwrap().as_str(), "acme");
        assert_eq!(r.owned_name(), Some("a--b"));
        for unowned in [
            "instance/i-1",
            "host/acme--h1",
            "kms-key/acme--k",
            "placement/local",
        ] {
            assert_eq!(
                ResourceId::parse(unowned).unwrap().owner(),
                None,
                "{unowned}"
            );
        }
        let acme = Name::new("acme").unwrap();
        assert_eq!(
            ResourceId::owned(ResourceKind::Instance, &acme, "web1")
                .unwrap()
                .to_string(),
            "instance/acme--web1"
        );
        assert!(ResourceId::owned(ResourceKind::Host, &acme, "h1").is_err());
        assert!(ResourceId::owned(ResourceKind::Instance, &acme, "Web").is_err());
        assert!(ResourceId::owned(ResourceKind::Instance, &acme, &"a".repeat(58)).is_err());
    }

    #[test]
    fn serde_is_the_text_form() {
        let r: ResourceId = serde_json::from_str("\"volume/v1\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"volume/v1\"");
        assert!(serde_json::from_str::<ResourceId>("\"volume/V1\"").is_err());
    }

    proptest! {
        #[test]
        fn parsed_names_round_trip(s in "\\PC{0,80}") {
            if let Ok(n) = Name::new(&s) {
                prop_assert_eq!(n.as_str(), s.as_str());
                prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
            }
        }

        #[test]
        fn principal_parse_never_panics(s in "\\PC{0,200}") {
            if let Ok(p) = PrincipalId::parse(&s) {
                prop_assert_eq!(p.uri(), s);
            }
        }
    }
}
