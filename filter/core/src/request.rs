//! API requests: parse `Authorization`, look the signature up, decide.

use crate::cache::{Forward, LocalCache};
use crate::config::{Config, FullJwtPolicy};
use crate::stats::Counter;
use crate::store::{find, Lookup, SharedData, Store, StoreError};
use crate::token::Signature;
use std::rc::Rc;

/// What the client presented in `Authorization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// No header, or an empty one.
    Absent,
    /// A scheme other than Bearer (RFC 6750 §3.1: answer without an error code).
    OtherScheme,
    /// More than one value (Envoy joins repeated headers with a comma).
    Multiple,
    /// Bearer, but the token is empty or not base64url.
    Malformed,
    /// A full `header.payload.signature`.
    FullJwt,
    /// A signature, the only thing clients of this gateway hold.
    Signature(Signature<'a>),
}

/// Parses an `Authorization` value: `Bearer <token>` (scheme case-insensitive) or a bare token.
pub fn parse_authorization(value: Option<&[u8]>) -> Credentials<'_> {
    let Some(value) = value.map(<[u8]>::trim_ascii) else {
        return Credentials::Absent;
    };
    if value.is_empty() {
        return Credentials::Absent;
    }
    if value.contains(&b',') {
        return Credentials::Multiple;
    }
    let token = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(space) => {
            let (scheme, rest) = value.split_at(space);
            if !scheme.eq_ignore_ascii_case(b"bearer") {
                return Credentials::OtherScheme;
            }
            rest.trim_ascii()
        }
        None if value.eq_ignore_ascii_case(b"bearer") => return Credentials::Malformed,
        None => value,
    };
    let dots = token.iter().filter(|&&b| b == b'.').count();
    if dots == 2 && token.split(|&b| b == b'.').all(crate::token::is_base64url) {
        return Credentials::FullJwt;
    }
    Signature::parse(token).map_or(Credentials::Malformed, Credentials::Signature)
}

/// Why a request is refused before reaching an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No credentials for this scheme on a protected path.
    MissingCredentials,
    /// More than one Authorization header.
    MultipleAuthorization,
    /// The token is not a well-formed signature.
    Malformed,
    /// A full JWT where a signature is expected.
    FullJwt,
    /// The signature is not in the store.
    Unknown,
    /// The signature's entry has expired.
    Expired,
    /// The store could not be read.
    StoreUnavailable,
}

/// The decision for one API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Continue with the rebuilt `Authorization` and claim headers.
    Forward(Rc<Forward>),
    /// Continue without touching the request.
    PassThrough,
    /// Answer locally; the request never reaches an upstream.
    Reject(Rejection),
}

impl Verdict {
    /// The counter this decision moves.
    pub fn counter(&self) -> Counter {
        match self {
            Self::Forward(_) => Counter::LookupHit,
            Self::PassThrough => Counter::FullJwtForwarded,
            Self::Reject(r) => r.counter(),
        }
    }
}

/// Decides what happens to a request on a protected path: the worker's cache first, then the
/// shared store.
pub fn authorize<H: SharedData>(
    config: &Config,
    store: &Store<'_, H>,
    cache: &mut LocalCache,
    authorization: Option<&[u8]>,
    now: u64,
) -> Result<Verdict, (Rejection, StoreError)> {
    let signature = match parse_authorization(authorization) {
        Credentials::Absent | Credentials::OtherScheme => {
            return Ok(Verdict::Reject(Rejection::MissingCredentials))
        }
        Credentials::Multiple => return Ok(Verdict::Reject(Rejection::MultipleAuthorization)),
        Credentials::Malformed => return Ok(Verdict::Reject(Rejection::Malformed)),
        Credentials::FullJwt => {
            return Ok(match config.full_jwt {
                FullJwtPolicy::Allow => Verdict::PassThrough,
                FullJwtPolicy::Reject => Verdict::Reject(Rejection::FullJwt),
            })
        }
        Credentials::Signature(s) => s,
    };
    if let Some(forward) = cache.get(signature.as_str(), now) {
        return Ok(Verdict::Forward(forward));
    }
    let key = signature.store_key();
    let slot = store
        .fetch_slot(&key)
        .map_err(|e| (Rejection::StoreUnavailable, e))?;
    let (header_payload, expires_at) = match find(&slot, &key, now) {
        Ok(Lookup::Hit {
            header_payload,
            expires_at,
        }) => (header_payload, expires_at),
        Ok(Lookup::Expired) => return Ok(Verdict::Reject(Rejection::Expired)),
        Ok(Lookup::Miss) | Err(_) => return Ok(Verdict::Reject(Rejection::Unknown)),
    };
    // Entries are written from `&str`; a non-UTF-8 entry would be corruption.
    let Ok(hp) = std::str::from_utf8(header_payload) else {
        return Ok(Verdict::Reject(Rejection::Unknown));
    };
    let projection = crate::claims::project(header_payload, &config.claims_to_headers);
    let authorization = config.forward_jwt.then(|| {
        let sig = signature.as_str();
        let mut value = String::with_capacity("Bearer ".len() + hp.len() + 1 + sig.len());
        value.push_str("Bearer ");
        value.push_str(hp);
        value.push('.');
        value.push_str(sig);
        value
    });
    let forward = Rc::new(Forward {
        expires_at,
        authorization,
        claim_headers: projection.headers,
        unsafe_claims: projection.unsafe_dropped,
    });
    cache.insert(signature.as_str(), Rc::clone(&forward));
    Ok(Verdict::Forward(forward))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::MemoryData;
    use crate::store::Entry;
    use crate::token::tests::JWT;

    #[test]
    fn parses_authorization_forms() {
        let sig = |s: &'static [u8]| Credentials::Signature(Signature::parse(s).unwrap());
        let cases: [(&[u8], Credentials<'_>); 16] = [
            (b"Bearer abc", sig(b"abc")),
            (b"bearer abc", sig(b"abc")),
            (b"BEARER   abc  ", sig(b"abc")),
            (b"Bearer\tabc", sig(b"abc")),
            (b"abc-_", sig(b"abc-_")),
            (b"", Credentials::Absent),
            (b"   ", Credentials::Absent),
            (b"Bearer", Credentials::Malformed),
            (b"Bearer    ", Credentials::Malformed),
            (b"Basic dXNlcjpwYXNz", Credentials::OtherScheme),
            (b"DPoP abc", Credentials::OtherScheme),
            (b"Bearer a,Bearer b", Credentials::Multiple),
            (b"Bearer a b", Credentials::Malformed),
            (b"Bearer a.b", Credentials::Malformed),
            (b"Bearer x.y.z", Credentials::FullJwt),
            (b"Bearer ..z", Credentials::Malformed),
        ];
        for (value, want) in cases {
            assert_eq!(
                parse_authorization(Some(value)),
                want,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        assert_eq!(parse_authorization(None), Credentials::Absent);
        assert_eq!(
            parse_authorization(Some("Bearer é".as_bytes())),
            Credentials::Malformed
        );
    }

    fn store_of<'a>(config: &'a Config, host: &'a MemoryData) -> Store<'a, MemoryData> {
        Store::new(
            host,
            &config.store_prefix,
            config.store_slots,
            config.slot_capacity,
        )
    }

    /// Stores the test JWT (expiring at 100) and returns its signature.
    fn store_jwt(store: &Store<'_, MemoryData>) -> &'static str {
        let (hp, sig) = JWT.rsplit_once('.').unwrap();
        let key = Signature::parse(sig.as_bytes()).unwrap().store_key();
        let entry = Entry {
            key,
            expires_at: 100,
            header_payload: hp.as_bytes(),
        };
        store.put(&entry, 0).unwrap();
        sig
    }

    fn setup(full_jwt: &str) -> (Config, MemoryData) {
        let config = Config::from_json(
            format!(r#"{{"token_paths": ["/t"], "full_jwt": "{full_jwt}", "store_slots": 8}}"#)
                .as_bytes(),
        )
        .unwrap();
        (config, MemoryData::default())
    }

    #[test]
    fn known_signature_is_rebuilt_byte_identically() {
        let (config, host) = setup("reject");
        let store = store_of(&config, &host);
        let sig = store_jwt(&store);
        let auth = format!("Bearer {sig}");
        let mut cache = LocalCache::new(0);
        let verdict = authorize(&config, &store, &mut cache, Some(auth.as_bytes()), 10).unwrap();
        assert_eq!(
            verdict,
            Verdict::Forward(Rc::new(Forward {
                expires_at: 100,
                authorization: Some(format!("Bearer {JWT}")),
                claim_headers: vec![],
                unsafe_claims: 0
            }))
        );
        let bare = authorize(&config, &store, &mut cache, Some(sig.as_bytes()), 10).unwrap();
        assert_eq!(bare, verdict);
        let late = authorize(&config, &store, &mut cache, Some(auth.as_bytes()), 100).unwrap();
        assert_eq!(late, Verdict::Reject(Rejection::Expired));
    }

    #[test]
    fn rejections() {
        let (config, host) = setup("reject");
        let store = store_of(&config, &host);
        let cases: [(Option<&[u8]>, Rejection); 6] = [
            (None, Rejection::MissingCredentials),
            (Some(b"Basic eA=="), Rejection::MissingCredentials),
            (Some(b"Bearer unknown"), Rejection::Unknown),
            (Some(b"Bearer a,Bearer b"), Rejection::MultipleAuthorization),
            (Some(b"Bearer %%%"), Rejection::Malformed),
            (Some(JWT.as_bytes()), Rejection::FullJwt),
        ];
        for (auth, want) in cases {
            let mut cache = LocalCache::new(16);
            assert_eq!(
                authorize(&config, &store, &mut cache, auth, 0).unwrap(),
                Verdict::Reject(want)
            );
        }
    }

    #[test]
    fn claims_are_projected_and_forward_jwt_false_drops_authorization() {
        let config = Config::from_json(
            br#"{"token_paths": ["/t"], "forward_jwt": false, "store_slots": 8,
                 "claims_to_headers": [{"claim": "sub", "header": "x-user-id"},
                                       {"claim": "exp", "header": "x-exp"}]}"#,
        )
        .unwrap();
        let host = MemoryData::default();
        let store = store_of(&config, &host);
        let sig = store_jwt(&store);
        let mut cache = LocalCache::new(16);
        let verdict = authorize(&config, &store, &mut cache, Some(sig.as_bytes()), 10).unwrap();
        assert_eq!(
            verdict,
            Verdict::Forward(Rc::new(Forward {
                expires_at: 100,
                authorization: None,
                claim_headers: vec![(0, "alice".into()), (1, "2000000000".into())],
                unsafe_claims: 0
            }))
        );
    }

    #[test]
    fn cache_serves_repeat_hits_without_the_store_and_honours_expiry() {
        let (config, host) = setup("reject");
        let store = store_of(&config, &host);
        let sig = store_jwt(&store);
        let mut cache = LocalCache::new(16);
        let first = authorize(&config, &store, &mut cache, Some(sig.as_bytes()), 10).unwrap();
        host.map.borrow_mut().clear(); // the store forgets; the worker's cache still knows
        let second = authorize(&config, &store, &mut cache, Some(sig.as_bytes()), 11).unwrap();
        assert_eq!(first, second);
        assert!(matches!(second, Verdict::Forward(_)));
        let late = authorize(&config, &store, &mut cache, Some(sig.as_bytes()), 100).unwrap();
        assert_eq!(late, Verdict::Reject(Rejection::Unknown));
    }

    #[test]
    fn full_jwt_passes_through_when_allowed() {
        let (config, host) = setup("allow");
        let store = store_of(&config, &host);
        let auth = format!("Bearer {JWT}");
        assert_eq!(
            authorize(
                &config,
                &store,
                &mut LocalCache::new(16),
                Some(auth.as_bytes()),
                0
            )
            .unwrap(),
            Verdict::PassThrough
        );
    }
}
