//! API requests: parse `Authorization`, look the signature up, decide.

use crate::config::{Config, FullJwtPolicy};
use crate::stats::Counter;
use crate::store::cache::{Forward, LocalCache};
use crate::store::{Lookup, StoreError, TokenStore};
use crate::token::{Presented, Signature};
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
    /// A signature under the `DPoP` scheme (RFC 9449): a sender-constrained token.
    Dpop(Signature<'a>),
}

/// Parses an `Authorization` value: `Bearer <token>` or `DPoP <token>` (schemes
/// case-insensitive), or a bare token.
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
    let is_scheme = |s: &[u8]| s.eq_ignore_ascii_case(b"bearer") || s.eq_ignore_ascii_case(b"dpop");
    let (dpop, token) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(space) => {
            let (scheme, rest) = value.split_at(space);
            if !is_scheme(scheme) {
                return Credentials::OtherScheme;
            }
            (scheme.eq_ignore_ascii_case(b"dpop"), rest.trim_ascii())
        }
        None if is_scheme(value) => return Credentials::Malformed,
        None => (false, value),
    };
    match Presented::of(token) {
        Presented::FullJwt => Credentials::FullJwt,
        Presented::Signature(s) if dpop => Credentials::Dpop(s),
        Presented::Signature(s) => Credentials::Signature(s),
        Presented::Malformed => Credentials::Malformed,
    }
}

/// The store key of the signature an `Authorization` value presents, under either scheme.
pub fn presented_key(authorization: Option<&[u8]>) -> Option<crate::token::StoreKey> {
    match parse_authorization(authorization) {
        Credentials::Signature(s) | Credentials::Dpop(s) => Some(s.store_key()),
        _ => None,
    }
}

/// Whether a `DPoP` request header holds one proof JWT (RFC 9449 §4.2). Its signature, key and
/// claims are for the upstream to check; the gateway only makes sure one is there.
pub fn has_dpop_proof(value: Option<&[u8]>) -> bool {
    value.map(<[u8]>::trim_ascii).is_some_and(|v| {
        v.split(|&b| b == b'.').count() == 3
            && v.split(|&b| b == b'.').all(|part| {
                !part.is_empty()
                    && part
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    })
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
    /// The `DPoP` scheme without exactly one proof in a `DPoP` header.
    MissingDpopProof,
    /// A DPoP-bound token (`cnf.jkt`) presented as a bearer token (RFC 9449 §7.2).
    DpopBoundAsBearer,
    /// The `DPoP` scheme with a token that is not DPoP-bound.
    DpopNotBound,
    /// A DPoP-bound token while `forward_jwt` is off: no upstream could check its proof.
    DpopUncheckable,
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
///
/// `dpop_proof` is the `DPoP` request header, read only for the `DPoP` scheme.
pub fn authorize<S: TokenStore>(
    config: &Config,
    store: &S,
    cache: &mut LocalCache,
    authorization: Option<&[u8]>,
    dpop_proof: impl FnOnce() -> Option<Vec<u8>>,
    now: u64,
) -> Result<Verdict, (Rejection, StoreError)> {
    let (dpop, signature) = match parse_authorization(authorization) {
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
        Credentials::Signature(s) => (false, s),
        Credentials::Dpop(s) => (true, s),
    };
    if dpop && !has_dpop_proof(dpop_proof().as_deref()) {
        return Ok(Verdict::Reject(Rejection::MissingDpopProof));
    }
    let forward = lookup(config, store, cache, signature, now)?;
    let Verdict::Forward(f) = &forward else {
        return Ok(forward);
    };
    Ok(match (dpop, f.dpop_bound) {
        (false, true) => Verdict::Reject(Rejection::DpopBoundAsBearer),
        (true, false) => Verdict::Reject(Rejection::DpopNotBound),
        // Without the JWT no upstream can check the proof against `cnf.jkt`: refuse rather
        // than forward a sender-constrained token whose constraint nobody checks.
        (true, true) if !config.forward_jwt => Verdict::Reject(Rejection::DpopUncheckable),
        _ => forward,
    })
}

fn epoch_of<S: TokenStore>(store: &S) -> Result<u64, (Rejection, StoreError)> {
    store.epoch().map_err(|e| (Rejection::StoreUnavailable, e))
}

/// The forward for a well-formed signature: the worker's cache first, then the shared store.
pub(crate) fn lookup<S: TokenStore>(
    config: &Config,
    store: &S,
    cache: &mut LocalCache,
    signature: Signature<'_>,
    now: u64,
) -> Result<Verdict, (Rejection, StoreError)> {
    // Without revocation nothing is ever taken out of the store early, so a cache entry is
    // good until it expires, and the epoch (one shared-data read, about a fifth of a hit's
    // cost in `just bench`) is not read. Listeners that share a store must therefore agree on
    // whether tokens can be revoked (docs/config.md).
    let watch = config.revocation_enabled() && cache.capacity() > 0;
    if let Some(forward) = cache.get(signature.as_str(), now) {
        // A revocation on any worker moves the epoch; a cache that missed it is emptied and
        // the store, which is authoritative, decides.
        if !watch || !cache.sync(epoch_of(store)?) {
            return Ok(Verdict::Forward(forward));
        }
    } else if watch {
        // Epoch first, then the slot: a revocation landing in between moves the epoch past
        // the one this entry is cached under, so the next hit drops it.
        cache.sync(epoch_of(store)?);
    }
    let key = signature.store_key();
    // Built while the entry is borrowed (a native store's shard stays locked meanwhile: one
    // payload decode and one copy into the rebuilt value).
    let built = store
        .lookup(&key, now, |found| {
            let (header_payload, expires_at) = match found {
                Ok(Lookup::Hit {
                    header_payload,
                    expires_at,
                }) => (header_payload, expires_at),
                Ok(Lookup::Expired) => return Err(Rejection::Expired),
                Ok(Lookup::Miss) | Err(_) => return Err(Rejection::Unknown),
            };
            // Entries are written from `&str`; a non-UTF-8 entry would be corruption.
            let Ok(hp) = std::str::from_utf8(header_payload) else {
                return Err(Rejection::Unknown);
            };
            let crate::claims::Inspection {
                projection,
                dpop_bound,
            } = crate::claims::inspect(header_payload, &config.claims_to_headers);
            // A DPoP-bound token is only ever forwarded under the scheme it must be presented
            // with.
            let scheme = if dpop_bound { "DPoP " } else { "Bearer " };
            let authorization = config.forward_jwt.then(|| {
                let sig = signature.as_str();
                let mut value = String::with_capacity(scheme.len() + hp.len() + 1 + sig.len());
                value.push_str(scheme);
                value.push_str(hp);
                value.push('.');
                value.push_str(sig);
                value
            });
            Ok(Forward {
                expires_at,
                authorization,
                claim_headers: projection.headers,
                unsafe_claims: projection.unsafe_dropped,
                dpop_bound,
            })
        })
        .map_err(|e| (Rejection::StoreUnavailable, e))?;
    let forward = match built {
        Ok(forward) => Rc::new(forward),
        Err(rejection) => return Ok(Verdict::Reject(rejection)),
    };
    cache.insert(signature.as_str(), Rc::clone(&forward));
    Ok(Verdict::Forward(forward))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{put_token, MemoryData};
    use crate::store::{Entry, Store};
    use crate::token::tests::JWT;

    #[test]
    fn parses_authorization_forms() {
        let sig = |s: &'static [u8]| Credentials::Signature(Signature::parse(s).unwrap());
        let cases: [(&[u8], Credentials<'_>); 18] = [
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
            (
                b"DPoP abc",
                Credentials::Dpop(Signature::parse(b"abc").unwrap()),
            ),
            (b"dpop", Credentials::Malformed),
            (b"Token abc", Credentials::OtherScheme),
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
        let verdict = authorize(
            &config,
            &store,
            &mut cache,
            Some(auth.as_bytes()),
            || None,
            10,
        )
        .unwrap();
        assert_eq!(
            verdict,
            Verdict::Forward(Rc::new(Forward {
                expires_at: 100,
                authorization: Some(format!("Bearer {JWT}")),
                claim_headers: vec![],
                unsafe_claims: 0,
                dpop_bound: false,
            }))
        );
        let bare = authorize(
            &config,
            &store,
            &mut cache,
            Some(sig.as_bytes()),
            || None,
            10,
        )
        .unwrap();
        assert_eq!(bare, verdict);
        let late = authorize(
            &config,
            &store,
            &mut cache,
            Some(auth.as_bytes()),
            || None,
            100,
        )
        .unwrap();
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
                authorize(&config, &store, &mut cache, auth, || None, 0).unwrap(),
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
        let verdict = authorize(
            &config,
            &store,
            &mut cache,
            Some(sig.as_bytes()),
            || None,
            10,
        )
        .unwrap();
        assert_eq!(
            verdict,
            Verdict::Forward(Rc::new(Forward {
                expires_at: 100,
                authorization: None,
                claim_headers: vec![(0, "alice".into()), (1, "2000000000".into())],
                unsafe_claims: 0,
                dpop_bound: false,
            }))
        );
    }

    #[test]
    fn cache_serves_repeat_hits_without_the_store_and_honours_expiry() {
        let (config, host) = setup("reject");
        let store = store_of(&config, &host);
        let sig = store_jwt(&store);
        let mut cache = LocalCache::new(16);
        let first = authorize(
            &config,
            &store,
            &mut cache,
            Some(sig.as_bytes()),
            || None,
            10,
        )
        .unwrap();
        host.map.borrow_mut().clear(); // the store forgets; the worker's cache still knows
        let second = authorize(
            &config,
            &store,
            &mut cache,
            Some(sig.as_bytes()),
            || None,
            11,
        )
        .unwrap();
        assert_eq!(first, second);
        assert!(matches!(second, Verdict::Forward(_)));
        let late = authorize(
            &config,
            &store,
            &mut cache,
            Some(sig.as_bytes()),
            || None,
            100,
        )
        .unwrap();
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
                || None,
                0
            )
            .unwrap(),
            Verdict::PassThrough
        );
    }

    #[test]
    fn dpop_bound_tokens_need_the_dpop_scheme_and_a_proof() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let (config, host) = setup("reject");
        let store = store_of(&config, &host);
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"at+jwt"}"#);
        let bound = URL_SAFE_NO_PAD.encode(br#"{"sub":"a","exp":200,"cnf":{"jkt":"0ZcOCORZNYy"}}"#);
        let hp = format!("{header}.{bound}");
        let sig = "Ym91bmQtc2lnbmF0dXJl";
        put_token(&store, sig, hp.as_bytes(), 100);
        let proof = || Some(b"eyJ0eXAiOiJkcG9wK2p3dCJ9.eyJodG0iOiJHRVQifQ.c2ln".to_vec());
        let mut cache = LocalCache::new(16);
        let mut run = |auth: &str, proof: Option<Vec<u8>>| {
            authorize(
                &config,
                &store,
                &mut cache,
                Some(auth.as_bytes()),
                || proof,
                10,
            )
            .unwrap()
        };
        let Verdict::Forward(f) = run(&format!("DPoP {sig}"), proof()) else {
            panic!()
        };
        assert_eq!(
            f.authorization.as_deref(),
            Some(format!("DPoP {hp}.{sig}").as_str())
        );
        assert_eq!(
            run(&format!("Bearer {sig}"), proof()),
            Verdict::Reject(Rejection::DpopBoundAsBearer)
        );
        assert_eq!(
            run(&format!("DPoP {sig}"), None),
            Verdict::Reject(Rejection::MissingDpopProof)
        );
        let two = b"a.b.c,d.e.f".to_vec();
        assert_eq!(
            run(&format!("DPoP {sig}"), Some(two)),
            Verdict::Reject(Rejection::MissingDpopProof)
        );
        // An unbound token under the DPoP scheme.
        let plain = store_jwt(&store);
        assert_eq!(
            run(&format!("DPoP {plain}"), proof()),
            Verdict::Reject(Rejection::DpopNotBound)
        );
        // With forward_jwt off no upstream could check the proof (found in review).
        let no_jwt = Config {
            forward_jwt: false,
            ..config.clone()
        };
        let auth = format!("DPoP {sig}");
        let verdict = authorize(
            &no_jwt,
            &store,
            &mut LocalCache::new(0),
            Some(auth.as_bytes()),
            proof,
            10,
        );
        assert_eq!(
            verdict.unwrap(),
            Verdict::Reject(Rejection::DpopUncheckable)
        );
    }
}
