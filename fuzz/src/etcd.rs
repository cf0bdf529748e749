//! `etcd`: calls to etcd's JSON gateway and its answers, revocation markers and leases.

use crate::support::{b64, form_body, form_params, signature_bytes, string, value, MemoryData};
use arbitrary::{Result, Unstructured};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use split_token_core::config::Config;
use split_token_core::lifecycle::revoke::{could_be_signature, parse_form, remote_candidate};
use split_token_core::replicas::etcd::{
    adopt, apply_markers, get_token, grant, marker_key, miss_key, parse_get, parse_grant,
    parse_poll, parse_write, poll, put_token, revoke, sweep_slack_ms, token_key, Call, EtcdError,
    Fetched, Leases, Markers, RecentRevocations, Sweeps, Watermark, POLL_LIMIT, RECENT_CAPACITY,
    RECENT_SECONDS, SWEEP_SLACK_MS,
};
use split_token_core::request::{Rejection, Verdict};
use split_token_core::store::{find, Entry, Lookup, SharedData, Store};
use split_token_core::token::{Signature, StoreKey};
use std::collections::{BTreeMap, BTreeSet, HashMap};

const NOW: u64 = 1_700_000_000;
/// The configuration's default key prefix.
const PREFIX: &str = "split-token/";
/// Unix milliseconds of the largest time a marker key holds in 13 digits.
const MAX_WRITTEN_MS: u64 = 9_999_999_999_999;
/// The error statuses the raw mode answers with besides 200; `None` is no answer at all.
const ERROR_STATUSES: [Option<&[u8]>; 4] = [Some(b"404"), Some(b"503"), Some(b"+20x"), None];
/// Decoded lengths of the signatures `could_be_signature` accepts.
const SIGNATURE_LENGTHS: [usize; 9] = [32, 48, 64, 96, 114, 132, 256, 384, 512];
/// Key prefixes the structured mode picks from besides arbitrary ones.
const PREFIXES: [&str; 7] = [PREFIX, "p/", "", "r/", "t/", "é/", "split-token/r/"];

/// Raw bytes: an answer to every call, with status 200 and error statuses; a revocation body
/// for `remote_candidate`; an `Authorization` value for `miss_key`. First byte `0`: calls built
/// from arbitrary keys and tokens read back from the answers etcd would send, revocation sweeps
/// against a simulated etcd, `RecentRevocations` and `Leases` against models, and revocation
/// bodies naming arbitrary tokens.
pub fn etcd(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            let mut u = Unstructured::new(rest);
            let _ = match u.int_in_range(0..=4).unwrap_or(0) {
                0 => structured_calls(&mut u),
                1 => structured_sweeps(&mut u),
                2 => structured_recent(&mut u),
                3 => structured_leases(&mut u),
                _ => structured_candidate(&mut u),
            };
        }
        _ => {
            check_answers(data);
            check_candidate(data);
            check_miss(data);
            check_hex(&String::from_utf8_lossy(data));
        }
    }
}

/// etcd's error body, as the core reads it: the same members in the same order (serde also
/// takes a struct as an array), `code` of any type.
#[derive(Deserialize)]
struct Said {
    #[serde(default)]
    #[allow(dead_code)]
    code: Option<IgnoredAny>,
    #[serde(default)]
    message: Option<String>,
}

/// A range answer, as the core reads it: it accepts what the core accepts, so its reading of
/// an answer the core took is what etcd said.
#[derive(Deserialize)]
struct Range {
    #[serde(default)]
    #[allow(dead_code)]
    header: Option<IgnoredAny>,
    #[serde(default)]
    kvs: Vec<Kv>,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct Kv {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

/// Every parser never panics, takes only a 200 answer, and fails with an error that shows
/// nothing of the body but etcd's own message.
fn check_answers(body: &[u8]) {
    let ok: Option<&[u8]> = Some(b"200");
    match parse_grant(ok, body) {
        Ok(id) => assert!(id > 0, "lease ID {id}"),
        Err(e) => check_error("lease grant", ok, body, &e),
    }
    if let Err(e) = parse_write("txn", ok, body) {
        check_error("txn", ok, body, &e);
    }
    match parse_get(ok, body) {
        Ok(Some(fetched)) => check_fetched(body, &fetched),
        Ok(None) => {}
        Err(e) => check_error("range", ok, body, &e),
    }
    match parse_poll(PREFIX, ok, body) {
        Ok(markers) => check_markers(PREFIX, body, &markers),
        Err(e) => check_error("poll", ok, body, &e),
    }
    // One parser per error status: they share the error path.
    for (i, status) in ERROR_STATUSES.into_iter().enumerate() {
        let (call, result) = match i {
            0 => ("lease grant", parse_grant(status, body).map(drop)),
            1 => ("put", parse_write("put", status, body)),
            2 => ("range", parse_get(status, body).map(drop)),
            _ => ("poll", parse_poll(PREFIX, status, body).map(drop)),
        };
        let error = result.expect_err("an error status was taken as an answer");
        check_error(call, status, body, &error);
    }
}

/// The error names the call and the status; its text is built from them, a fixed reason, and
/// at most 200 characters of etcd's `message`, never any other part of the body.
fn check_error(call: &str, status: Option<&[u8]>, body: &[u8], error: &EtcdError) {
    let text = error.to_string();
    match error {
        EtcdError::NoAnswer { call: named } => {
            assert_eq!(*named, call);
            assert!(status.is_none(), "no answer, yet a status");
            assert_eq!(text, format!("etcd {call}: no answer (down or timed out)"));
        }
        EtcdError::NotDispatched { .. } => panic!("a parser reported {error:?}"),
        EtcdError::Refused {
            call: named,
            status: number,
            code,
            message,
        } => {
            assert_eq!(*named, call);
            let status = status.expect("refused without an answer");
            assert_ne!(status, b"200", "a 200 answer refused");
            let want = std::str::from_utf8(status)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
                .unwrap_or(0);
            assert_eq!(*number, want, "the status is not the answer's");
            assert_eq!(text, format!("etcd {call}: status {number}: {message}"));
            let len = message.chars().count();
            assert!(len <= 200, "a message of {len} characters");
            if !message.is_empty() || code.is_some() {
                let said: Said =
                    serde_json::from_slice(body).expect("an error body read that is not etcd's");
                let said = said.message.unwrap_or_default();
                assert!(
                    said.starts_with(message.as_str()),
                    "the message is not etcd's"
                );
                assert_eq!(
                    len,
                    said.chars().count().min(200),
                    "the message was cut short"
                );
            }
            if error.lease_not_found() {
                assert!(*code == Some(5) && message.contains("lease not found"));
            }
        }
        EtcdError::BadAnswer {
            call: named,
            reason,
        } => {
            assert_eq!(*named, call);
            assert_eq!(status, Some(&b"200"[..]), "a bad answer without a 200");
            assert_eq!(text, format!("etcd {call}: {reason}"));
        }
    }
}

/// Exactly two non-empty base64url segments, at most 65535 bytes (what the store takes).
fn is_header_payload(text: &str) -> bool {
    let segments: Vec<&str> = text.split('.').collect();
    segments.len() == 2
        && segments.iter().all(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && text.len() <= usize::from(u16::MAX)
}

/// A token read from an answer is a `header.payload`, is what the first value holds, and its
/// `Debug` never shows it.
fn check_fetched(body: &[u8], fetched: &Fetched) {
    let hp = fetched.header_payload.as_str();
    assert!(
        is_header_payload(hp),
        "read a token that is not a header.payload"
    );
    let debug = format!("{fetched:?}");
    assert!(!debug.contains(hp), "Debug shows header.payload");
    assert_eq!(
        debug,
        format!("Fetched {{ expires_at: {}, .. }}", fetched.expires_at)
    );
    let range: Range = serde_json::from_slice(body).expect("read what is not a range answer");
    let value = range
        .kvs
        .first()
        .and_then(|kv| kv.value.as_deref())
        .and_then(|v| STANDARD.decode(v).ok())
        .and_then(|v| String::from_utf8(v).ok())
        .expect("read a token without a value");
    let (expires_at, stored) = value.split_once(':').expect("a value without ':'");
    assert_eq!(stored, hp, "the token is not the value's");
    assert_eq!(expires_at.parse::<u64>(), Ok(fetched.expires_at));
}

/// 64 hex digits of either case, decoded without the core.
fn hex32(text: &str) -> Option<[u8; 32]> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// `from_hex` reads exactly 64 hex digits; `to_hex` is lowercase and reads back.
fn check_hex(text: &str) {
    let key = StoreKey::from_hex(text);
    assert_eq!(key.map(|k| k.0), hex32(text), "from_hex disagrees");
    if let Some(key) = key {
        assert_eq!(key.to_hex(), text.to_ascii_lowercase());
    }
}

/// The marker a key names: `<prefix>r/<13 digits>/<64 hex digits>`.
fn model_marker(prefix: &str, name: &str) -> Option<[u8; 32]> {
    let (written, hex) = name.strip_prefix(&format!("{prefix}r/"))?.split_once('/')?;
    if written.len() != 13 || !written.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    hex32(hex)
}

/// The markers of a poll answer are exactly its keys `<prefix>r/<13 digits>/<hash>`, in order,
/// each named by its key's hex; with more to come, the sweep continues after the page's last key.
fn check_markers(prefix: &str, body: &[u8], markers: &Markers) {
    let range: Range = serde_json::from_slice(body).expect("polled what is not a range answer");
    let names: Vec<String> = range
        .kvs
        .iter()
        .map(|kv| {
            kv.key
                .as_deref()
                .and_then(|k| STANDARD.decode(k).ok())
                .and_then(|k| String::from_utf8(k).ok())
                .expect("polled a key that is not base64 of text")
        })
        .collect();
    let want: Vec<[u8; 32]> = names
        .iter()
        .filter_map(|n| model_marker(prefix, n))
        .collect();
    assert_eq!(
        markers.keys.iter().map(|k| k.0).collect::<Vec<_>>(),
        want,
        "not the answer's markers"
    );
    let marker_prefix = format!("{prefix}r/");
    for key in &markers.keys {
        let hex = key.to_hex();
        assert!(names.iter().any(|n| n.starts_with(&marker_prefix)
            && n.len() >= 64
            && n.is_char_boundary(n.len() - 64)
            && n[n.len() - 64..].eq_ignore_ascii_case(&hex)));
        check_hex(&hex);
    }
    let more_after = names.last().filter(|_| range.more);
    assert_eq!(
        markers.more_after.as_ref(),
        more_after,
        "not continued after the page's last key"
    );
}

/// The signature `remote_candidate` would look for: the whole token, or the last segment of
/// three; `None` for a refresh token or anything without a signature's shape.
fn model_candidate(body: &[u8]) -> Option<[u8; 32]> {
    let pairs = parse_form(body).ok()?;
    let values = |name: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    if values("token_type_hint") == ["refresh_token"] {
        return None;
    }
    let [token] = values("token")[..] else {
        return None;
    };
    let segments: Vec<&str> = token.split('.').collect();
    let signature = match segments[..] {
        [whole] => whole,
        [_, _, last] => last,
        _ => return None,
    };
    could_be_signature(signature).then(|| Sha256::digest(signature.as_bytes()).into())
}

/// A candidate comes from the one `token` of a form: SHA-256 of its signature text.
fn check_candidate(body: &[u8]) {
    let got = remote_candidate(body);
    if let Some(key) = got {
        let pairs = parse_form(body).expect("a candidate from what is not a form");
        let tokens: Vec<&str> = pairs
            .iter()
            .filter(|(n, _)| n == "token")
            .map(|(_, v)| v.as_str())
            .collect();
        let [token] = tokens[..] else {
            panic!("a candidate from {} tokens", tokens.len());
        };
        let signature = match token.split('.').collect::<Vec<_>>()[..] {
            [whole] => whole,
            [_, _, last] => last,
            _ => panic!("a candidate from a token that is no signature nor JWT"),
        };
        let sha: [u8; 32] = Sha256::digest(signature.as_bytes()).into();
        assert_eq!(key.0, sha, "the candidate is not SHA-256 of the signature");
    }
    assert_eq!(got.map(|k| k.0), model_candidate(body), "candidate");
}

thread_local! {
    /// With etcd, and without.
    static CONFIGS: (Config, Config) = (config(true), config(false));
}

fn config(etcd: bool) -> Config {
    let etcd = if etcd {
        r#", "etcd": {"cluster": "etcd"}"#
    } else {
        ""
    };
    Config::from_json(format!(r#"{{"token_paths": ["/t"], "store_slots": 8{etcd}}}"#).as_bytes())
        .expect("the configuration was refused")
}

/// Looked for in etcd: exactly a Bearer or DPoP (or bare) token with a signature's shape, after
/// an unknown-token refusal, when etcd is configured; its key is SHA-256 of the token text.
fn check_miss(authorization: &[u8]) {
    let value = authorization.trim_ascii();
    let token = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(space) => {
            let (scheme, rest) = value.split_at(space);
            (scheme.eq_ignore_ascii_case(b"bearer") || scheme.eq_ignore_ascii_case(b"dpop"))
                .then(|| rest.trim_ascii())
        }
        None => Some(value),
    };
    let want = token
        .filter(|_| !value.contains(&b','))
        .and_then(|t| std::str::from_utf8(t).ok())
        .filter(|t| could_be_signature(t))
        .map(|t| <[u8; 32]>::from(Sha256::digest(t.as_bytes())));
    CONFIGS.with(|(with, without)| {
        let unknown = Verdict::Reject(Rejection::Unknown);
        let got = miss_key(with, &unknown, Some(authorization));
        assert_eq!(got.map(|k| k.0), want, "miss_key");
        assert_eq!(miss_key(without, &unknown, Some(authorization)), None);
        let expired = Verdict::Reject(Rejection::Expired);
        assert_eq!(miss_key(with, &expired, Some(authorization)), None);
    });
}

fn prefix(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(2, 3)? {
        Ok((*u.choose(&PREFIXES)?).to_owned())
    } else {
        string(u)
    }
}

/// A base64url segment: of arbitrary bytes or JSON, of a repeated character (up to 40000), or
/// a usual JWT header.
fn segment(u: &mut Unstructured<'_>) -> Result<String> {
    let text = match u.int_in_range(0..=3)? {
        0 => b64(&u.arbitrary::<Vec<u8>>()?),
        1 => {
            let c = *u.choose(&["A", "z", "0", "-", "_"])?;
            c.repeat(u.int_in_range(1..=40_000)?)
        }
        2 => b64(value(u, 2)?.to_string().as_bytes()),
        _ => b64(br#"{"alg":"ES256","typ":"at+jwt"}"#),
    };
    Ok(if text.is_empty() {
        "e30".to_owned()
    } else {
        text
    })
}

/// A `header.payload` the store takes: at most 65535 bytes.
fn header_payload(u: &mut Unstructured<'_>) -> Result<String> {
    let header = segment(u)?;
    let mut payload = segment(u)?;
    payload.truncate(usize::from(u16::MAX) - header.len() - 1);
    Ok(format!("{header}.{payload}"))
}

/// A signature of at least 16 bytes: text no call could hold by chance.
fn long_signature(u: &mut Unstructured<'_>) -> Result<String> {
    let mut bytes = signature_bytes(u.arbitrary()?);
    while bytes.len() < 16 {
        bytes.push(0xa5);
    }
    Ok(b64(&bytes))
}

fn body(call: &Call) -> Value {
    serde_json::from_slice(&call.body).expect("a call's body is not JSON")
}

fn unb64(v: &Value) -> String {
    let text = v.as_str().expect("not a string");
    String::from_utf8(STANDARD.decode(text).expect("not base64")).expect("not text")
}

/// The five calls for `key`.
fn calls(
    prefix: &str,
    key: StoreKey,
    entry: &Entry<'_>,
    lease: i64,
    now_ms: u64,
    ttl: u64,
) -> [Call; 5] {
    [
        put_token(prefix, &Entry { key, ..*entry }, lease),
        get_token(prefix, &key),
        revoke(prefix, &key, entry.expires_at, lease, now_ms),
        poll(prefix, &format!("{prefix}r/{now_ms:013}")),
        grant(ttl),
    ]
}

/// Each call says what it should; a token written reads back from the answer etcd sends; no
/// call holds the signature; a token read is stored, and a marker forgets it for good.
fn structured_calls(u: &mut Unstructured<'_>) -> Result<()> {
    let prefix = prefix(u)?;
    let signature = long_signature(u)?;
    let key = Signature::parse(signature.as_bytes())
        .expect("not a signature")
        .store_key();
    let hp = header_payload(u)?;
    let expires_at: u64 = if u.ratio(3, 4)? {
        NOW + u.int_in_range(0..=7_200)?
    } else {
        u.arbitrary()?
    };
    let lease: i64 = u.arbitrary()?;
    let now_ms: u64 = if u.ratio(3, 4)? {
        NOW * 1_000 + u.int_in_range(0..=999)?
    } else {
        u.int_in_range(0..=MAX_WRITTEN_MS)?
    };
    let ttl: u64 = u.arbitrary()?;
    let entry = Entry {
        key,
        expires_at,
        header_payload: hp.as_bytes(),
    };
    let hex = key.to_hex();
    check_hex(&hex);
    check_hex(&hex.to_uppercase());
    assert_eq!(token_key(&prefix, &key), format!("{prefix}t/{hex}"));
    let marker = format!("{prefix}r/{now_ms:013}/{hex}");
    assert_eq!(marker_key(&prefix, &key, now_ms), marker);

    let built = calls(&prefix, key, &entry, lease, now_ms, ttl);
    let [put, get, txn, polled, granted] = &built;
    let expected = [
        ("put", "/v3/kv/txn"),
        ("range", "/v3/kv/range"),
        ("txn", "/v3/kv/txn"),
        ("poll", "/v3/kv/range"),
        ("lease grant", "/v3/lease/grant"),
    ];
    for (call, (name, path)) in built.iter().zip(expected) {
        assert_eq!((call.name, call.path), (name, path));
        assert_eq!(
            format!("{call:?}"),
            format!("Call({path}, <{} bytes>)", call.body.len()),
            "Debug shows the body"
        );
    }

    let b = body(put);
    assert_eq!(
        unb64(&b["compare"][0]["key"]),
        format!("{prefix}x/{hex}"),
        "a token write checks it was not revoked"
    );
    assert_eq!(b["compare"][0]["version"], "0");
    let b = &b["success"][0]["request_put"];
    assert_eq!(unb64(&b["key"]), format!("{prefix}t/{hex}"));
    assert_eq!(unb64(&b["value"]), format!("{expires_at}:{hp}"));
    assert_eq!(b["lease"], lease.to_string());
    assert_eq!(unb64(&body(get)["key"]), format!("{prefix}t/{hex}"));
    let t = body(txn);
    let ops = t["success"]
        .as_array()
        .expect("a transaction without success");
    assert_eq!(ops.len(), 3);
    assert_eq!(
        unb64(&ops[0]["request_delete_range"]["key"]),
        format!("{prefix}t/{hex}")
    );
    assert_eq!(
        unb64(&ops[2]["request_put"]["key"]),
        format!("{prefix}x/{hex}")
    );
    assert_eq!(ops[2]["request_put"]["lease"], lease.to_string());
    assert_eq!(unb64(&ops[1]["request_put"]["key"]), marker);
    assert_eq!(
        unb64(&ops[1]["request_put"]["value"]),
        expires_at.to_string()
    );
    assert_eq!(ops[1]["request_put"]["lease"], lease.to_string());
    let p = body(polled);
    assert_eq!(unb64(&p["key"]), format!("{prefix}r/{now_ms:013}"));
    assert_eq!(unb64(&p["range_end"]), format!("{prefix}r0"));
    assert_eq!(p["keys_only"], true);
    assert_eq!(p["limit"], POLL_LIMIT.to_string());
    // The marker written is read back by a poll that lists it.
    let listing = json!({
        "header": {"revision": "9"},
        "kvs": [{"key": ops[1]["request_put"]["key"], "mod_revision": "9"}],
    })
    .to_string();
    let polled = parse_poll(&prefix, Some(b"200"), listing.as_bytes());
    assert_eq!(
        polled,
        Ok(Markers {
            keys: vec![key],
            more_after: None
        }),
        "a marker written is not read back"
    );
    assert_eq!(body(granted)["TTL"], ttl.to_string());

    // The signature reaches no call, but where the prefix or header.payload already held it:
    // then the same call for another key holds it too.
    let other = calls(&prefix, StoreKey([0x42; 32]), &entry, lease, now_ms, ttl);
    let encoded = STANDARD.encode(signature.as_bytes());
    for (call, innocent) in built.iter().zip(&other) {
        let text = String::from_utf8(call.body.clone()).expect("a call's body is not UTF-8");
        let innocent = String::from_utf8(innocent.body.clone()).expect("not UTF-8");
        for needle in [&signature, &encoded] {
            assert!(
                !text.contains(needle.as_str()) || innocent.contains(needle.as_str()),
                "the {} call holds the signature",
                call.name
            );
        }
    }

    // The answer etcd sends to a read of that token.
    let mod_revision = u.int_in_range(1..=i64::MAX as u64)?;
    let answer = json!({
        "header": {"cluster_id": "1", "member_id": "2", "revision": mod_revision.to_string(), "raft_term": "3"},
        "kvs": [{
            "key": b["key"],
            "create_revision": mod_revision.to_string(),
            "mod_revision": mod_revision.to_string(),
            "version": "1",
            "value": b["value"],
            "lease": lease.to_string(),
        }],
        "count": "1",
    })
    .to_string();
    let read = parse_get(Some(b"200"), answer.as_bytes());
    let want = Fetched {
        expires_at,
        header_payload: hp.clone(),
    };
    assert!(
        read.as_ref() == Ok(&Some(want.clone())),
        "a token written ({} bytes of header.payload, segments of {:?} characters) reads back as {read:?}",
        hp.len(),
        hp.split('.').map(str::len).collect::<Vec<_>>()
    );
    check_fetched(answer.as_bytes(), &want);

    // Stored here unless expired; a marker removes it and keeps a racing read out.
    let host = MemoryData::default();
    let store = Store::new(&host, "et/", 4, 4);
    store.initialize().expect("the in-memory store failed");
    let now = match u.int_in_range(0..=3)? {
        0 => expires_at,
        1 => expires_at.saturating_sub(1),
        _ => NOW,
    };
    let recent = RecentRevocations::new(&host, "et/etcd-recent/");
    recent.initialize().expect("the in-memory store failed");
    let adopted = adopt(&store, key, &want, &recent, now)
        .expect("the in-memory store failed")
        .is_some();
    assert_eq!(adopted, expires_at > now, "adopted {adopted} at {now}");
    let stored = |now| {
        let slot = store.fetch_slot(&key).expect("the in-memory store failed");
        match find(&slot, &key, now).expect("a corrupt slot") {
            Lookup::Hit {
                header_payload,
                expires_at: e,
            } => {
                assert_eq!((header_payload, e), (hp.as_bytes(), expires_at));
                true
            }
            Lookup::Miss => false,
            Lookup::Expired => panic!("an expired token was stored"),
        }
    };
    assert_eq!(stored(now), adopted);
    let epoch = store.epoch().expect("the in-memory store failed");
    let removed = apply_markers(&store, &[key], &recent, now).expect("the store failed");
    assert_eq!(removed, u32::from(adopted));
    let moved = if adopted { 1 } else { 0 };
    assert_eq!(
        store.epoch().expect("the in-memory store failed"),
        epoch.wrapping_add(moved)
    );
    assert_eq!(recent.contains(&key, now), Ok(true));
    assert!(!stored(now), "a revoked token is still stored");
    assert_eq!(adopt(&store, key, &want, &recent, now), Ok(None));
    assert!(!stored(now), "a read that raced its revocation was stored");
    // Sweeps overlap: the marker read again changes nothing.
    let epoch = store.epoch().expect("the in-memory store failed");
    assert_eq!(apply_markers(&store, &[key], &recent, now), Ok(0));
    assert_eq!(store.epoch(), Ok(epoch));
    Ok(())
}

/// A key under `<prefix>r/` (or near it) that is no marker, or by chance is one.
fn foreign(u: &mut Unstructured<'_>, prefix: &str, now_ms: u64) -> Result<String> {
    let hex = StoreKey(u.arbitrary()?).to_hex();
    Ok(match u.int_in_range(0..=7)? {
        0 => format!("{prefix}r/{now_ms:013}/not-a-hash"),
        1 => format!("{prefix}r/{now_ms:013}/{hex}0"),
        2 => format!("{prefix}r/{now_ms}/{hex}"),
        3 => format!("{prefix}r/{hex}"),
        4 => format!("{prefix}r/{now_ms:013}{hex}"),
        5 => format!("{prefix}r/{now_ms:013}/{}", &hex[1..]),
        6 => format!("{prefix}r/{now_ms:013}/{}", hex.to_uppercase()),
        _ => format!("{prefix}r/{}", string(u)?),
    })
}

/// etcd answering a poll: the keys in `[key, range_end)` in byte order, `limit` of them, or
/// `page` (a smaller page than `POLL_LIMIT` pages in a few keys). Returns the answer and the keys.
fn range_answer(
    u: &mut Unstructured<'_>,
    etcd: &BTreeSet<String>,
    prefix: &str,
    call: &Call,
    page: usize,
) -> Result<(String, Vec<String>)> {
    let b = body(call);
    assert_eq!((call.name, call.path), ("poll", "/v3/kv/range"));
    assert_eq!(unb64(&b["range_end"]), format!("{prefix}r0"));
    assert_eq!(b["keys_only"], true);
    assert_eq!(b["limit"], POLL_LIMIT.to_string());
    let start = unb64(&b["key"]);
    let end = format!("{prefix}r0");
    let in_range: Vec<&String> = etcd
        .range::<String, _>((
            std::ops::Bound::Included(&start),
            std::ops::Bound::Excluded(&end),
        ))
        .collect();
    let listed: Vec<String> = in_range.iter().take(page).map(|k| (*k).clone()).collect();
    let mut answer = json!({
        "header": {"cluster_id": "1", "member_id": "2", "revision": "40", "raft_term": "3"},
        "count": in_range.len().to_string(),
    });
    if !listed.is_empty() || u.arbitrary()? {
        answer["kvs"] = listed
            .iter()
            .map(|k| json!({"key": STANDARD.encode(k.as_bytes()), "create_revision": "5", "mod_revision": "5", "version": "1", "lease": "7"}))
            .collect();
    }
    if in_range.len() > listed.len() {
        answer["more"] = Value::Bool(true);
    } else if u.arbitrary()? {
        answer["more"] = Value::Bool(false);
    }
    Ok((answer.to_string(), listed))
}

/// Revocation sweeps against etcd simulated as a sorted map, while replicas write markers
/// (stamped up to the sweeps' slack before they commit, or ahead of this worker's clock), leases
/// run out and polls fail: within a sweep every page starts after the last and no key is read
/// twice; a sweep that begins after a marker committed and completes reads it, if it still
/// exists; the watermark keeps the latest complete sweep's start.
fn structured_sweeps(u: &mut Unstructured<'_>) -> Result<()> {
    let prefix = prefix(u)?;
    let page = u.int_in_range(1..=8)?;
    let timeout_ms = if u.ratio(1, 2)? {
        1_000
    } else {
        u.int_in_range(50..=60_000)?
    };
    let slack = sweep_slack_ms(timeout_ms);
    assert!(slack >= SWEEP_SLACK_MS + 2 * timeout_ms);
    let mut now_ms: u64 = if u.ratio(3, 4)? {
        NOW * 1_000
    } else {
        u.int_in_range(0..=9_000_000_000_000)?
    };
    let host = MemoryData::default();
    let watermark = Watermark::new("st/", &prefix);
    assert_eq!(watermark.load(&host), 0, "a new store has a watermark");
    // Where a previous VM's sweeps stood, or nowhere.
    let mut since = if u.ratio(1, 2)? {
        0
    } else {
        now_ms.saturating_sub(u.int_in_range(0..=3 * slack)?)
    };
    watermark.save(&host, since);
    assert_eq!(watermark.load(&host), since);
    let mut sweeps = Sweeps::new(slack, since);
    assert_eq!(sweeps.since_ms(), since);
    let mut etcd: BTreeSet<String> = BTreeSet::new();
    // Markers committed since the last sweep began, and those the sweep under way must read.
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut owed: BTreeSet<String> = BTreeSet::new();
    let mut read: BTreeSet<String> = BTreeSet::new();
    let mut last_start: Option<String> = None;
    // The sweep under way: when it began.
    let mut began: Option<u64> = None;
    for _ in 0..128 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=11)? {
            // A replica revokes a token: its marker, stamped by its clock when sent.
            0..=2 => {
                let key = if u.ratio(1, 2)? {
                    StoreKey([u.int_in_range(0..=3)?; 32])
                } else {
                    StoreKey(u.arbitrary()?)
                };
                let (written, owed_here) = match u.int_in_range(0..=7)? {
                    0 => (now_ms.saturating_sub(slack), true),
                    1 => (now_ms + u.int_in_range(0..=slack)?, true),
                    2 => (
                        now_ms.saturating_sub(u.int_in_range(slack + 1..=3 * slack)?),
                        false,
                    ),
                    _ => (now_ms.saturating_sub(u.int_in_range(0..=slack)?), true),
                };
                let name = marker_key(&prefix, &key, written);
                etcd.insert(name.clone());
                if owed_here {
                    pending.insert(name);
                }
            }
            3 => {
                etcd.insert(foreign(u, &prefix, now_ms)?);
            }
            // A marker's lease runs out.
            4 => {
                if !etcd.is_empty() {
                    let gone = etcd
                        .iter()
                        .nth(u.choose_index(etcd.len())?)
                        .cloned()
                        .expect("in range");
                    etcd.remove(&gone);
                    pending.remove(&gone);
                    owed.remove(&gone);
                }
            }
            5 | 6 => now_ms += u.int_in_range(0..=3 * slack)?,
            // A poll fails: the sweep is dropped, the next one starts from the same point.
            7 => {
                sweeps.abandon();
                began = None;
                pending.append(&mut owed);
            }
            _ => {
                let call = sweeps.next_call(&prefix, now_ms);
                let start = unb64(&body(&call)["key"]);
                if began.is_some() {
                    let last = last_start.as_deref().unwrap_or_default();
                    assert!(start.as_str() > last, "a page starts at or before the last");
                } else {
                    began = Some(now_ms);
                    owed.append(&mut pending);
                    read.clear();
                    let from = if since == 0 {
                        0
                    } else {
                        since.saturating_sub(slack)
                    };
                    assert_eq!(start, format!("{prefix}r/{from:013}"), "a sweep's start");
                }
                last_start = Some(start);
                let (answer, listed) = range_answer(u, &etcd, &prefix, &call, page)?;
                let markers = parse_poll(&prefix, Some(b"200"), answer.as_bytes())
                    .expect("a poll answer was refused");
                check_markers(&prefix, answer.as_bytes(), &markers);
                for name in listed {
                    assert!(read.insert(name), "a key read twice in one sweep");
                }
                if sweeps.advance(&markers) {
                    assert!(
                        markers.more_after.is_some(),
                        "a sweep went on after its last page"
                    );
                    assert_eq!(sweeps.since_ms(), since, "moved on before the sweep ended");
                } else {
                    assert!(markers.more_after.is_none(), "a sweep ended early");
                    let lost: Vec<&String> = owed.iter().filter(|m| !read.contains(*m)).collect();
                    assert!(lost.is_empty(), "a sweep missed markers {lost:?}");
                    owed.clear();
                    since = began.take().expect("a sweep under way");
                    assert_eq!(
                        sweeps.since_ms(),
                        since,
                        "not moved on to the sweep's start"
                    );
                    let recorded = watermark.load(&host);
                    watermark.save(&host, since);
                    assert_eq!(watermark.load(&host), recorded.max(since), "the watermark");
                }
            }
        }
    }
    Ok(())
}

fn pool_key(i: u8) -> StoreKey {
    StoreKey([i; 32])
}

/// Never a pool key (its last byte is 0xEE), and every one in the first slot of
/// `RecentRevocations`, so a few dozen fill it.
fn fresh_key(n: u64) -> StoreKey {
    let mut k = [0xEE; 32];
    k[..8].copy_from_slice(&n.wrapping_mul(u64::from(SLOTS)).to_be_bytes());
    StoreKey(k)
}

const SLOTS: u32 = RecentRevocations::<MemoryData>::SLOTS;

/// `RecentRevocations` (a small store in shared data) against what it must remember: never a
/// key that was not inserted, nor one whose last insert is `RECENT_SECONDS` old or more; always
/// the key inserted last; never more than its share of `RECENT_CAPACITY` in a slot.
fn structured_recent(u: &mut Unstructured<'_>) -> Result<()> {
    let host = MemoryData::default();
    let recent = RecentRevocations::new(&host, "rr/");
    assert_eq!(recent.initialize(), Ok(SLOTS));
    let mut inserted: HashMap<StoreKey, u64> = HashMap::new();
    let mut now: u64 = if u.ratio(7, 8)? {
        NOW
    } else {
        u.int_in_range(0..=u64::MAX / 2)?
    };
    let mut fresh = 0u64;
    for _ in 0..=u8::MAX {
        if u.is_empty() {
            break;
        }
        now = now.saturating_add(match u.int_in_range(0..=9)? {
            0 | 1 => 0,
            2 => RECENT_SECONDS - 1,
            3 => RECENT_SECONDS,
            4 => RECENT_SECONDS + 1,
            _ => u.int_in_range(0..=RECENT_SECONDS)?,
        });
        let mut last = None;
        if u.ratio(1, 3)? {
            for _ in 0..u.int_in_range(1..=80)? {
                let key = fresh_key(fresh);
                fresh += 1;
                recent.insert(key, now).expect("the in-memory store failed");
                inserted.insert(key, now);
                last = Some(key);
            }
        } else {
            let key = pool_key(u.int_in_range(0..=7)?);
            recent.insert(key, now).expect("the in-memory store failed");
            inserted.insert(key, now);
            last = Some(key);
        }
        if let Some(key) = last {
            assert_eq!(
                recent.contains(&key, now),
                Ok(true),
                "the key inserted last"
            );
            let (slot, _) = host
                .get(&format!("rr/{:x}", key.slot(SLOTS)))
                .expect("the in-memory store failed");
            let held = find_all(&slot);
            assert!(held <= RECENT_CAPACITY / SLOTS as usize, "{held} in a slot");
        }
        for (key, at) in &inserted {
            if recent
                .contains(key, now)
                .expect("the in-memory store failed")
            {
                assert!(
                    at.saturating_add(RECENT_SECONDS) > now,
                    "remembered past RECENT_SECONDS"
                );
            }
        }
        let never = StoreKey([0xAB; 32]);
        assert_eq!(recent.contains(&never, now), Ok(false));
    }
    Ok(())
}

fn find_all(slot: &[u8]) -> usize {
    split_token_core::store::entries(slot).count()
}

/// A token's bucket ends at or after it, within one width; a lease outlives its bucket; the
/// granted leases are a map that forgets the buckets that ended.
fn structured_leases(u: &mut Unstructured<'_>) -> Result<()> {
    let width: u64 = match u.int_in_range(0..=4)? {
        0 => 0,
        1 => 1,
        2 => 60,
        3 => 3_600,
        _ => u.arbitrary()?,
    };
    let mut leases = Leases::new(width);
    let w = width.max(1);
    let mut model: BTreeMap<u64, i64> = BTreeMap::new();
    let mut now: u64 = if u.ratio(3, 4)? {
        NOW
    } else {
        u.int_in_range(0..=u64::MAX / 2)?
    };
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        let expires_at: u64 = match u.int_in_range(0..=3)? {
            0 => u.arbitrary()?,
            1 => u64::MAX - u.int_in_range(0..=w)?,
            _ => now.saturating_add(u.int_in_range(0..=7_200)?),
        };
        let bucket = leases.bucket(expires_at);
        assert!(bucket >= expires_at, "bucket {bucket} before {expires_at}");
        assert!(
            bucket - expires_at < w,
            "bucket {bucket} too far after {expires_at}"
        );
        assert!(
            bucket.is_multiple_of(w) || bucket == u64::MAX,
            "bucket {bucket} is no end"
        );
        for at in [now, expires_at, u.arbitrary()?] {
            let ttl = Leases::ttl(bucket, at);
            assert!(
                ttl >= bucket.saturating_sub(at),
                "ttl {ttl} ends before {bucket}"
            );
            assert!(ttl >= 1);
            // Past the bucket's end, unless the TTL saturated.
            assert!(ttl == u64::MAX || at.checked_add(ttl).is_none_or(|end| end > bucket));
        }
        if bucket > now.saturating_add(1 << 40) {
            continue;
        }
        match u.int_in_range(0..=2)? {
            0 => {
                let lease: i64 = u.arbitrary()?;
                leases.insert(bucket, lease);
                model.insert(bucket, lease);
            }
            1 => {
                leases.forget(bucket);
                model.remove(&bucket);
            }
            _ => {}
        }
        now = now.saturating_add(u.int_in_range(0..=w.min(7_200))?);
        model.retain(|b, _| *b > now);
        assert_eq!(leases.get(bucket, now), model.get(&bucket).copied());
    }
    Ok(())
}

/// Revocation bodies naming a signature, a JWT, a token of another shape, with hints and other
/// parameters around.
fn structured_candidate(u: &mut Unstructured<'_>) -> Result<()> {
    let mut params = form_params(u)?;
    let signature = if u.ratio(3, 4)? {
        let len = *u.choose(&SIGNATURE_LENGTHS)?;
        let byte: u8 = u.arbitrary()?;
        b64(&vec![byte; len])
    } else {
        b64(&signature_bytes(u.arbitrary()?))
    };
    let hp = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9";
    let token = match u.int_in_range(0..=5)? {
        0 | 1 => signature.clone(),
        2 => format!("{hp}.{signature}"),
        3 => format!("..{signature}"),
        4 => format!("{hp}.{signature}.x"),
        _ => string(u)?,
    };
    let at = u.int_in_range(0..=params.len())?;
    params.insert(at, ("token".to_owned(), token));
    let body = form_body(u, &params)?;
    check_candidate(&body);
    Ok(())
}
