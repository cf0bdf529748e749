//! `verify` and `keys`: JWKS documents, OpenID discovery documents and token verification.

use crate::support::b64;
use arbitrary::{Arbitrary, Unstructured};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use split_token_core::issue::keys::{on_response, KeyRequest, Outcome, Step, DISCOVERY_PATH};
use split_token_core::token::verify::{verify, KeySet, Policy, VerifyError};
use split_token_core::Config;

const NOW: u64 = 1_700_000_000;

thread_local! {
    /// An inline HMAC key and an RSA key, HS256 and RS256 allowed.
    static KEYS: (KeySet, Policy) = {
        let c = Config::from_json(
            br#"{"token_paths": ["/t"], "verify": {"algorithms": ["HS256", "RS256"],
                 "issuer": "https://idp", "audiences": ["api"],
                 "jwks": {"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}]}}}"#,
        )
        .unwrap();
        let v = c.verify.unwrap();
        match v.source {
            split_token_core::config::KeySource::Inline(keys) => (keys, v.policy),
            _ => unreachable!(),
        }
    };
}

/// The first byte picks the parser, the rest is its input:
/// - `0`/`1`: a JWKS (`1`: symmetric keys allowed, as inline): a key set is never empty and a
///   network JWKS never yields an HMAC secret;
/// - `2`: a discovery document: the JWKS path learned from it is a plain absolute path, as a
///   configured `jwks_path` must be;
/// - `3`: a JWKS answer: keys are kept under the path that was asked for;
/// - `4`: an HS256 token signed with the inline key from arbitrary claims: it verifies exactly
///   when `exp`, `nbf` (with the leeway), `iss` and `aud` allow, and never once its signature is
///   altered;
/// - other: a token to verify: never panics, `none` and algorithms off the list never pass.
pub fn jwks(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 | 1 => {
            let allow_symmetric = mode == 1;
            if let Ok(set) = KeySet::parse(rest, allow_symmetric) {
                assert!(!set.keys.is_empty());
                assert!(
                    allow_symmetric || !set.has_symmetric(),
                    "HMAC secret from the network"
                );
            }
        }
        2 => {
            let request = KeyRequest {
                path: DISCOVERY_PATH.to_owned(),
                step: Step::Discovery,
            };
            match on_response(&request, Some(b"200"), rest) {
                Outcome::Next(next) => {
                    assert_eq!(next.step, Step::Jwks);
                    assert!(next.path.starts_with('/'), "{:?}", next.path);
                    assert!(!next.path.contains('#'));
                    assert!(
                        !next.path.bytes().any(|b| b <= b' ' || b == 0x7f),
                        "discovered JWKS path {:?} is not a plain path",
                        next.path
                    );
                }
                Outcome::Failed(_) => {}
                Outcome::Keys { .. } => panic!("keys from a discovery document"),
            }
        }
        3 => {
            let request = KeyRequest {
                path: "/jwks".to_owned(),
                step: Step::Jwks,
            };
            match on_response(&request, Some(b"200"), rest) {
                Outcome::Keys { keys, jwks_path } => {
                    assert_eq!(jwks_path, "/jwks");
                    assert!(!keys.has_symmetric());
                }
                Outcome::Failed(_) => {}
                Outcome::Next(_) => panic!("a JWKS answer asked for more"),
            }
        }
        4 => {
            if let Ok(claims) = Signed::arbitrary_take_rest(Unstructured::new(rest)) {
                KEYS.with(|(keys, policy)| signed(keys, policy, &claims));
            }
        }
        _ => KEYS.with(|(keys, policy)| {
            let token = String::from_utf8_lossy(rest);
            match verify(&token, keys, policy, NOW) {
                Ok(()) => {
                    let alg = token.split('.').next().and_then(|h| {
                        let h = base64::Engine::decode(
                            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                            h,
                        )
                        .ok()?;
                        serde_json::from_slice::<Value>(&h).ok()?["alg"]
                            .as_str()
                            .map(str::to_owned)
                    });
                    let alg = alg.expect("a token without alg verified");
                    assert!(policy.algorithms.contains(&alg), "{alg} is not allowed");
                }
                Err(VerifyError::AlgorithmNotAllowed { alg }) => {
                    assert!(alg.chars().count() <= 16);
                }
                Err(_) => {}
            }
        }),
    }
}

/// The inline key's secret (`c2VjcmV0LXNlY3JldC1zZWNyZXQ`).
const SECRET: &[u8] = b"secret-secret-secret";

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[derive(Arbitrary, Debug)]
enum Aud {
    Api,
    Other(String),
    Many(Vec<String>, bool),
}

#[derive(Arbitrary, Debug)]
struct Signed {
    kid: bool,
    exp: Option<i16>,
    nbf: Option<i16>,
    iss: Option<Option<String>>,
    aud: Option<Aud>,
}

fn signed(keys: &KeySet, policy: &Policy, c: &Signed) {
    let header = if c.kid {
        json!({"alg": "HS256", "kid": "h"})
    } else {
        json!({"alg": "HS256"})
    };
    let now = i64::try_from(NOW).unwrap();
    let mut claims = json!({"sub": "alice"});
    if let Some(exp) = c.exp {
        claims["exp"] = json!(now + i64::from(exp));
    }
    if let Some(nbf) = c.nbf {
        claims["nbf"] = json!(now + i64::from(nbf));
    }
    let iss = match &c.iss {
        None => None,
        Some(None) => Some("https://idp".to_owned()),
        Some(Some(other)) => Some(other.clone()),
    };
    if let Some(iss) = &iss {
        claims["iss"] = json!(iss);
    }
    let audiences: Vec<String> = match &c.aud {
        None => Vec::new(),
        Some(Aud::Api) => vec!["api".to_owned()],
        Some(Aud::Other(a)) => vec![a.clone()],
        Some(Aud::Many(all, with_api)) => {
            let mut all = all.clone();
            if *with_api {
                all.push("api".to_owned());
            }
            claims["aud"] = json!(all);
            all
        }
    };
    if let Some(Aud::Api | Aud::Other(_)) = &c.aud {
        claims["aud"] = json!(audiences[0]);
    }
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mac = hmac_sha256(SECRET, signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64(&mac));

    let leeway = i64::try_from(policy.leeway_seconds).unwrap();
    let expected = if c.exp.is_some_and(|e| now + i64::from(e) + leeway <= now) {
        Err(VerifyError::Expired)
    } else if c.nbf.is_some_and(|n| now + i64::from(n) - leeway > now) {
        Err(VerifyError::NotYetValid)
    } else if iss.as_deref() != policy.issuer.as_deref() {
        Err(VerifyError::WrongIssuer)
    } else if !audiences.iter().any(|a| policy.audiences.contains(a)) {
        Err(VerifyError::WrongAudience)
    } else {
        Ok(())
    };
    assert_eq!(verify(&token, keys, policy, NOW), expected, "{claims}");

    // One flipped signature bit is never accepted.
    let mut bad = mac;
    bad[0] ^= 1;
    let tampered = format!("{signing_input}.{}", b64(&bad));
    assert_eq!(
        verify(&tampered, keys, policy, NOW),
        Err(VerifyError::BadSignature)
    );
}
