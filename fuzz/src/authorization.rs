//! `request`: parsing `Authorization` and deciding a request against a store with one token.

use crate::support::MemoryData;
use split_token_core::request::{
    authorize, has_dpop_proof, parse_authorization, Credentials, Rejection, Verdict,
};
use split_token_core::store::cache::LocalCache;
use split_token_core::store::{Entry, Store};
use split_token_core::token::{is_base64url, Signature};
use split_token_core::Config;

/// `{"alg":"RS256","typ":"JWT","kid":"k1"}` . `{"sub":"alice","exp":2000000000}` . signature
pub const JWT: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6MjAwMDAwMDAwMH0.c2lnbmF0dXJlLWJ5dGVzLWZvci10ZXN0cw";
const NOW: u64 = 1_700_000_000;

thread_local! {
    static CONFIG: Config = Config::from_json(
        br#"{"token_paths": ["/t"], "store_slots": 4, "local_cache_entries": 4,
             "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}]}"#,
    )
    .unwrap();
}

/// Any bytes: the parse is deterministic, ignores surrounding whitespace and the scheme's case,
/// accepts only base64url credentials that re-parse identically however they are framed; and
/// `authorize` forwards exactly the stored token's signature, rebuilt byte for byte.
pub fn authorization(data: &[u8]) {
    let got = parse_authorization(Some(data));
    assert_eq!(got, parse_authorization(Some(data)), "not deterministic");
    let trimmed = data.trim_ascii();
    assert_eq!(got == Credentials::Absent, trimmed.is_empty());
    if !trimmed.is_empty() {
        assert_eq!(got == Credentials::Multiple, trimmed.contains(&b','));
    }
    let padded = [b" \t\r\n".as_slice(), data, b" \t"].concat();
    assert_eq!(
        parse_authorization(Some(&padded)),
        got,
        "whitespace matters"
    );

    let space = trimmed.iter().position(|&b| b == b' ' || b == b'\t');
    if let Some(space) = space {
        // Scheme matching is ASCII case-insensitive: flipping the scheme's case changes nothing.
        let mut flipped = trimmed.to_vec();
        for b in flipped.iter_mut().take(space) {
            *b = if b.is_ascii_lowercase() {
                b.to_ascii_uppercase()
            } else {
                b.to_ascii_lowercase()
            };
        }
        assert_eq!(
            parse_authorization(Some(&flipped)),
            got,
            "scheme case matters"
        );
    }

    match got {
        Credentials::Signature(sig) | Credentials::Dpop(sig) => {
            let s = sig.as_str().as_bytes();
            assert!(
                is_base64url(s),
                "accepted a credential that is not base64url"
            );
            assert!(trimmed.ends_with(s));
            let schemes: [&[u8]; 3] = if matches!(got, Credentials::Dpop(_)) {
                [b"DPoP ", b"dpop\t", b"DPOP   "]
            } else {
                [b"Bearer ", b"bearer\t", b"BEARER   "]
            };
            for scheme in schemes {
                let framed = [scheme, s].concat();
                assert_eq!(
                    parse_authorization(Some(&framed)),
                    got,
                    "re-framing changed it"
                );
            }
            // Bare is Bearer, except for the tokens a bare value cannot be: a scheme's name.
            if !s.eq_ignore_ascii_case(b"bearer") && !s.eq_ignore_ascii_case(b"dpop") {
                let bare = parse_authorization(Some(s));
                assert_eq!(bare, Credentials::Signature(sig), "the bare token differs");
            }
        }
        Credentials::FullJwt => {
            let token = match space {
                Some(space) => trimmed.get(space..).unwrap().trim_ascii(),
                None => trimmed,
            };
            assert_eq!(token.iter().filter(|&&b| b == b'.').count(), 2);
            assert!(token.split(|&b| b == b'.').all(is_base64url));
            let framed = [b"Bearer ", token].concat();
            assert_eq!(parse_authorization(Some(&framed)), got);
        }
        Credentials::OtherScheme => {
            let scheme = trimmed.get(..space.unwrap()).unwrap();
            assert!(!scheme.eq_ignore_ascii_case(b"bearer"));
            assert!(!scheme.eq_ignore_ascii_case(b"dpop"));
        }
        Credentials::Absent | Credentials::Multiple | Credentials::Malformed => {}
    }

    dpop_proof(data);
    CONFIG.with(|config| decide(config, data, got));
}

fn decide(config: &Config, data: &[u8], got: Credentials<'_>) {
    let (hp, stored) = JWT.rsplit_once('.').unwrap();
    let host = MemoryData::default();
    let store = Store::new(
        &host,
        &config.store_prefix,
        config.store_slots,
        config.slot_capacity,
    );
    let key = Signature::parse(stored.as_bytes()).unwrap().store_key();
    let entry = Entry {
        key,
        expires_at: 2_000_000_000,
        header_payload: hp.as_bytes(),
    };
    store.put(&entry, NOW).unwrap();
    let mut cache = LocalCache::new(config.local_cache_entries);
    let proof = || Some(b"eyJ0eXAiOiJkcG9wK2p3dCJ9.e30.c2ln".to_vec());
    let verdict = authorize(config, &store, &mut cache, Some(data), proof, NOW).unwrap();
    match (&got, &verdict) {
        (Credentials::Signature(sig), Verdict::Forward(forward)) => {
            assert_eq!(
                sig.as_str(),
                stored,
                "forwarded a signature that was never stored"
            );
            assert_eq!(
                forward.authorization.as_deref(),
                Some(&*format!("Bearer {JWT}"))
            );
            assert_eq!(forward.claim_headers, [(0, "alice".to_owned())]);
            assert_eq!(forward.expires_at, 2_000_000_000);
            assert!(!forward.dpop_bound);
        }
        (Credentials::Dpop(sig), Verdict::Reject(Rejection::DpopNotBound)) => {
            assert_eq!(sig.as_str(), stored, "an unknown token was found");
        }
        (
            Credentials::Signature(sig) | Credentials::Dpop(sig),
            Verdict::Reject(Rejection::Unknown),
        ) => {
            assert_ne!(sig.as_str(), stored, "the stored token was refused");
        }
        (Credentials::Absent | Credentials::OtherScheme, Verdict::Reject(r)) => {
            assert_eq!(*r, Rejection::MissingCredentials);
        }
        (Credentials::Multiple, Verdict::Reject(r)) => {
            assert_eq!(*r, Rejection::MultipleAuthorization);
        }
        (Credentials::Malformed, Verdict::Reject(r)) => assert_eq!(*r, Rejection::Malformed),
        (Credentials::FullJwt, Verdict::Reject(r)) => assert_eq!(*r, Rejection::FullJwt),
        (got, verdict) => panic!("{got:?} was decided as {verdict:?}"),
    }
    // A repeat is served by the worker's cache or the store alike, with the same answer.
    let again = authorize(config, &store, &mut cache, Some(data), proof, NOW + 1).unwrap();
    assert_eq!(again, verdict);
}

/// A `DPoP` header holds a proof exactly when it is three non-empty base64url parts.
fn dpop_proof(data: &[u8]) {
    let parts: Vec<&[u8]> = data.trim_ascii().split(|&b| b == b'.').collect();
    let expected = parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    assert_eq!(has_dpop_proof(Some(data)), expected, "has_dpop_proof");
    assert!(!has_dpop_proof(None));
}
