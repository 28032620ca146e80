//! Where a log is kept, as both logd and an auditor name it: the log
//! directory in logd's state directory, or a PostgreSQL database given by a
//! connection string that is never shown whole.

use serde::{Deserialize, Serialize};

/// The directory of the log (tiles, entry bundles, checkpoints) in logd's
/// state directory, when the log is kept in files.
pub const LOG_DIR: &str = "log";

/// A PostgreSQL connection string (libpq `key=value` words or a
/// `postgresql://` URL): logd's `[storage] postgres`, an auditor's
/// `--postgres`. It may hold a password, so `Debug` shows only
/// [`Conninfo::target`]; the full text ([`Conninfo::danger_full_text`]) is
/// only handed to the database client and written back into logd's config.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Conninfo {
    text: String,
    target: String,
    has_password: bool,
}

/// The text is not a PostgreSQL connection string (the text is not shown:
/// it may hold a password).
#[derive(Debug, thiserror::Error)]
#[error("not a PostgreSQL connection string (libpq key=value words or a postgresql:// URL)")]
pub struct ConninfoError(#[source] postgres::Error);

impl Conninfo {
    /// Parses a connection string.
    pub fn new(text: &str) -> Result<Self, ConninfoError> {
        let parsed: postgres::Config = text.parse().map_err(ConninfoError)?;
        let hosts: Vec<String> = parsed
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(dir) => dir.display().to_string(),
            })
            .collect();
        let host = if hosts.is_empty() {
            "(default)".to_owned()
        } else {
            hosts.join(",")
        };
        let dbname = parsed.get_dbname().unwrap_or("(default)");
        Ok(Self {
            text: text.to_owned(),
            target: format!("host={host} dbname={dbname}"),
            has_password: parsed.get_password().is_some(),
        })
    }

    /// The host(s) and database it names, `host=... dbname=...`: what may
    /// be logged or shown of it.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether it holds a password.
    pub fn has_password(&self) -> bool {
        self.has_password
    }

    /// The whole connection string, password included if it has one: for
    /// the database client only, never to be logged.
    pub fn danger_full_text(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for Conninfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Conninfo").field(&self.target).finish()
    }
}

impl TryFrom<String> for Conninfo {
    type Error = ConninfoError;
    fn try_from(text: String) -> Result<Self, ConninfoError> {
        Self::new(&text)
    }
}

impl From<Conninfo> for String {
    fn from(c: Conninfo) -> Self {
        c.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_target_of_a_conninfo_is_shown() {
        let c = Conninfo::new("host=/run/postgresql dbname=logs password=hunter2").unwrap();
        assert_eq!(c.target(), "host=/run/postgresql dbname=logs");
        assert!(c.has_password());
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(c.danger_full_text().contains("hunter2"));
        let url = Conninfo::new("postgresql://nitrile:hunter2@db.example:5433/logs").unwrap();
        assert_eq!(url.target(), "host=db.example dbname=logs");
        assert!(url.has_password());
        assert!(!Conninfo::new("dbname=x").unwrap().has_password());
        assert_eq!(
            Conninfo::new("dbname=x").unwrap().target(),
            "host=(default) dbname=x"
        );
        let err = Conninfo::new("host=db password=hunter2 port=notaport").unwrap_err();
        let mut chain = String::new();
        let mut e: Option<&dyn std::error::Error> = Some(&err);
        while let Some(x) = e {
            chain.push_str(&format!("{x} {x:?}\n"));
            e = x.source();
        }
        assert!(!chain.contains("hunter2"), "{chain}");
    }
}
