//! A per-worker cache of rebuilt requests, in front of the shared store.
//!
//! A token's store entry never changes once written: the same signature always rebuilds the
//! same `Authorization` and the same claim headers until it expires. So each worker keeps what it
//! built for recently seen tokens and serves repeat requests without SHA-256, a copy of the
//! slot or a payload decode (with revocation configured, one 8-byte shared-data read of the
//! revocation epoch). Misses
//! always go to the shared store, so a token issued on another worker is usable at once.
//!
//! Bounded by two generations: inserts go to `current`; when it holds half the capacity it
//! becomes `previous` (dropping the old `previous`). A hit in `previous` is promoted. Lookups and
//! inserts are O(1) and memory never exceeds `capacity` entries.
//!
//! With revocation configured the cache never outlives the store: every hit first compares
//! the store's revocation epoch
//! with the one the cache was filled under ([`LocalCache::sync`]), and revocations and
//! evictions move it. A token revoked or evicted on any worker is then looked up in the store
//! again, where it is gone.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

/// What a forwarded request gets for one token.
#[derive(Clone, PartialEq, Eq)]
pub struct Forward {
    /// When the token expires, Unix seconds.
    pub expires_at: u64,
    /// The rebuilt `Authorization` value; `None` removes the header (`forward_jwt: false`).
    pub authorization: Option<String>,
    /// `(index into claims_to_headers, value)` for each projected claim.
    pub claim_headers: Vec<(usize, String)>,
    /// Claims not projected because their value had a control character.
    pub unsafe_claims: u32,
    /// The token carries `cnf.jkt` (RFC 9449): it must come with the `DPoP` scheme.
    pub dpop_bound: bool,
}

/// Never print the rebuilt JWT or claim values, even in a debug log.
impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("expires_at", &self.expires_at)
            .field("forward_jwt", &self.authorization.is_some())
            .field("claim_headers", &self.claim_headers.len())
            .field("unsafe_claims", &self.unsafe_claims)
            .field("dpop_bound", &self.dpop_bound)
            .finish()
    }
}

/// Keys are signatures: base64url of a signature, whose first characters are already
/// uniformly distributed. Only genuine (issued) signatures are ever inserted, so a client cannot
/// flood a bucket; a lookup compares the whole key.
#[derive(Default)]
pub struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }

    fn write_usize(&mut self, _: usize) {}
}

type Map = HashMap<Box<str>, Rc<Forward>, BuildHasherDefault<PrefixHasher>>;

/// The per-worker cache.
#[derive(Default)]
pub struct LocalCache {
    capacity: usize,
    current: Map,
    previous: Map,
    /// The store's revocation epoch this cache is valid for.
    epoch: u64,
}

impl LocalCache {
    /// A cache of at most `capacity` entries; 0 disables it.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            current: Map::default(),
            previous: Map::default(),
            // No epoch read yet: the first sync always takes the store's.
            epoch: u64::MAX,
        }
    }

    /// Forgets everything when the store's revocation epoch moved since the last call (a token
    /// was revoked, or evicted and so could no longer be found to be revoked): a revoked token
    /// must not be served from here, on any worker. Returns whether the cache was emptied.
    pub fn sync(&mut self, epoch: u64) -> bool {
        if epoch == self.epoch {
            return false;
        }
        self.current.clear();
        self.previous.clear();
        self.epoch = epoch;
        true
    }

    /// The cached forward for a signature, if present and unexpired at `now`. Keyed by the
    /// signature itself, so a repeat hit costs no SHA-256: this memory already holds the rebuilt
    /// JWT, so the signature adds no exposure (the shared store still never holds it).
    pub fn get(&mut self, key: &str, now: u64) -> Option<Rc<Forward>> {
        if let Some(hit) = self.current.get(key) {
            if hit.expires_at > now {
                return Some(Rc::clone(hit));
            }
            self.current.remove(key);
            return None;
        }
        let hit = self.previous.remove(key)?;
        if hit.expires_at <= now {
            return None;
        }
        self.insert(key, Rc::clone(&hit));
        Some(hit)
    }

    /// Remembers a forward.
    pub fn insert(&mut self, key: &str, forward: Rc<Forward>) {
        if self.capacity == 0 {
            return;
        }
        if self.current.len() >= self.capacity.div_ceil(2) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key.into(), forward);
    }

    /// Entries it may hold; 0 when disabled.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(expires_at: u64) -> Rc<Forward> {
        Rc::new(Forward {
            expires_at,
            authorization: Some("Bearer x".into()),
            claim_headers: vec![],
            unsafe_claims: 0,
            dpop_bound: false,
        })
    }

    fn key(n: u32) -> String {
        format!("sig{n:08}")
    }

    #[test]
    fn hits_until_expiry() {
        let mut c = LocalCache::new(8);
        c.insert(&key(1), fwd(100));
        assert!(c.get(&key(1), 99).is_some());
        assert!(c.get(&key(1), 100).is_none());
        assert!(c.get(&key(1), 50).is_none(), "expired entries are dropped");
        assert!(c.get(&key(2), 0).is_none());
    }

    #[test]
    fn stays_bounded_and_keeps_recent_entries() {
        let mut c = LocalCache::new(100);
        for n in 0..10_000 {
            c.insert(&key(n), fwd(1_000));
            assert!(c.len() <= 100);
        }
        assert!(c.get(&key(9_999), 0).is_some());
        assert!(c.get(&key(0), 0).is_none());
    }

    #[test]
    fn previous_generation_hits_are_promoted() {
        let mut c = LocalCache::new(4);
        c.insert(&key(1), fwd(1_000));
        c.insert(&key(2), fwd(1_000));
        c.insert(&key(3), fwd(1_000)); // key 1 and 2 move to previous
        assert!(c.get(&key(1), 0).is_some()); // promoted into current
        c.insert(&key(4), fwd(1_000)); // current (3, 1) full: it becomes previous
        assert!(c.get(&key(1), 0).is_some());
        assert!(c.get(&key(2), 0).is_none());
    }

    #[test]
    fn debug_does_not_print_the_jwt() {
        let f = Forward {
            expires_at: 1,
            authorization: Some("Bearer eyJsecret".into()),
            claim_headers: vec![(0, "alice".into())],
            unsafe_claims: 0,
            dpop_bound: false,
        };
        let shown = format!("{f:?}");
        assert!(
            !shown.contains("eyJ") && !shown.contains("alice"),
            "{shown}"
        );
    }

    #[test]
    fn zero_capacity_disables() {
        let mut c = LocalCache::new(0);
        c.insert(&key(1), fwd(1_000));
        assert!(c.is_empty());
        assert!(c.get(&key(1), 0).is_none());
    }
}
