//! The etcd tier: tokens and revocations shared by every replica of the gateway.
//!
//! Envoy's shared data lives in one process. Behind several gateway replicas, a token issued
//! through one must work through all of them, and a revocation on one must reach all of them.
//! This module builds the calls to etcd v3's JSON gateway (`POST /v3/...`, keys and values in
//! base64) and reads the answers; the glue sends them with `dispatch_http_call`.
//!
//! # Layout in etcd
//! - `<key_prefix>t/<hex SHA-256(signature)>` = `<expires_at>:<header.payload>`, under a lease
//!   that ends with the token's expiry bucket. Like shared data, etcd never holds a signature,
//!   so a dump of it holds no usable credential.
//! - `<key_prefix>r/<written, Unix ms, 13 digits>/<hex SHA-256(signature)>` = `<expires_at>`: a
//!   revocation marker, written in the transaction that deletes the token, under a lease of the
//!   same kind: it lives as long as the token would have. Markers sort by when they were written.
//! - `<key_prefix>x/<hex SHA-256(signature)>` = `<expires_at>`, written with the marker: a token
//!   write is a transaction that puts the token only while this key is absent, so a write that
//!   commits late (Envoy retried it) cannot bring a revoked token back.
//!
//! # Flow
//! - Issuance writes the token before the client gets it (fail closed: a 503 if etcd fails), so
//!   a token a client holds is known to every replica.
//! - A signature a replica does not hold is read from etcd once ([`miss_key`]), then stored
//!   locally ([`adopt`]).
//! - A revocation deletes the token and writes its marker. Every worker of every replica sweeps
//!   the markers written since its last sweep began, less [`SWEEP_SLACK_MS`] ([`Sweeps`]), every
//!   `poll_ms`, and forgets those tokens ([`apply_markers`]). A sweep reads only recent markers,
//!   whatever the number of live ones, and does not depend on etcd's revisions, which start over
//!   when etcd is restored from a backup.

use crate::config::Config;
use crate::lifecycle::revoke::could_be_signature;
use crate::request::{parse_authorization, presented_key, Credentials, Rejection, Verdict};
use crate::store::{
    find, Entry, HostStatus, Lookup, PutReport, SetError, SharedData, Store, StoreError,
    TokenStore, MAX_WRITE_ATTEMPTS,
};
use crate::token::StoreKey;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt;

/// Markers asked for per poll; more come with the next call at once.
pub const POLL_LIMIT: u32 = 1000;
/// A sweep starts this long, plus twice `timeout_ms` ([`sweep_slack_ms`]), before the previous
/// one began, so a marker whose writer's clock runs behind this worker's, or that took a while
/// to commit, is still read. Replica clocks must agree within a few seconds (NTP).
pub const SWEEP_SLACK_MS: u64 = 10_000;

/// The slack of sweeps for calls that time out after `timeout_ms`: a marker is stamped when its
/// write is sent and may commit up to a timeout later (or, when etcd applies a write the filter
/// gave up on, about another).
pub fn sweep_slack_ms(timeout_ms: u64) -> u64 {
    SWEEP_SLACK_MS.saturating_add(timeout_ms.saturating_mul(2))
}
/// How long a worker remembers a revocation it polled, to refuse a read of that token from
/// etcd that raced the revocation (a read takes at most `timeout_ms`, at most 60 s).
pub const RECENT_SECONDS: u64 = 120;
/// Revocations a worker remembers at most.
pub const RECENT_CAPACITY: usize = 65_536;

/// One call to etcd's JSON gateway: `POST path` with a JSON body.
#[derive(Clone, PartialEq, Eq)]
pub struct Call {
    /// What the call does, for messages: "put", "range", "txn", "poll", "lease grant".
    pub name: &'static str,
    pub path: &'static str,
    pub body: Vec<u8>,
}

/// Never print the body: a token write carries `header.payload`.
impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Call({}, <{} bytes>)", self.path, self.body.len())
    }
}

/// The etcd key of a token.
pub fn token_key(prefix: &str, key: &StoreKey) -> String {
    format!("{prefix}t/{}", key.to_hex())
}

/// The etcd key that says a token was revoked, for as long as it would have lived: a token write
/// checks it is absent, so a write that commits late (Envoy retried it, and the first attempt
/// still went through after the revocation) cannot bring the token back.
pub fn revoked_key(prefix: &str, key: &StoreKey) -> String {
    format!("{prefix}x/{}", key.to_hex())
}

/// The etcd key of a token's revocation marker written at `written_ms` (Unix milliseconds).
pub fn marker_key(prefix: &str, key: &StoreKey, written_ms: u64) -> String {
    format!("{prefix}r/{written_ms:013}/{}", key.to_hex())
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn call(name: &'static str, path: &'static str, body: &serde_json::Value) -> Call {
    Call {
        name,
        path,
        body: body.to_string().into_bytes(),
    }
}

/// Grants a lease of `ttl_seconds`.
pub fn grant(ttl_seconds: u64) -> Call {
    call(
        "lease grant",
        "/v3/lease/grant",
        &json!({ "TTL": ttl_seconds.to_string() }),
    )
}

/// Writes a token under `lease`, unless it was revoked: a transaction that puts the token only
/// while its [`revoked_key`] is absent (version 0).
pub fn put_token(prefix: &str, entry: &Entry<'_>, lease: i64) -> Call {
    let mut value = format!("{}:", entry.expires_at).into_bytes();
    value.extend_from_slice(entry.header_payload);
    call(
        "put",
        "/v3/kv/txn",
        &json!({
            "compare": [{
                "key": b64(revoked_key(prefix, &entry.key).as_bytes()),
                "target": "VERSION",
                "result": "EQUAL",
                "version": "0",
            }],
            "success": [{ "request_put": {
                "key": b64(token_key(prefix, &entry.key).as_bytes()),
                "value": b64(&value),
                "lease": lease.to_string(),
            } }],
        }),
    )
}

/// Reads a token.
pub fn get_token(prefix: &str, key: &StoreKey) -> Call {
    call(
        "range",
        "/v3/kv/range",
        &json!({ "key": b64(token_key(prefix, key).as_bytes()) }),
    )
}

/// Deletes a token and writes its revocation marker and its [`revoked_key`], in one
/// transaction, under the lease of the token's expiry. Applied twice (a retry), it leaves etcd
/// as once.
pub fn revoke(prefix: &str, key: &StoreKey, expires_at: u64, lease: i64, now_ms: u64) -> Call {
    let expires = b64(expires_at.to_string().as_bytes());
    call(
        "txn",
        "/v3/kv/txn",
        &json!({ "success": [
            { "request_delete_range": { "key": b64(token_key(prefix, key).as_bytes()) } },
            { "request_put": {
                "key": b64(marker_key(prefix, key, now_ms).as_bytes()),
                "value": expires,
                "lease": lease.to_string(),
            } },
            { "request_put": {
                "key": b64(revoked_key(prefix, key).as_bytes()),
                "value": expires,
                "lease": lease.to_string(),
            } },
        ] }),
    )
}

/// Asks for the revocation markers from `start_key` on, in key order: oldest first.
pub fn poll(prefix: &str, start_key: &str) -> Call {
    // The range ends at `<prefix>r0` ('0' follows '/'): every marker, and nothing else.
    call(
        "poll",
        "/v3/kv/range",
        &json!({
            "key": b64(start_key.as_bytes()),
            "range_end": b64(format!("{prefix}r0").as_bytes()),
            "keys_only": true,
            "limit": POLL_LIMIT.to_string(),
        }),
    )
}

/// Why an etcd call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No answer: the connection failed, was reset, or the call timed out.
    NoAnswer { call: &'static str },
    /// Envoy refused to start the call (an unknown cluster, say): the host's status.
    NotDispatched { call: &'static str, status: u32 },
    /// etcd answered with an error status.
    Refused {
        call: &'static str,
        status: u32,
        /// etcd's gRPC code, when the body carried one (5: not found).
        code: Option<i64>,
        message: String,
    },
    /// The answer is not what etcd sends.
    BadAnswer {
        call: &'static str,
        reason: &'static str,
    },
}

impl EtcdError {
    /// The lease a write named is gone (it expired, or etcd lost it): grant another.
    pub fn lease_not_found(&self) -> bool {
        matches!(self, Self::Refused { code: Some(5), message, .. } if message.contains("lease not found"))
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAnswer { call } => write!(f, "etcd {call}: no answer (down or timed out)"),
            Self::NotDispatched { call, status } => write!(
                f,
                "etcd {call}: Envoy did not start the call (host status {status}; is the cluster defined?)"
            ),
            Self::Refused {
                call,
                status,
                message,
                ..
            } => write!(f, "etcd {call}: status {status}: {message}"),
            Self::BadAnswer { call, reason } => write!(f, "etcd {call}: {reason}"),
        }
    }
}

impl std::error::Error for EtcdError {}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

/// Every etcd answer has one; its content is not needed.
#[derive(Deserialize)]
struct Header {}

#[derive(Deserialize)]
struct GrantAnswer {
    #[serde(default)]
    header: Option<Header>,
    #[serde(rename = "ID", default)]
    id: Option<String>,
}

/// What every etcd answer carries: a header. A 200 without one is not from etcd.
trait Headed {
    fn has_header(&self) -> bool;
}

macro_rules! headed {
    ($($answer:ty),*) => {$(
        impl Headed for $answer {
            fn has_header(&self) -> bool {
                self.header.is_some()
            }
        }
    )*};
}

#[derive(Deserialize)]
struct WriteAnswer {
    #[serde(default)]
    header: Option<Header>,
    /// Only in transaction answers.
    #[serde(default)]
    succeeded: Option<bool>,
}

#[derive(Deserialize)]
struct Kv {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
struct RangeAnswer {
    #[serde(default)]
    header: Option<Header>,
    #[serde(default)]
    kvs: Vec<Kv>,
    #[serde(default)]
    more: bool,
}

headed!(GrantAnswer, WriteAnswer, RangeAnswer);

/// Decodes a 200 answer, or names the failure. `status` is `None` when no answer came.
fn answer<'a, T: Deserialize<'a> + Headed>(
    call: &'static str,
    status: Option<&[u8]>,
    body: &'a [u8],
) -> Result<T, EtcdError> {
    let Some(status) = status else {
        return Err(EtcdError::NoAnswer { call });
    };
    if status != b"200" {
        let error: Option<ErrorAnswer> = serde_json::from_slice(body).ok();
        let (code, message) = error.map_or((None, None), |e| (e.code, e.message));
        let mut message = message.unwrap_or_default();
        if let Some((cut, _)) = message.char_indices().nth(200) {
            message.truncate(cut);
        }
        return Err(EtcdError::Refused {
            call,
            status: std::str::from_utf8(status)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            code,
            message,
        });
    }
    let answer: T = serde_json::from_slice(body).map_err(|_| EtcdError::BadAnswer {
        call,
        reason: "the answer is not the JSON etcd sends",
    })?;
    if !answer.has_header() {
        return Err(EtcdError::BadAnswer {
            call,
            reason: "no header in the answer",
        });
    }
    Ok(answer)
}

/// The lease id of a grant.
pub fn parse_grant(status: Option<&[u8]>, body: &[u8]) -> Result<i64, EtcdError> {
    const CALL: &str = "lease grant";
    let grant: GrantAnswer = answer(CALL, status, body)?;
    grant
        .id
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or(EtcdError::BadAnswer {
            call: CALL,
            reason: "no lease ID in the answer",
        })
}

/// Whether a transaction (a token write, a revocation) took effect. etcd leaves `succeeded` out
/// of its JSON when it is false (a token write whose token was revoked: its compare failed), so
/// only an explicit `true` counts.
pub fn parse_write(
    call: &'static str,
    status: Option<&[u8]>,
    body: &[u8],
) -> Result<(), EtcdError> {
    let write: WriteAnswer = answer(call, status, body)?;
    if write.succeeded != Some(true) {
        return Err(EtcdError::BadAnswer {
            call,
            reason: "etcd did not apply the transaction (a token write: the token was revoked)",
        });
    }
    Ok(())
}

/// A token read from etcd.
#[derive(Clone, PartialEq, Eq)]
pub struct Fetched {
    pub expires_at: u64,
    pub header_payload: String,
}

/// Never print `header.payload`.
impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The token of a [`get_token`] answer, if etcd holds it.
pub fn parse_get(status: Option<&[u8]>, body: &[u8]) -> Result<Option<Fetched>, EtcdError> {
    const CALL: &str = "range";
    let range: RangeAnswer = answer(CALL, status, body)?;
    let Some(kv) = range.kvs.first() else {
        return Ok(None);
    };
    let bad = |reason| EtcdError::BadAnswer { call: CALL, reason };
    let value = kv
        .value
        .as_deref()
        .and_then(|v| STANDARD.decode(v).ok())
        .and_then(|v| String::from_utf8(v).ok())
        .ok_or(bad("the value is not base64 of text"))?;
    let (expires_at, header_payload) = value
        .split_once(':')
        .ok_or(bad("the value is not <expires_at>:<header.payload>"))?;
    let expires_at = Some(expires_at)
        .filter(|e| e.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|e| e.parse().ok())
        .ok_or(bad("the value's expiry is not a number"))?;
    // Segments of any length (a payload with many claims is long), as issuance stores them: the
    // store's own bound is the whole entry's.
    let mut parts = header_payload.split('.');
    let well_formed = parts.clone().count() == 2
        && parts.all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && header_payload.len() <= usize::from(u16::MAX);
    if !well_formed {
        return Err(bad("the value's token is not a header.payload"));
    }
    Ok(Some(Fetched {
        expires_at,
        header_payload: header_payload.to_owned(),
    }))
}

/// Revocation markers from one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    pub keys: Vec<StoreKey>,
    /// When etcd has more: the last key of this page, to continue after.
    pub more_after: Option<String>,
}

/// The markers of a [`poll`] answer. Keys under the prefix that are not markers are skipped.
pub fn parse_poll(prefix: &str, status: Option<&[u8]>, body: &[u8]) -> Result<Markers, EtcdError> {
    const CALL: &str = "poll";
    let range: RangeAnswer = answer(CALL, status, body)?;
    let marker_prefix = format!("{prefix}r/");
    let mut keys = Vec::with_capacity(range.kvs.len());
    let mut last = None;
    for kv in &range.kvs {
        let name = kv
            .key
            .as_deref()
            .and_then(|k| STANDARD.decode(k).ok())
            .and_then(|k| String::from_utf8(k).ok())
            .ok_or(EtcdError::BadAnswer {
                call: CALL,
                reason: "a key is not base64 of text",
            })?;
        let marker = name
            .strip_prefix(&marker_prefix)
            .and_then(|rest| rest.split_once('/'))
            .filter(|(written, _)| {
                written.len() == 13 && written.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|(_, hex)| StoreKey::from_hex(hex));
        if let Some(key) = marker {
            keys.push(key);
        }
        last = Some(name);
    }
    Ok(Markers {
        keys,
        more_after: last.filter(|_| range.more),
    })
}

/// Where a worker's revocation sweeps stand.
#[derive(Debug, Default)]
pub struct Sweeps {
    /// When the last complete sweep began (Unix ms); 0 before the first, which reads every
    /// live marker.
    since_ms: u64,
    slack_ms: u64,
    /// The sweep under way: when it began, and the key its next page starts at.
    current: Option<(u64, String)>,
}

impl Sweeps {
    /// Sweeps with this slack ([`sweep_slack_ms`]), the first from `since_ms` (0: every live
    /// marker; or the [`Watermark`] of the store, whose markers are applied up to there).
    pub fn new(slack_ms: u64, since_ms: u64) -> Self {
        Self {
            since_ms,
            slack_ms,
            current: None,
        }
    }

    /// When the last complete sweep began (Unix ms): every marker written before, less the
    /// slack, has been applied.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// The next poll: the next page of the sweep under way, or a new sweep beginning at `now_ms`.
    pub fn next_call(&mut self, prefix: &str, now_ms: u64) -> Call {
        let since = self.since_ms;
        let slack = self.slack_ms;
        let (_, start) = self.current.get_or_insert_with(|| {
            let from = if since == 0 {
                0
            } else {
                since.saturating_sub(slack)
            };
            (now_ms, format!("{prefix}r/{from:013}"))
        });
        poll(prefix, start)
    }

    /// Records markers that were applied. Returns whether the sweep has more pages; when it has
    /// none, [`Sweeps::since_ms`] moved on.
    pub fn advance(&mut self, markers: &Markers) -> bool {
        match (&markers.more_after, self.current.as_mut()) {
            (Some(last), Some((_, start))) => {
                // The smallest key after `last`.
                *start = format!("{last}\0");
                true
            }
            _ => {
                if let Some((began, _)) = self.current.take() {
                    self.since_ms = began;
                }
                false
            }
        }
    }

    /// Drops the sweep under way (a failed poll): the next one starts from the same point.
    pub fn abandon(&mut self) {
        self.current = None;
    }
}

/// Where the sweeps of a store stand, kept in shared data next to the store: a new or reloaded
/// VM (every listener update reloads the configuration) starts sweeping from there instead of
/// reading every live marker again. Markers act on the shared store, so any worker's complete
/// sweep counts for all of them.
pub struct Watermark {
    key: String,
}

impl Watermark {
    /// The watermark of the store under `store_prefix` for markers under `key_prefix`.
    pub fn new(store_prefix: &str, key_prefix: &str) -> Self {
        Self {
            key: format!("{store_prefix}etcd-swept/{key_prefix}"),
        }
    }

    /// The last recorded sweep start (Unix ms); 0 when none (a new store).
    pub fn load<H: SharedData>(&self, host: &H) -> u64 {
        host.get(&self.key)
            .ok()
            .and_then(|(value, _)| <[u8; 8]>::try_from(value.as_slice()).ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Records `since_ms` unless a later sweep was recorded. One compare-and-swap: a lost race
    /// means another worker recorded a sweep just now, which serves as well.
    pub fn save<H: SharedData>(&self, host: &H, since_ms: u64) {
        let Ok((value, cas)) = host.get(&self.key) else {
            return;
        };
        let current = <[u8; 8]>::try_from(value.as_slice()).map_or(0, u64::from_be_bytes);
        if since_ms > current {
            let _ = host.set(&self.key, &since_ms.to_be_bytes(), cas);
        }
    }
}

/// The key to look for in etcd after a request was refused as unknown here: the presented
/// signature, when etcd is configured and the token has a signature's shape.
pub fn miss_key(
    config: &Config,
    verdict: &Verdict,
    authorization: Option<&[u8]>,
) -> Option<StoreKey> {
    config.etcd.as_ref()?;
    if *verdict != Verdict::Reject(Rejection::Unknown) {
        return None;
    }
    match parse_authorization(authorization) {
        Credentials::Signature(s) | Credentials::Dpop(s) if could_be_signature(s.as_str()) => {
            presented_key(authorization)
        }
        _ => None,
    }
}

/// Revocations applied lately in this Envoy process, for all of its workers: a store of their
/// own in shared data (under `recent_prefix`, entries without a header.payload), so a fixed key
/// space and bounded in size. One worker applies the markers it polled; every worker refuses to
/// keep a token read from etcd that was revoked meanwhile.
pub struct RecentRevocations<'a, H: SharedData> {
    store: Store<'a, H>,
}

impl<'a, H: SharedData> RecentRevocations<'a, H> {
    /// Slots of the store; [`RECENT_CAPACITY`] entries in all.
    pub const SLOTS: u32 = 1024;
    const SLOT_CAPACITY: u16 = (RECENT_CAPACITY / Self::SLOTS as usize) as u16;

    pub fn new(host: &'a H, recent_prefix: &'a str) -> Self {
        Self {
            store: Store::new(host, recent_prefix, Self::SLOTS, Self::SLOT_CAPACITY),
        }
    }

    /// Creates the store's slots (see [`Store::initialize`]); returns how many it created.
    pub fn initialize(&self) -> Result<u32, StoreError> {
        self.store.initialize()
    }

    /// Remembers the revocation of `key` for [`RECENT_SECONDS`] from `now`. A full slot forgets
    /// its oldest first.
    pub fn insert(&self, key: StoreKey, now: u64) -> Result<(), StoreError> {
        let entry = Entry {
            key,
            expires_at: now.saturating_add(RECENT_SECONDS),
            header_payload: &[],
        };
        self.store.put(&entry, now).map(|_| ())
    }

    /// [`RecentRevocations::insert`], unless `key` is remembered already (one read, no write).
    pub fn remember(&self, key: StoreKey, now: u64) -> Result<(), StoreError> {
        let slot = self.store.fetch_slot(&key)?;
        match find(&slot, &key, now) {
            Ok(Lookup::Hit { .. }) => Ok(()),
            // A corrupt slot is rewritten by the insert.
            _ => self.insert(key, now),
        }
    }

    /// Whether `key` was revoked here lately. A corrupt slot counts as remembering it: a token
    /// is not kept rather than kept after its revocation.
    pub fn contains(&self, key: &StoreKey, now: u64) -> Result<bool, StoreError> {
        let slot = self.store.fetch_slot(key)?;
        Ok(!matches!(
            find(&slot, key, now),
            Ok(Lookup::Miss | Lookup::Expired)
        ))
    }
}

/// Which worker of an Envoy process polls etcd for revocations: the one holding this lease in
/// shared data. Markers act on the process's shared store, so one poller serves every worker,
/// and the requests etcd sees do not grow with the worker count. The holder renews its lease on
/// every tick; when it stops (its VM went away with a configuration update), another worker
/// takes over once the lease lapses, from the [`Watermark`].
pub struct PollerLease<'a> {
    key: &'a str,
}

impl<'a> PollerLease<'a> {
    pub fn new(poller_key: &'a str) -> Self {
        Self { key: poller_key }
    }

    /// Takes or renews the lease for worker `me` until `until_ms`, unless another worker holds
    /// it past `now_ms`. Returns whether `me` polls. One compare-and-swap: losing it means
    /// another worker took the lease just now. When shared data fails, every worker polls:
    /// more requests to etcd, but no revocation left unswept.
    pub fn acquire<H: SharedData>(&self, host: &H, me: u64, now_ms: u64, until_ms: u64) -> bool {
        let Ok((value, cas)) = host.get(self.key) else {
            return true;
        };
        if let Some((holder, held_until)) = decode_pair(&value) {
            if holder != me && held_until > now_ms {
                return false;
            }
        }
        let mut next = [0u8; 16];
        next[..8].copy_from_slice(&me.to_be_bytes());
        next[8..].copy_from_slice(&until_ms.to_be_bytes());
        !matches!(host.set(self.key, &next, cas), Err(SetError::CasMismatch))
    }
}

fn decode_pair(value: &[u8]) -> Option<(u64, u64)> {
    let first = <[u8; 8]>::try_from(value.get(..8)?).ok()?;
    let second = <[u8; 8]>::try_from(value.get(8..16)?).ok()?;
    Some((u64::from_be_bytes(first), u64::from_be_bytes(second)))
}

/// A number no other worker (VM) of this Envoy process got from this function: a counter in
/// shared data under `key`, moved on with compare-and-swap, and created at `seed` (the clock in
/// nanoseconds: CAS cannot guard a creation, and two workers creating it at once get different
/// numbers that way). Names a poller.
pub fn worker_number<H: SharedData>(host: &H, key: &str, seed: u64) -> Result<u64, StoreError> {
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let (value, cas) = host
            .get(key)
            .map_err(|HostStatus(status)| StoreError::Host {
                operation: "get",
                status,
            })?;
        let next = <[u8; 8]>::try_from(value.as_slice())
            .map_or(seed, |current| u64::from_be_bytes(current).wrapping_add(1));
        match host.set(key, &next.to_be_bytes(), cas) {
            Ok(()) => return Ok(next),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host(HostStatus(status))) => {
                return Err(StoreError::Host {
                    operation: "set",
                    status,
                })
            }
        }
    }
    Err(StoreError::Contention {
        attempts: MAX_WRITE_ATTEMPTS,
    })
}

/// Stores a token read from etcd in this replica's store, with the write's report (evictions
/// are counted as at issuance). Not when it has expired, nor when this process applied its
/// revocation lately (`None`): the read may have raced the revocation, and storing it after its
/// marker was applied would bring it back here until it expires.
pub fn adopt<S: TokenStore, H: SharedData>(
    store: &S,
    key: StoreKey,
    fetched: &Fetched,
    recent: &RecentRevocations<'_, H>,
    now: u64,
) -> Result<Option<PutReport>, StoreError> {
    if fetched.expires_at <= now {
        return Ok(None);
    }
    let report = store.put(
        &Entry {
            key,
            expires_at: fetched.expires_at,
            header_payload: fetched.header_payload.as_bytes(),
        },
        now,
    )?;
    // Checked after the write: the poller remembers a revocation before it removes the token,
    // so either this check sees it, or that removal comes after this write and takes it out.
    match recent.contains(&key, now) {
        Ok(false) => Ok(Some(report)),
        Ok(true) => {
            store.remove(&key)?;
            store.bump_epoch()?;
            Ok(None)
        }
        Err(e) => {
            // A worker may have cached it in between: the epoch tells every cache.
            let _ = store.remove(&key);
            let _ = store.bump_epoch();
            Err(e)
        }
    }
}

/// Forgets the tokens of polled revocation markers here. Returns how many entries this removed;
/// when any, the epoch moves once, so every worker's cache forgets them too.
pub fn apply_markers<S: TokenStore, H: SharedData>(
    store: &S,
    markers: &[StoreKey],
    recent: &RecentRevocations<'_, H>,
    now: u64,
) -> Result<u32, StoreError> {
    let mut removed = 0;
    let mut failed = None;
    for key in markers {
        // Remembered before the removal, so that a read of the token racing it is not kept.
        // Sweeps overlap: a marker remembered lately is not remembered again, but its token is
        // still removed (a read of its slot; a write only when the token is there), in case an
        // earlier removal failed. A failed remember does not hold the removal back.
        let remembered = recent.remember(*key, now);
        match store.remove(key) {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => {
                // The rest waits for the next sweep, which reads these markers again.
                failed = Some(e);
                break;
            }
        }
        if let Err(e) = remembered {
            failed = Some(e);
            break;
        }
    }
    // Whatever was removed must leave every cache too, even when a later removal failed: the
    // next sweep skips the markers applied here.
    if removed > 0 {
        store.bump_epoch()?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// The leases a worker granted, one per expiry bucket: tokens expiring within the same
/// `lease_bucket_seconds` share one, so issuance grants a lease about once per bucket.
#[derive(Debug)]
pub struct Leases {
    width: u64,
    granted: BTreeMap<u64, i64>,
}

/// Buckets of a minute, the configuration's default.
impl Default for Leases {
    fn default() -> Self {
        Self::new(60)
    }
}

impl Leases {
    pub fn new(width: u64) -> Self {
        Self {
            width: width.max(1),
            granted: BTreeMap::new(),
        }
    }

    /// The end of the bucket of a token expiring at `expires_at`.
    pub fn bucket(&self, expires_at: u64) -> u64 {
        expires_at.div_ceil(self.width).saturating_mul(self.width)
    }

    /// The lease of `bucket`, if granted. Forgets leases of buckets that have ended.
    pub fn get(&mut self, bucket: u64, now: u64) -> Option<i64> {
        self.granted = self.granted.split_off(&now.saturating_add(1));
        self.granted.get(&bucket).copied()
    }

    /// What to grant for `bucket` at `now`: it outlives every token of the bucket.
    pub fn ttl(bucket: u64, now: u64) -> u64 {
        bucket.saturating_sub(now).saturating_add(1)
    }

    pub fn insert(&mut self, bucket: u64, lease: i64) {
        self.granted.insert(bucket, lease);
    }

    /// A lease etcd no longer knows.
    pub fn forget(&mut self, bucket: u64) {
        self.granted.remove(&bucket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{put_token as store_token, MemoryData};
    use crate::token::Signature;

    const SIG: &str = "5mhBHqs5_DTLdINd9p5m7ZJ6XD0Xc55kIaCRY5r6HRA";
    const HP: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0";

    fn key() -> StoreKey {
        Signature::parse(SIG.as_bytes()).unwrap().store_key()
    }

    fn body(call: &Call) -> serde_json::Value {
        serde_json::from_slice(&call.body).unwrap()
    }

    fn unb64(v: &serde_json::Value) -> String {
        String::from_utf8(STANDARD.decode(v.as_str().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn keys_are_hashes_and_never_signatures() {
        let hex = key().to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(StoreKey::from_hex(&hex), Some(key()));
        assert_eq!(StoreKey::from_hex(&hex.to_uppercase()), Some(key()));
        assert_eq!(StoreKey::from_hex(&hex[1..]), None);
        assert_eq!(StoreKey::from_hex(&format!("+{}", &hex[1..])), None);
        assert_eq!(token_key("p/", &key()), format!("p/t/{hex}"));
        assert_eq!(
            marker_key("p/", &key(), 1_764_000_000_123),
            format!("p/r/1764000000123/{hex}")
        );
        let entry = Entry {
            key: key(),
            expires_at: 1_900_000_000,
            header_payload: HP.as_bytes(),
        };
        assert_eq!(revoked_key("p/", &key()), format!("p/x/{hex}"));
        let put = put_token("p/", &entry, 42);
        assert_eq!(put.path, "/v3/kv/txn");
        let b = body(&put);
        // Only while the token was never revoked.
        let compare = &b["compare"][0];
        assert_eq!(unb64(&compare["key"]), format!("p/x/{hex}"));
        assert_eq!(
            (&compare["target"], &compare["result"], &compare["version"]),
            (&json!("VERSION"), &json!("EQUAL"), &json!("0"))
        );
        let b = &b["success"][0]["request_put"];
        assert_eq!(unb64(&b["key"]), format!("p/t/{hex}"));
        assert_eq!(unb64(&b["value"]), format!("1900000000:{HP}"));
        assert_eq!(b["lease"], "42");
        for call in [put, get_token("p/", &key()), revoke("p/", &key(), 9, 42, 1)] {
            let text = String::from_utf8(call.body.clone()).unwrap();
            assert!(!text.contains(SIG) && !text.contains(&b64(SIG.as_bytes())));
            assert!(!format!("{call:?}").contains("eyJ"));
        }
    }

    #[test]
    fn revocation_deletes_the_token_and_writes_its_marker_in_one_transaction() {
        let b = body(&revoke("p/", &key(), 77, 5, 1_000));
        let ops = b["success"].as_array().unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            unb64(&ops[0]["request_delete_range"]["key"]),
            token_key("p/", &key())
        );
        let put = &ops[1]["request_put"];
        assert_eq!(unb64(&put["key"]), marker_key("p/", &key(), 1_000));
        assert_eq!(unb64(&put["value"]), "77");
        assert_eq!(put["lease"], "5");
        let put = &ops[2]["request_put"];
        assert_eq!(unb64(&put["key"]), revoked_key("p/", &key()));
        assert_eq!(
            (unb64(&put["value"]), &put["lease"]),
            ("77".to_owned(), &json!("5"))
        );
        assert!(b.get("compare").is_none());
    }

    #[test]
    fn a_first_sweep_reads_every_marker_and_later_ones_only_recent_markers() {
        let mut sweeps = Sweeps::new(SWEEP_SLACK_MS, 0);
        let first = body(&sweeps.next_call("p/", 50_000));
        assert_eq!(unb64(&first["key"]), "p/r/0000000000000");
        assert_eq!(unb64(&first["range_end"]), "p/r0");
        assert_eq!(first["keys_only"], true);
        assert!(first.get("sort_target").is_none() && first.get("min_mod_revision").is_none());
        let page = |keys: Vec<StoreKey>, more_after: Option<&str>| Markers {
            keys,
            more_after: more_after.map(str::to_owned),
        };
        // Paged: the next call continues right after the last key, within the same sweep.
        let last = format!("p/r/0000000040000/{}", key().to_hex());
        assert!(sweeps.advance(&page(vec![key()], Some(&last))));
        let next = body(&sweeps.next_call("p/", 50_100));
        assert_eq!(unb64(&next["key"]), format!("{last}\0"));
        assert!(!sweeps.advance(&page(vec![], None)));
        // The next sweep starts where the last one began, less the slack.
        let later = body(&sweeps.next_call("p/", 60_000));
        assert_eq!(
            unb64(&later["key"]),
            format!("p/r/{:013}", 50_000 - SWEEP_SLACK_MS)
        );
        // A failed poll drops the sweep: the next one starts from the same point.
        sweeps.abandon();
        let retry = body(&sweeps.next_call("p/", 70_000));
        assert_eq!(unb64(&retry["key"]), unb64(&later["key"]));
        assert_eq!(sweeps.since_ms(), 50_000);
        // Resumed from a watermark, with the slack of long timeouts.
        assert_eq!(sweep_slack_ms(60_000), SWEEP_SLACK_MS + 120_000);
        let mut resumed = Sweeps::new(sweep_slack_ms(1_000), 500_000);
        let first = body(&resumed.next_call("p/", 600_000));
        assert_eq!(
            unb64(&first["key"]),
            format!("p/r/{:013}", 500_000 - 12_000)
        );
    }

    #[test]
    fn the_watermark_only_moves_forward() {
        let host = MemoryData::default();
        let mark = Watermark::new("st/", "p/");
        assert_eq!(mark.load(&host), 0);
        mark.save(&host, 5_000);
        mark.save(&host, 4_000);
        assert_eq!(mark.load(&host), 5_000);
        mark.save(&host, 6_000);
        assert_eq!(mark.load(&host), 6_000);
        assert_eq!(
            Watermark::new("st/", "q/").load(&host),
            0,
            "one per key prefix"
        );
        host.raw_set("st/etcd-swept/p/", b"junk");
        assert_eq!(mark.load(&host), 0);
    }

    fn kv(key: &str, value: Option<&str>, rev: u64) -> serde_json::Value {
        let mut kv = json!({"key": b64(key.as_bytes()), "mod_revision": rev.to_string()});
        if let Some(v) = value {
            kv["value"] = b64(v.as_bytes()).into();
        }
        kv
    }

    #[test]
    fn reads_a_token_or_its_absence() {
        let found = json!({"header": {"revision": "3"}, "kvs": [kv("p/t/x", Some(&format!("99:{HP}")), 2)], "count": "1"});
        let got = parse_get(Some(b"200"), found.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!((got.expires_at, got.header_payload.as_str()), (99, HP));
        assert!(!format!("{got:?}").contains("eyJ"));
        let absent = json!({"header": {"revision": "3"}});
        assert_eq!(
            parse_get(Some(b"200"), absent.to_string().as_bytes()),
            Ok(None)
        );
        for value in [
            "+99:a.b",
            "99",
            "x:a.b",
            &format!("99:{HP}.sig"),
            "99:a..b",
            "99:a b.c",
            "99:",
        ] {
            let body = json!({"header": {}, "kvs": [kv("p/t/x", Some(value), 2)]});
            assert!(
                matches!(
                    parse_get(Some(b"200"), body.to_string().as_bytes()),
                    Err(EtcdError::BadAnswer { .. })
                ),
                "{value}"
            );
        }
        let body = json!({"header": {}, "kvs": [kv("p/t/x", None, 2)]});
        assert!(parse_get(Some(b"200"), body.to_string().as_bytes()).is_err());
        // Found by fuzz target etcd: a payload segment longer than any signature (many claims)
        // was refused, so a large token issued on one replica failed on the others.
        let long = format!("99:eyJh.{}", "A".repeat(12_000));
        let body = json!({"header": {}, "kvs": [kv("p/t/x", Some(&long), 2)]});
        let got = parse_get(Some(b"200"), body.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(got.header_payload.len(), 12_005);
    }

    #[test]
    fn failures_name_the_call_and_what_etcd_said() {
        assert_eq!(
            parse_get(None, b""),
            Err(EtcdError::NoAnswer { call: "range" })
        );
        let lease_gone = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        let e = parse_write("put", Some(b"404"), lease_gone).unwrap_err();
        assert!(e.lease_not_found(), "{e:?}");
        assert_eq!(
            e.to_string(),
            "etcd put: status 404: etcdserver: requested lease not found"
        );
        let e = parse_write("put", Some(b"503"), b"<html>").unwrap_err();
        assert!(!e.lease_not_found());
        assert!(matches!(
            e,
            EtcdError::Refused {
                status: 503,
                code: None,
                ..
            }
        ));
        assert!(matches!(
            parse_write("put", Some(b"200"), b"{}"),
            Err(EtcdError::BadAnswer { .. })
        ));
        assert!(matches!(
            parse_write("put", Some(b"200"), b"not json"),
            Err(EtcdError::BadAnswer { .. })
        ));
        // What etcd 3.4 answers when a token write's compare fails (its token was revoked):
        // no `succeeded` at all.
        assert!(matches!(
            parse_write("put", Some(b"200"), br#"{"header":{"revision":"2"}}"#),
            Err(EtcdError::BadAnswer { .. })
        ));
        assert!(parse_write("txn", Some(b"200"), br#"{"header":{},"succeeded":false}"#).is_err());
        assert_eq!(
            parse_write("txn", Some(b"200"), br#"{"header":{},"succeeded":true}"#),
            Ok(())
        );
        assert_eq!(
            parse_grant(Some(b"200"), br#"{"header":{},"ID":"7587","TTL":"60"}"#),
            Ok(7587)
        );
        assert!(parse_grant(Some(b"200"), br#"{"header":{},"ID":"-1"}"#).is_err());
        assert!(parse_grant(Some(b"200"), br#"{"header":{}}"#).is_err());
    }

    #[test]
    fn polls_read_marker_keys_and_skip_foreign_keys() {
        let hex = key().to_hex();
        let page = json!({"header": {"revision": "40"}, "more": true, "kvs": [
            kv(&format!("p/r/0000000001000/{hex}"), None, 12),
            kv("p/r/0000000001000/not-a-hash", None, 13),
            kv(&format!("p/r/1000/{hex}"), None, 14),
            kv(&format!("p/r/{hex}"), None, 15),
        ]});
        let m = parse_poll("p/", Some(b"200"), page.to_string().as_bytes()).unwrap();
        assert_eq!(m.keys, vec![key()]);
        assert_eq!(m.more_after.as_deref(), Some(&*format!("p/r/{hex}")));
        let last = json!({"header": {"revision": "40"}, "kvs": [kv(&format!("p/r/0000000001000/{hex}"), None, 30)]});
        let m = parse_poll("p/", Some(b"200"), last.to_string().as_bytes()).unwrap();
        assert_eq!((m.keys.len(), m.more_after), (1, None));
        let none = json!({"header": {"revision": "40"}});
        let m = parse_poll("p/", Some(b"200"), none.to_string().as_bytes()).unwrap();
        assert!(m.keys.is_empty());
        assert!(parse_poll("p/", Some(b"200"), b"{}").is_err());
        assert!(parse_poll("p/", None, b"").is_err());
    }

    fn config(etcd: bool) -> Config {
        let etcd = if etcd {
            r#", "etcd": {"cluster": "etcd"}"#
        } else {
            ""
        };
        Config::from_json(
            format!(r#"{{"token_paths": ["/t"], "store_slots": 8{etcd}}}"#).as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn only_unknown_signature_shapes_are_looked_for_in_etcd() {
        let unknown = Verdict::Reject(Rejection::Unknown);
        let bearer = format!("Bearer {SIG}");
        let dpop = format!("DPoP {SIG}");
        assert_eq!(
            miss_key(&config(true), &unknown, Some(bearer.as_bytes())),
            Some(key())
        );
        assert_eq!(
            miss_key(&config(true), &unknown, Some(dpop.as_bytes())),
            Some(key())
        );
        assert_eq!(
            miss_key(&config(false), &unknown, Some(bearer.as_bytes())),
            None
        );
        let expired = Verdict::Reject(Rejection::Expired);
        assert_eq!(
            miss_key(&config(true), &expired, Some(bearer.as_bytes())),
            None
        );
        // A UUID has no signature's length.
        let uuid = b"Bearer 0b5c1e8e-2f5e-4c1a-9d8e-3b1f2a4c5d6e";
        assert_eq!(miss_key(&config(true), &unknown, Some(uuid)), None);
        assert_eq!(miss_key(&config(true), &unknown, None), None);
    }

    #[test]
    fn a_read_that_raced_its_revocation_is_not_stored() {
        let c = config(true);
        let host = MemoryData::default();
        let store = Store::new(&host, &c.store_prefix, c.store_slots, c.slot_capacity);
        store.initialize().unwrap();
        let fetched = Fetched {
            expires_at: 100,
            header_payload: HP.to_owned(),
        };
        let recent = RecentRevocations::new(&host, "st/etcd-recent/");
        recent.initialize().unwrap();
        assert_eq!(
            adopt(&store, key(), &fetched, &recent, 100),
            Ok(None),
            "expired"
        );
        assert_eq!(apply_markers(&store, &[key()], &recent, 10), Ok(0));
        // Another worker of the process reads the token from etcd: it sees the same record.
        let other_worker = RecentRevocations::new(&host, "st/etcd-recent/");
        assert_eq!(
            adopt(&store, key(), &fetched, &other_worker, 10),
            Ok(None),
            "revoked"
        );
        let slot = store.fetch_slot(&key()).unwrap();
        assert!(
            matches!(
                crate::store::find(&slot, &key(), 10),
                Ok(crate::store::Lookup::Miss)
            ),
            "written, then taken out again"
        );
        // Another process (its own shared data) keeps it.
        let other_host = MemoryData::default();
        let fresh = RecentRevocations::new(&other_host, "st/etcd-recent/");
        fresh.initialize().unwrap();
        let report = adopt(&store, key(), &fetched, &fresh, 10).unwrap();
        assert_eq!(report.map(|r| r.evicted), Some(0));
        let slot = store.fetch_slot(&key()).unwrap();
        assert!(matches!(
            crate::store::find(&slot, &key(), 10),
            Ok(crate::store::Lookup::Hit {
                expires_at: 100,
                ..
            })
        ));
    }

    /// A store with an epoch and two tokens, sig-a and sig-b: their keys.
    fn two_tokens(store: &Store<'_, MemoryData>) -> (StoreKey, StoreKey) {
        store.initialize().unwrap();
        store.bump_epoch().unwrap();
        store_token(store, "sig-a", HP.as_bytes(), 100);
        store_token(store, "sig-b", HP.as_bytes(), 100);
        let key = |s: &[u8]| Signature::parse(s).unwrap().store_key();
        (key(b"sig-a"), key(b"sig-b"))
    }

    #[test]
    fn markers_remove_tokens_and_move_the_epoch_once() {
        let c = config(true);
        let host = MemoryData::default();
        let store = Store::new(&host, &c.store_prefix, c.store_slots, c.slot_capacity);
        let (a, b) = two_tokens(&store);
        let absent = StoreKey([7; 32]);
        let recent = RecentRevocations::new(&host, "st/etcd-recent/");
        recent.initialize().unwrap();
        let before = store.epoch().unwrap();
        assert_eq!(apply_markers(&store, &[a, absent, b], &recent, 10), Ok(2));
        assert_eq!(store.epoch().unwrap(), before + 1);
        assert_eq!(apply_markers(&store, &[a], &recent, 10), Ok(0));
        assert_eq!(
            store.epoch().unwrap(),
            before + 1,
            "nothing removed, nothing to tell caches"
        );
        assert!(recent.contains(&a, 10).unwrap() && recent.contains(&absent, 10).unwrap());
    }

    #[test]
    fn a_sweep_that_fails_midway_still_tells_caches_about_what_it_removed() {
        let host = MemoryData::default();
        let store = Store::new(&host, "st/", 1024, 8);
        let (a, b) = two_tokens(&store);
        let recent = RecentRevocations::new(&host, "st/etcd-recent/");
        recent.initialize().unwrap();
        let slot_b = store.slot_key(&b);
        assert_ne!(store.slot_key(&a), slot_b);
        {
            // a's removal goes through; every write of b's slot loses its race (the first three
            // writes: a remembered, a removed, b remembered).
            let mut hooks = host.before_set.borrow_mut();
            for _ in 0..crate::store::MAX_WRITE_ATTEMPTS + 3 {
                let k = slot_b.clone();
                hooks.push(Box::new(move |h: &MemoryData| {
                    let (v, _) = h.get(&k).unwrap();
                    h.raw_set(&k, &v);
                }));
            }
            hooks.push(Box::new(|_: &MemoryData| {}));
        }
        let before = store.epoch().unwrap();
        assert!(apply_markers(&store, &[a, b], &recent, 10).is_err());
        assert_eq!(
            store.epoch().unwrap(),
            before + 1,
            "a left the store: caches must hear"
        );
        assert!(
            recent.contains(&b, 10).unwrap(),
            "remembered before its removal"
        );
        assert_eq!(
            apply_markers(&store, &[a, b], &recent, 11),
            Ok(1),
            "b is removed by the next sweep, though remembered"
        );
    }

    #[test]
    fn recent_revocations_are_bounded_in_time_and_size() {
        let host = MemoryData::default();
        let recent = RecentRevocations::new(&host, "st/etcd-recent/");
        assert_eq!(
            recent.initialize(),
            Ok(RecentRevocations::<MemoryData>::SLOTS)
        );
        recent.insert(StoreKey([1; 32]), 0).unwrap();
        recent.insert(StoreKey([2; 32]), 5).unwrap();
        assert!(recent
            .contains(&StoreKey([1; 32]), RECENT_SECONDS - 1)
            .unwrap());
        assert!(!recent.contains(&StoreKey([1; 32]), RECENT_SECONDS).unwrap());
        assert!(recent.contains(&StoreKey([2; 32]), RECENT_SECONDS).unwrap());
        let later = RECENT_SECONDS * 10;
        for i in 0..RECENT_CAPACITY + 10 {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            k[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            recent.insert(StoreKey(k), later).unwrap();
        }
        let held: usize = (0..RecentRevocations::<MemoryData>::SLOTS)
            .map(|slot| {
                let (value, _) = host.get(&format!("st/etcd-recent/{slot:x}")).unwrap();
                crate::store::entries(&value).count()
            })
            .sum();
        assert!(held <= RECENT_CAPACITY, "{held} entries");
        assert!(held > RECENT_CAPACITY / 2, "{held} entries");
    }

    #[test]
    fn one_worker_of_a_process_holds_the_poller_lease_until_it_lapses() {
        let host = MemoryData::default();
        let (a, b) = (
            worker_number(&host, "st/etcd-workers", 77).unwrap(),
            worker_number(&host, "st/etcd-workers", 77).unwrap(),
        );
        assert_eq!((a, b), (77, 78));
        let lease = PollerLease::new("st/etcd-poller/p/");
        assert!(lease.acquire(&host, a, 1_000, 2_500));
        assert!(!lease.acquire(&host, b, 1_100, 2_600), "a holds it");
        assert!(lease.acquire(&host, a, 1_500, 3_000), "renewed");
        assert!(!lease.acquire(&host, b, 2_900, 4_400));
        assert!(
            lease.acquire(&host, b, 3_000, 4_500),
            "a stopped renewing: b takes over"
        );
        assert!(!lease.acquire(&host, a, 3_100, 4_600));
        // A lease on another key prefix is another poller's.
        assert!(PollerLease::new("st/etcd-poller/q/").acquire(&host, a, 3_100, 4_600));
    }

    #[test]
    fn leases_cover_their_bucket_and_are_forgotten_after_it() {
        let mut leases = Leases::new(60);
        assert_eq!(leases.bucket(1), 60);
        assert_eq!(leases.bucket(60), 60);
        assert_eq!(leases.bucket(61), 120);
        assert_eq!(Leases::ttl(120, 30), 91);
        assert_eq!(Leases::ttl(120, 500), 1);
        leases.insert(120, 9);
        assert_eq!(leases.get(120, 100), Some(9));
        assert_eq!(leases.get(120, 120), None, "the bucket has ended");
        leases.insert(180, 10);
        leases.forget(180);
        assert_eq!(leases.get(180, 100), None);
    }
}
