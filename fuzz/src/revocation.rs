//! `revoke`: RFC 7009 form bodies, and revoking a stored token.

use crate::support::{b64, form_body, form_params, MemoryData};
use arbitrary::{Result, Unstructured};
use split_token_core::lifecycle::revoke::{
    could_be_signature, encode_form, parse_form, revoke, Failure, RevocationError, RevocationPlan,
    MAX_REVOCATION_BODY,
};
use split_token_core::store::{find, Entry, Lookup, Store};
use split_token_core::token::Signature;

const NOW: u64 = 1_700_000_000;
const HEADER_PAYLOAD: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9";

/// The stored token's signature: 32 bytes, an HS256 signature's length.
fn stored_signature() -> String {
    b64(&[0x5a; 32])
}

/// Raw bytes: a revocation body. First byte `0`: a body built from arbitrary parameters around
/// the stored token, another signature, a JWT or a refresh token, and a form round trip.
pub fn revocation(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            let _ = structured(&mut Unstructured::new(rest));
        }
        _ => check_revoke(data),
    }
}

/// Parsing is deterministic and encoding round-trips; revocation removes exactly the stored
/// token it names, rewrites only its `token` parameter to the full JWT, and a revoked token is
/// never found again.
fn check_revoke(body: &[u8]) {
    let parsed = parse_form(body);
    assert_eq!(parsed, parse_form(body), "not deterministic");
    if let Ok(pairs) = &parsed {
        assert_eq!(
            parse_form(&encode_form(pairs)).as_ref(),
            Ok(pairs),
            "no round trip"
        );
    }

    let host = MemoryData::default();
    let store = Store::new(&host, "rv/", 4, 4);
    store.initialize().unwrap();
    let sig = stored_signature();
    let key = Signature::parse(sig.as_bytes()).unwrap().store_key();
    let entry = Entry {
        key,
        expires_at: NOW + 3_600,
        header_payload: HEADER_PAYLOAD.as_bytes(),
    };
    store.put(&entry, NOW).unwrap();
    let epoch = store.epoch().unwrap();
    let stored = || {
        let slot = store.fetch_slot(&key).unwrap();
        matches!(find(&slot, &key, NOW), Ok(Lookup::Hit { .. }))
    };

    let plan = revoke(&store, body, NOW);
    let token = parsed.as_ref().ok().and_then(|pairs| {
        let mut tokens = pairs.iter().filter(|(n, _)| n == "token");
        match (tokens.next(), tokens.next()) {
            (Some((_, t)), None) => Some(t.clone()),
            _ => None,
        }
    });
    // The token names the stored one: its signature, or a full JWT ending in it.
    let names_stored = |t: &str| {
        t == sig
            || (t.matches('.').count() == 2 && t.rsplit_once('.').is_some_and(|(_, s)| s == sig))
    };
    let hint = parsed
        .iter()
        .flatten()
        .find(|(n, _)| n == "token_type_hint")
        .map(|(_, v)| v.as_str());
    match &plan {
        Err(Failure::Request(RevocationError::TooLarge { .. })) => {
            assert!(body.len() > MAX_REVOCATION_BODY);
        }
        Err(Failure::Request(e)) => {
            let count = |name: &str| parsed.iter().flatten().filter(|(n, _)| n == name).count();
            match e {
                RevocationError::NotForm { .. } => assert!(parsed.is_err()),
                RevocationError::MissingToken => {
                    assert!(count("token") == 0 || token.as_deref() == Some(""));
                }
                RevocationError::Repeated { name } => assert!(count(name) > 1),
                other => panic!("unexpected refusal {other:?}"),
            }
        }
        Err(Failure::Store(e)) => panic!("store failed: {e:?}"),
        Ok(RevocationPlan::Revoked { body: out, .. }) => {
            let token = token.as_deref().expect("revoked without one token");
            assert!(names_stored(token), "revoked another token");
            assert!(!stored(), "a revoked token is still found");
            assert_ne!(store.epoch().unwrap(), epoch, "epoch did not move");
            // The IdP gets the token it issued, every other parameter as it was.
            let mut expected = parsed.clone().unwrap();
            for (name, value) in &mut expected {
                if name == "token" {
                    *value = format!("{HEADER_PAYLOAD}.{sig}");
                }
            }
            assert_eq!(parse_form(out), Ok(expected), "the forwarded form differs");
            // The token is gone: a second revocation finds nothing to revoke.
            let again = revoke(&store, body, NOW).unwrap();
            assert!(
                !matches!(again, RevocationPlan::Revoked { .. }),
                "revoked twice"
            );
        }
        Ok(RevocationPlan::ForwardUnchanged) => {
            assert!(stored(), "forwarded, yet revoked");
            assert_eq!(store.epoch().unwrap(), epoch);
            let token = token.as_deref().expect("forwarded without one token");
            assert!(!names_stored(token), "a stored token was not revoked");
            assert!(
                hint == Some("refresh_token")
                    || token.matches('.').count() == 2
                    || !could_be_signature(token)
            );
        }
        Ok(RevocationPlan::AnswerLocally) => {
            assert!(stored(), "answered locally, yet revoked");
            assert_eq!(store.epoch().unwrap(), epoch);
            let token = token.as_deref().expect("answered without one token");
            assert!(!names_stored(token), "a stored token was not revoked");
            assert!(could_be_signature(token) && hint != Some("refresh_token"));
        }
    }
    if let Some(t) = &token {
        if could_be_signature(t) {
            assert!(Signature::parse(t.as_bytes()).is_some());
        }
    }
}

fn structured(u: &mut Unstructured<'_>) -> Result<()> {
    // Any pairs survive an encode and a parse.
    let pairs: Vec<(String, String)> = u.arbitrary()?;
    assert_eq!(parse_form(&encode_form(&pairs)), Ok(pairs), "no round trip");

    let mut params = form_params(u)?;
    let token = match u.int_in_range(0..=3)? {
        0 => stored_signature(),
        1 => b64(&[0x11; 64]),
        2 => format!("{HEADER_PAYLOAD}.{}", stored_signature()),
        _ => u.arbitrary()?,
    };
    let at = u.int_in_range(0..=params.len())?;
    params.insert(at, ("token".to_owned(), token));
    let body = form_body(u, &params)?;
    assert_eq!(parse_form(&body), Ok(params), "the form did not parse back");
    check_revoke(&body);
    Ok(())
}
