//! `token`: base64url checks, signatures, store keys and compact JWS parsing.

use crate::support::{b64, jwt, signature_bytes};
use arbitrary::{Arbitrary, Unstructured};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use split_token_core::config::MAX_STORE_SLOTS;
use split_token_core::token::{is_base64url, CompactJws, JwsError, Signature, MAX_SIGNATURE_LEN};

/// Raw bytes: every token check holds for any input. First byte `0`: a well-formed JWT built from
/// arbitrary parts must parse back to those parts.
pub fn jws(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            if let Ok(parts) = Parts::arbitrary_take_rest(Unstructured::new(rest)) {
                well_formed(parts);
            }
        }
        _ => {
            signature(data);
            compact(&String::from_utf8_lossy(data));
        }
    }
}

/// `is_base64url` is exactly "1 to 2048 of `A-Za-z0-9-_`"; a `Signature` is exactly such text,
/// its store key is SHA-256 of that text, and its slot is always in range.
fn signature(data: &[u8]) {
    let expected = !data.is_empty()
        && data.len() <= MAX_SIGNATURE_LEN
        && data
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    assert_eq!(is_base64url(data), expected);
    let Some(sig) = Signature::parse(data) else {
        assert!(!expected, "a base64url signature was refused");
        return;
    };
    assert!(expected, "Signature::parse accepted what is not base64url");
    assert_eq!(sig.as_str().as_bytes(), data);
    let key = sig.store_key();
    let sha: [u8; 32] = Sha256::digest(data).into();
    assert_eq!(key.0, sha, "the store key is SHA-256 of the signature text");
    assert_eq!(Signature::parse(data).map(|s| s.store_key()), Some(key));
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    for slots in [0, 1, 2, 3, 7, 16, len, 65_536, MAX_STORE_SLOTS, u32::MAX] {
        assert!(
            key.slot(slots) < slots.max(1),
            "slot out of range for {slots}"
        );
    }
    assert_eq!(
        format!("{sig:?}"),
        format!("Signature(<{} chars>)", data.len()),
        "Debug must never print the credential"
    );
}

/// A parsed JWS splits back into its exact text; its signature is base64url; `exp` is the
/// payload's; errors match the structure and never quote token segments.
fn compact(text: &str) {
    let parsed = CompactJws::parse(text);
    match &parsed {
        Ok(jws) => {
            let hp = jws.header_payload();
            let sig = jws.signature().as_str();
            assert_eq!(format!("{hp}.{sig}"), text, "split is not byte-identical");
            assert!(is_base64url(sig.as_bytes()));
            assert_eq!(text.matches('.').count(), 2);
            assert_eq!(hp.matches('.').count(), 1);
            let (_, payload) = hp.split_once('.').unwrap();
            let claims: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
            match claims.get("exp") {
                None | Some(Value::Null) => assert_eq!(jws.exp, None),
                Some(exp) => {
                    if let Some(exp) = exp.as_i64() {
                        assert_eq!(jws.exp, Some(exp), "exp differs from the payload's");
                    }
                }
            }
            assert!(!format!("{jws:?}").contains(hp), "Debug prints the token");
        }
        Err(e) => {
            let segments = text.split('.').count();
            if segments != 3 {
                assert_eq!(*e, JwsError::Structure { segments });
            }
            assert!(error_is_content_free(e), "error may quote the token: {e:?}");
        }
    }
    let again = CompactJws::parse(text);
    assert_eq!(
        parsed.map(|j| (j.header_payload(), j.exp, j.algorithm)),
        again.map(|j| (j.header_payload(), j.exp, j.algorithm)),
        "parsing is not deterministic"
    );
}

/// Errors describe a token by kind and position only: every message is one of the fixed forms.
pub fn error_is_content_free(e: &JwsError) -> bool {
    const PARSE: [&str; 5] = [
        "bad structure",
        "a segment is not base64url",
        "header is not a JSON object with an alg",
        "unsupported cty header",
        "unparseable",
    ];
    match e {
        JwsError::Structure { .. } | JwsError::Signature { .. } => true,
        JwsError::Parse { reason } => PARSE.contains(&reason.as_str()),
        JwsError::Claims { reason } => reason == "not a JSON object with numeric exp/nbf/iat",
        _ => false,
    }
}

#[derive(Arbitrary, Debug)]
struct Parts {
    alg: String,
    kid: Option<String>,
    sub: String,
    exp: Option<i64>,
    extra: Option<(String, i64)>,
    signature: Vec<u8>,
}

/// Chrono, behind jwt-compact, represents about +-262,000 years of seconds.
const REPRESENTABLE_EXP: i64 = 8_000_000_000_000;

fn well_formed(parts: Parts) {
    let mut header = json!({"alg": parts.alg, "typ": "JWT"});
    if let Some(kid) = &parts.kid {
        header["kid"] = json!(kid);
    }
    let mut payload = json!({"sub": parts.sub});
    if let Some(exp) = parts.exp {
        payload["exp"] = json!(exp);
    }
    if let Some((name, n)) = &parts.extra {
        if !["exp", "nbf", "iat"].contains(&name.as_str()) {
            payload[name] = json!(n);
        }
    }
    let sig = signature_bytes(parts.signature);
    let token = jwt(&header, &payload, &sig);
    compact(&token);
    match CompactJws::parse(&token) {
        Ok(jws) => {
            assert_eq!(jws.algorithm, parts.alg);
            assert_eq!(jws.exp, parts.exp);
            assert_eq!(jws.signature().as_str(), b64(&sig));
        }
        Err(JwsError::Claims { .. })
            if parts
                .exp
                .is_some_and(|e| e.unsigned_abs() > REPRESENTABLE_EXP as u64) => {}
        Err(e) => panic!("a well-formed JWT was refused: {e}"),
    }
}
