//! Key-encryption keys: their names, states and metadata.

use std::fmt;
use std::str::FromStr;

use nitrile_api::{IdError, Name, PrincipalId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

/// The resource kind of a KEK: `kms-key/<name>`.
pub const KEY_RESOURCE_KIND: &str = "kms-key";

/// The name of the cell's default KEK (`kms-key/default`), owned by the
/// key service itself.
pub const DEFAULT_KEY: &str = "default";

/// Shortest deletion window, in days: a key scheduled for deletion can be
/// brought back for at least this long.
pub const MIN_DELETION_WINDOW_DAYS: u32 = 7;

/// Longest deletion window, in days.
pub const MAX_DELETION_WINDOW_DAYS: u32 = 30;

/// The deletion window when none is asked for, in days.
pub const DEFAULT_DELETION_WINDOW_DAYS: u32 = 30;

/// Why a KEK name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyNameError {
    /// the text is not `kms-key/<name>`
    #[error("{0:?} is not a key of the key service: expected kms-key/<name>")]
    NotAKey(String),
    /// the name part breaks the rules of names
    #[error(transparent)]
    Name(#[from] IdError),
}

/// The name of a KEK, `kms-key/<name>`, where `<name>` follows the rules of
/// [`Name`] (so it is safe as a file name). Displayed and serialized in the
/// `kms-key/<name>` form; [`KeyName::new`] takes the bare name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName(Name);

impl KeyName {
    /// A KEK name from its bare name (`default`).
    pub fn new(name: &str) -> Result<Self, KeyNameError> {
        Ok(Self(Name::new(name)?))
    }

    /// A KEK name from its resource form (`kms-key/default`).
    pub fn parse(resource: &str) -> Result<Self, KeyNameError> {
        let name = resource
            .strip_prefix(KEY_RESOURCE_KIND)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| KeyNameError::NotAKey(resource.chars().take(80).collect()))?;
        Self::new(name)
    }

    /// The cell's default KEK, `kms-key/default`.
    pub fn default_key() -> Self {
        Self::new(DEFAULT_KEY).unwrap_or_else(|_| unreachable!("`default` is a valid name"))
    }

    /// The bare name.
    pub fn name(&self) -> &Name {
        &self.0
    }

    /// The bare name as text (the key's file names are made of it).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl From<Name> for KeyName {
    fn from(name: Name) -> Self {
        Self(name)
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_RESOURCE_KIND}/{}", self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({self})")
    }
}

impl FromStr for KeyName {
    type Err = KeyNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for KeyName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The state of a KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Wraps new volume keys and unwraps existing ones.
    Enabled,
    /// Refuses every new volume key and every unwrap; can be enabled again.
    Disabled,
    /// Refuses like a disabled key; destroyed, with every volume record
    /// under it, by the first sweep at or after `delete_at`, unless the
    /// deletion is cancelled before (which leaves it disabled).
    PendingDeletion {
        /// When the deletion window ends.
        delete_at: OffsetDateTime,
    },
}

impl KeyState {
    /// The state's name: `enabled`, `disabled` or `pending_deletion`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::PendingDeletion { .. } => "pending_deletion",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyState::PendingDeletion { delete_at } => write!(
                f,
                "pending deletion at {}",
                crate::time_format::format(*delete_at)
            ),
            _ => f.write_str(self.as_str()),
        }
    }
}

/// What is known of a KEK apart from its material: everything
/// [`crate::Kms::describe_key`] and [`crate::Kms::list_keys`] return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMetadata {
    /// The key's name.
    pub name: KeyName,
    /// Who owns it: the key service itself for the cell's default key, a
    /// customer for a customer-managed key.
    pub owner: PrincipalId,
    /// Its state.
    pub state: KeyState,
    /// When it was created.
    pub created: OffsetDateTime,
    /// When its state last changed (its creation, if never).
    pub updated: OffsetDateTime,
    /// How many volume records are under it.
    pub volumes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_kms_key_resources() {
        let k = KeyName::parse("kms-key/team-a").unwrap();
        assert_eq!(k.as_str(), "team-a");
        assert_eq!(k.to_string(), "kms-key/team-a");
        assert_eq!(KeyName::new("team-a").unwrap(), k);
        assert_eq!(KeyName::default_key().to_string(), "kms-key/default");
        assert_eq!(serde_json::to_string(&k).unwrap(), "\"kms-key/team-a\"");
        for bad in [
            "team-a",
            "kms-key/",
            "kms-key/../x",
            "kms-key/a/b",
            "volume/a",
            "kms-key/A",
            "kms-key/a\0",
            &format!("kms-key/{}", "a".repeat(10_000)),
        ] {
            assert!(KeyName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(KeyName::new("../x").is_err());
    }
}
