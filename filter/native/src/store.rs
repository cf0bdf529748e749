//! The process-wide stores: the map of tokens of each store prefix, and the core's
//! [`SharedData`] over one map for what else the workers share.
//!
//! Tokens live in a [`MapStore`] per `store_prefix` ([`token_map`]): the core's store for a host
//! that owns its memory. Each token is kept once, in exactly its size, and expired or revoked
//! ones give their memory back (see `split_token_core::store::map`). Every configuration of the
//! same prefix in this process (listeners, reloads) shares its map; the map goes away with the
//! last configuration that uses it.
//!
//! What the etcd tier shares between workers (recent revocations, the poller's lease, worker
//! numbers, the sweep watermark) is written against Envoy's shared data: get a value with a
//! version, set it only if the version still matches. [`ProcessStore`] gives the native host the
//! same semantics, so that code and its tests serve both builds. Its map is sharded by a hash of
//! the key (64 `Mutex`es); versions are per key and never 0 (0 means "no check" in Envoy's API,
//! as here).

use split_token_core::store::map::MapStore;
use split_token_core::store::{HostStatus, SetError, SharedData};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

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

/// The token maps of this process by store prefix, held by the configurations that use them.
static MAPS: Mutex<Vec<(String, Weak<MapStore>)>> = Mutex::new(Vec::new());

/// The token map of `prefix`, made when no configuration holds one; at most `capacity` tokens
/// from now on (configurations sharing a prefix are meant to agree on its size).
pub fn token_map(prefix: &str, capacity: usize) -> Arc<MapStore> {
    let mut maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|(_, map)| map.strong_count() > 0);
    if let Some(map) = maps
        .iter()
        .find(|(p, _)| p == prefix)
        .and_then(|(_, map)| map.upgrade())
    {
        map.set_capacity(capacity);
        return map;
    }
    let map = Arc::new(MapStore::new(capacity));
    maps.push((prefix.to_owned(), Arc::downgrade(&map)));
    map
}

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
    fn configurations_of_one_prefix_share_its_map_until_the_last_goes() {
        use split_token_core::store::{Entry, TokenStore};
        use split_token_core::token::StoreKey;
        let a = token_map("share/", 100);
        let b = token_map("share/", 100);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &token_map("other/", 100)));
        let entry = Entry {
            key: StoreKey([7; 32]),
            expires_at: u64::MAX,
            header_payload: b"h.p",
        };
        assert!(TokenStore::put(&*a, &entry, 0).is_ok());
        assert_eq!(b.len(), 1);
        drop((a, b));
        // Freed with its last configuration: a later one starts empty.
        assert!(token_map("share/", 100).is_empty());
    }

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
