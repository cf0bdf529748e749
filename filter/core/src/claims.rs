//! Claims to headers: project chosen claims of the stored JWT into request headers.
//!
//! Paths (`realm_access.roles`) and header names are compiled at configuration load. On each
//! request the payload is decoded once and every configured claim is rendered:
//! strings as they are, numbers and booleans in JSON form, arrays of scalars joined with `,`,
//! anything else as compact JSON. A value with a control character is never emitted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};
use std::fmt;

/// A dotted claim path, split at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

impl ClaimPath {
    /// Parses `a.b.c`; every segment must be non-empty.
    pub fn parse(path: &str) -> Option<Self> {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return None;
        }
        Some(Self(segments))
    }

    /// A path given as its segments, for claim names that contain dots
    /// (`["https://example.com/roles"]`).
    pub fn from_segments(segments: Vec<String>) -> Option<Self> {
        if segments.is_empty() || segments.iter().any(String::is_empty) {
            return None;
        }
        Some(Self(segments))
    }

    /// The value at this path, if every segment exists.
    pub fn find<'v>(&self, claims: &'v Value) -> Option<&'v Value> {
        self.0
            .iter()
            .try_fold(claims, |value, segment| value.as_object()?.get(segment))
    }
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// One `claim -> header` mapping, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    pub claim: ClaimPath,
    /// Lower-case header name.
    pub header: String,
}

/// Headers a claim may never be projected into: framing, routing, the credential itself and its
/// DPoP proof (read from the client on API calls).
const RESERVED_HEADERS: [&str; 11] = [
    "authorization",
    "dpop",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-authorization",
];

/// Why a header name is refused.
pub fn check_header_name(name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if lower.is_empty() || !lower.bytes().all(is_tchar) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-envoy-") {
        return Err(format!("{name:?} is reserved and cannot carry a claim"));
    }
    Ok(lower)
}

/// Renders a claim value as a header value, or `None` when it has no header form (null) or
/// would be unsafe (a control character, or a list element containing the `,` separator).
pub fn render(value: &Value) -> Rendered {
    let text = match value {
        Value::Null => return Rendered::Absent,
        Value::String(s) => s.clone(),
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        // An element that itself contains "," would be indistinguishable from two elements
        // (["team,admin"] vs ["team", "admin"]); such arrays are never emitted.
        Value::Array(items)
            if items
                .iter()
                .any(|i| i.as_str().is_some_and(|s| s.contains(','))) =>
        {
            return Rendered::Unsafe
        }
        Value::Array(items) if items.iter().all(is_scalar) => {
            let mut out = String::new();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                }
            }
            out
        }
        Value::Array(_) | Value::Object(_) => value.to_string(),
    };
    if text.chars().any(|c| c.is_control()) {
        Rendered::Unsafe
    } else {
        Rendered::Value(text)
    }
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// The outcome of rendering one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    Value(String),
    /// Missing or null: no header.
    Absent,
    /// Has a control character: dropped and counted.
    Unsafe,
}

/// The headers to add for one request: `(index into the mappings, value)`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Projection {
    pub headers: Vec<(usize, String)>,
    /// Claims dropped because their value had a control character.
    pub unsafe_dropped: u32,
}

/// What a forwarded request needs from a stored token's payload, read in one decode.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    pub projection: Projection,
    /// The token carries `cnf.jkt` (RFC 9449): it must come with the `DPoP` scheme.
    pub dpop_bound: bool,
}

/// Decodes the payload of `header.payload` once, renders every mapping and reads the DPoP
/// binding. A payload that does not decode projects nothing and is not bound (the stored token
/// came from a verified or at least parsed JWS, so this is corruption, not input). The JSON is
/// parsed only when there are mappings or `cnf` can be in it.
pub fn inspect(header_payload: &[u8], mappings: &[ClaimHeader]) -> Inspection {
    let Some(json) = decode_payload(header_payload) else {
        return Inspection::default();
    };
    if mappings.is_empty() && !may_name_cnf(&json) {
        return Inspection::default();
    }
    let Ok(claims) = serde_json::from_slice::<Value>(&json) else {
        return Inspection::default();
    };
    Inspection {
        projection: project_claims(&claims, mappings),
        dpop_bound: claims.as_object().is_some_and(is_bound),
    }
}

/// The claim headers for one request; see [`inspect`].
pub fn project(header_payload: &[u8], mappings: &[ClaimHeader]) -> Projection {
    if mappings.is_empty() {
        return Projection::default();
    }
    inspect(header_payload, mappings).projection
}

/// Whether a token is DPoP-bound: its payload has a `cnf.jkt` string (RFC 9449 §6.1).
pub fn is_dpop_bound(header_payload: &[u8]) -> bool {
    inspect(header_payload, &[]).dpop_bound
}

/// The payload of a `header.payload` as a JSON object, for introspection.
pub(crate) fn payload_object(header_payload: &[u8]) -> Option<Map<String, Value>> {
    serde_json::from_slice(&decode_payload(header_payload)?).ok()
}

/// Whether decoded claims bind the token to a DPoP key.
pub(crate) fn is_bound(claims: &Map<String, Value>) -> bool {
    claims
        .get("cnf")
        .and_then(|cnf| cnf.get("jkt"))
        .is_some_and(Value::is_string)
}

fn project_claims(claims: &Value, mappings: &[ClaimHeader]) -> Projection {
    let mut projection = Projection::default();
    for (i, mapping) in mappings.iter().enumerate() {
        match mapping.claim.find(claims).map_or(Rendered::Absent, render) {
            Rendered::Value(v) => projection.headers.push((i, v)),
            Rendered::Absent => {}
            Rendered::Unsafe => projection.unsafe_dropped += 1,
        }
    }
    projection
}

/// The payload of a `header.payload`, base64url-decoded.
fn decode_payload(header_payload: &[u8]) -> Option<Vec<u8>> {
    let dot = header_payload.iter().position(|&b| b == b'.')?;
    URL_SAFE_NO_PAD.decode(header_payload.get(dot + 1..)?).ok()
}

/// Whether decoded JSON can name `cnf`: `"cnf"` ends in `f"`, or in `\u0066"` when its last
/// letter is escaped. Lets tokens without a binding skip the JSON parse.
fn may_name_cnf(json: &[u8]) -> bool {
    json.windows(2).any(|w| w == b"f\"") || json.windows(7).any(|w| w == b"\\u0066\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn mapping(claim: &str, header: &str) -> ClaimHeader {
        ClaimHeader {
            claim: ClaimPath::parse(claim).unwrap(),
            header: check_header_name(header).unwrap(),
        }
    }

    #[test]
    fn claim_paths_walk_objects() {
        let claims = json!({"sub": "a", "realm_access": {"roles": ["x"]}, "n": {"m": null}});
        let p = ClaimPath::parse("realm_access.roles").unwrap();
        assert_eq!(p.find(&claims), Some(&json!(["x"])));
        assert_eq!(
            ClaimPath::parse("realm_access.none").unwrap().find(&claims),
            None
        );
        assert_eq!(ClaimPath::parse("sub.x").unwrap().find(&claims), None);
        assert_eq!(p.to_string(), "realm_access.roles");
        let namespaced = json!({"https://example.com/roles": ["a"]});
        let p = ClaimPath::from_segments(vec!["https://example.com/roles".into()]).unwrap();
        assert_eq!(p.find(&namespaced), Some(&json!(["a"])));
        assert!(ClaimPath::from_segments(vec![]).is_none());
        assert!(ClaimPath::from_segments(vec![String::new()]).is_none());
        for bad in ["", ".", "a.", ".a", "a..b"] {
            assert!(ClaimPath::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn rendering_follows_the_documented_forms() {
        let cases = [
            (json!("alice"), Rendered::Value("alice".into())),
            (json!(42), Rendered::Value("42".into())),
            (json!(1.5), Rendered::Value("1.5".into())),
            (json!(true), Rendered::Value("true".into())),
            (
                json!(["user", "admin"]),
                Rendered::Value("user,admin".into()),
            ),
            (json!([1, "a", false]), Rendered::Value("1,a,false".into())),
            (json!([]), Rendered::Value(String::new())),
            (json!({"a": 1}), Rendered::Value(r#"{"a":1}"#.into())),
            (json!([{"a": 1}]), Rendered::Value(r#"[{"a":1}]"#.into())),
            (json!(null), Rendered::Absent),
            (json!("a\r\nx-admin: 1"), Rendered::Unsafe),
            (json!("nul\u{0}"), Rendered::Unsafe),
            (json!(["ok", "bad\n"]), Rendered::Unsafe),
            (json!(["team,admin"]), Rendered::Unsafe),
            (json!(["user", "a,b"]), Rendered::Unsafe),
        ];
        for (value, want) in cases {
            assert_eq!(render(&value), want, "{value}");
        }
    }

    #[test]
    fn header_names_are_validated_and_lowercased() {
        assert_eq!(check_header_name("X-User-Id").unwrap(), "x-user-id");
        for bad in [
            "",
            "x user",
            "x:y",
            ":path",
            "x\n",
            "Authorization",
            "host",
            "x-envoy-internal",
        ] {
            assert!(check_header_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn project_renders_each_mapping_from_the_stored_payload() {
        let payload = json!({"sub": "alice", "email": "a@x.io", "realm_access": {"roles": ["user", "admin"]},
                             "evil": "x\r\ny"});
        let hp = format!("{}.{}", b64(&json!({"alg": "RS256"})), b64(&payload));
        let mappings = [
            mapping("sub", "x-user-id"),
            mapping("realm_access.roles", "x-user-roles"),
            mapping("email", "x-user-email"),
            mapping("missing", "x-missing"),
            mapping("evil", "x-evil"),
        ];
        let p = project(hp.as_bytes(), &mappings);
        assert_eq!(
            p.headers,
            [
                (0, "alice".to_owned()),
                (1, "user,admin".to_owned()),
                (2, "a@x.io".to_owned()),
            ]
        );
        assert_eq!(p.unsafe_dropped, 1);
        assert_eq!(project(b"garbage", &mappings), Projection::default());
        assert_eq!(project(hp.as_bytes(), &[]), Projection::default());
    }

    #[test]
    fn dpop_binding_is_found_whichever_letter_of_cnf_is_escaped() {
        // Found by fuzz target claims: with `n` or `f` of "cnf" written as a JSON escape, the
        // quick pre-check missed the binding, so a DPoP-bound token passed as a bearer token.
        let header = b64(&json!({"alg": "RS256"}));
        for cnf in [
            "cnf",
            r"\u0063nf",
            r"c\u006ef",
            r"cn\u0066",
            r"\u0063\u006e\u0066",
        ] {
            let payload = format!(r#"{{"sub":"a","{cnf}":{{"jkt":"x"}}}}"#);
            let hp = format!("{header}.{}", URL_SAFE_NO_PAD.encode(&payload));
            assert!(is_dpop_bound(hp.as_bytes()), "{payload}");
        }
        let unbound = format!(
            "{header}.{}",
            b64(&json!({"sub": "a", "cnf": {"x5t": "y"}}))
        );
        assert!(!is_dpop_bound(unbound.as_bytes()));
        assert!(!is_dpop_bound(b"garbage"));
    }
}
