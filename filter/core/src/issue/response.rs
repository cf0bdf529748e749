//! Rewriting token responses: `access_token` becomes its signature, the rest stays.
//!
//! The body is parsed as a JSON object into `(key, raw value)` pairs in their original order, so
//! every field the filter does not touch is copied byte for byte. Anything that is not a clean
//! single JSON object with one compact-JWS `access_token` is refused: the caller fails closed.

use crate::config::Config;
use crate::store::Entry;
use crate::token::{CompactJws, JwsError, StoreKey};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// Why a token response could not be split. Messages never contain token material.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SplitError {
    /// The IdP compressed the body although the filter asked for identity.
    Encoded { content_encoding: String },
    /// The body is larger than `max_token_response_bytes`.
    TooLarge { limit: usize },
    /// A 200 with no body.
    Empty,
    /// The body is not a single JSON object.
    NotJsonObject { reason: String },
    /// The object has no `access_token` member.
    NoAccessToken,
    /// `access_token` or `expires_in` appears more than once (clients would disagree on which).
    DuplicateMember { name: &'static str },
    /// `access_token` is not a JSON string.
    AccessTokenNotString,
    /// `access_token` is not a compact JWS.
    NotJws(JwsError),
    /// The token is already expired (by `exp` or `expires_in`).
    AlreadyExpired,
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Encoded { content_encoding } => {
                write!(
                    f,
                    "token response is encoded ({content_encoding:?}), expected identity"
                )
            }
            Self::TooLarge { limit } => {
                write!(
                    f,
                    "token response body exceeds max_token_response_bytes ({limit})"
                )
            }
            Self::Empty => f.write_str("token response has no body"),
            Self::NotJsonObject { reason } => {
                write!(f, "token response is not a JSON object: {reason}")
            }
            Self::NoAccessToken => f.write_str("token response has no access_token"),
            Self::DuplicateMember { name } => {
                write!(f, "token response has more than one {name}")
            }
            Self::AccessTokenNotString => f.write_str("access_token is not a string"),
            Self::NotJws(e) => e.fmt(f),
            Self::AlreadyExpired => f.write_str("access_token is already expired"),
        }
    }
}

impl std::error::Error for SplitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NotJws(e) => Some(e),
            _ => None,
        }
    }
}

/// A split token response: the body to send and the entry to store first.
pub struct SplitPlan {
    /// The rewritten JSON body.
    pub body: Vec<u8>,
    /// SHA-256 of the signature.
    pub key: StoreKey,
    /// When the entry expires, Unix seconds.
    pub expires_at: u64,
    header_payload: String,
    signature: String,
}

/// Never print token material, even in a debug log.
impl fmt::Debug for SplitPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitPlan")
            .field("body_len", &self.body.len())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl SplitPlan {
    /// The whole JWT, for verification. Never log it.
    pub fn jwt(&self) -> String {
        format!("{}.{}", self.header_payload, self.signature)
    }

    /// The store entry for this token.
    pub fn entry(&self) -> Entry<'_> {
        Entry {
            key: self.key,
            expires_at: self.expires_at,
            header_payload: self.header_payload.as_bytes(),
        }
    }
}

/// What to do with a token endpoint's response, judged from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseAction {
    /// Not a success: let it through untouched (OAuth errors, redirects...).
    PassThrough,
    /// A 200 to buffer and split.
    Split,
    /// A 200 that cannot be split; fail closed.
    Fail(SplitError),
}

/// Judges a token endpoint's response headers.
pub fn classify(
    status: &[u8],
    content_encoding: Option<&[u8]>,
    end_of_stream: bool,
) -> ResponseAction {
    // RFC 6749 answers a token request with 200; any other success carrying a body (201, 203...)
    // is treated the same way, so an unusual IdP cannot slip a full JWT past the filter.
    let success = status.len() == 3 && status.first() == Some(&b'2');
    if !success || status == b"204" {
        return ResponseAction::PassThrough;
    }
    if let Some(enc) = content_encoding {
        let enc = enc.trim_ascii();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case(b"identity") {
            return ResponseAction::Fail(SplitError::Encoded {
                content_encoding: String::from_utf8_lossy(enc).chars().take(32).collect(),
            });
        }
    }
    if end_of_stream {
        return ResponseAction::Fail(SplitError::Empty);
    }
    ResponseAction::Split
}

/// A JSON object as its members in order, values unparsed.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// `expires_in` as seconds: a JSON number, or a string of digits (some IdPs). A negative value
/// means already expired. Kept as a float, fraction and all, so that the rewrite compares what
/// the client reads: a JSON number is read by Rust's parser, which takes every JSON number
/// (serde_json refuses `1e400`; this reads it as infinity).
fn expires_in(raw: &RawValue) -> Option<f64> {
    let text = raw.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).ok()?;
        return s.trim().parse::<i64>().ok().map(|v| v as f64);
    }
    text.parse::<f64>().ok()
}

/// Splits a buffered 200 token response.
pub fn split(config: &Config, body: &[u8], now: u64) -> Result<SplitPlan, SplitError> {
    if body.len() > config.max_token_response_bytes {
        return Err(SplitError::TooLarge {
            limit: config.max_token_response_bytes,
        });
    }
    if body.trim_ascii().is_empty() {
        return Err(SplitError::Empty);
    }
    let Members(members) = serde_json::from_slice(body).map_err(|e| SplitError::NotJsonObject {
        reason: crate::token::describe(&e),
    })?;

    for name in ["access_token", "expires_in"] {
        if members.iter().filter(|(k, _)| k == name).count() > 1 {
            return Err(SplitError::DuplicateMember { name });
        }
    }
    let (_, raw_token) = members
        .iter()
        .find(|(k, _)| k == "access_token")
        .ok_or(SplitError::NoAccessToken)?;
    let token: String =
        serde_json::from_str(raw_token.get()).map_err(|_| SplitError::AccessTokenNotString)?;
    let jws = CompactJws::parse(&token).map_err(SplitError::NotJws)?;

    let mut expires_at = now.saturating_add(config.max_ttl_seconds);
    if let Some(exp) = jws.exp {
        expires_at = expires_at.min(u64::try_from(exp).unwrap_or(0));
    }
    let announced = members
        .iter()
        .find(|(k, _)| k == "expires_in")
        .and_then(|(_, v)| expires_in(v));
    if let Some(secs) = announced {
        // `as` saturates: negative is 0, infinite is u64::MAX, a fraction is dropped.
        expires_at = expires_at.min(now.saturating_add(secs as u64));
    }
    if expires_at <= now {
        return Err(SplitError::AlreadyExpired);
    }
    // Tell the client the lifetime the gateway will honour when it is shorter than announced.
    let lifetime = expires_at - now;
    let rewrite_expires_in = announced.is_some_and(|secs| secs > lifetime as f64);

    let signature = jws.signature();
    let mut out = Vec::with_capacity(body.len());
    out.push(b'{');
    let mut first = true;
    for (key, value) in &members {
        if config.strip_response_fields.iter().any(|f| f == key) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        // Writing into a Vec cannot fail, and a String always serializes.
        let _ = serde_json::to_writer(&mut out, key);
        out.push(b':');
        if key == "access_token" {
            let _ = serde_json::to_writer(&mut out, signature.as_str());
        } else if key == "expires_in" && rewrite_expires_in {
            let _ = serde_json::to_writer(&mut out, &lifetime);
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    out.push(b'}');

    Ok(SplitPlan {
        body: out,
        key: signature.store_key(),
        expires_at,
        header_payload: jws.header_payload().to_owned(),
        signature: signature.as_str().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::tests::JWT;
    use crate::token::Signature;

    fn config(extra: &str) -> Config {
        Config::from_json(format!(r#"{{"token_paths": ["/t"]{extra}}}"#).as_bytes()).unwrap()
    }

    fn body_with(token: &str) -> String {
        format!(
            r#"{{"access_token": "{token}", "token_type": "Bearer", "expires_in": 3600, "scope": "a b"}}"#
        )
    }

    #[test]
    fn rewrites_access_token_to_the_signature_and_keeps_the_rest() {
        let plan = split(&config(""), body_with(JWT).as_bytes(), 1_000).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
        let sig = JWT.rsplit('.').next().unwrap();
        assert_eq!(v["access_token"], sig);
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 3600);
        assert_eq!(v["scope"], "a b");
        let body = String::from_utf8(plan.body.clone()).unwrap();
        assert!(!body.contains("eyJ"), "{body}");
        // Field order is kept.
        assert!(body.find("token_type").unwrap() < body.find("scope").unwrap());
        assert_eq!(
            plan.key,
            Signature::parse(sig.as_bytes()).unwrap().store_key()
        );
        let entry = plan.entry();
        assert_eq!(
            format!(
                "{}.{sig}",
                std::str::from_utf8(entry.header_payload).unwrap()
            ),
            JWT
        );
        assert_eq!(plan.expires_at, 1_000 + 3600);
        assert_eq!(plan.jwt(), JWT);
    }

    #[test]
    fn expiry_is_the_earliest_of_exp_expires_in_and_max_ttl() {
        let c = config(r#", "max_ttl_seconds": 60"#);
        assert_eq!(
            split(&c, body_with(JWT).as_bytes(), 1_000)
                .unwrap()
                .expires_at,
            1_060
        );
        let c = config("");
        // exp = 2_000_000_000, expires_in 3600 later than that.
        let now = 2_000_000_000 - 10;
        assert_eq!(
            split(&c, body_with(JWT).as_bytes(), now)
                .unwrap()
                .expires_at,
            2_000_000_000
        );
        let no_expires_in = format!(r#"{{"access_token": "{JWT}"}}"#);
        assert_eq!(
            split(&c, no_expires_in.as_bytes(), 5).unwrap().expires_at,
            5 + 86_400
        );
        let string_expires_in = format!(r#"{{"access_token": "{JWT}", "expires_in": "30"}}"#);
        assert_eq!(
            split(&c, string_expires_in.as_bytes(), 5)
                .unwrap()
                .expires_at,
            35
        );
    }

    #[test]
    fn expires_in_is_shortened_to_what_the_gateway_honours() {
        let c = config(r#", "max_ttl_seconds": 60"#);
        let plan = split(&c, body_with(JWT).as_bytes(), 1_000).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
        assert_eq!(v["expires_in"], 60);
        let c = config("");
        let plan = split(&c, body_with(JWT).as_bytes(), 1_000).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
        assert_eq!(
            v["expires_in"], 3600,
            "unchanged when the gateway honours it all"
        );
    }

    #[test]
    fn expires_in_beyond_what_is_honoured_is_always_rewritten() {
        // Found by fuzz target token_response: `1e400` (too large for serde_json) and `3600.5`
        // (floored to the 3600 s honoured) were passed to the client unchanged.
        let c = config(r#", "max_ttl_seconds": 3600"#);
        for (announced, honoured) in [("1e400", 3600), ("3600.5", 3600), ("\"7200\"", 3600)] {
            let body = format!(r#"{{"access_token": "{JWT}", "expires_in": {announced}}}"#);
            let plan = split(&c, body.as_bytes(), 1_000).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
            assert_eq!(v["expires_in"], honoured, "{announced}");
            assert_eq!(plan.expires_at, 1_000 + honoured, "{announced}");
        }
        // The fraction is not honoured, and the client is told so.
        let fraction = format!(r#"{{"access_token": "{JWT}", "expires_in": 59.9}}"#);
        let plan = split(&c, fraction.as_bytes(), 1_000).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
        assert_eq!((plan.expires_at, &v["expires_in"]), (1_059, &59.into()));
        // What the gateway honours in full is kept as the IdP wrote it.
        let exact = format!(r#"{{"access_token": "{JWT}", "expires_in": "3600"}}"#);
        let plan = split(&c, exact.as_bytes(), 1_000).unwrap();
        assert!(String::from_utf8(plan.body)
            .unwrap()
            .ends_with(r#""expires_in":"3600"}"#));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let c = config("");
        assert_eq!(
            split(&c, body_with(JWT).as_bytes(), 2_000_000_000).unwrap_err(),
            SplitError::AlreadyExpired
        );
        let zero = format!(r#"{{"access_token": "{JWT}", "expires_in": 0}}"#);
        assert_eq!(
            split(&c, zero.as_bytes(), 5).unwrap_err(),
            SplitError::AlreadyExpired
        );
    }

    #[test]
    fn strip_response_fields_removes_them() {
        let c = config(r#", "strip_response_fields": ["scope", "absent"]"#);
        let plan = split(&c, body_with(JWT).as_bytes(), 0).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
        assert!(v.get("scope").is_none());
        assert_eq!(v["token_type"], "Bearer");
    }

    #[test]
    fn escaped_access_token_is_decoded() {
        let escaped = JWT.replace('.', "\\u002e");
        let plan = split(&config(""), body_with(&escaped).as_bytes(), 0).unwrap();
        let entry = plan.entry();
        assert!(JWT.starts_with(std::str::from_utf8(entry.header_payload).unwrap()));
    }

    #[test]
    fn unsplittable_bodies_fail_with_a_named_reason() {
        let c = config(r#", "max_token_response_bytes": 1024"#);
        let big = format!(
            r#"{{"access_token": "{JWT}", "pad": "{}"}}"#,
            "x".repeat(2000)
        );
        type Check = fn(&SplitError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("not json".into(), |e| {
                matches!(e, SplitError::NotJsonObject { .. })
            }),
            ("[1,2]".into(), |e| {
                matches!(e, SplitError::NotJsonObject { .. })
            }),
            ("\"str\"".into(), |e| {
                matches!(e, SplitError::NotJsonObject { .. })
            }),
            (format!(r#"{{"access_token": "{JWT}"}} trailing"#), |e| {
                matches!(e, SplitError::NotJsonObject { .. })
            }),
            ("{}".into(), |e| *e == SplitError::NoAccessToken),
            (r#"{"access_token": null}"#.into(), |e| {
                *e == SplitError::AccessTokenNotString
            }),
            (r#"{"access_token": 5}"#.into(), |e| {
                *e == SplitError::AccessTokenNotString
            }),
            (r#"{"access_token": {}}"#.into(), |e| {
                *e == SplitError::AccessTokenNotString
            }),
            (r#"{"access_token": ""}"#.into(), |e| {
                matches!(e, SplitError::NotJws(_))
            }),
            (r#"{"access_token": "opaque"}"#.into(), |e| {
                matches!(e, SplitError::NotJws(_))
            }),
            (
                format!(r#"{{"access_token": "{JWT}", "access_token": "{JWT}"}}"#),
                |e| {
                    *e == SplitError::DuplicateMember {
                        name: "access_token",
                    }
                },
            ),
            (
                format!(r#"{{"access_token": "{JWT}", "expires_in": 5, "expires_in": 9}}"#),
                |e| *e == SplitError::DuplicateMember { name: "expires_in" },
            ),
            ("   ".into(), |e| *e == SplitError::Empty),
            (big, |e| matches!(e, SplitError::TooLarge { .. })),
        ];
        for (body, check) in cases {
            let err = split(&c, body.as_bytes(), 0).unwrap_err();
            assert!(check(&err), "{body:.60}: {err:?}");
            assert!(!err.to_string().contains("eyJ"), "{err}");
        }
    }

    #[test]
    fn error_messages_never_quote_the_body() {
        let secret_claims = r#"{"access_token": "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.c2ln"}"#;
        let err = split(&config(""), secret_claims.as_bytes(), 0).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = split(&config(""), br#"{"a": "secret-value" "b"}"#, 0).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn classify_passes_errors_and_refuses_encodings() {
        assert_eq!(classify(b"400", None, false), ResponseAction::PassThrough);
        assert_eq!(classify(b"204", None, true), ResponseAction::PassThrough);
        assert_eq!(classify(b"201", None, false), ResponseAction::Split);
        assert_eq!(classify(b"203", None, false), ResponseAction::Split);
        assert_eq!(classify(b"302", None, true), ResponseAction::PassThrough);
        assert_eq!(classify(b"200", None, false), ResponseAction::Split);
        assert_eq!(
            classify(b"200", Some(b"identity"), false),
            ResponseAction::Split
        );
        assert!(matches!(
            classify(b"200", Some(b"gzip"), false),
            ResponseAction::Fail(SplitError::Encoded { .. })
        ));
        assert_eq!(
            classify(b"200", None, true),
            ResponseAction::Fail(SplitError::Empty)
        );
    }
}
