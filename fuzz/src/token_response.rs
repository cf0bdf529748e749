//! `response`: judging token responses and splitting their bodies.

use crate::support::{jwt, members, signature_bytes, string};
use arbitrary::{Arbitrary, Result, Unstructured};
use serde_json::json;
use split_token_core::issue::response::{classify, split, ResponseAction, SplitError, SplitPlan};
use split_token_core::token::{CompactJws, Signature};
use split_token_core::Config;

const NOW: u64 = 1_700_000_000;

thread_local! {
    static CONFIGS: [Config; 3] = [
        r#"{"token_paths": ["/t"]}"#,
        r#"{"token_paths": ["/t"], "max_ttl_seconds": 60,
            "strip_response_fields": ["refresh_token", "id_token"]}"#,
        r#"{"token_paths": ["/t"], "max_token_response_bytes": 256}"#,
    ]
    .map(|json| Config::from_json(json.as_bytes()).unwrap());
}

/// Raw bytes: any body is split or refused without panicking, and an accepted body satisfies
/// every output property. First byte `0`: a token response built from arbitrary members around
/// a well-formed JWT, whose outcome is known in advance; and `classify` on arbitrary headers.
pub fn token_response(data: &[u8]) {
    CONFIGS.with(|configs| match data.split_first() {
        Some((0, rest)) => {
            let mut u = Unstructured::new(rest);
            let _ = structured(configs, &mut u);
        }
        _ => {
            let config = &configs[data.len() % configs.len()];
            check_split(config, data, NOW);
        }
    });
}

/// Split errors never quote the body: each is a fixed form, a JSON error by category and
/// position only (`syntax error at line 1 column 5`), or a content-free JWS error.
fn error_is_content_free(e: &SplitError) -> bool {
    match e {
        SplitError::NotJsonObject { reason } => {
            let Some((what, position)) = reason.split_once(" at line ") else {
                return false;
            };
            let Some((line, column)) = position.split_once(" column ") else {
                return false;
            };
            ["read error", "syntax error", "not an object", "truncated"].contains(&what)
                && [line, column]
                    .iter()
                    .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }
        SplitError::NotJws(e) => crate::jws::error_is_content_free(e),
        SplitError::Encoded { .. } => false,
        _ => true,
    }
}

/// Seconds an `expires_in` value announces to a client: a JSON number (read as a float, so
/// `1e400` is infinite), or a string of an integer, as OAuth clients read it.
fn announced(raw: &str) -> Option<f64> {
    match serde_json::from_str::<String>(raw) {
        Ok(s) => s.trim().parse::<i64>().ok().map(|v| v as f64),
        Err(_) => raw.parse::<f64>().ok(),
    }
}

/// Properties of `split` for one body; returns the plan when it was accepted.
fn check_split(config: &Config, body: &[u8], now: u64) -> Option<SplitPlan> {
    let result = split(config, body, now);
    let input = members(body);
    let plan = match result {
        Err(e) => {
            if body.len() > config.max_token_response_bytes {
                assert!(matches!(e, SplitError::TooLarge { .. }), "{e:?}");
            }
            assert!(error_is_content_free(&e), "error may quote the body: {e:?}");
            return None;
        }
        Ok(plan) => plan,
    };
    assert!(body.len() <= config.max_token_response_bytes);
    let input = input.expect("split accepted a body that is not one JSON object");
    let output = members(&plan.body).expect("split produced a body that is not a JSON object");

    // The token: access_token was a JWS; the plan holds it whole, the client gets its signature.
    let token: String = input
        .iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| serde_json::from_str(v.get()).unwrap())
        .unwrap();
    assert_eq!(
        plan.jwt(),
        token,
        "plan.jwt() is not the IdP's token byte for byte"
    );
    let jws = CompactJws::parse(&token).unwrap();
    let (hp, sig) = token.rsplit_once('.').unwrap();
    assert_eq!(
        plan.key,
        Signature::parse(sig.as_bytes()).unwrap().store_key()
    );
    let entry = plan.entry();
    assert_eq!(entry.header_payload, hp.as_bytes());
    assert_eq!((entry.key, entry.expires_at), (plan.key, plan.expires_at));

    // Expiry: in the future, and never later than max_ttl_seconds or exp allow.
    assert!(plan.expires_at > now, "accepted an expired token");
    assert!(plan.expires_at <= now.saturating_add(config.max_ttl_seconds));
    if let Some(exp) = jws.exp {
        assert!(
            i128::from(plan.expires_at) <= i128::from(exp),
            "outlives exp"
        );
    }
    let lifetime = plan.expires_at - now;

    // Members: the same names in the same order, stripped ones gone, values byte-identical but
    // access_token (the signature) and expires_in (lowered to the honoured lifetime).
    let kept: Vec<_> = input
        .iter()
        .filter(|(k, _)| !config.strip_response_fields.contains(k))
        .collect();
    assert_eq!(
        output.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        kept.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "members added, lost or reordered"
    );
    for ((name, before), (_, after)) in kept.iter().zip(&output) {
        match name.as_str() {
            "access_token" => {
                assert_eq!(after.get(), serde_json::to_string(sig).unwrap());
            }
            "expires_in" => {
                if after.get() != before.get() {
                    assert_eq!(after.get(), lifetime.to_string());
                }
                if let Some(secs) = announced(after.get()) {
                    assert!(
                        secs <= lifetime as f64,
                        "expires_in {} announces more than the {lifetime} s honoured",
                        after.get()
                    );
                }
            }
            _ => assert_eq!(after.get(), before.get(), "{name} was altered"),
        }
    }

    // header.payload never reaches the client, unless the IdP put it in another member as well.
    let body_text = String::from_utf8(plan.body.clone()).unwrap();
    if body_text.contains(hp) {
        assert!(
            input
                .iter()
                .any(|(k, v)| k.contains(hp) || (k != "access_token" && v.get().contains(hp))),
            "header.payload leaked into the client's body"
        );
    }
    Some(plan)
}

#[derive(Arbitrary, Debug)]
enum ExpiresIn {
    Int(i64),
    Small(u16),
    Float(f64),
    Digits(u32),
    Text(String),
    Tricky(u8),
}

const TRICKY: [&str; 14] = [
    "1e400",
    "-0",
    "3600.5",
    "59.9",
    "1E3",
    "0.0",
    "-1",
    "18446744073709551616",
    "\"3600\"",
    "\" 7200 \"",
    "\"3600.5\"",
    "null",
    "true",
    "{}",
];

impl ExpiresIn {
    fn json(&self) -> String {
        match self {
            Self::Int(n) => n.to_string(),
            Self::Small(n) => n.to_string(),
            Self::Float(f) if f.is_finite() => serde_json::to_string(f).unwrap(),
            Self::Float(_) => "1e400".to_owned(),
            Self::Digits(n) => format!("\"{n}\""),
            Self::Text(s) => serde_json::to_string(s).unwrap(),
            Self::Tricky(i) => TRICKY[usize::from(*i) % TRICKY.len()].to_owned(),
        }
    }
}

/// A token response with a well-formed JWT and arbitrary members around it.
fn structured(configs: &[Config; 3], u: &mut Unstructured<'_>) -> Result<()> {
    // classify: only a success with a body, unencoded, is split.
    let status: [u8; 3] = u.arbitrary()?;
    let encoding: Option<Vec<u8>> = u.arbitrary()?;
    let eos: bool = u.arbitrary()?;
    let action = classify(&status, encoding.as_deref(), eos);
    let success = status[0] == b'2' && &status != b"204";
    let identity = encoding.as_deref().is_none_or(|e| {
        let e = e.trim_ascii();
        e.is_empty() || e.eq_ignore_ascii_case(b"identity")
    });
    match action {
        ResponseAction::PassThrough => assert!(!success),
        ResponseAction::Split => assert!(success && identity && !eos),
        ResponseAction::Fail(SplitError::Encoded { content_encoding }) => {
            assert!(success && !identity);
            assert!(content_encoding.chars().count() <= 32);
        }
        ResponseAction::Fail(SplitError::Empty) => assert!(success && identity && eos),
        ResponseAction::Fail(e) => panic!("classify failed with {e:?}"),
    }

    let config = &configs[usize::from(u.arbitrary::<u8>()?) % configs.len()];
    let now = NOW + u64::from(u.arbitrary::<u16>()?);
    let exp: Option<i32> = u.arbitrary()?;
    let expires_in: Option<ExpiresIn> = u.arbitrary()?;
    let sub = string(u)?;
    let sig = signature_bytes(u.arbitrary()?);
    let mut payload = json!({"sub": sub, "iat": now});
    if let Some(offset) = exp {
        payload["exp"] = json!(i64::try_from(now).unwrap() + i64::from(offset));
    }
    let token = jwt(&json!({"alg": "RS256", "typ": "JWT"}), &payload, &sig);
    let escaped = u.arbitrary::<bool>()?;
    let token_json = if escaped {
        serde_json::to_string(&token)
            .unwrap()
            .replace('.', "\\u002e")
    } else {
        serde_json::to_string(&token).unwrap()
    };

    let mut fields: Vec<(String, String)> = Vec::new();
    let n = u.int_in_range(0..=5)?;
    for _ in 0..n {
        let name = match u.int_in_range(0..=5)? {
            0 => "token_type".to_owned(),
            1 => "scope".to_owned(),
            2 => "refresh_token".to_owned(),
            3 => "id_token".to_owned(),
            4 => "access_token".to_owned(),
            _ => string(u)?,
        };
        let value = crate::support::value(u, 2)?;
        fields.push((name, value.to_string()));
    }
    let at = u.int_in_range(0..=fields.len())?;
    fields.insert(at, ("access_token".to_owned(), token_json));
    if let Some(e) = &expires_in {
        let at = u.int_in_range(0..=fields.len())?;
        fields.insert(at, ("expires_in".to_owned(), e.json()));
    }
    let space = if u.arbitrary()? { " " } else { "" };
    let body = format!(
        "{{{}}}",
        fields
            .iter()
            .map(|(k, v)| format!("{}:{space}{v}", serde_json::to_string(k).unwrap()))
            .collect::<Vec<_>>()
            .join(",")
    );

    let result = check_split(config, body.as_bytes(), now);
    let count = |name: &str| fields.iter().filter(|(k, _)| k == name).count();
    if body.len() > config.max_token_response_bytes {
        assert!(result.is_none());
        return Ok(());
    }
    if count("access_token") > 1 || count("expires_in") > 1 {
        assert!(result.is_none(), "duplicate members were accepted");
        return Ok(());
    }
    // With an integer expires_in (or none), the outcome is known: the earliest of exp,
    // now + expires_in and now + max_ttl_seconds, refused when not in the future.
    let announced = match &expires_in {
        None => None,
        Some(ExpiresIn::Int(n)) => Some(i128::from(*n)),
        Some(ExpiresIn::Small(n)) => Some(i128::from(*n)),
        Some(_) => return Ok(()),
    };
    let now = i128::from(now);
    let mut expected = now + i128::from(config.max_ttl_seconds);
    if let Some(offset) = exp {
        expected = expected.min(now + i128::from(offset));
    }
    if let Some(secs) = announced {
        expected = expected.min(now + secs.max(0));
    }
    match result {
        Some(plan) => assert_eq!(i128::from(plan.expires_at), expected, "wrong expiry"),
        None => assert!(expected <= now, "a splittable response was refused: {body}"),
    }
    Ok(())
}
