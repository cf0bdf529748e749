//! `config`: parsing and validating the filter configuration, and routing by path.

use crate::support::string;
use arbitrary::{Result, Unstructured};
use serde_json::{json, Map, Value};
use split_token_core::claims::check_header_name;
use split_token_core::config::{
    KeySource, MAX_LOCAL_CACHE_ENTRIES, MAX_SLOT_CAPACITY, MAX_STORE_SLOTS,
    MAX_TOKEN_RESPONSE_BYTES,
};
use split_token_core::token::verify::SUPPORTED_ALGORITHMS;
use split_token_core::{Config, ConfigError, Route};

const FIELDS: [&str; 18] = [
    "introspection",
    "token_paths",
    "revocation_paths",
    "logout_paths",
    "public_prefixes",
    "full_jwt",
    "strip_response_fields",
    "max_ttl_seconds",
    "store_slots",
    "slot_capacity",
    "store_prefix",
    "realm",
    "max_token_response_bytes",
    "verify",
    "claims_to_headers",
    "forward_jwt",
    "local_cache_entries",
    "recompute_route",
];

const VERIFY_FIELDS: [&str; 11] = [
    "jwks",
    "jwks_cluster",
    "jwks_path",
    "jwks_authority",
    "refresh_seconds",
    "fetch_timeout_ms",
    "min_refetch_seconds",
    "algorithms",
    "issuer",
    "audiences",
    "leeway_seconds",
];

/// Raw bytes: never panics, is deterministic, and an accepted configuration satisfies every
/// documented bound. First byte `0`: a JSON object built from the known fields with plausible
/// and implausible values; a refusal must then name a field the input set.
pub fn config(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            let mut u = Unstructured::new(rest);
            if let Ok(doc) = object(&mut u) {
                let bytes = doc.to_string().into_bytes();
                if let Err(ConfigError::Invalid { field, .. }) = check(&bytes) {
                    let top = field.split(['.', '[']).next().unwrap();
                    assert!(doc.get(top).is_some(), "{field} blamed but not set: {doc}");
                }
            }
        }
        _ => {
            let _ = check(data);
        }
    }
}

fn check(bytes: &[u8]) -> std::result::Result<(), ConfigError> {
    let parsed = Config::from_json(bytes);
    let again = Config::from_json(bytes);
    match (&parsed, &again) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a, b, "not deterministic"),
        _ => panic!("not deterministic"),
    }
    match parsed {
        Err(ConfigError::Missing) => {
            assert!(bytes.iter().all(u8::is_ascii_whitespace));
            Err(ConfigError::Missing)
        }
        Err(e @ ConfigError::Syntax { .. }) => {
            assert!(e.to_string().starts_with("configuration: "));
            Err(e)
        }
        Err(ConfigError::Invalid { field, reason }) => {
            // Every refusal names the field at fault, first.
            let e = ConfigError::Invalid {
                field: field.clone(),
                reason: reason.clone(),
            };
            assert_eq!(e.to_string(), format!("{field}: {reason}"));
            assert!(is_field_name(&field), "{field:?} is not a field name");
            Err(e)
        }
        Err(e) => panic!("unexpected error kind {e:?}"),
        Ok(c) => {
            accepted(bytes, &c);
            Ok(())
        }
    }
}

/// A known top-level field, then any `[index]` and `.member` steps: `store_slots`,
/// `token_paths[1]`, `claims_to_headers[0].header`, `verify.algorithms[2]`.
fn is_field_name(field: &str) -> bool {
    let top = field.find(['.', '[']).unwrap_or(field.len());
    if !FIELDS.contains(&&field[..top]) {
        return false;
    }
    let mut rest = &field[top..];
    while !rest.is_empty() {
        let (step, after) = if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return false;
            };
            (&r[..end], &r[end + 1..])
        } else if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            (&r[..end], &r[end..])
        } else {
            return false;
        };
        let index = rest.starts_with('[');
        let ok = !step.is_empty()
            && step.bytes().all(|b| {
                if index {
                    b.is_ascii_digit()
                } else {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
                }
            });
        if !ok {
            return false;
        }
        rest = after;
    }
    true
}

fn plain_path(p: &str) -> bool {
    p.starts_with('/') && !p.contains(['?', '#']) && !p.bytes().any(|b| b <= b' ' || b == 0x7f)
}

fn printable_header_value(s: &str) -> bool {
    s.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// The invariants a validated configuration promises (docs/config.md).
fn accepted(bytes: &[u8], c: &Config) {
    let doc: Value = serde_json::from_slice(bytes).unwrap();
    let obj = doc.as_object().unwrap();
    assert!(
        obj.keys().all(|k| FIELDS.contains(&k.as_str())),
        "unknown field accepted"
    );
    if let Some(v) = obj.get("verify").and_then(Value::as_object) {
        assert!(
            v.keys().all(|k| VERIFY_FIELDS.contains(&k.as_str())),
            "unknown verify field"
        );
    }

    assert!(!c.token_paths.is_empty());
    assert!(c.token_paths.iter().all(|p| plain_path(p)));
    assert!(c.public_prefixes.iter().all(|p| plain_path(p)));
    for t in &c.token_paths {
        assert!(!c.public_prefixes.iter().any(|p| t.starts_with(p.as_str())));
        assert_eq!(c.route(t.as_bytes()), Route::TokenEndpoint);
        assert_eq!(
            c.route(format!("{t}?x=1#f").as_bytes()),
            Route::TokenEndpoint
        );
    }
    // Revocation and logout paths: plain, each handled once, never made public.
    for (paths, route) in [
        (&c.revocation_paths, Route::Revocation),
        (&c.logout_paths, Route::Logout),
    ] {
        for p in paths {
            assert!(plain_path(p));
            assert!(!c.token_paths.contains(p));
            assert!(!c.public_prefixes.iter().any(|q| p.starts_with(q.as_str())));
            assert_eq!(c.route(p.as_bytes()), route);
        }
    }
    assert!(!c
        .revocation_paths
        .iter()
        .any(|p| c.logout_paths.contains(p)));
    for p in &c.public_prefixes {
        assert_eq!(c.route(p.as_bytes()), Route::Public);
        assert_eq!(c.route(format!("{p}x?y").as_bytes()), Route::Public);
    }
    for f in &c.strip_response_fields {
        assert!(!f.is_empty() && f != "access_token");
    }
    assert!((1..=366 * 86_400).contains(&c.max_ttl_seconds));
    assert!((1..=MAX_STORE_SLOTS).contains(&c.store_slots));
    assert!((1..=MAX_SLOT_CAPACITY).contains(&c.slot_capacity));
    assert!((1..=256).contains(&c.store_prefix.len()));
    assert!((256..=MAX_TOKEN_RESPONSE_BYTES).contains(&c.max_token_response_bytes));
    assert!(c.local_cache_entries <= MAX_LOCAL_CACHE_ENTRIES);

    // The challenges are header values with one quoted-string realm.
    let realm = c
        .challenge
        .strip_prefix("Bearer realm=\"")
        .and_then(|r| r.strip_suffix('"'))
        .unwrap();
    assert!((1..=128).contains(&realm.len()));
    assert!(!realm.contains(['"', '\\']));
    for challenge in [
        &c.challenge,
        &c.challenge_invalid_token,
        &c.challenge_invalid_request,
    ] {
        assert!(printable_header_value(challenge), "{challenge:?}");
        assert!(challenge.starts_with(&c.challenge));
    }
    for challenge in [
        &c.challenge_dpop_invalid_token,
        &c.challenge_dpop_invalid_proof,
    ] {
        assert!(printable_header_value(challenge), "{challenge:?}");
        assert!(challenge.starts_with(&format!("DPoP realm=\"{realm}\", error=")));
    }

    for (i, m) in c.claims_to_headers.iter().enumerate() {
        assert_eq!(check_header_name(&m.header), Ok(m.header.clone()));
        assert!(c.claims_to_headers[..i]
            .iter()
            .all(|o| o.header != m.header));
        assert!(!m.claim.to_string().is_empty());
    }

    if let Some(v) = &c.verify {
        let algs = &v.policy.algorithms;
        assert!(!algs.is_empty());
        for alg in algs {
            assert!(SUPPORTED_ALGORITHMS.contains(&alg.as_str()));
            if alg.starts_with("HS") {
                assert!(matches!(&v.source, KeySource::Inline(k) if k.has_symmetric()));
            }
        }
        match &v.source {
            KeySource::Inline(keys) => assert!(!keys.keys.is_empty()),
            KeySource::Remote {
                cluster,
                path,
                authority,
            } => {
                assert!(!cluster.is_empty());
                assert!(path.as_deref().is_none_or(
                    |p| p.starts_with('/') && !p.bytes().any(|b| b <= b' ' || b == 0x7f)
                ));
                let _ = authority;
            }
        }
        assert!((1..=86_400).contains(&v.refresh_seconds));
        assert!((100..=60_000).contains(&v.fetch_timeout_ms));
        assert!(v.min_refetch_seconds <= 3_600);
        assert!(v.policy.leeway_seconds <= 600);
        assert!(v.policy.audiences.iter().all(|a| !a.is_empty()));
    }
}

fn path(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(json!(match u.int_in_range(0..=4)? {
        0 => "/auth/token".to_owned(),
        1 => "/public/".to_owned(),
        2 => format!("/{}", string(u)?),
        3 => "/".to_owned(),
        _ => string(u)?,
    }))
}

fn list(
    u: &mut Unstructured<'_>,
    item: fn(&mut Unstructured<'_>) -> Result<Value>,
) -> Result<Value> {
    let n = u.int_in_range(0..=3)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(item(u)?);
    }
    Ok(Value::Array(items))
}

/// A number near the interesting bounds, or any.
fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    const EDGES: [i64; 14] = [
        -1, 0, 1, 8, 60, 99, 100, 255, 256, 600, 3_600, 86_400, 31_622_401, 4_194_305,
    ];
    Ok(match u.int_in_range(0..=2)? {
        0 => json!(*u.choose(&EDGES)?),
        1 => json!(u.arbitrary::<u64>()?),
        _ => json!(u.arbitrary::<u16>()?),
    })
}

fn text(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(json!(string(u)?))
}

fn claim_mapping(u: &mut Unstructured<'_>) -> Result<Value> {
    let claim = if u.arbitrary()? {
        text(u)?
    } else {
        list(u, text)?
    };
    let header = match u.int_in_range(0..=3)? {
        0 => json!("x-user-id"),
        1 => json!("X-User-Roles"),
        2 => json!("authorization"),
        _ => text(u)?,
    };
    Ok(json!({"claim": claim, "header": header}))
}

fn algorithm(u: &mut Unstructured<'_>) -> Result<Value> {
    const ALGS: [&str; 5] = ["RS256", "HS256", "none", "ES256", "rs256"];
    Ok(if u.arbitrary()? {
        json!(*u.choose(&ALGS)?)
    } else {
        text(u)?
    })
}

fn verify(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut v = Map::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let field = *u.choose(&VERIFY_FIELDS)?;
        let value = match field {
            "jwks" => match u.int_in_range(0..=2)? {
                0 => json!({"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}]}),
                1 => json!({"keys": []}),
                _ => crate::support::value(u, 2)?,
            },
            "jwks_cluster" | "jwks_authority" | "issuer" => text(u)?,
            "jwks_path" => path(u)?,
            "algorithms" => list(u, algorithm)?,
            "audiences" => list(u, text)?,
            _ => number(u)?,
        };
        v.insert(field.to_owned(), value);
    }
    Ok(Value::Object(v))
}

fn object(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut doc = Map::new();
    doc.insert("token_paths".to_owned(), list(u, path)?);
    for _ in 0..u.int_in_range(0..=6)? {
        let field = *u.choose(&FIELDS)?;
        let value = match field {
            "token_paths" | "public_prefixes" | "revocation_paths" | "logout_paths" => {
                list(u, path)?
            }
            "full_jwt" => json!(*u.choose(&["reject", "allow", "maybe"])?),
            "strip_response_fields" => list(u, text)?,
            "store_prefix" | "realm" => text(u)?,
            "verify" => verify(u)?,
            "introspection" => {
                let client = |u: &mut Unstructured<'_>| -> Result<Value> {
                    Ok(json!({"client_id": string(u)?, "client_secret_sha256": string(u)?}))
                };
                json!({"paths": list(u, path)?, "clients": list(u, client)?})
            }
            "claims_to_headers" => list(u, claim_mapping)?,
            "forward_jwt" | "recompute_route" => json!(u.arbitrary::<bool>()?),
            _ => number(u)?,
        };
        doc.insert(field.to_owned(), value);
    }
    Ok(Value::Object(doc))
}
