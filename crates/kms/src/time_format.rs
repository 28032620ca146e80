//! Times in the store's files: RFC 3339 in UTC.

use serde::{Deserialize, Deserializer, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// `t` as RFC 3339 in UTC, to the nanosecond.
pub(crate) fn format(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| unreachable!("every UTC time of years 0 to 9999 formats as RFC 3339"))
}

pub(crate) fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let t = t.to_offset(UtcOffset::UTC);
    let text = t.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(serde::de::Error::custom)?;
    if t.offset() != UtcOffset::UTC {
        return Err(serde::de::Error::custom("a time must be in UTC (Z)"));
    }
    Ok(t)
}

/// The same for an optional time (`null` when absent).
pub(crate) mod option {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        t: &Option<OffsetDateTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<OffsetDateTime>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(deserialize_with = "super::deserialize")] OffsetDateTime);
        Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(t)| t))
    }
}
