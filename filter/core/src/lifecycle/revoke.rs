//! Revocation (RFC 7009) and logout: clients hold only signatures, so the gateway turns their
//! lifecycle calls into ones the IdP understands, and forgets the token itself.
//!
//! A revocation request names its token in a form body (`token=<signature>`, optionally
//! `token_type_hint`). What happens depends on what the token is:
//! - **a stored signature**: the entry is removed from the store and the revocation epoch moves,
//!   so no worker serves it again, from its cache or the store. The request goes on to the IdP
//!   with `token=<header.payload.signature>`, the token the IdP issued.
//!   A full JWT whose signature is stored is revoked the same way (and forwarded as it is).
//! - **otherwise, `token_type_hint=refresh_token`, or a value that cannot be a signature (a JWT,
//!   a UUID)**: not the gateway's business. It is forwarded unchanged (refresh tokens are never
//!   split). The hint never stops the store from being searched (RFC 7009 §2.1).
//! - **anything that could be a signature but is unknown or expired**: answered `200` here, as
//!   RFC 7009 §2.2 answers invalid tokens, and nothing is forwarded. The answer is the same as
//!   for a known token, so the endpoint tells a caller nothing about which signatures exist.

use crate::config::Config;
use crate::request::{authorize, presented_key, Rejection, Verdict};
use crate::store::cache::LocalCache;
use crate::store::{Lookup, StoreError, TokenStore};
use crate::token::{Signature, StoreKey};
use std::fmt;

/// Largest revocation body read; RFC 7009 requests are a few hundred bytes.
pub const MAX_REVOCATION_BODY: usize = 16 * 1024;

/// Byte lengths of the signatures of the algorithms IdPs use: HMAC (32/48/64), ECDSA P-256,
/// P-384, P-521 (64/96/132), EdDSA (64, 114) and RSA 2048 to 4096 bits (256/384/512).
const SIGNATURE_LENGTHS: [usize; 9] = [32, 48, 64, 96, 114, 132, 256, 384, 512];

/// Why a revocation or introspection request was refused (`invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevocationError {
    /// The body is larger than [`MAX_REVOCATION_BODY`].
    TooLarge { limit: usize },
    /// The body is not `application/x-www-form-urlencoded` text.
    NotForm { reason: &'static str },
    /// No `token` parameter.
    MissingToken,
    /// A parameter that must appear once appears more often.
    Repeated { name: &'static str },
    /// The request is not a POST (RFC 7009 §2.1, RFC 7662 §2.1).
    NotPost,
}

impl fmt::Display for RevocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => write!(f, "the request body exceeds {limit} bytes"),
            Self::NotForm { reason } => {
                write!(f, "the request body is not a form: {reason}")
            }
            Self::MissingToken => f.write_str("the request has no token parameter"),
            Self::Repeated { name } => write!(f, "the request has more than one {name}"),
            Self::NotPost => f.write_str("this endpoint takes POST only"),
        }
    }
}

impl std::error::Error for RevocationError {}

/// What to do with a revocation request.
#[derive(Clone, PartialEq, Eq)]
pub enum RevocationPlan {
    /// Revoked here (store entry removed, epoch moved; by [`decide`]: to be revoked); forward
    /// this body to the IdP. `key` and
    /// `expires_at` are the token's, for the etcd tier.
    Revoked {
        body: Vec<u8>,
        key: StoreKey,
        expires_at: u64,
    },
    /// Not an access token of this gateway: forward the request unchanged.
    ForwardUnchanged,
    /// Unknown or expired signature: answer 200 here and forward nothing.
    AnswerLocally,
}

/// Never print the rebuilt form: it holds the full JWT.
impl fmt::Debug for RevocationPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Revoked {
                body, expires_at, ..
            } => write!(
                f,
                "Revoked(<{} bytes>, expires_at {expires_at})",
                body.len()
            ),
            Self::ForwardUnchanged => f.write_str("ForwardUnchanged"),
            Self::AnswerLocally => f.write_str("AnswerLocally"),
        }
    }
}

/// Decodes an `application/x-www-form-urlencoded` body into its pairs, in order.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, RevocationError> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (
                    pair.get(..eq).unwrap_or_default(),
                    pair.get(eq + 1..).unwrap_or_default(),
                ),
                None => (pair, &b""[..]),
            };
            Ok((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

pub(crate) fn percent_decode(text: &[u8]) -> Result<String, RevocationError> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                match (hex(bytes.next()), hex(bytes.next())) {
                    (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                    _ => {
                        return Err(RevocationError::NotForm {
                            reason: "a '%' is not followed by two hex digits",
                        })
                    }
                }
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| RevocationError::NotForm {
        reason: "a value is not UTF-8",
    })
}

/// Encodes pairs as a form body; only RFC 3986 unreserved characters are left as they are.
pub fn encode_form(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        percent_encode(&mut out, name);
        out.push(b'=');
        percent_encode(&mut out, value);
    }
    out
}

fn percent_encode(out: &mut Vec<u8>, text: &str) {
    use std::io::Write;
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Whether `token` could be the signature of a JWS: base64url whose decoded length is one a
/// signature algorithm produces. A UUID or another opaque refresh token is not.
///
/// Judged by length alone: a near miss of a real signature (one character changed, so its last
/// character may carry non-zero padding bits) is still signature-shaped.
pub fn could_be_signature(token: &str) -> bool {
    let len = token.len();
    let decoded = len / 4 * 3
        + match len % 4 {
            0 => 0,
            2 => 1,
            3 => 2,
            _ => return false,
        };
    Signature::parse(token.as_bytes()).is_some() && SIGNATURE_LENGTHS.contains(&decoded)
}

/// Decides a revocation request and, for a stored signature, revokes it.
pub fn revoke<S: TokenStore>(store: &S, body: &[u8], now: u64) -> Result<RevocationPlan, Failure> {
    let plan = decide(store, body, now)?;
    if let RevocationPlan::Revoked { key, .. } = &plan {
        forget(store, key)?;
    }
    Ok(plan)
}

/// Decides a revocation request without revoking anything: a `Revoked` plan names the token to
/// [`forget`] once the revocation is also written elsewhere (etcd), so that a failure there
/// leaves the token as it was everywhere, instead of revoked on one replica only.
pub fn decide<S: TokenStore>(store: &S, body: &[u8], now: u64) -> Result<RevocationPlan, Failure> {
    if body.len() > MAX_REVOCATION_BODY {
        return Err(Failure::Request(RevocationError::TooLarge {
            limit: MAX_REVOCATION_BODY,
        }));
    }
    let mut pairs = parse_form(body).map_err(Failure::Request)?;
    let once = |name: &'static str| {
        let mut found = pairs.iter().enumerate().filter(|(_, (n, _))| n == name);
        match (found.next(), found.next()) {
            (_, Some(_)) => Err(Failure::Request(RevocationError::Repeated { name })),
            (first, None) => Ok(first.map(|(i, _)| i)),
        }
    };
    let token_at = once("token")?.ok_or(Failure::Request(RevocationError::MissingToken))?;
    let hint = once("token_type_hint")?
        .and_then(|i| pairs.get(i))
        .map(|(_, v)| v.clone());
    let Some((_, token)) = pairs.get(token_at).filter(|(_, t)| !t.is_empty()) else {
        return Err(Failure::Request(RevocationError::MissingToken));
    };
    // The store is searched whatever the hint says (RFC 7009 §2.1: a hint only speeds the
    // search up). A full JWT is looked up by its signature segment: someone holding it wants it
    // dead here too.
    let full_jwt = token.bytes().filter(|&b| b == b'.').count() == 2;
    let candidate = if full_jwt {
        token.rsplit_once('.').map_or("", |(_, sig)| sig)
    } else {
        token.as_str()
    };
    let stored = match Signature::parse(candidate.as_bytes()) {
        Some(signature) => {
            let key = signature.store_key();
            store
                .lookup(&key, now, |found| match found {
                    Ok(Lookup::Hit {
                        header_payload,
                        expires_at,
                    }) => std::str::from_utf8(header_payload)
                        .ok()
                        .map(|hp| (key, expires_at, format!("{hp}.{}", signature.as_str()))),
                    Ok(Lookup::Expired | Lookup::Miss) | Err(_) => None,
                })
                .map_err(Failure::Store)?
        }
        None => None,
    };
    let Some((key, expires_at, jwt)) = stored else {
        let refresh = hint.as_deref() == Some("refresh_token");
        return Ok(if refresh || full_jwt || !could_be_signature(token) {
            RevocationPlan::ForwardUnchanged
        } else {
            RevocationPlan::AnswerLocally
        });
    };
    if let Some((_, value)) = pairs.get_mut(token_at) {
        *value = jwt;
    }
    Ok(RevocationPlan::Revoked {
        body: encode_form(&pairs),
        key,
        expires_at,
    })
}

/// The key a revocation request names when this replica does not hold it, for a look in etcd:
/// the token's signature (or a full JWT's signature segment) when it has a signature's shape
/// and is not hinted to be a refresh token.
pub fn remote_candidate(body: &[u8]) -> Option<StoreKey> {
    let pairs = parse_form(body).ok()?;
    let value = |name: &str| {
        let mut found = pairs.iter().filter(|(n, _)| n == name);
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Some(v.as_str()),
            _ => None,
        }
    };
    if value("token_type_hint") == Some("refresh_token") {
        return None;
    }
    let token = value("token")?;
    let signature = match token.matches('.').count() {
        0 => token,
        2 => token.rsplit_once('.').map_or("", |(_, sig)| sig),
        _ => return None,
    };
    could_be_signature(signature)
        .then(|| Signature::parse(signature.as_bytes()).map(|s| s.store_key()))
        .flatten()
}

/// Why a lifecycle call could not be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The client's request is malformed: 400 `invalid_request`.
    Request(RevocationError),
    /// The store could not be changed: 503, and the token is not known to be revoked.
    Store(StoreError),
}

/// Removes a token everywhere: from the store, then (by moving the epoch) from every worker's
/// cache. The epoch moves even when another worker removed the entry first, so no cache lags.
pub fn forget<S: TokenStore>(store: &S, key: &crate::token::StoreKey) -> Result<(), Failure> {
    store.remove(key).map_err(Failure::Store)?;
    store.bump_epoch().map_err(Failure::Store)?;
    Ok(())
}

/// A logout call: authorized like any API request (a valid token is required), then the token
/// is revoked before the request is forwarded with the rebuilt JWT, so the IdP can end the
/// session. On a rejection nothing is revoked.
pub fn logout<S: TokenStore>(
    config: &Config,
    store: &S,
    cache: &mut LocalCache,
    authorization: Option<&[u8]>,
    dpop_proof: impl FnOnce() -> Option<Vec<u8>>,
    now: u64,
) -> Result<Verdict, (Rejection, StoreError)> {
    let verdict = authorize(config, store, cache, authorization, dpop_proof, now)?;
    if let (Verdict::Forward(_), Some(key)) = (&verdict, presented_key(authorization)) {
        if let Err(Failure::Store(e)) = forget(store, &key) {
            return Err((Rejection::StoreUnavailable, e));
        }
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{put_token, MemoryData};
    use crate::store::{Entry, Store};
    use crate::token::tests::JWT;

    fn config() -> Config {
        Config::from_json(
            br#"{"token_paths": ["/t"], "revocation_paths": ["/r"], "logout_paths": ["/l"], "store_slots": 8}"#,
        )
        .unwrap()
    }

    fn store_of<'a>(c: &'a Config, host: &'a MemoryData) -> Store<'a, MemoryData> {
        let store = Store::new(host, &c.store_prefix, c.store_slots, c.slot_capacity);
        store.initialize().unwrap();
        store
    }

    /// A signature of HS256's length (32 bytes): revocation only looks up signature shapes.
    const SIG: &str = "5mhBHqs5_DTLdINd9p5m7ZJ6XD0Xc55kIaCRY5r6HRA";

    fn jwt() -> String {
        format!("{}.{SIG}", JWT.rsplit_once('.').unwrap().0)
    }

    fn put_jwt(store: &Store<'_, MemoryData>) -> (&'static str, &'static str) {
        let (hp, _) = JWT.rsplit_once('.').unwrap();
        put_token(store, SIG, hp.as_bytes(), 100);
        (hp, SIG)
    }

    #[test]
    fn forms_round_trip_and_decode_escapes() {
        let pairs = parse_form(b"token=a%2Bb+c&token_type_hint=access_token&&x").unwrap();
        assert_eq!(
            pairs,
            [
                ("token".into(), "a+b c".into()),
                ("token_type_hint".into(), "access_token".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(parse_form(&encode_form(&pairs)).unwrap(), pairs);
        assert!(matches!(
            parse_form(b"token=%zz"),
            Err(RevocationError::NotForm { .. })
        ));
        assert!(matches!(
            parse_form(b"token=%ff"),
            Err(RevocationError::NotForm { .. })
        ));
    }

    #[test]
    fn a_stored_signature_is_revoked_and_forwarded_as_the_full_jwt() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        let (_, sig) = put_jwt(&store);
        let epoch = store.epoch().unwrap();
        let body = format!("token={sig}&token_type_hint=access_token&client_id=app");
        let plan = revoke(&store, body.as_bytes(), 10).unwrap();
        let RevocationPlan::Revoked {
            body,
            key,
            expires_at,
        } = plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!(key, Signature::parse(sig.as_bytes()).unwrap().store_key());
        assert_eq!(expires_at, 100);
        let pairs = parse_form(&body).unwrap();
        assert_eq!(pairs[0], ("token".into(), jwt()));
        assert_eq!(pairs[2], ("client_id".into(), "app".into()));
        assert_ne!(store.epoch().unwrap(), epoch);
        // Gone: a second revocation is answered locally, like any unknown signature.
        let again = revoke(&store, format!("token={sig}").as_bytes(), 10).unwrap();
        assert_eq!(again, RevocationPlan::AnswerLocally);
    }

    #[test]
    fn deciding_revokes_nothing_until_forget() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        let (_, sig) = put_jwt(&store);
        let epoch = store.epoch().unwrap();
        let body = format!("token={sig}");
        let plan = decide(&store, body.as_bytes(), 10).unwrap();
        let RevocationPlan::Revoked { key, .. } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(store.epoch().unwrap(), epoch);
        assert_eq!(
            decide(&store, body.as_bytes(), 10).unwrap(),
            plan,
            "still stored"
        );
        forget(&store, &key).unwrap();
        assert_ne!(store.epoch().unwrap(), epoch);
        assert_eq!(
            decide(&store, body.as_bytes(), 10).unwrap(),
            RevocationPlan::AnswerLocally
        );
    }

    #[test]
    fn etcd_is_asked_about_signatures_and_full_jwts_only() {
        let key = Some(Signature::parse(SIG.as_bytes()).unwrap().store_key());
        let cases: [(String, Option<StoreKey>); 8] = [
            (format!("token={SIG}"), key),
            (format!("token={}", jwt()), key),
            (format!("token={SIG}&token_type_hint=access_token"), key),
            (format!("token={SIG}&token_type_hint=refresh_token"), None),
            ("token=0b5c1e8e-2f5e-4c1a-9d8e-3b1f2a4c5d6e".into(), None),
            (format!("token={SIG}&token={SIG}"), None),
            (format!("token=a.{SIG}"), None),
            ("token=%zz".into(), None),
        ];
        for (body, want) in cases {
            assert_eq!(remote_candidate(body.as_bytes()), want, "{body}");
        }
    }

    #[test]
    fn unknown_signatures_are_answered_here_and_others_forwarded() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        let (_, sig) = put_jwt(&store);
        let unknown = format!("token={}", "A".repeat(sig.len()));
        assert_eq!(
            revoke(&store, unknown.as_bytes(), 10).unwrap(),
            RevocationPlan::AnswerLocally
        );
        // Expired entries are unknown too.
        assert_eq!(
            revoke(&store, format!("token={sig}").as_bytes(), 100).unwrap(),
            RevocationPlan::AnswerLocally
        );
        for body in [
            format!(
                "token={}&token_type_hint=refresh_token",
                "B".repeat(sig.len())
            ),
            "token=0b5e2d8c-1f7a-4c0e-9d38-6a3f2b1c9e47".to_owned(),
            format!(
                "token={}.{}",
                JWT.rsplit_once('.').unwrap().0,
                "C".repeat(sig.len())
            ),
        ] {
            assert_eq!(
                revoke(&store, body.as_bytes(), 10).unwrap(),
                RevocationPlan::ForwardUnchanged,
                "{body}"
            );
        }
    }

    #[test]
    fn the_hint_never_stops_the_search_and_full_jwts_are_revoked_too() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        put_jwt(&store);
        let hinted = format!("token={SIG}&token_type_hint=refresh_token");
        assert!(matches!(
            revoke(&store, hinted.as_bytes(), 10).unwrap(),
            RevocationPlan::Revoked { .. }
        ));
        put_jwt(&store);
        let full = format!("token={}", jwt());
        let RevocationPlan::Revoked { body, .. } = revoke(&store, full.as_bytes(), 10).unwrap()
        else {
            panic!("a stored full JWT is revoked")
        };
        assert_eq!(parse_form(&body).unwrap()[0].1, jwt());
        assert_eq!(
            revoke(&store, full.as_bytes(), 10).unwrap(),
            RevocationPlan::ForwardUnchanged
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        for (body, want) in [
            (&b"client_id=x"[..], RevocationError::MissingToken),
            (b"token=", RevocationError::MissingToken),
            (
                b"token=a&token=b",
                RevocationError::Repeated { name: "token" },
            ),
            (
                b"token=a&token_type_hint=x&token_type_hint=y",
                RevocationError::Repeated {
                    name: "token_type_hint",
                },
            ),
        ] {
            assert_eq!(revoke(&store, body, 0), Err(Failure::Request(want)));
        }
        let big = vec![b'a'; MAX_REVOCATION_BODY + 1];
        assert!(matches!(
            revoke(&store, &big, 0),
            Err(Failure::Request(RevocationError::TooLarge { .. }))
        ));
    }

    #[test]
    fn a_revocation_on_one_worker_empties_another_workers_cache() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        let (_, sig) = put_jwt(&store);
        let auth = format!("Bearer {sig}");
        let mut other_worker = LocalCache::new(16);
        let first = authorize(
            &c,
            &store,
            &mut other_worker,
            Some(auth.as_bytes()),
            || None,
            10,
        );
        assert!(matches!(first, Ok(Verdict::Forward(_))));
        revoke(&store, format!("token={sig}").as_bytes(), 10).unwrap();
        let after = authorize(
            &c,
            &store,
            &mut other_worker,
            Some(auth.as_bytes()),
            || None,
            10,
        );
        assert_eq!(after.unwrap(), Verdict::Reject(Rejection::Unknown));
    }

    #[test]
    fn a_token_evicted_then_revoked_is_not_served_from_a_cache() {
        // Found in review: revoking a token that a full slot had evicted found nothing, moved no
        // epoch, and workers kept serving it from their caches.
        let c = Config::from_json(
            br#"{"token_paths": ["/t"], "revocation_paths": ["/r"], "store_slots": 1, "slot_capacity": 1}"#,
        )
        .unwrap();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        put_jwt(&store);
        let auth = format!("Bearer {SIG}");
        let mut cache = LocalCache::new(16);
        let first = authorize(&c, &store, &mut cache, Some(auth.as_bytes()), || None, 10);
        assert!(matches!(first, Ok(Verdict::Forward(_))));
        let other = Signature::parse(b"b3RoZXItc2lnbmF0dXJlLW9mLTMyLWJ5dGVzLWxvbmc").unwrap();
        let entry = Entry {
            key: other.store_key(),
            expires_at: 100,
            header_payload: b"h.p",
        };
        assert_eq!(store.put(&entry, 10).unwrap().evicted, 1);
        assert_eq!(
            revoke(&store, format!("token={SIG}").as_bytes(), 10).unwrap(),
            RevocationPlan::AnswerLocally
        );
        let after = authorize(&c, &store, &mut cache, Some(auth.as_bytes()), || None, 10);
        assert_eq!(after.unwrap(), Verdict::Reject(Rejection::Unknown));
    }

    #[test]
    fn a_bump_that_loses_its_race_still_moves_the_epoch() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        store.bump_epoch().unwrap();
        let before = store.epoch().unwrap();
        // Another worker bumps between this read and this write.
        host.before_set
            .borrow_mut()
            .push(Box::new(|h: &MemoryData| {
                Store::new(h, "split-token/", 8, 8).bump_epoch().unwrap();
            }));
        store.bump_epoch().unwrap();
        assert_ne!(store.epoch().unwrap(), before);
    }

    #[test]
    fn logout_forwards_once_then_the_token_is_gone() {
        let c = config();
        let host = MemoryData::default();
        let store = store_of(&c, &host);
        let (_, sig) = put_jwt(&store);
        let auth = format!("Bearer {sig}");
        let mut cache = LocalCache::new(16);
        let first = logout(&c, &store, &mut cache, Some(auth.as_bytes()), || None, 10).unwrap();
        assert!(matches!(first, Verdict::Forward(_)));
        let second = logout(&c, &store, &mut cache, Some(auth.as_bytes()), || None, 10).unwrap();
        assert_eq!(second, Verdict::Reject(Rejection::Unknown));
        let unknown = logout(&c, &store, &mut cache, Some(b"Bearer nope"), || None, 10).unwrap();
        assert_eq!(unknown, Verdict::Reject(Rejection::Unknown));
    }

    #[test]
    fn signature_shapes() {
        assert!(could_be_signature(SIG));
        assert!(could_be_signature(&"A".repeat(43))); // HS256
        assert!(could_be_signature(&"A".repeat(86))); // ES256, EdDSA
        assert!(could_be_signature(&"A".repeat(342))); // RS256 (2048-bit key)
        assert!(could_be_signature(&"B".repeat(342))); // non-zero padding bits: a near miss
        assert!(!could_be_signature("0b5e2d8c-1f7a-4c0e-9d38-6a3f2b1c9e47"));
        assert!(!could_be_signature(&jwt()));
        assert!(!could_be_signature(""));
    }
}
