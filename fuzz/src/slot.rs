//! `store`: the slot encoding, `find`, `insert`, and the CAS store against a model.

use crate::support::MemoryData;
use arbitrary::{Arbitrary, Unstructured};
use sha2::{Digest, Sha256};
use split_token_core::store::{entries, find, insert, without, Entry, Lookup, Store};
use split_token_core::token::StoreKey;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

const VERSION: u8 = 1;

/// First byte `0`: a sequence of store operations checked against a model. Anything else: the
/// bytes are a slot value as read from shared data.
pub fn slot(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            if let Ok(scenario) = Scenario::arbitrary_take_rest(Unstructured::new(rest)) {
                run(&scenario);
            }
        }
        _ => raw_slot(data),
    }
}

/// The documented layout: `VERSION (key[32] expires_at[u64 BE] len[u16 BE] header_payload)*`.
fn encode(list: &[Entry<'_>]) -> Vec<u8> {
    let mut out = vec![VERSION];
    for e in list {
        out.extend_from_slice(&e.key.0);
        out.extend_from_slice(&e.expires_at.to_be_bytes());
        out.extend_from_slice(&u16::try_from(e.header_payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(e.header_payload);
    }
    out
}

/// The entries of a slot, and whether it failed to decode (decoding stops at the first error).
fn decode(slot: &[u8]) -> (Vec<Entry<'_>>, bool) {
    let mut list = Vec::new();
    let mut corrupt = false;
    for e in entries(slot) {
        assert!(!corrupt, "entries went on after an error");
        match e {
            Ok(e) => list.push(e),
            Err(_) => corrupt = true,
        }
    }
    (list, corrupt)
}

/// Removes one entry equal to `e` from `pool`, if there is one.
fn take(pool: &mut Vec<Entry<'_>>, e: &Entry<'_>) -> bool {
    match pool.iter().position(|p| p == e) {
        Some(i) => {
            pool.swap_remove(i);
            true
        }
        None => false,
    }
}

fn raw_slot(slot: &[u8]) {
    let (list, corrupt) = decode(slot);
    if slot.first().is_some_and(|&v| v != VERSION) {
        assert!(corrupt, "an unknown version decoded");
    }
    if !corrupt && !slot.is_empty() {
        assert_eq!(
            encode(&list),
            slot,
            "a decoded slot does not re-encode to its bytes"
        );
    }

    // find agrees with the decoded entries: the first entry with the key decides.
    let now = list.first().map_or(0, |e| e.expires_at.wrapping_sub(1));
    for e in &list {
        let first = list.iter().find(|f| f.key == e.key).unwrap();
        let want = if first.expires_at <= now {
            Lookup::Expired
        } else {
            Lookup::Hit {
                header_payload: first.header_payload,
                expires_at: first.expires_at,
            }
        };
        assert_eq!(find(slot, &e.key, now), Ok(want));
    }
    let absent = StoreKey(Sha256::digest(slot).into());
    if !list.iter().any(|e| e.key == absent) {
        let found = find(slot, &absent, now);
        assert_eq!(found.is_err(), corrupt);
        if !corrupt {
            assert_eq!(found, Ok(Lookup::Miss));
        }
    }

    // without: the slot less every entry with the key, in order; None when absent or corrupt.
    for k in list.iter().map(|e| e.key).chain([absent]) {
        let expected = (!corrupt && list.iter().any(|e| e.key == k)).then(|| {
            let rest: Vec<Entry<'_>> = list.iter().filter(|e| e.key != k).copied().collect();
            encode(&rest)
        });
        assert_eq!(without(slot, &k), expected, "without");
    }

    // insert: the new entry last, expired and same-key entries dropped, at most `capacity`,
    // and only the entries nearest to expiry evicted.
    let replaced = list.last().map(|e| e.key);
    for (capacity, key) in [
        (1, absent),
        (2, absent),
        (64, absent),
        (3, replaced.unwrap_or(absent)),
    ] {
        let new = Entry {
            key,
            expires_at: now.wrapping_add(u64::from(capacity)),
            header_payload: b"h.p",
        };
        let (out, report) = insert(slot, &new, now, capacity);
        let (after, out_corrupt) = decode(&out);
        assert!(!out_corrupt, "insert wrote a corrupt slot");
        assert_eq!(out, encode(&after));
        assert_eq!(after.last(), Some(&new));
        assert!(after.len() <= usize::from(capacity), "slot over capacity");
        assert_eq!(report.corrupt, corrupt);
        assert_eq!(
            find(&out, &key, now),
            Ok(if new.expires_at > now {
                Lookup::Hit {
                    header_payload: b"h.p",
                    expires_at: new.expires_at,
                }
            } else {
                Lookup::Expired
            })
        );
        if corrupt {
            assert_eq!(
                after,
                [new],
                "a corrupt slot restarts with only the new entry"
            );
            continue;
        }
        let kept = &after[..after.len() - 1];
        let expired = list
            .iter()
            .filter(|e| e.key != key && e.expires_at <= now)
            .count();
        assert_eq!(usize::try_from(report.expired).unwrap(), expired);
        let mut candidates: Vec<Entry<'_>> = list
            .iter()
            .filter(|e| e.key != key && e.expires_at > now)
            .copied()
            .collect();
        for e in kept {
            assert!(
                take(&mut candidates, e),
                "insert kept an entry it should have dropped"
            );
        }
        assert_eq!(usize::try_from(report.evicted).unwrap(), candidates.len());
        let min_kept = kept.iter().map(|e| e.expires_at).min().unwrap_or(u64::MAX);
        for evicted in &candidates {
            assert!(
                evicted.expires_at <= min_kept,
                "evicted an entry that outlives a kept one"
            );
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Stores a token.
    Put { key: u8, ttl: u16, len: u8 },
    /// Looks a token up.
    Find { key: u8 },
    /// Time passes.
    Tick { seconds: u16 },
    /// Another worker stores `other` between this worker's read and its write.
    Race {
        key: u8,
        ttl: u16,
        other: u8,
        other_ttl: u16,
    },
    /// A slot's value is replaced by garbage (a host bug, a foreign writer).
    Corrupt { slot: u8, how: u8 },
    /// Creates every slot, as `on_configure` does.
    Initialize,
    /// Revokes a token: removes its entry and moves the revocation epoch on.
    Revoke { key: u8 },
}

#[derive(Arbitrary, Debug)]
struct Scenario {
    slots: u8,
    capacity: u8,
    ops: Vec<Op>,
}

const PREFIX: &str = "st/";
const KEYS: u8 = 24;

fn key(n: u8) -> StoreKey {
    StoreKey(Sha256::digest([n % KEYS]).into())
}

fn header_payload(n: u8, len: u8, ttl: u16) -> Vec<u8> {
    let mut hp = format!("h{n}.p{ttl}.").into_bytes();
    hp.resize(hp.len() + usize::from(len % 64), b'x');
    hp
}

/// What was last written for each key, what may be gone, and which slots hold garbage.
struct Harness {
    host: MemoryData,
    slots: u32,
    capacity: u16,
    now: u64,
    /// key -> (expires_at, header_payload) of its last successful put.
    written: HashMap<StoreKey, (u64, Vec<u8>)>,
    /// Keys an eviction, a corrupted slot or the documented slot-creation race may have removed.
    lost: HashSet<StoreKey>,
    /// Slots holding garbage since the last put to them.
    corrupt: HashSet<String>,
}

/// `(key, ttl, header_payload)` of one put.
type Put<'a> = (u8, u16, &'a [u8]);

fn run(scenario: &Scenario) {
    let mut h = Harness {
        host: MemoryData::default(),
        slots: u32::from(scenario.slots % 4) + 1,
        capacity: u16::from(scenario.capacity % 4) + 1,
        now: 1_000,
        written: HashMap::new(),
        lost: HashSet::new(),
        corrupt: HashSet::new(),
    };
    for op in scenario.ops.iter().take(64) {
        match *op {
            Op::Put { key: n, ttl, len } => {
                let hp = header_payload(n, len, ttl);
                h.put((n, ttl, &hp), None);
            }
            Op::Race {
                key: n,
                ttl,
                other,
                other_ttl,
            } => {
                let hp = header_payload(n, 0, ttl);
                let other_hp = header_payload(other, 1, other_ttl);
                h.put((n, ttl, &hp), Some((other, other_ttl, &other_hp)));
            }
            Op::Find { key: n } => h.check_find(&key(n)),
            Op::Tick { seconds } => h.now += u64::from(seconds % 600),
            Op::Corrupt { slot: s, how } => h.corrupt(u32::from(s) % h.slots, how),
            Op::Revoke { key: n } => h.revoke(&key(n)),
            Op::Initialize => {
                let store = h.store();
                store.initialize().unwrap();
                assert_eq!(
                    store.initialize().unwrap(),
                    0,
                    "initialize is not idempotent"
                );
                for slot in 0..h.slots {
                    assert!(h
                        .host
                        .map
                        .borrow()
                        .contains_key(&format!("{PREFIX}{slot:x}")));
                }
            }
        }
        h.check_slots();
    }
    for n in 0..KEYS {
        h.check_find(&key(n));
    }
}

impl Harness {
    fn store(&self) -> Store<'_, MemoryData> {
        Store::new(&self.host, PREFIX, self.slots, self.capacity)
    }

    fn is_slot_key(&self, key: &str) -> bool {
        key.strip_prefix(PREFIX)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .is_some_and(|slot| slot < self.slots)
    }

    /// The slots' values.
    fn snapshot(&self) -> HashMap<String, Vec<u8>> {
        self.host
            .map
            .borrow()
            .iter()
            .filter(|(k, _)| self.is_slot_key(k))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    /// A revoked token is gone from the store, and the revocation epoch moves on.
    fn revoke(&mut self, k: &StoreKey) {
        let store = self.store();
        let slot_key = store.slot_key(k);
        let value = store.fetch_slot(k).unwrap();
        let (list, corrupt) = decode(&value);
        let present = !corrupt && list.iter().any(|e| e.key == *k);
        assert_eq!(store.remove(k).unwrap(), present, "remove misreported");
        let epoch = store.epoch().unwrap();
        store.bump_epoch().unwrap();
        assert_ne!(store.epoch().unwrap(), epoch);
        if present {
            let value = store.fetch_slot(k).unwrap();
            let mut expected = list.clone();
            expected.retain(|e| e.key != *k);
            assert_eq!(
                decode(&value),
                (expected, false),
                "remove touched other entries"
            );
        }
        if !self.corrupt.contains(&slot_key) {
            // Revoked: a later hit would be "a hit for a key never written".
            self.written.remove(k);
        }
    }

    /// Keys found in a snapshot; with `live`, only unexpired ones.
    fn keys(&self, slots: &HashMap<String, Vec<u8>>, live: bool) -> HashSet<StoreKey> {
        slots
            .values()
            .flat_map(|v| decode(v).0)
            .filter(|e| !live || e.expires_at > self.now)
            .map(|e| e.key)
            .collect()
    }

    /// The key space is bounded by store_slots; every slot the store wrote decodes, holds at
    /// most `capacity` entries and each key once.
    fn check_slots(&self) {
        let map = self.host.map.borrow();
        // The slots, and at most one more key: the revocation epoch.
        let slots = map.keys().filter(|k| self.is_slot_key(k)).count();
        assert!(
            slots <= usize::try_from(self.slots).unwrap(),
            "more slot keys than slots"
        );
        assert!(
            map.len() <= slots + 1,
            "more than one key besides the slots"
        );
        for (k, (v, _)) in map.iter() {
            assert!(k.starts_with(PREFIX));
            if self.corrupt.contains(k) || !self.is_slot_key(k) {
                continue;
            }
            let (list, corrupt) = decode(v);
            assert!(!corrupt, "the store wrote a corrupt slot");
            assert!(
                list.len() <= usize::from(self.capacity),
                "slot over capacity"
            );
            let distinct: HashSet<_> = list.iter().map(|e| e.key).collect();
            assert_eq!(
                distinct.len(),
                list.len(),
                "a key is stored twice in a slot"
            );
        }
    }

    fn corrupt(&mut self, slot: u32, how: u8) {
        let slot_key = format!("{PREFIX}{slot:x}");
        let garbage: &[u8] = match how % 3 {
            0 => &[2],
            1 => &[VERSION, 0, 0],
            _ => &[VERSION; 50],
        };
        let old = self
            .host
            .map
            .borrow()
            .get(&slot_key)
            .map(|(v, _)| v.clone());
        for e in decode(old.as_deref().unwrap_or_default()).0 {
            self.lost.insert(e.key);
        }
        self.host.raw_set(&slot_key, garbage);
        self.corrupt.insert(slot_key);
    }

    /// A lookup returns what was last written for the key and never an expired entry as a hit;
    /// a miss only for keys never written, expired, evicted or in a corrupted slot.
    fn check_find(&self, k: &StoreKey) {
        let store = self.store();
        let value = store.fetch_slot(k).unwrap();
        match find(&value, k, self.now) {
            Ok(Lookup::Hit {
                header_payload,
                expires_at,
            }) => {
                assert!(expires_at > self.now, "find returned an expired entry");
                let (exp, hp) = self.written.get(k).expect("a hit for a key never written");
                assert_eq!(
                    (expires_at, header_payload),
                    (*exp, hp.as_slice()),
                    "stale entry"
                );
            }
            Ok(Lookup::Expired) => {
                let (exp, _) = self.written.get(k).expect("expired: a key never written");
                assert!(*exp <= self.now, "an unexpired entry reported expired");
            }
            Ok(Lookup::Miss) => {
                if let Some((exp, _)) = self.written.get(k) {
                    assert!(
                        *exp <= self.now || self.lost.contains(k),
                        "a stored, unexpired, never-evicted token went missing"
                    );
                }
            }
            Err(_) => assert!(
                self.corrupt.contains(&store.slot_key(k)),
                "find failed on a slot the store wrote"
            ),
        }
    }

    /// Stores one entry; with `race`, another worker stores its own just before this write lands.
    fn put(&mut self, (n, ttl, hp): Put<'_>, race: Option<Put<'_>>) {
        let now = self.now;
        let k = key(n);
        let entry = Entry {
            key: k,
            expires_at: now + u64::from(ttl),
            header_payload: hp,
        };
        let slot_key = self.store().slot_key(&k);
        let before = self.snapshot();
        let mut written = Vec::new();
        let other_report = Rc::new(RefCell::new(None));
        if let Some((o, other_ttl, other_hp)) = race {
            let other = (key(o), now + u64::from(other_ttl), other_hp.to_vec());
            written.push(other.clone());
            let report = Rc::clone(&other_report);
            let (slots, capacity) = (self.slots, self.capacity);
            *self.host.before_set.borrow_mut() = Some((
                slot_key.clone(),
                Box::new(move |host: &MemoryData| {
                    let e = Entry {
                        key: other.0,
                        expires_at: other.1,
                        header_payload: &other.2,
                    };
                    let store = Store::new(host, PREFIX, slots, capacity);
                    *report.borrow_mut() = Some(store.put(&e, now).unwrap());
                }),
            ));
        }
        written.push((k, entry.expires_at, hp.to_vec()));
        let report = self.store().put(&entry, now).unwrap();
        assert!(
            self.host.before_set.borrow().is_none(),
            "put never wrote its slot"
        );
        let other_report = other_report.borrow_mut().take();

        // Corruption is reported by the put that repairs the slot.
        let was_corrupt = self.corrupt.remove(&slot_key);
        let mut repaired = report.corrupt;
        match (other_report, race) {
            (Some(o), Some((on, _, _))) => {
                repaired |= o.corrupt;
                let other_slot = self.store().slot_key(&key(on));
                if other_slot == slot_key {
                    assert!(report.retries >= 1, "the CAS mismatch was not retried");
                    assert_eq!(
                        was_corrupt,
                        report.corrupt || o.corrupt,
                        "corruption unreported"
                    );
                } else {
                    assert_eq!(report.corrupt, was_corrupt, "corruption not reported");
                    assert_eq!(o.corrupt, self.corrupt.remove(&other_slot));
                }
            }
            _ => assert_eq!(report.corrupt, was_corrupt, "corruption not reported"),
        }
        for (wk, exp, whp) in &written {
            self.written.insert(*wk, (*exp, whp.clone()));
            self.lost.remove(wk);
        }

        // Whatever live entry disappeared was evicted, and the reports count it. (A key
        // rewritten with an entry that is already expired was replaced, not evicted.)
        let after = self.snapshot();
        let mut live_before = self.keys(&before, true);
        live_before.extend(written.iter().filter(|w| w.1 > now).map(|w| w.0));
        // A key whose last write was already expired was replaced (and maybe dropped as
        // expired), not evicted.
        let replaced = |g: &StoreKey| {
            written
                .iter()
                .rev()
                .find(|w| w.0 == *g)
                .is_some_and(|w| w.1 <= now)
        };
        let gone: Vec<StoreKey> = live_before
            .difference(&self.keys(&after, false))
            .filter(|g| !replaced(g))
            .copied()
            .collect();
        // Envoy's CAS cannot guard a key's creation: a slot that did not exist yet may lose the
        // other worker's entry to the empty slot this worker creates (documented in store.rs).
        let creation_race = race.is_some() && !before.contains_key(&slot_key);
        if !repaired && !creation_race {
            let evicted = usize::try_from(report.evicted + other_report.map_or(0, |o| o.evicted));
            if race.is_none() {
                assert_eq!(gone.len(), evicted.unwrap(), "eviction miscounted");
            } else {
                // The other worker may evict the very entry this one then rewrites: counted,
                // though the key is not gone.
                assert!(gone.len() <= evicted.unwrap(), "an uncounted eviction");
            }
        }
        self.lost.extend(gone.iter().copied());
        if race.is_none() && !repaired {
            // Only the entries nearest to expiry are evicted.
            let remaining = decode(&after[&slot_key]).0;
            let min_kept = remaining
                .iter()
                .filter(|e| e.key != k)
                .map(|e| e.expires_at)
                .min()
                .unwrap_or(u64::MAX);
            for e in decode(before.get(&slot_key).map_or(&[][..], Vec::as_slice)).0 {
                if gone.contains(&e.key) {
                    assert!(
                        e.expires_at <= min_kept,
                        "evicted an entry outliving a kept one"
                    );
                }
            }
        }
    }
}
