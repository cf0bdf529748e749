//! Stage 3 of a token's life, the store: a fixed key space of slots in Envoy shared data, and
//! each worker's cache in front of it ([`cache`]).
//!
//! Envoy never frees a shared-data key, so the store addresses exactly `store_slots` keys
//! (`<prefix><slot>`), whatever the churn. A slot holds a few entries:
//!
//! ```text
//! slot  = VERSION entry*
//! entry = store_key[32] expires_at[u64 BE] len[u16 BE] header_payload[len]
//! ```
//!
//! Writes read the slot, drop expired entries and any older entry for the same key, evict the
//! entry nearest to expiry while the slot is full, append, and write back with compare-and-swap,
//! retrying on a mismatch.
//!
//! Envoy's compare-and-swap cannot guard the creation of a key: a write to a missing key always
//! succeeds, so two workers creating the same slot could silently drop one token. The store
//! therefore creates every slot, empty, when the filter is configured ([`Store::initialize`]),
//! before any token is written; entries are only ever written with a CAS token. Should a slot be
//! missing anyway (initialization failed), `put` creates it empty first and retries, so an entry
//! is never written blind; only that fallback keeps the (tiny) creation race.

pub mod cache;
#[cfg(feature = "host-map")]
pub mod map;
/// Without `host-map` (the Wasm build) no host lends the filter a map: the type exists so the
/// flow can name it, and no value of it can, so the compiler drops every path through it.
#[cfg(not(feature = "host-map"))]
pub mod map {
    use super::{CorruptSlot, Entry, Lookup, PutReport, StoreError, StoreKey, TokenStore};

    /// The native build's token map; never made in this build.
    pub enum MapStore {}

    impl TokenStore for MapStore {
        fn lookup<R>(
            &self,
            _: &StoreKey,
            _: u64,
            _: impl FnOnce(Result<Lookup<'_>, CorruptSlot>) -> R,
        ) -> Result<R, StoreError> {
            match *self {}
        }
        fn put(&self, _: &Entry<'_>, _: u64) -> Result<PutReport, StoreError> {
            match *self {}
        }
        fn remove(&self, _: &StoreKey) -> Result<bool, StoreError> {
            match *self {}
        }
        fn epoch(&self) -> Result<u64, StoreError> {
            match *self {}
        }
        fn bump_epoch(&self) -> Result<(), StoreError> {
            match *self {}
        }
    }
}

use crate::token::StoreKey;
use std::borrow::Cow;
use std::fmt;

const VERSION: u8 = 1;
const ENTRY_FIXED: usize = 32 + 8 + 2;
/// Writes give up after this many CAS mismatches in a row.
pub const MAX_WRITE_ATTEMPTS: u32 = 32;

/// A failed host call, with the status the host returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u32);

/// The status by its proxy-wasm ABI name (`BadArgument`), as log lines show it.
impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "Ok",
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            7 => "Empty",
            8 => "CasMismatch",
            10 => "InternalFailure",
            other => return write!(f, "Status({other})"),
        };
        f.write_str(name)
    }
}

/// What a shared-data write can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Another writer changed the key since it was read.
    CasMismatch,
    /// The host refused the call.
    Host(HostStatus),
}

/// The host's shared data, as the store needs it. Implemented over proxy-wasm in the glue and
/// in memory for tests.
pub trait SharedData {
    /// The value (empty when the key was never set or was emptied) and its CAS token, if any.
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus>;
    /// Writes `value`; with `cas`, only if the key is still at that version.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// Why the store could not serve a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// A shared-data host call failed.
    Host {
        operation: &'static str,
        status: u32,
    },
    /// Other writers kept winning the compare-and-swap.
    Contention { attempts: u32 },
    /// The header.payload is longer than an entry can hold.
    EntryTooLarge { len: usize },
    /// A shard of the native store cannot address more bytes (2 GiB).
    Full { bytes: usize },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host { operation, status } => {
                write!(
                    f,
                    "shared data {operation} failed with host status {status}"
                )
            }
            Self::Contention { attempts } => {
                write!(f, "store slot still contended after {attempts} attempts")
            }
            Self::EntryTooLarge { len } => write!(
                f,
                "header.payload of {len} bytes exceeds the {} bytes an entry holds",
                u16::MAX
            ),
            Self::Full { bytes } => {
                write!(f, "store shard full: it holds {bytes} bytes, its most")
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// One stored token: the key, when it expires (Unix seconds) and its `header.payload`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub key: StoreKey,
    pub expires_at: u64,
    pub header_payload: &'a [u8],
}

/// Never print `header.payload`, even in a debug log.
impl fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("expires_at", &self.expires_at)
            .field("header_payload_len", &self.header_payload.len())
            .finish_non_exhaustive()
    }
}

/// The slot's bytes did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptSlot;

/// Iterates over the entries of an encoded slot. An empty slice is an empty slot.
pub fn entries(slot: &[u8]) -> impl Iterator<Item = Result<Entry<'_>, CorruptSlot>> + '_ {
    let mut rest = match slot.split_first() {
        None => &[][..],
        Some((&VERSION, rest)) => rest,
        Some(_) => &[0u8][..], // an unknown version decodes as corrupt
    };
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let decoded = decode_entry(rest);
        rest = match decoded {
            Ok((_, tail)) => tail,
            Err(_) => &[],
        };
        Some(decoded.map(|(entry, _)| entry))
    })
}

fn decode_entry(bytes: &[u8]) -> Result<(Entry<'_>, &[u8]), CorruptSlot> {
    let (fixed, rest) = bytes.split_at_checked(ENTRY_FIXED).ok_or(CorruptSlot)?;
    let (key, tail) = fixed.split_at(32);
    let (exp, len) = tail.split_at(8);
    let key: [u8; 32] = key.try_into().map_err(|_| CorruptSlot)?;
    let expires_at = u64::from_be_bytes(exp.try_into().map_err(|_| CorruptSlot)?);
    let len = usize::from(u16::from_be_bytes(len.try_into().map_err(|_| CorruptSlot)?));
    let (header_payload, rest) = rest.split_at_checked(len).ok_or(CorruptSlot)?;
    Ok((
        Entry {
            key: StoreKey(key),
            expires_at,
            header_payload,
        },
        rest,
    ))
}

fn encode_entry(out: &mut Vec<u8>, e: &Entry<'_>) {
    out.extend_from_slice(&e.key.0);
    out.extend_from_slice(&e.expires_at.to_be_bytes());
    // Callers check the length before encoding; see `Store::put`.
    out.extend_from_slice(&(e.header_payload.len() as u16).to_be_bytes());
    out.extend_from_slice(e.header_payload);
}

/// The result of looking a key up in one slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Present and unexpired.
    Hit {
        header_payload: &'a [u8],
        expires_at: u64,
    },
    /// Present but past its expiry.
    Expired,
    /// Not in the slot.
    Miss,
}

impl fmt::Debug for Lookup<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hit { expires_at, .. } => write!(f, "Hit {{ expires_at: {expires_at}, .. }}"),
            Self::Expired => f.write_str("Expired"),
            Self::Miss => f.write_str("Miss"),
        }
    }
}

/// Finds `key` in an encoded slot without allocating.
pub fn find<'a>(slot: &'a [u8], key: &StoreKey, now: u64) -> Result<Lookup<'a>, CorruptSlot> {
    for entry in entries(slot) {
        let entry = entry?;
        if entry.key == *key {
            return Ok(if entry.expires_at <= now {
                Lookup::Expired
            } else {
                Lookup::Hit {
                    header_payload: entry.header_payload,
                    expires_at: entry.expires_at,
                }
            });
        }
    }
    Ok(Lookup::Miss)
}

/// What one insert did to a slot besides adding the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InsertReport {
    /// Unexpired entries pushed out because the slot was full.
    pub evicted: u32,
    /// Expired entries dropped on the way.
    pub expired: u32,
    /// The slot did not decode and was started afresh.
    pub corrupt: bool,
}

/// Builds the next value of a slot with `new` in it.
pub fn insert(slot: &[u8], new: &Entry<'_>, now: u64, capacity: u16) -> (Vec<u8>, InsertReport) {
    let mut report = InsertReport::default();
    let mut kept: Vec<Entry<'_>> = Vec::new();
    for entry in entries(slot) {
        match entry {
            Ok(e) if e.key == new.key => {}
            Ok(e) if e.expires_at <= now => report.expired += 1,
            Ok(e) => kept.push(e),
            Err(CorruptSlot) => {
                report.corrupt = true;
                kept.clear();
                break;
            }
        }
    }
    let capacity = usize::from(capacity.max(1));
    while kept.len() >= capacity {
        let nearest = kept
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.expires_at)
            .map(|(i, _)| i);
        if let Some(i) = nearest {
            kept.swap_remove(i);
            report.evicted += 1;
        }
    }
    let size = 1 + kept
        .iter()
        .chain(std::iter::once(new))
        .map(|e| ENTRY_FIXED + e.header_payload.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(VERSION);
    for e in kept.iter().chain(std::iter::once(new)) {
        encode_entry(&mut out, e);
    }
    (out, report)
}

/// The slot without the entry for `key`; None when there is none (or the slot is corrupt).
pub fn without(slot: &[u8], key: &StoreKey) -> Option<Vec<u8>> {
    let all: Vec<Entry<'_>> = entries(slot).collect::<Result<_, _>>().ok()?;
    if !all.iter().any(|e| e.key == *key) {
        return None;
    }
    let mut out = Vec::with_capacity(slot.len());
    out.push(VERSION);
    for e in all.iter().filter(|e| e.key != *key) {
        encode_entry(&mut out, e);
    }
    Some(out)
}

/// Totals of a successful write, for the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PutReport {
    pub evicted: u32,
    pub expired: u32,
    pub corrupt: bool,
    /// CAS mismatches (and lost blind writes) before the write stuck.
    pub retries: u32,
}

/// The store over some host's shared data.
pub struct Store<'a, H: SharedData> {
    host: &'a H,
    prefix: &'a str,
    slots: u32,
    capacity: u16,
    /// The revocation epoch's key, when the caller made it once ([`epoch_key`]).
    epoch_key: Option<&'a str>,
}

/// The shared-data key of the revocation epoch of the store under `prefix`. Not a hex slot
/// number, so it never collides with a slot key.
pub fn epoch_key(prefix: &str) -> String {
    format!("{prefix}revocations")
}

impl<'a, H: SharedData> Store<'a, H> {
    pub fn new(host: &'a H, prefix: &'a str, slots: u32, capacity: u16) -> Self {
        Self {
            host,
            prefix,
            slots,
            capacity,
            epoch_key: None,
        }
    }

    /// The same store, with its epoch key made once (`epoch_key(prefix)`) rather than on each
    /// epoch read: the hot path reads the epoch on every hit.
    pub fn with_epoch_key(self, key: &'a str) -> Self {
        Self {
            epoch_key: Some(key),
            ..self
        }
    }

    /// The shared-data key of the slot holding `key`.
    pub fn slot_key(&self, key: &StoreKey) -> String {
        use fmt::Write;
        let mut s = String::with_capacity(self.prefix.len() + 8);
        s.push_str(self.prefix);
        let _ = write!(s, "{:x}", key.slot(self.slots));
        s
    }

    fn get(&self, slot_key: &str) -> Result<(Vec<u8>, Option<u32>), StoreError> {
        self.host
            .get(slot_key)
            .map_err(|HostStatus(status)| StoreError::Host {
                operation: "get",
                status,
            })
    }

    /// Looks `key` up; the returned bytes are the slot's, for [`find`].
    pub fn fetch_slot(&self, key: &StoreKey) -> Result<Vec<u8>, StoreError> {
        self.get(&self.slot_key(key)).map(|(value, _)| value)
    }

    /// Creates every missing slot as an empty slot, so that all entry writes can use CAS.
    /// Idempotent; returns how many slots it created.
    pub fn initialize(&self) -> Result<u32, StoreError> {
        let mut created = 0;
        let mut key = String::with_capacity(self.prefix.len() + 8);
        for slot in 0..self.slots {
            use fmt::Write;
            key.clear();
            key.push_str(self.prefix);
            let _ = write!(key, "{slot:x}");
            let (_, cas) = self.get(&key)?;
            if cas.is_none() {
                self.create_empty(&key)?;
                created += 1;
            }
        }
        Ok(created)
    }

    fn create_empty(&self, slot_key: &str) -> Result<(), StoreError> {
        match self.host.set(slot_key, &[VERSION], None) {
            Ok(()) | Err(SetError::CasMismatch) => Ok(()),
            Err(SetError::Host(HostStatus(status))) => Err(StoreError::Host {
                operation: "set",
                status,
            }),
        }
    }

    /// Stores an entry, retrying on CAS mismatches.
    pub fn put(&self, entry: &Entry<'_>, now: u64) -> Result<PutReport, StoreError> {
        if entry.header_payload.len() > usize::from(u16::MAX) {
            return Err(StoreError::EntryTooLarge {
                len: entry.header_payload.len(),
            });
        }
        let slot_key = self.slot_key(&entry.key);
        let (report, retries) = self.update(&slot_key, |current| {
            let (next, report) = insert(current, entry, now, self.capacity);
            (Some(next), report)
        })?;
        if report.evicted > 0 {
            // An evicted token is still valid and may sit in workers' caches, where a later
            // revocation (which finds nothing in the store) could not reach it. Moving the
            // epoch keeps every cache a subset of the store.
            self.bump_epoch()?;
        }
        Ok(PutReport {
            evicted: report.evicted,
            expired: report.expired,
            corrupt: report.corrupt,
            retries,
        })
    }

    /// Removes the entry for `key` (a revocation). Returns whether there was one, expired or
    /// not. Every worker's next lookup misses it; their caches are told by [`Store::bump_epoch`].
    pub fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let (removed, _) =
            self.update(&self.slot_key(key), |current| match without(current, key) {
                Some(next) => (Some(next), true),
                None => (None, false),
            })?;
        Ok(removed)
    }

    /// The revocation epoch: it changes whenever a token is revoked on any worker, which tells
    /// every worker to forget what it cached.
    ///
    /// It is the key's CAS, which the host moves on every write of it, whoever writes. The value
    /// stays empty (see [`Store::bump_epoch`]), and a host hands an empty value back without
    /// calling into the VM to allocate it (a proxy-wasm host calls the module's allocator for
    /// every non-empty value it returns: that call is most of what a shared-data read costs).
    /// 0 until the first bump. Envoy's CAS is one counter for every key of the process, so a
    /// cache could miss a change only if the counter came back round (2^32 writes) to exactly
    /// the value it saw.
    pub fn epoch(&self) -> Result<u64, StoreError> {
        let (_, cas) = self.get(&self.epoch_key())?;
        Ok(cas.map_or(0, u64::from))
    }

    /// Moves the revocation epoch on, after a revocation or an eviction: a write of the key,
    /// which gives it a new CAS. The value written is the empty one, unless the key holds an
    /// 8-byte counter: releases before this one read the counter, not the CAS, and a VM of one
    /// may share this store during an upgrade (a listener update under the same `vm_id`
    /// drains the old VMs), so a counter is carried on, and that store keeps the old format
    /// (and its read cost) until Envoy restarts.
    ///
    /// One compare-and-swap, no retry: a mismatch means another worker moved the epoch after
    /// this read, which came after the caller's change to the store, so every cache that syncs
    /// later sees a new epoch either way. Only a host failure is an error.
    pub fn bump_epoch(&self) -> Result<(), StoreError> {
        let key = self.epoch_key();
        let (current, cas) = self.get(&key)?;
        let next = <[u8; 8]>::try_from(current.as_slice())
            .map(|counter| u64::from_be_bytes(counter).wrapping_add(1).to_be_bytes());
        let value: &[u8] = match &next {
            Ok(counter) => counter,
            Err(_) => &[],
        };
        match self.host.set(&key, value, cas) {
            Ok(()) | Err(SetError::CasMismatch) => Ok(()),
            Err(SetError::Host(HostStatus(status))) => Err(StoreError::Host {
                operation: "set",
                status,
            }),
        }
    }

    fn epoch_key(&self) -> Cow<'a, str> {
        match self.epoch_key {
            Some(key) => Cow::Borrowed(key),
            None => Cow::Owned(epoch_key(self.prefix)),
        }
    }

    /// Read, change, compare-and-swap, retried on a mismatch. `change` returns the new value
    /// (None: nothing to write) and what to report. A key never written is first created empty
    /// (initialize did not run for it), so a value is never written without CAS.
    fn update<T>(
        &self,
        key: &str,
        mut change: impl FnMut(&[u8]) -> (Option<Vec<u8>>, T),
    ) -> Result<(T, u32), StoreError> {
        let mut retries = 0;
        while retries < MAX_WRITE_ATTEMPTS {
            let (current, cas) = self.get(key)?;
            let Some(cas) = cas else {
                self.create_empty(key)?;
                retries += 1;
                continue;
            };
            let (next, report) = change(&current);
            let Some(next) = next else {
                return Ok((report, retries));
            };
            match self.host.set(key, &next, Some(cas)) {
                Ok(()) => return Ok((report, retries)),
                Err(SetError::CasMismatch) => {}
                Err(SetError::Host(HostStatus(status))) => {
                    return Err(StoreError::Host {
                        operation: "set",
                        status,
                    })
                }
            }
            retries += 1;
        }
        Err(StoreError::Contention { attempts: retries })
    }
}

/// What the flow asks of a token store, whichever the host has: the slot store over shared data
/// ([`Store`], the Wasm build) or a map the host lets the filter own ([`map::MapStore`], the
/// native build). Both keep the same guarantees (see each).
pub trait TokenStore {
    /// Looks `key` up and hands what it found to `read`, which runs while the entry is borrowed
    /// (`Err`: the slot holding it did not decode).
    fn lookup<R>(
        &self,
        key: &StoreKey,
        now: u64,
        read: impl FnOnce(Result<Lookup<'_>, CorruptSlot>) -> R,
    ) -> Result<R, StoreError>;
    /// Stores an entry, replacing one of the same key; evicts when full.
    fn put(&self, entry: &Entry<'_>, now: u64) -> Result<PutReport, StoreError>;
    /// Removes the entry for `key` (a revocation): whether there was one.
    fn remove(&self, key: &StoreKey) -> Result<bool, StoreError>;
    /// The revocation epoch, which every revocation and eviction moves.
    fn epoch(&self) -> Result<u64, StoreError>;
    /// Moves the revocation epoch on.
    fn bump_epoch(&self) -> Result<(), StoreError>;
}

impl<H: SharedData> TokenStore for Store<'_, H> {
    fn lookup<R>(
        &self,
        key: &StoreKey,
        now: u64,
        read: impl FnOnce(Result<Lookup<'_>, CorruptSlot>) -> R,
    ) -> Result<R, StoreError> {
        let slot = self.fetch_slot(key)?;
        Ok(read(find(&slot, key, now)))
    }

    fn put(&self, entry: &Entry<'_>, now: u64) -> Result<PutReport, StoreError> {
        Store::put(self, entry, now)
    }

    fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        Store::remove(self, key)
    }

    fn epoch(&self) -> Result<u64, StoreError> {
        Store::epoch(self)
    }

    fn bump_epoch(&self) -> Result<(), StoreError> {
        Store::bump_epoch(self)
    }
}

/// The token store of one configuration on its host.
pub enum Tokens<'a, H: SharedData> {
    /// Slots in the host's shared data.
    Slots(Store<'a, H>),
    /// The host's process-wide map.
    Map(&'a map::MapStore),
}

impl<H: SharedData> TokenStore for Tokens<'_, H> {
    fn lookup<R>(
        &self,
        key: &StoreKey,
        now: u64,
        read: impl FnOnce(Result<Lookup<'_>, CorruptSlot>) -> R,
    ) -> Result<R, StoreError> {
        match self {
            Self::Slots(store) => store.lookup(key, now, read),
            Self::Map(store) => TokenStore::lookup(*store, key, now, read),
        }
    }

    fn put(&self, entry: &Entry<'_>, now: u64) -> Result<PutReport, StoreError> {
        match self {
            Self::Slots(store) => store.put(entry, now),
            Self::Map(store) => TokenStore::put(*store, entry, now),
        }
    }

    fn remove(&self, key: &StoreKey) -> Result<bool, StoreError> {
        match self {
            Self::Slots(store) => store.remove(key),
            Self::Map(store) => TokenStore::remove(*store, key),
        }
    }

    fn epoch(&self) -> Result<u64, StoreError> {
        match self {
            Self::Slots(store) => store.epoch(),
            Self::Map(store) => TokenStore::epoch(*store),
        }
    }

    fn bump_epoch(&self) -> Result<(), StoreError> {
        match self {
            Self::Slots(store) => store.bump_epoch(),
            Self::Map(store) => TokenStore::bump_epoch(*store),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    type Hook = Box<dyn FnOnce(&MemoryData)>;

    /// Shared data in memory, with Envoy's CAS semantics, and a hook that lets a test run
    /// another "worker's" write just before a set lands.
    #[derive(Default)]
    pub struct MemoryData {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        pub before_set: RefCell<Vec<Hook>>,
        pub sets: RefCell<u32>,
    }

    /// Stores `header_payload` for the token whose signature is `signature`, as issuance does.
    pub fn put_token<H: SharedData>(
        store: &Store<'_, H>,
        signature: &str,
        header_payload: &[u8],
        expires_at: u64,
    ) {
        let key = crate::token::Signature::parse(signature.as_bytes())
            .unwrap()
            .store_key();
        let entry = Entry {
            key,
            expires_at,
            header_payload,
        };
        store.put(&entry, 0).unwrap();
    }

    impl MemoryData {
        pub fn raw_set(&self, key: &str, value: &[u8]) {
            let mut map = self.map.borrow_mut();
            let cas = map.get(key).map_or(1, |(_, c)| c + 1);
            map.insert(key.to_owned(), (value.to_vec(), cas));
        }
    }

    impl SharedData for MemoryData {
        fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
            Ok(self
                .map
                .borrow()
                .get(key)
                .map_or((Vec::new(), None), |(v, c)| (v.clone(), Some(*c))))
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            *self.sets.borrow_mut() += 1;
            let hook = self.before_set.borrow_mut().pop();
            if let Some(hook) = hook {
                hook(self);
            }
            let current = self.map.borrow().get(key).map(|(_, c)| *c);
            if let (Some(want), Some(have)) = (cas, current) {
                if want != have {
                    return Err(SetError::CasMismatch);
                }
            }
            self.raw_set(key, value);
            Ok(())
        }
    }

    fn key(n: u8) -> StoreKey {
        StoreKey([n; 32])
    }

    fn entry(n: u8, expires_at: u64, hp: &[u8]) -> Entry<'_> {
        Entry {
            key: key(n),
            expires_at,
            header_payload: hp,
        }
    }

    #[test]
    fn slot_round_trips() {
        let (slot, _) = insert(&[], &entry(1, 100, b"h.p"), 0, 4);
        let (slot, _) = insert(&slot, &entry(2, 200, b""), 0, 4);
        let decoded: Vec<_> = entries(&slot).map(Result::unwrap).collect();
        assert_eq!(decoded, [entry(1, 100, b"h.p"), entry(2, 200, b"")]);
        let mut reencoded = vec![VERSION];
        for e in &decoded {
            encode_entry(&mut reencoded, e);
        }
        assert_eq!(reencoded, slot);
    }

    #[test]
    fn find_reports_hit_expired_and_miss() {
        let (slot, _) = insert(&[], &entry(1, 100, b"h.p"), 0, 4);
        assert_eq!(
            find(&slot, &key(1), 99),
            Ok(Lookup::Hit {
                header_payload: b"h.p",
                expires_at: 100
            })
        );
        assert_eq!(find(&slot, &key(1), 100), Ok(Lookup::Expired));
        assert_eq!(find(&slot, &key(2), 0), Ok(Lookup::Miss));
        assert_eq!(find(&[], &key(2), 0), Ok(Lookup::Miss));
    }

    #[test]
    fn corrupt_slots_are_detected() {
        let (slot, _) = insert(&[], &entry(1, 100, b"h.p"), 0, 4);
        assert_eq!(find(&slot[..slot.len() - 1], &key(9), 0), Err(CorruptSlot));
        assert_eq!(find(&[2, 0, 0], &key(9), 0), Err(CorruptSlot));
        let (fresh, report) = insert(&slot[..10], &entry(2, 5, b"x"), 0, 4);
        assert!(report.corrupt);
        assert_eq!(entries(&fresh).count(), 1);
    }

    #[test]
    fn insert_drops_expired_and_replaces_same_key() {
        let (slot, _) = insert(&[], &entry(1, 10, b"a"), 0, 4);
        let (slot, _) = insert(&slot, &entry(2, 50, b"b"), 0, 4);
        let (slot, report) = insert(&slot, &entry(2, 60, b"c"), 20, 4);
        assert_eq!(report.expired, 1);
        let decoded: Vec<_> = entries(&slot).map(Result::unwrap).collect();
        assert_eq!(decoded, [entry(2, 60, b"c")]);
    }

    #[test]
    fn full_slot_evicts_the_entry_nearest_to_expiry() {
        let mut slot = Vec::new();
        for (n, exp) in [(1, 300), (2, 100), (3, 200)] {
            slot = insert(&slot, &entry(n, exp, b"x"), 0, 3).0;
        }
        let (slot, report) = insert(&slot, &entry(4, 400, b"y"), 0, 3);
        assert_eq!(report.evicted, 1);
        let keys: Vec<_> = entries(&slot).map(|e| e.unwrap().key).collect();
        assert!(!keys.contains(&key(2)));
        assert_eq!(keys.len(), 3);
        assert!(keys.contains(&key(4)));
    }

    #[test]
    fn key_space_is_bounded_by_store_slots() {
        let host = MemoryData::default();
        let store = Store::new(&host, "p/", 16, 2);
        for n in 0..=255u8 {
            let mut k = [n; 32];
            k[31] = n.wrapping_mul(7);
            let e = Entry {
                key: StoreKey(k),
                expires_at: 1000,
                header_payload: b"hp",
            };
            store.put(&e, 0).unwrap();
        }
        let map = host.map.borrow();
        // The slots, plus the one revocation epoch key that evictions move.
        assert!(map.len() <= 16 + 1, "{} keys", map.len());
        assert!(map.keys().all(|k| k.starts_with("p/")));
    }

    #[test]
    fn put_then_lookup() {
        let host = MemoryData::default();
        let store = Store::new(&host, "p/", 64, 4);
        store.initialize().unwrap();
        let report = store.put(&entry(7, 100, b"h.p"), 0).unwrap();
        assert_eq!(report, PutReport::default());
        let slot = store.fetch_slot(&key(7)).unwrap();
        assert_eq!(
            find(&slot, &key(7), 1),
            Ok(Lookup::Hit {
                header_payload: b"h.p",
                expires_at: 100
            })
        );
    }

    #[test]
    fn cas_mismatch_is_retried_and_keeps_the_other_writers_entry() {
        let host = MemoryData::default();
        let store = Store::new(&host, "p/", 1, 8);
        store.put(&entry(1, 100, b"one"), 0).unwrap();
        // Another worker writes entry 2 between our read and our write.
        host.before_set
            .borrow_mut()
            .push(Box::new(|h: &MemoryData| {
                Store::new(h, "p/", 1, 8)
                    .put(&entry(2, 100, b"two"), 0)
                    .unwrap();
            }));
        let report = store.put(&entry(3, 100, b"three"), 0).unwrap();
        assert_eq!(report.retries, 1);
        let slot = store.fetch_slot(&key(1)).unwrap();
        for n in 1..=3 {
            assert!(
                matches!(find(&slot, &key(n), 0), Ok(Lookup::Hit { .. })),
                "{n}"
            );
        }
    }

    #[test]
    fn entries_are_never_written_blind() {
        // Envoy's CAS cannot guard key creation. Two workers that both saw a missing slot and
        // both wrote blind would drop one token (review of issue 3). Writes must always carry CAS.
        struct Strict<'a>(&'a MemoryData, RefCell<u32>);
        impl SharedData for Strict<'_> {
            fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
                self.0.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
                if cas.is_none() {
                    assert_eq!(
                        value,
                        [VERSION],
                        "a blind write may only create an empty slot"
                    );
                    *self.1.borrow_mut() += 1;
                }
                self.0.set(key, value, cas)
            }
        }
        let host = MemoryData::default();
        let strict = Strict(&host, RefCell::new(0));
        let store = Store::new(&strict, "p/", 4, 8);
        assert_eq!(store.initialize().unwrap(), 4);
        assert_eq!(store.initialize().unwrap(), 0, "idempotent");
        store.put(&entry(1, 100, b"one"), 0).unwrap();
        // A slot missing despite initialize (another prefix's store): created empty, then CAS.
        let other = Store::new(&strict, "q/", 1, 8);
        let report = other.put(&entry(2, 100, b"two"), 0).unwrap();
        assert_eq!(report.retries, 1);
        // 4 slots at initialize, then the missing q/ slot.
        assert_eq!(*strict.1.borrow(), 5);
        let slot = other.fetch_slot(&key(2)).unwrap();
        assert!(matches!(find(&slot, &key(2), 0), Ok(Lookup::Hit { .. })));
    }

    #[test]
    fn endless_contention_gives_up() {
        struct AlwaysMismatch;
        impl SharedData for AlwaysMismatch {
            fn get(&self, _: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
                Ok((Vec::new(), Some(1)))
            }
            fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), SetError> {
                Err(SetError::CasMismatch)
            }
        }
        let err = Store::new(&AlwaysMismatch, "p/", 4, 4)
            .put(&entry(1, 100, b"x"), 0)
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::Contention {
                attempts: MAX_WRITE_ATTEMPTS
            }
        );
    }

    #[test]
    fn oversized_entries_are_refused() {
        let host = MemoryData::default();
        let big = vec![b'a'; usize::from(u16::MAX) + 1];
        let err = Store::new(&host, "p/", 4, 4)
            .put(&entry(1, 100, &big), 0)
            .unwrap_err();
        assert!(matches!(err, StoreError::EntryTooLarge { .. }));
    }

    #[test]
    fn the_epoch_is_the_cas_of_an_empty_key_or_carries_an_older_releases_counter() {
        let host = MemoryData::default();
        let store = Store::new(&host, "p/", 16, 2);
        let key = epoch_key("p/");
        assert_eq!(store.epoch().unwrap(), 0, "no bump yet");
        store.bump_epoch().unwrap();
        let first = store.epoch().unwrap();
        assert_ne!(first, 0);
        assert_eq!(host.get(&key).unwrap().0, b"", "the value stays empty");
        store.bump_epoch().unwrap();
        assert_ne!(store.epoch().unwrap(), first);
        // An earlier release created the key with its 8-byte counter and still reads it: a bump
        // carries the counter on, so that release's caches see it too.
        let old = MemoryData::default();
        old.raw_set(&key, &41u64.to_be_bytes());
        let store = Store::new(&old, "p/", 16, 2);
        let before = store.epoch().unwrap();
        store.bump_epoch().unwrap();
        assert_ne!(store.epoch().unwrap(), before);
        assert_eq!(old.get(&key).unwrap().0, 42u64.to_be_bytes());
    }
}
