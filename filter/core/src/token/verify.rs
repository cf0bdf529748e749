//! Verification at issuance: JWKS parsing, key selection by `kid`, the algorithm allowlist, and
//! the registered-claim checks (`iss`, `aud`, `exp`, `nbf`).
//!
//! Signatures are checked by jwt-compact. The allowlist is enforced before any key is looked at,
//! so `alg: none` and algorithm swaps (an RS256 key's public bytes used as an HS256 secret) are
//! refused whatever the keys are: HMAC keys only ever come from an inline JWKS, and a key is only
//! tried with algorithms of its own type.

use jwt_compact::alg::{
    Ed25519, Es256, Hs256, Hs256Key, Hs384, Hs384Key, Hs512, Hs512Key, Rsa, RsaPublicKey,
};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm, AlgorithmExt, UntrustedToken};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// Algorithms the filter can verify.
pub const SUPPORTED_ALGORITHMS: [&str; 11] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "EdDSA", "HS256", "HS384",
    "HS512",
];

/// The default allowlist: every asymmetric algorithm jwt-compact supports.
pub const DEFAULT_ALGORITHMS: [&str; 8] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "EdDSA",
];

type EsKey = <Es256 as Algorithm>::VerifyingKey;
type EdKey = <Ed25519 as Algorithm>::VerifyingKey;

/// Key material, by type.
#[derive(Clone)]
enum Material {
    Rsa(Box<RsaPublicKey>),
    Es256(Box<EsKey>),
    Ed25519(Box<EdKey>),
    Hmac(Vec<u8>),
}

impl Material {
    fn fits(&self, alg: &str) -> bool {
        match self {
            Self::Rsa(_) => alg.starts_with("RS") || alg.starts_with("PS"),
            Self::Es256(_) => alg == "ES256",
            Self::Ed25519(_) => alg == "EdDSA",
            Self::Hmac(_) => alg.starts_with("HS"),
        }
    }
}

/// One usable key of a JWKS.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<String>,
    material: Material,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.material {
            Material::Rsa(_) => "RSA",
            Material::Es256(_) => "EC P-256",
            Material::Ed25519(_) => "Ed25519",
            Material::Hmac(_) => "oct",
        };
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &kind)
            .finish()
    }
}

/// A parsed JWKS: the keys the filter can use.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
    /// Keys skipped (unsupported type or curve, `use` other than `sig`, symmetric from the network).
    pub skipped: usize,
}

/// Why a JWKS document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwksError {
    /// Not JSON, or no `keys` array.
    Malformed { reason: String },
    /// Parsed, but no key is usable.
    NoUsableKeys { skipped: usize },
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed { reason } => write!(f, "JWKS is malformed: {reason}"),
            Self::NoUsableKeys { skipped } => {
                write!(f, "JWKS has no usable signing key ({skipped} skipped)")
            }
        }
    }
}

impl std::error::Error for JwksError {}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

#[derive(Deserialize)]
struct JwkMeta {
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
}

impl KeySet {
    /// Parses a JWKS. Symmetric (`oct`) keys are kept only when `allow_symmetric` (an inline,
    /// operator-written JWKS); a key set fetched from the network never supplies HMAC secrets.
    pub fn parse(json: &[u8], allow_symmetric: bool) -> Result<Self, JwksError> {
        let raw: RawJwks = serde_json::from_slice(json).map_err(|e| JwksError::Malformed {
            reason: crate::token::describe(&e),
        })?;
        let mut set = KeySet::default();
        for value in raw.keys {
            match Self::key(&value, allow_symmetric) {
                Some(key) => set.keys.push(key),
                None => set.skipped += 1,
            }
        }
        if set.keys.is_empty() {
            return Err(JwksError::NoUsableKeys {
                skipped: set.skipped,
            });
        }
        Ok(set)
    }

    fn key(value: &Value, allow_symmetric: bool) -> Option<Key> {
        let meta: JwkMeta = serde_json::from_value(value.clone()).ok()?;
        if meta.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        let jwk: JsonWebKey<'_> = serde_json::from_value(value.clone()).ok()?;
        let material = match &jwk {
            JsonWebKey::Rsa { .. } => Material::Rsa(Box::new(RsaPublicKey::try_from(&jwk).ok()?)),
            JsonWebKey::EllipticCurve { curve, .. } if curve == "P-256" => {
                Material::Es256(Box::new(EsKey::try_from(&jwk).ok()?))
            }
            JsonWebKey::KeyPair { curve, .. } if curve == "Ed25519" => {
                Material::Ed25519(Box::new(EdKey::try_from(&jwk).ok()?))
            }
            JsonWebKey::Symmetric { secret } if allow_symmetric => {
                Material::Hmac(secret.as_ref().to_vec())
            }
            _ => return None,
        };
        if let Some(alg) = &meta.alg {
            if !material.fits(alg) {
                return None;
            }
        }
        Some(Key {
            kid: meta.kid,
            alg: meta.alg,
            material,
        })
    }

    /// Whether an HMAC secret is among the keys.
    pub fn has_symmetric(&self) -> bool {
        self.keys
            .iter()
            .any(|k| matches!(k.material, Material::Hmac(_)))
    }

    /// Whether a key with this `kid` is present.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// What verification checks besides the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub algorithms: Vec<String>,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub leeway_seconds: u64,
}

/// Why a token failed verification. Messages never quote token content beyond header metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a parseable JWS.
    Malformed,
    /// `alg` is not in the allowlist (`none` never is).
    AlgorithmNotAllowed { alg: String },
    /// No key has the token's `kid`: the key set may be stale.
    UnknownKid { kid: String },
    /// No key of a type that fits `alg`.
    NoKeyForAlgorithm { alg: String },
    /// The signature does not verify with any candidate key.
    BadSignature,
    /// `iss` is missing or not the configured issuer.
    WrongIssuer,
    /// `aud` is missing or names none of the configured audiences.
    WrongAudience,
    /// `exp` is past (beyond the leeway).
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("token is not a parseable JWS"),
            Self::AlgorithmNotAllowed { alg } => write!(f, "algorithm {alg:?} is not allowed"),
            Self::UnknownKid { kid } => write!(f, "no key with kid {kid:?}"),
            Self::NoKeyForAlgorithm { alg } => write!(f, "no key for algorithm {alg:?}"),
            Self::BadSignature => f.write_str("signature does not verify"),
            Self::WrongIssuer => f.write_str("issuer is not the configured one"),
            Self::WrongAudience => f.write_str("audience is not a configured one"),
            Self::Expired => f.write_str("token is expired"),
            Self::NotYetValid => f.write_str("token is not valid yet (nbf)"),
        }
    }
}

impl std::error::Error for VerifyError {}

#[derive(Deserialize)]
struct RegisteredClaims {
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

fn check_signature(alg: &str, material: &Material, token: &UntrustedToken<'_>) -> bool {
    type Claims = jwt_compact::Claims<RegisteredClaims>;
    match material {
        Material::Rsa(key) => match alg.parse::<Rsa>() {
            Ok(rsa) => rsa.validator::<Claims>(key).validate(token).is_ok(),
            Err(_) => false,
        },
        Material::Es256(key) => Es256.validator::<Claims>(key).validate(token).is_ok(),
        Material::Ed25519(key) => Ed25519.validator::<Claims>(key).validate(token).is_ok(),
        Material::Hmac(secret) => match alg {
            "HS256" => Hs256
                .validator::<Claims>(&Hs256Key::new(secret))
                .validate(token)
                .is_ok(),
            "HS384" => Hs384
                .validator::<Claims>(&Hs384Key::new(secret))
                .validate(token)
                .is_ok(),
            "HS512" => Hs512
                .validator::<Claims>(&Hs512Key::new(secret))
                .validate(token)
                .is_ok(),
            _ => false,
        },
    }
}

/// Verifies a compact JWS against `keys` under `policy` at Unix time `now`.
pub fn verify(jwt: &str, keys: &KeySet, policy: &Policy, now: u64) -> Result<(), VerifyError> {
    let token = UntrustedToken::new(jwt).map_err(|_| VerifyError::Malformed)?;
    let alg = token.algorithm();
    if alg.eq_ignore_ascii_case("none") || !policy.algorithms.iter().any(|a| a == alg) {
        return Err(VerifyError::AlgorithmNotAllowed {
            alg: alg.chars().take(16).collect(),
        });
    }
    let kid = token.header().key_id.as_deref();
    let candidates: Vec<&Key> = keys
        .keys
        .iter()
        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
        .collect();
    if candidates.is_empty() {
        return Err(VerifyError::UnknownKid {
            kid: kid.unwrap_or_default().chars().take(64).collect(),
        });
    }
    let fitting: Vec<&Key> = candidates
        .into_iter()
        .filter(|k| k.material.fits(alg) && k.alg.as_deref().is_none_or(|a| a == alg))
        .collect();
    if fitting.is_empty() {
        return Err(VerifyError::NoKeyForAlgorithm {
            alg: alg.to_owned(),
        });
    }
    if !fitting
        .iter()
        .any(|k| check_signature(alg, &k.material, &token))
    {
        return Err(VerifyError::BadSignature);
    }

    let claims = token
        .deserialize_claims_unchecked::<RegisteredClaims>()
        .map_err(|_| VerifyError::Malformed)?;
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let leeway = i64::try_from(policy.leeway_seconds).unwrap_or(0);
    if let Some(exp) = claims.expiration {
        if exp.timestamp().saturating_add(leeway) <= now {
            return Err(VerifyError::Expired);
        }
    }
    if let Some(nbf) = claims.not_before {
        if nbf.timestamp().saturating_sub(leeway) > now {
            return Err(VerifyError::NotYetValid);
        }
    }
    if let Some(issuer) = &policy.issuer {
        if claims.custom.iss.as_deref() != Some(issuer.as_str()) {
            return Err(VerifyError::WrongIssuer);
        }
    }
    if !policy.audiences.is_empty() {
        let matches = match &claims.custom.aud {
            Some(Audience::One(a)) => policy.audiences.contains(a),
            Some(Audience::Many(all)) => all.iter().any(|a| policy.audiences.contains(a)),
            None => false,
        };
        if !matches {
            return Err(VerifyError::WrongAudience);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jwt_compact::{Claims, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs_jwks(kid: &str) -> Vec<u8> {
        json!({"keys": [{"kty": "oct", "kid": kid, "k": URL_SAFE_NO_PAD.encode(SECRET)}]})
            .to_string()
            .into_bytes()
    }

    fn policy(algs: &[&str]) -> Policy {
        Policy {
            algorithms: algs.iter().map(|s| (*s).to_owned()).collect(),
            issuer: None,
            audiences: vec![],
            leeway_seconds: 0,
        }
    }

    fn hs256(kid: Option<&str>, claims: Value) -> String {
        let mut header = Header::empty();
        if let Some(kid) = kid {
            header = header.with_key_id(kid);
        }
        let claims = Claims::new(claims);
        Hs256
            .token(&header, &claims, &Hs256Key::new(SECRET))
            .unwrap()
    }

    fn raw(header: Value, payload: Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// An RSA JWK (public), from RFC 7517 appendix A.1.
    fn rsa_jwks(kid: &str) -> Vec<u8> {
        json!({"keys": [{
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "e": "AQAB",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        }]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn jwks_parsing_keeps_usable_keys_only() {
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "enc", "use": "enc", "e": "AQAB", "n": "AQAB"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "weird"},
        ]});
        let err = KeySet::parse(doc.to_string().as_bytes(), false).unwrap_err();
        assert_eq!(err, JwksError::NoUsableKeys { skipped: 4 });
        let set = KeySet::parse(&rsa_jwks("r1"), false).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert!(set.has_kid("r1"));
        assert!(!set.has_kid("r2"));
        assert!(matches!(
            KeySet::parse(b"{\"nokeys\": 1}", false),
            Err(JwksError::Malformed { .. })
        ));
        // A symmetric key is only taken from an inline (operator-written) JWKS.
        assert!(KeySet::parse(&hs_jwks("h"), false).is_err());
        assert_eq!(KeySet::parse(&hs_jwks("h"), true).unwrap().keys.len(), 1);
    }

    #[test]
    fn hmac_token_verifies_with_the_configured_secret() {
        let keys = KeySet::parse(&hs_jwks("h1"), true).unwrap();
        let token = hs256(Some("h1"), json!({"sub": "a"}));
        assert_eq!(verify(&token, &keys, &policy(&["HS256"]), 0), Ok(()));
        // Same token, HS256 not in the allowlist (the default one).
        assert!(matches!(
            verify(&token, &keys, &policy(&DEFAULT_ALGORITHMS), 0),
            Err(VerifyError::AlgorithmNotAllowed { .. })
        ));
        // One byte of the signature changed.
        let mut tampered = token.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(
            verify(&tampered, &keys, &policy(&["HS256"]), 0),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn alg_none_is_always_rejected() {
        let keys = KeySet::parse(&hs_jwks("h1"), true).unwrap();
        let token = raw(json!({"alg": "none"}), json!({"sub": "a"}), b"");
        let token = token.trim_end_matches('.').to_owned() + ".";
        for algs in [&["none"][..], &["HS256"][..]] {
            assert!(matches!(
                verify(&token, &keys, &policy(algs), 0),
                Err(VerifyError::AlgorithmNotAllowed { .. }) | Err(VerifyError::Malformed)
            ));
        }
    }

    #[test]
    fn rs256_to_hs256_swap_with_the_public_key_as_secret_fails() {
        // The classic confusion: sign HS256 with the RSA public key's bytes.
        let keys = KeySet::parse(&rsa_jwks("r1"), false).unwrap();
        let public_n = b"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86z";
        let header = Header::empty().with_key_id("r1");
        let token = Hs256
            .token(
                &header,
                &Claims::new(json!({"sub": "a"})),
                &Hs256Key::new(public_n),
            )
            .unwrap();
        // Not allowed by the default list...
        assert!(matches!(
            verify(&token, &keys, &policy(&DEFAULT_ALGORITHMS), 0),
            Err(VerifyError::AlgorithmNotAllowed { .. })
        ));
        // ...and even if HS256 were listed, an RSA key is never used as an HMAC secret.
        assert_eq!(
            verify(&token, &keys, &policy(&["HS256", "RS256"]), 0),
            Err(VerifyError::NoKeyForAlgorithm {
                alg: "HS256".into()
            })
        );
    }

    #[test]
    fn unknown_kid_is_reported_for_a_refetch() {
        let keys = KeySet::parse(&hs_jwks("h1"), true).unwrap();
        let token = hs256(Some("rotated"), json!({}));
        assert_eq!(
            verify(&token, &keys, &policy(&["HS256"]), 0),
            Err(VerifyError::UnknownKid {
                kid: "rotated".into()
            })
        );
        // No kid: every fitting key is tried.
        let token = hs256(None, json!({}));
        assert_eq!(verify(&token, &keys, &policy(&["HS256"]), 0), Ok(()));
    }

    #[test]
    fn bad_rsa_signature_fails() {
        let keys = KeySet::parse(&rsa_jwks("r1"), false).unwrap();
        let token = raw(
            json!({"alg": "RS256", "kid": "r1"}),
            json!({"sub": "a"}),
            &[7u8; 256],
        );
        assert_eq!(
            verify(&token, &keys, &policy(&DEFAULT_ALGORITHMS), 0),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn issuer_audience_and_times_are_checked() {
        let keys = KeySet::parse(&hs_jwks("h1"), true).unwrap();
        let mut p = policy(&["HS256"]);
        p.issuer = Some("https://idp".into());
        p.audiences = vec!["api".into(), "web".into()];
        p.leeway_seconds = 10;
        let ok = |claims: Value| verify(&hs256(Some("h1"), claims), &keys, &p, 1_000);
        assert_eq!(ok(json!({"iss": "https://idp", "aud": "api"})), Ok(()));
        assert_eq!(
            ok(json!({"iss": "https://idp", "aud": ["x", "web"]})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"iss": "https://evil", "aud": "api"})),
            Err(VerifyError::WrongIssuer)
        );
        assert_eq!(ok(json!({"aud": "api"})), Err(VerifyError::WrongIssuer));
        assert_eq!(
            ok(json!({"iss": "https://idp", "aud": "other"})),
            Err(VerifyError::WrongAudience)
        );
        assert_eq!(
            ok(json!({"iss": "https://idp"})),
            Err(VerifyError::WrongAudience)
        );
        let base = json!({"iss": "https://idp", "aud": "api"});
        let with = |k: &str, v: i64| {
            let mut c = base.clone();
            c[k] = json!(v);
            c
        };
        assert_eq!(ok(with("exp", 995)), Ok(())); // within leeway
        assert_eq!(ok(with("exp", 990)), Err(VerifyError::Expired)); // expired at issuance
        assert_eq!(ok(with("nbf", 1_005)), Ok(()));
        assert_eq!(ok(with("nbf", 1_011)), Err(VerifyError::NotYetValid));
    }
}
