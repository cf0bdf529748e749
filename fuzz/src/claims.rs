//! `claims`: claim paths, header names, rendering claim values and projecting a stored payload.

use crate::support::{b64, is_safe_header_value, string, value};
use arbitrary::{Result, Unstructured};
use serde_json::Value;
use split_token_core::claims::{
    check_header_name, is_dpop_bound, project, render, ClaimHeader, ClaimPath, Rendered,
};

/// First byte `0`: an arbitrary claims object, mappings and header names; any other: the bytes
/// are a stored `header.payload` projected through fixed mappings.
pub fn claims(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            let _ = structured(&mut Unstructured::new(rest));
        }
        _ => {
            let mappings = fixed_mappings();
            check_projection(data, &mappings, None);
            check_dpop_bound(data);
        }
    }
}

fn fixed_mappings() -> Vec<ClaimHeader> {
    [
        ("sub", "x-user-id"),
        ("realm_access.roles", "x-user-roles"),
        ("email", "x-user-email"),
        ("a.b", "x-a-b"),
    ]
    .iter()
    .map(|(claim, header)| ClaimHeader {
        claim: ClaimPath::parse(claim).unwrap(),
        header: check_header_name(header).unwrap(),
    })
    .collect()
}

/// A rendered value is a safe header value; strings are as they are, scalars in JSON form,
/// non-empty arrays of scalars split back into their elements, the rest is compact JSON; a
/// refusal has a reason.
fn check_render(v: &Value) {
    let rendered = render(v);
    assert_eq!(rendered, render(v), "not deterministic");
    let is_scalar = |i: &Value| matches!(i, Value::String(_) | Value::Number(_) | Value::Bool(_));
    match (&rendered, v) {
        (Rendered::Absent, Value::Null) => {}
        (Rendered::Absent, _) | (_, Value::Null) => panic!("{v} rendered as {rendered:?}"),
        (Rendered::Value(text), _) => {
            assert!(is_safe_header_value(text), "unsafe header value {text:?}");
            match v {
                Value::String(s) => assert_eq!(text, s),
                Value::Array(items) if !items.is_empty() && items.iter().all(is_scalar) => {
                    let parts: Vec<&str> = text.split(',').collect();
                    assert_eq!(parts.len(), items.len(), "ambiguous list {text:?}");
                    for (part, item) in parts.iter().zip(items) {
                        assert_eq!(render(item), Rendered::Value((*part).to_owned()));
                    }
                }
                Value::Array(items) if items.is_empty() => assert_eq!(text, ""),
                // JSON form, compact (serde_json's float parsing is not exact: compare text).
                _ => {
                    assert_eq!(text, &v.to_string());
                    assert!(serde_json::from_str::<Value>(text).is_ok());
                }
            }
        }
        (Rendered::Unsafe, _) => {
            let naive = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let comma_item = matches!(v, Value::Array(items)
                if items.iter().any(|i| i.as_str().is_some_and(|s| s.contains(','))));
            let control_item = matches!(v, Value::Array(items)
                if items.iter().any(|i| i.as_str().is_some_and(|s| !is_safe_header_value(s))));
            assert!(
                !is_safe_header_value(&naive) || comma_item || control_item,
                "{v} refused without a reason"
            );
        }
    }
}

/// `is_dpop_bound` is exactly "the payload is a JSON object whose `cnf` is an object with a
/// string `jkt`" (RFC 9449 §6.1), however the JSON is written.
fn check_dpop_bound(hp: &[u8]) {
    let reference = hp
        .iter()
        .position(|&b| b == b'.')
        .and_then(|dot| {
            base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                &hp[dot + 1..],
            )
            .ok()
        })
        .and_then(|json| serde_json::from_slice::<Value>(&json).ok())
        .is_some_and(|claims| {
            claims
                .get("cnf")
                .and_then(|c| c.get("jkt"))
                .is_some_and(Value::is_string)
        });
    assert_eq!(
        is_dpop_bound(hp),
        reference,
        "is_dpop_bound disagrees with the payload"
    );
}

/// Every sub-value of `v`, `v` first.
fn walk<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
    out.push(v);
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
        Value::Object(map) => map.values().for_each(|i| walk(i, out)),
        _ => {}
    }
}

/// The projection is deterministic, names only configured mappings (each at most once, in
/// order) and matches rendering each mapping's claim on its own.
fn check_projection(hp: &[u8], mappings: &[ClaimHeader], claims: Option<&Value>) {
    let p = project(hp, mappings);
    assert_eq!(p, project(hp, mappings), "not deterministic");
    let mut last = None;
    for (i, text) in &p.headers {
        assert!(*i < mappings.len(), "a header no mapping names");
        assert!(
            last.is_none_or(|l| l < *i),
            "mappings out of order or repeated"
        );
        last = Some(*i);
        assert!(is_safe_header_value(text), "unsafe header value {text:?}");
    }
    assert!(p.headers.len() + usize::try_from(p.unsafe_dropped).unwrap() <= mappings.len());
    if let Some(claims) = claims {
        // The claims as `project` reads them: serde_json's float parsing is not exact (without
        // its `float_roundtrip` feature), so a float claim may render one ULP away from the
        // token's text; compare against the same reading.
        let reread: Value = serde_json::from_str(&claims.to_string()).unwrap();
        let claims = &reread;
        let mut headers = Vec::new();
        let mut dropped = 0;
        for (i, m) in mappings.iter().enumerate() {
            match m.claim.find(claims).map_or(Rendered::Absent, render) {
                Rendered::Value(v) => headers.push((i, v)),
                Rendered::Absent => {}
                Rendered::Unsafe => dropped += 1,
            }
        }
        assert_eq!((p.headers, p.unsafe_dropped), (headers, dropped));
    }
}

fn structured(u: &mut Unstructured<'_>) -> Result<()> {
    let mut claims = value(u, 3)?;
    if let (Value::Object(map), true) = (&mut claims, u.arbitrary::<bool>()?) {
        let jkt = if u.arbitrary()? {
            Value::String(string(u)?)
        } else {
            value(u, 1)?
        };
        map.insert("cnf".to_owned(), serde_json::json!({ "jkt": jkt }));
    }
    let mut subs = Vec::new();
    walk(&claims, &mut subs);
    for v in subs.iter().take(16) {
        check_render(v);
    }

    // Paths: a dotted path parses iff no segment is empty, and prints back as given.
    let dotted = string(u)?;
    match ClaimPath::parse(&dotted) {
        Some(p) => {
            assert!(dotted.split('.').all(|s| !s.is_empty()));
            assert_eq!(p.to_string(), dotted);
            assert_eq!(ClaimPath::parse(&p.to_string()), Some(p));
        }
        None => assert!(dotted.split('.').any(str::is_empty)),
    }

    // Header names: lower-cased HTTP tokens, never reserved, stable when checked again.
    let name = string(u)?;
    if let Ok(lower) = check_header_name(&name) {
        assert_eq!(lower, name.to_ascii_lowercase());
        assert!(lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)));
        assert!(!lower.starts_with("x-envoy-") && lower != "authorization" && lower != "host");
        assert_eq!(check_header_name(&lower), Ok(lower.clone()));
    }

    // Mappings over the claims: paths drawn from the claims' own keys and from anywhere.
    let mut mappings = Vec::new();
    for i in 0..u.int_in_range(0..=5)? {
        let n = u.int_in_range(1..=3)?;
        let mut segments = Vec::with_capacity(n);
        for _ in 0..n {
            segments.push(string(u)?);
        }
        if let Some(claim) = ClaimPath::from_segments(segments) {
            mappings.push(ClaimHeader {
                claim,
                header: format!("x-claim-{i}"),
            });
        }
    }
    let header = b64(br#"{"alg":"RS256"}"#);
    let hp = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    check_dpop_bound(hp.as_bytes());
    // The same claims with one letter of each "cnf" and "jkt" written as a JSON escape.
    let text = claims.to_string();
    let at = u.int_in_range(0..=2)?;
    let escaped = text
        .replace("\"cnf\"", &format!("\"{}\"", escape_one("cnf", at)))
        .replace("\"jkt\"", &format!("\"{}\"", escape_one("jkt", at)));
    check_dpop_bound(format!("{header}.{}", b64(escaped.as_bytes())).as_bytes());
    check_projection(hp.as_bytes(), &mappings, Some(&claims));
    check_projection(hp.as_bytes(), &fixed_mappings(), Some(&claims));
    Ok(())
}

/// `name` with its `at`th letter as a `\u00XX` escape.
fn escape_one(name: &str, at: usize) -> String {
    name.char_indices()
        .map(|(i, c)| {
            if i == at {
                format!("\\u{:04x}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}
