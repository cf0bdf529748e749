//! RFC 7662 introspection for resource servers that only see a signature.
//!
//! A resource server behind the gateway normally gets the full JWT and needs nothing else. One
//! that is handed a signature out of band (a message queue, a websocket, another gateway) can ask
//! the gateway what it stands for: `POST token=<signature>` with its client credentials in HTTP
//! Basic. The answer is `{"active": false}` for an unknown, expired or revoked signature (and for
//! anything that is not one), and otherwise the token's claims with `"active": true`. Only
//! configured clients may ask: an open endpoint would turn signatures into identities for anyone.

use crate::config::IntrospectionConfig;
use crate::lifecycle::revoke::{parse_form, percent_decode, RevocationError};
use crate::store::{Lookup, StoreError, TokenStore};
use crate::token::Signature;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The outcome of an introspection request.
#[derive(Clone, PartialEq, Eq)]
pub enum Introspection {
    /// No or wrong client credentials: 401 `invalid_client`.
    Unauthorized,
    /// A malformed request: 400 `invalid_request`.
    Invalid(RevocationError),
    /// The RFC 7662 answer, a JSON object.
    Answer(String),
}

/// Never print the answer: it holds a token's claims.
impl std::fmt::Debug for Introspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unauthorized => f.write_str("Unauthorized"),
            Self::Invalid(e) => write!(f, "Invalid({e})"),
            Self::Answer(a) => write!(f, "Answer(<{} bytes>)", a.len()),
        }
    }
}

/// Whether `authorization` holds HTTP Basic credentials of a configured client (RFC 6749
/// §2.3.1: id and secret are form-encoded, then base64).
pub fn authenticate(config: &IntrospectionConfig, authorization: Option<&[u8]>) -> bool {
    let Some(value) = authorization.map(<[u8]>::trim_ascii) else {
        return false;
    };
    let Some((scheme, encoded)) = value
        .iter()
        .position(|&b| b == b' ')
        .map(|i| value.split_at(i))
    else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return false;
    }
    let Ok(decoded) = STANDARD.decode(encoded.trim_ascii()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    let (id, secret) = decoded.split_at(colon);
    let secret = secret.get(1..).unwrap_or_default();
    // RFC 6749 §2.3.1 form-encodes both before base64, but most clients (curl -u) send them
    // raw: accept either spelling. A secret is compared by its SHA-256, over every client and
    // both spellings, without stopping early.
    let raw: [u8; 32] = Sha256::digest(secret).into();
    let decoded: Option<[u8; 32]> = percent_decode(secret)
        .ok()
        .map(|s| Sha256::digest(s.as_bytes()).into());
    let decoded_id = percent_decode(id).ok();
    let mut found = false;
    for (client, expected) in &config.clients {
        let id_matches = client.as_bytes() == id || decoded_id.as_deref() == Some(client.as_str());
        let secret_matches = same(expected, &raw) | decoded.is_some_and(|d| same(expected, &d));
        found |= id_matches & secret_matches;
    }
    found
}

/// Compares two digests in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers an authenticated introspection request.
pub fn introspect<S: TokenStore>(
    store: &S,
    body: &[u8],
    now: u64,
) -> Result<Introspection, StoreError> {
    let pairs = match parse_form(body) {
        Ok(pairs) => pairs,
        Err(e) => return Ok(Introspection::Invalid(e)),
    };
    let mut tokens = pairs.iter().filter(|(n, _)| n == "token");
    let token = match (tokens.next(), tokens.next()) {
        (Some((_, t)), None) => t,
        (None, _) => return Ok(Introspection::Invalid(RevocationError::MissingToken)),
        (Some(_), Some(_)) => {
            return Ok(Introspection::Invalid(RevocationError::Repeated {
                name: "token",
            }))
        }
    };
    let inactive = || Introspection::Answer(r#"{"active":false}"#.to_owned());
    let Some(signature) = Signature::parse(token.as_bytes()) else {
        return Ok(inactive());
    };
    let key = signature.store_key();
    let found = store.lookup(&key, now, |found| match found {
        Ok(Lookup::Hit {
            header_payload,
            expires_at,
        }) => crate::claims::payload_object(header_payload).map(|claims| (claims, expires_at)),
        _ => None,
    })?;
    let Some((mut claims, expires_at)) = found else {
        return Ok(inactive());
    };
    let bound = crate::claims::is_bound(&claims);
    claims.insert("active".into(), Value::Bool(true));
    // The gateway may honour the token for less than its `exp` (max_ttl_seconds, expires_in):
    // a resource server must not cache "active" beyond that.
    let exp = claims.get("exp").and_then(Value::as_u64);
    if exp.is_none_or(|exp| exp > expires_at) {
        claims.insert("exp".into(), Value::from(expires_at));
    }
    // The token's binding decides, not a `token_type` claim in the payload: a DPoP-bound token
    // announced as Bearer would be taken without its proof.
    claims.insert(
        "token_type".into(),
        Value::from(if bound { "DPoP" } else { "Bearer" }),
    );
    Ok(Introspection::Answer(Value::Object(claims).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::tests::{put_token, MemoryData};
    use crate::store::Store;
    use crate::token::tests::JWT;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const SECRET_SHA256: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"; // "secret"

    fn config() -> Config {
        Config::from_json(
            format!(
                r#"{{"token_paths": ["/t"], "store_slots": 8, "introspection": {{"paths": ["/i"],
                "clients": [{{"client_id": "rs", "client_secret_sha256": "{SECRET_SHA256}"}}]}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn basic(credentials: &str) -> Vec<u8> {
        format!("Basic {}", STANDARD.encode(credentials)).into_bytes()
    }

    #[test]
    fn only_configured_clients_may_ask() {
        let c = config();
        let i = c.introspection.as_ref().unwrap();
        assert!(authenticate(i, Some(&basic("rs:secret"))));
        assert!(authenticate(i, Some(b"basic cnM6c2VjcmV0")));
        assert!(authenticate(i, Some(&basic("rs:secre%74")))); // form-encoded, RFC 6749 §2.3.1
        for bad in [
            "rs:Secret",
            "rs:",
            "other:secret",
            "rs",
            ":secret",
            "rs:secret ",
        ] {
            assert!(!authenticate(i, Some(&basic(bad))), "{bad}");
        }
        assert!(!authenticate(i, None));
        assert!(!authenticate(i, Some(b"Bearer cnM6c2VjcmV0")));
        assert!(!authenticate(i, Some(b"Basic !!!")));
    }

    #[test]
    fn answers_claims_for_live_tokens_and_inactive_otherwise() {
        let c = config();
        let host = MemoryData::default();
        let store = Store::new(&host, &c.store_prefix, c.store_slots, c.slot_capacity);
        let (hp, sig) = JWT.rsplit_once('.').unwrap();
        put_token(&store, sig, hp.as_bytes(), 100);
        let answer = |body: &str, now| match introspect(&store, body.as_bytes(), now).unwrap() {
            Introspection::Answer(json) => serde_json::from_str::<Value>(&json).unwrap(),
            other => panic!("{other:?}"),
        };
        let live = answer(&format!("token={sig}&token_type_hint=access_token"), 10);
        assert_eq!(live["active"], true);
        assert_eq!(live["sub"], "alice");
        assert_eq!(live["token_type"], "Bearer");
        assert_eq!(
            live["exp"], 100,
            "the gateway's expiry, not the JWT's later exp"
        );
        let inactive = serde_json::json!({"active": false});
        assert_eq!(answer(&format!("token={sig}"), 100), inactive); // expired
        assert_eq!(answer("token=unknown", 10), inactive);
        assert_eq!(answer(&format!("token={JWT}"), 10), inactive); // not a signature
        assert_eq!(
            introspect(&store, b"client_id=x", 10).unwrap(),
            Introspection::Invalid(RevocationError::MissingToken)
        );
    }

    #[test]
    fn secret_hashes_are_hex_digits_only() {
        // Noticed while fuzzing introspect: `u8::from_str_radix` also takes a sign, so "+a" pairs
        // were accepted as hex.
        let hash = "+a".repeat(32);
        let json = format!(
            r#"{{"token_paths": ["/t"], "introspection": {{"paths": ["/i"],
            "clients": [{{"client_id": "rs", "client_secret_sha256": "{hash}"}}]}}}}"#
        );
        assert!(Config::from_json(json.as_bytes()).is_err());
    }

    /// Found by fuzz target introspect: a `token_type` claim in the payload was answered as is,
    /// so a DPoP-bound token carrying `"token_type": "Bearer"` was announced as a bearer token.
    #[test]
    fn token_type_follows_the_binding_not_a_claim() {
        let c = config();
        let host = MemoryData::default();
        let store = Store::new(&host, &c.store_prefix, c.store_slots, c.slot_capacity);
        let cases = [
            (
                r#"{"sub":"a","token_type":"Bearer","cnf":{"jkt":"k"}}"#,
                "c2ln",
                "DPoP",
            ),
            (r#"{"sub":"b","token_type":"DPoP"}"#, "c2lnMg", "Bearer"),
        ];
        for (payload, sig, want) in cases {
            let hp = format!("eyJhbGciOiJFUzI1NiJ9.{}", URL_SAFE_NO_PAD.encode(payload));
            put_token(&store, sig, hp.as_bytes(), 100);
            let Introspection::Answer(json) =
                introspect(&store, format!("token={sig}").as_bytes(), 10).unwrap()
            else {
                panic!("no answer for {payload}");
            };
            let answer: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(answer["active"], true, "{payload}");
            assert_eq!(answer["token_type"], want, "{payload}");
        }
    }
}
