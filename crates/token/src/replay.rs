//! Single use of tokens for mutating operations.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use time::OffsetDateTime;

use crate::TokenError;
use crate::claims::TokenId;

/// How many live token ids a host tracks by default.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

/// Proof that a token id was seen for the first time and is now recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a first use is the permission to act; act on it or journal the refusal"]
pub struct FirstUse {
    token_id: TokenId,
    expires_at: OffsetDateTime,
}

impl FirstUse {
    /// The recorded token id.
    pub fn token_id(&self) -> &TokenId {
        &self.token_id
    }
    /// Until when it stays recorded.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }
}

#[derive(Debug, Default)]
struct Entries {
    by_id: HashMap<TokenId, OffsetDateTime>,
    by_expiry: BTreeSet<(OffsetDateTime, TokenId)>,
}

impl Entries {
    /// Drops every entry whose token has expired at `now`: a verifier refuses
    /// those tokens anyway.
    fn prune(&mut self, now: OffsetDateTime) {
        while let Some(&(exp, id)) = self.by_expiry.first() {
            if exp > now {
                break;
            }
            self.by_expiry.pop_first();
            self.by_id.remove(&id);
        }
    }

    fn insert(&mut self, id: TokenId, exp: OffsetDateTime) {
        if let Some(old) = self.by_id.insert(id, exp) {
            self.by_expiry.remove(&(old, id));
        }
        self.by_expiry.insert((exp, id));
    }
}

/// The ids of single-use tokens already used, kept until they expire.
///
/// Bounded: when it holds `capacity` live ids it refuses new ones
/// ([`TokenError::ReplayCacheFull`]) rather than forgetting one, which would
/// let that token be replayed.
#[derive(Debug)]
pub struct ReplayCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

impl ReplayCache {
    /// An empty cache that holds at most `capacity` live ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The entries stay consistent whatever panicked while holding the lock:
        // each mutation is completed before anything can panic.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first use of `token_id` (valid until `expires_at`) at `now`.
    /// Refuses a second use ([`TokenError::Replayed`]), a token already
    /// expired, and any new id when the cache is full of live ids.
    pub fn check_and_record(
        &self,
        token_id: &TokenId,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<FirstUse, TokenError> {
        let mut entries = self.lock();
        entries.prune(now);
        if entries.by_id.contains_key(token_id) {
            return Err(TokenError::Replayed);
        }
        if expires_at <= now {
            return Err(TokenError::Expired {
                expired_at: expires_at,
            });
        }
        if entries.by_id.len() >= self.capacity {
            return Err(TokenError::ReplayCacheFull);
        }
        entries.insert(*token_id, expires_at);
        Ok(FirstUse {
            token_id: *token_id,
            expires_at,
        })
    }

    /// Records an id used before (reloaded from the journal at start), so that
    /// it is refused until `expires_at`. Callers should skip ids already
    /// expired; they are dropped at the next check anyway.
    pub fn remember(
        &self,
        token_id: TokenId,
        expires_at: OffsetDateTime,
    ) -> Result<(), TokenError> {
        let mut entries = self.lock();
        if !entries.by_id.contains_key(&token_id) && entries.by_id.len() >= self.capacity {
            return Err(TokenError::ReplayCacheFull);
        }
        entries.insert(token_id, expires_at);
        Ok(())
    }

    /// How many ids are recorded (expired ones included until the next check).
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether no id is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2030-01-01 12:00 UTC);

    fn id(n: u8) -> TokenId {
        TokenId::from_bytes([n; 16])
    }

    #[test]
    fn second_use_is_refused_until_expiry() {
        let c = ReplayCache::new(10);
        let exp = T0 + Duration::minutes(5);
        let first = c.check_and_record(&id(1), exp, T0).unwrap();
        assert_eq!(first.token_id(), &id(1));
        let again = c.check_and_record(&id(1), exp, T0 + Duration::minutes(4));
        assert!(matches!(again, Err(TokenError::Replayed)));
        // At expiry the id is dropped, and the token itself is refused.
        assert!(matches!(
            c.check_and_record(&id(1), exp, exp),
            Err(TokenError::Expired { .. })
        ));
        assert!(c.is_empty());
    }

    #[test]
    fn full_of_live_entries_fails_closed_then_recovers_at_expiry() {
        let c = ReplayCache::new(3);
        for n in 0..3 {
            let exp = T0 + Duration::minutes(1 + i64::from(n));
            let _ = c.check_and_record(&id(n), exp, T0).unwrap();
        }
        assert!(matches!(
            c.check_and_record(&id(9), T0 + Duration::minutes(5), T0),
            Err(TokenError::ReplayCacheFull)
        ));
        // Still remembers the old ones: nothing was evicted.
        assert!(matches!(
            c.check_and_record(&id(0), T0 + Duration::minutes(1), T0),
            Err(TokenError::Replayed)
        ));
        // Once the first expires, there is room again.
        let later = T0 + Duration::minutes(1);
        let _ = c
            .check_and_record(&id(9), T0 + Duration::minutes(5), later)
            .unwrap();
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn remembered_ids_are_refused() {
        let c = ReplayCache::new(2);
        c.remember(id(1), T0 + Duration::minutes(5)).unwrap();
        assert!(matches!(
            c.check_and_record(&id(1), T0 + Duration::minutes(5), T0),
            Err(TokenError::Replayed)
        ));
        c.remember(id(2), T0 + Duration::minutes(5)).unwrap();
        assert!(matches!(
            c.remember(id(3), T0 + Duration::minutes(5)),
            Err(TokenError::ReplayCacheFull)
        ));
    }
}
