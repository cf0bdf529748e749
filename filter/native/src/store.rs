//! The process-wide store: the core's [`SharedData`] over one map shared by every worker.
//!
//! The core's slot store ([`split_token_core::store::Store`]) is written against Envoy's shared
//! data: get a value with a version, set it only if the version still matches. Giving the native
//! host the same semantics keeps the core, its tests and its guarantees unchanged for both
//! builds: SHA-256(signature) keys, `header.payload` only, expiry with the token, a fixed key
//! space (`store_slots`) whatever the churn, CAS retries, and a revocation that moves the epoch
//! every worker's cache checks, seen by all workers at once because they read one map.
//!
//! The map is sharded by a hash of the key (64 `Mutex`es), so workers writing different slots do
//! not contend; a slot's critical section is one clone or one swap. Versions are per key and
//! never 0 (0 means "no check" in Envoy's API, as here). Memory: a slot's value is its entries,
//! 42 bytes + `header.payload` each (see `split_token_core::store`), plus the fixed cost of
//! `store_slots` keys; an entry freed by expiry or eviction gives its bytes back on the slot's
//! next write, which shared data could never do for its keys.

use split_token_core::store::{HostStatus, SetError, SharedData};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{LazyLock, Mutex, MutexGuard};

const SHARDS: usize = 64;

/// One value and its version.
struct Versioned {
    version: u32,
    value: Vec<u8>,
}

/// A map of keys to versioned values, safe to share between threads (by its types: `Mutex`).
pub struct ProcessStore {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, Versioned>>>,
}

impl Default for ProcessStore {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// The one store of this Envoy process.
pub static STORE: LazyLock<ProcessStore> = LazyLock::new(ProcessStore::default);

impl ProcessStore {
    fn shard(&self, key: &str) -> Option<MutexGuard<'_, HashMap<String, Versioned>>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A poisoned lock only means another thread panicked while holding it (and was caught
        // at the FFI edge): the map itself is consistent after each statement.
        self.shards
            .get(index)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl SharedData for ProcessStore {
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
        let shard = self.shard(key).ok_or(HostStatus(10))?;
        Ok(match shard.get(key) {
            Some(v) => (v.value.clone(), Some(v.version)),
            None => (Vec::new(), None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut shard = self.shard(key).ok_or(SetError::Host(HostStatus(10)))?;
        match shard.get_mut(key) {
            Some(current) => {
                if matches!(cas, Some(c) if c != 0 && c != current.version) {
                    return Err(SetError::CasMismatch);
                }
                current.version = current.version.checked_add(1).unwrap_or(1);
                current.value.clear();
                current.value.extend_from_slice(value);
                current.value.shrink_to_fit();
            }
            None => {
                shard.insert(
                    key.to_owned(),
                    Versioned {
                        version: 1,
                        value: value.to_vec(),
                    },
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_reads_empty_without_version() {
        let store = ProcessStore::default();
        assert_eq!(store.get("k"), Ok((Vec::new(), None)));
    }

    #[test]
    fn cas_guards_every_write_after_the_first() {
        let store = ProcessStore::default();
        assert_eq!(store.set("k", b"a", None), Ok(()));
        let (value, cas) = store.get("k").unwrap_or_default();
        assert_eq!(value, b"a");
        assert_eq!(store.set("k", b"b", cas), Ok(()));
        // The old version no longer matches.
        assert_eq!(store.set("k", b"c", cas), Err(SetError::CasMismatch));
        assert_eq!(store.get("k").map(|(v, _)| v), Ok(b"b".to_vec()));
        // No CAS: always written.
        assert_eq!(store.set("k", b"d", None), Ok(()));
    }

    #[test]
    fn the_core_store_runs_over_it_from_many_threads() {
        use split_token_core::store::{Entry, Store};
        use split_token_core::token::StoreKey;
        let store = std::sync::Arc::new(ProcessStore::default());
        Store::new(&*store, "s/", 4, 64)
            .initialize()
            .unwrap_or_default();
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    let slots = Store::new(&*store, "s/", 4, 64);
                    for i in 0..20u8 {
                        let entry = Entry {
                            key: StoreKey([t.wrapping_mul(31).wrapping_add(i); 32]),
                            expires_at: u64::MAX,
                            header_payload: b"h.p",
                        };
                        assert!(slots.put(&entry, 0).is_ok());
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
    }
}
