//! `introspect`: RFC 7662 client authentication, and answers about stored tokens.

use crate::support::{b64, form_body, signature_bytes, string, value, MemoryData};
use arbitrary::{Result, Unstructured};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Map, Value};
use split_token_core::claims::is_dpop_bound;
use split_token_core::config::{Config, IntrospectionConfig};
use split_token_core::lifecycle::introspect::{authenticate, introspect as answer, Introspection};
use split_token_core::lifecycle::revoke::{encode_form, RevocationError};
use split_token_core::store::{Entry, Store};
use split_token_core::token::Signature;
use std::collections::{BTreeSet, HashMap};

const NOW: u64 = 1_700_000_000;
const INACTIVE: &str = r#"{"active":false}"#;

/// The clients of the raw mode, `(client_id, secret)`: a plain one, one whose id and secret
/// have form-encoded spellings, and one whose id is itself a percent-escape and whose secret
/// does not form-decode.
const CLIENTS: [(&str, &str); 3] = [("rs", "secret"), ("a b", "p+q%20r"), ("%41", "100%")];

/// Secrets the structured mode picks from: spellings that form-decode to one another.
const SECRETS: [&str; 10] = [
    "secret",
    "Secret",
    "a b",
    "a+b",
    "a%20b",
    "%41",
    "A",
    "100%",
    "",
    "p@ss:w0rd",
];

/// Payload texts whose JSON is unusual: escapes, duplicates, numbers out of range.
const PAYLOADS: [&str; 8] = [
    r#"{"c\u006ef":{"jkt":"x"}}"#,
    r#"{"cn\u0066":{"jkt":"x"},"sub":"a"}"#,
    r#"{"cnf":{"jkt":"x"},"cnf":{"jkt":1}}"#,
    r#"{"cnf":{"jkt":1},"cnf":{"jkt":"x"}}"#,
    r#"{"exp":1e400}"#,
    r#"{"exp":1.5,"token_type":"Bearer","cnf":{"jkt":"k"}}"#,
    r#"{"active":false,"exp":-1}"#,
    r#"{"sub":"\ud800"}"#,
];

/// Raw bytes: both an `Authorization` value for three fixed clients and an introspection body
/// for a fixed store. First byte `0`: arbitrary clients with a credential spelled every way
/// (or changed by a byte), or arbitrary stored tokens with a form naming one of them.
pub fn introspect(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            let mut u = Unstructured::new(rest);
            let _ = if u.arbitrary().unwrap_or(false) {
                structured_authenticate(&mut u)
            } else {
                structured_introspect(&mut u)
            };
        }
        _ => {
            let clients: Vec<(String, String)> = CLIENTS
                .iter()
                .map(|&(id, secret)| (id.to_owned(), secret.to_owned()))
                .collect();
            check_authenticate(&config(&clients, false), &clients, data);
            raw_introspect(data);
        }
    }
}

/// The lowercase (or uppercase) hex SHA-256 of `secret`, as the configuration takes it.
fn hex_sha256(secret: &str, upper: bool) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

/// An introspection configuration for `(client_id, secret)` pairs, read by `Config::from_json`.
fn config(clients: &[(String, String)], upper: bool) -> IntrospectionConfig {
    let clients: Vec<Value> = clients
        .iter()
        .map(|(id, secret)| json!({"client_id": id, "client_secret_sha256": hex_sha256(secret, upper)}))
        .collect();
    let text = json!({
        "token_paths": ["/t"],
        "introspection": {"paths": ["/i"], "clients": clients},
    })
    .to_string();
    Config::from_json(text.as_bytes())
        .expect("a valid introspection configuration was refused")
        .introspection
        .expect("the introspection block was lost")
}

/// `application/x-www-form-urlencoded` decoding written from the spec: `+` is a space, `%XX` a
/// byte, anything else itself, and the result must be UTF-8.
fn form_decode(text: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The two readings of a credential part: as sent, and form-decoded (RFC 6749 §2.3.1).
fn readings(text: &[u8]) -> [Option<Vec<u8>>; 2] {
    [
        Some(text.to_vec()),
        form_decode(text).map(String::into_bytes),
    ]
}

/// Whether `id:secret` belongs to a configured client: one reading of the id is its id and one
/// reading of the secret its secret, both of the same client.
fn model_accepts(clients: &[(String, String)], id: &[u8], secret: &[u8]) -> bool {
    let ids = readings(id);
    let secrets = readings(secret);
    clients.iter().any(|(cid, csecret)| {
        ids.iter().flatten().any(|i| i == cid.as_bytes())
            && secrets.iter().flatten().any(|s| s == csecret.as_bytes())
    })
}

/// The credentials of an HTTP Basic value (RFC 7617): the scheme case-insensitively, spaces,
/// padded base64 of `id:secret`, split at the first colon.
fn basic_credentials(header: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = header.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = STANDARD.decode(rest.trim_ascii()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// `authenticate` never panics, is deterministic, and accepts exactly the Basic credentials of
/// a configured client.
fn check_authenticate(config: &IntrospectionConfig, clients: &[(String, String)], header: &[u8]) {
    let got = authenticate(config, Some(header));
    assert_eq!(got, authenticate(config, Some(header)), "not deterministic");
    let want =
        basic_credentials(header).is_some_and(|(id, secret)| model_accepts(clients, &id, &secret));
    assert_eq!(got, want, "authenticate disagrees with the model");
    assert!(!authenticate(config, None), "no credentials accepted");
}

/// A client id the configuration takes: non-empty, no ':'.
fn client_id(u: &mut Unstructured<'_>, index: usize) -> Result<String> {
    let id = string(u)?;
    Ok(if id.is_empty() || id.contains(':') {
        format!("c{index}")
    } else {
        id
    })
}

/// `text` as sent: raw, fully form-encoded, or with only its spaces as `+`.
fn spell(u: &mut Unstructured<'_>, text: &str) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=2)? {
        0 => text.as_bytes().to_vec(),
        1 => encode_form(&[(text.to_owned(), String::new())])
            .strip_suffix(b"=")
            .unwrap()
            .to_vec(),
        _ => {
            let mut out = Vec::new();
            for c in text.chars() {
                match c {
                    ' ' => out.push(b'+'),
                    '+' | '%' => out.extend_from_slice(format!("%{:02X}", c as u32).as_bytes()),
                    c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            out
        }
    })
}

/// `Basic base64(id:secret)`, with the scheme and the spaces around it spelled some way.
fn basic(u: &mut Unstructured<'_>, id: &[u8], secret: &[u8]) -> Result<Vec<u8>> {
    let scheme = *u.choose(&["Basic", "basic", "BASIC", "bAsIc"])?;
    let before = *u.choose(&["", " ", "\t"])?;
    let between = *u.choose(&[" ", "  ", " \t"])?;
    let after = *u.choose(&["", " ", "\t "])?;
    let mut credentials = id.to_vec();
    credentials.push(b':');
    credentials.extend_from_slice(secret);
    Ok(format!(
        "{before}{scheme}{between}{}{after}",
        STANDARD.encode(credentials)
    )
    .into_bytes())
}

/// A configured client's credentials are accepted in every spelling, are refused by a
/// configuration without that client unless another client has the same id and secret, and
/// stop working when a byte of the secret changes (other than into another spelling of it).
fn structured_authenticate(u: &mut Unstructured<'_>) -> Result<()> {
    let n = u.int_in_range(1..=3)?;
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let id = client_id(u, i)?;
        let secret = if u.ratio(1, 2)? {
            (*u.choose(&SECRETS)?).to_owned()
        } else {
            u.arbitrary()?
        };
        clients.push((id, secret));
    }
    let config_all = config(&clients, u.arbitrary()?);
    let i = u.choose_index(n)?;
    let (id, secret) = clients[i].clone();
    let sent_id = spell(u, &id)?;
    let sent_secret = spell(u, &secret)?;
    let header = basic(u, &sent_id, &sent_secret)?;
    assert!(
        authenticate(&config_all, Some(&header)),
        "a configured client's credentials were refused"
    );
    check_authenticate(&config_all, &clients, &header);

    // Client A's credentials never authenticate as client B.
    if n > 1 {
        let others: Vec<_> = clients
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, c)| c.clone())
            .collect();
        let config_others = config(&others, false);
        check_authenticate(&config_others, &others, &header);
        let secrets = readings(&sent_secret);
        let shared = others
            .iter()
            .any(|(_, s)| secrets.iter().flatten().any(|r| r == s.as_bytes()));
        if !shared {
            assert!(
                !authenticate(&config_others, Some(&header)),
                "a client's credentials authenticate as another client"
            );
        }
    }

    // A changed byte of the secret fails, unless it is another spelling of a secret.
    let mut changed = sent_secret.clone();
    if !changed.is_empty() {
        let at = u.choose_index(changed.len())?;
        let byte: u8 = u.arbitrary()?;
        if byte != changed[at] {
            changed[at] = byte;
            let header = basic(u, &sent_id, &changed)?;
            check_authenticate(&config_all, &clients, &header);
            let plain = !changed.contains(&b'+') && !changed.contains(&b'%');
            if plain && !clients.iter().any(|(_, s)| s.as_bytes() == changed) {
                assert!(
                    !authenticate(&config_all, Some(&header)),
                    "a secret with a changed byte was accepted"
                );
            }
        }
    }

    // Anything else after the scheme: the model decides.
    let mut tail: Vec<u8> = u.arbitrary()?;
    if u.arbitrary()? {
        tail = STANDARD.encode(&tail).into_bytes();
    }
    let mut header = b"Basic ".to_vec();
    header.extend_from_slice(&tail);
    check_authenticate(&config_all, &clients, &header);
    Ok(())
}

/// A token in the store, and what the model knows of it.
struct Stored {
    signature: String,
    header_payload: String,
    expires_at: u64,
}

/// A form body read from the spec: `&`-separated pairs, empty ones skipped, split at the first
/// `=`, both sides form-decoded. `None`: not a form.
fn model_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (&pair[..eq], &pair[eq + 1..]),
                None => (pair, &b""[..]),
            };
            Some((form_decode(name)?, form_decode(value)?))
        })
        .collect()
}

/// The claims of `header.payload`: the base64url JSON object after the first dot.
fn model_claims(header_payload: &str) -> Option<Map<String, Value>> {
    let (_, payload) = header_payload.split_once('.')?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&json).ok()
}

fn snapshot(host: &MemoryData) -> HashMap<String, (Vec<u8>, u32)> {
    host.map.borrow().clone()
}

/// `introspect` never panics, is deterministic and read-only; a malformed form is `Invalid`,
/// a live stored signature gets its claims with `"active": true`, the gateway's expiry and the
/// token type of its binding, and anything else exactly `{"active":false}`. No answer holds the
/// stored `header.payload`.
fn check_introspect(
    host: &MemoryData,
    store: &Store<'_, MemoryData>,
    stored: &[Stored],
    body: &[u8],
    now: u64,
) {
    let before = snapshot(host);
    let got = answer(store, body, now).expect("the in-memory store failed");
    assert_eq!(got, answer(store, body, now).unwrap(), "not deterministic");
    assert!(snapshot(host) == before, "introspection wrote to the store");

    let Some(pairs) = model_form(body) else {
        assert!(
            matches!(got, Introspection::Invalid(RevocationError::NotForm { .. })),
            "not a form, yet {got:?}"
        );
        return;
    };
    let mut tokens = pairs.iter().filter(|(n, _)| n == "token");
    let token = match (tokens.next(), tokens.next()) {
        (None, _) => {
            assert_eq!(got, Introspection::Invalid(RevocationError::MissingToken));
            return;
        }
        (Some(_), Some(_)) => {
            assert_eq!(
                got,
                Introspection::Invalid(RevocationError::Repeated { name: "token" })
            );
            return;
        }
        (Some((_, t)), None) => t,
    };
    let Introspection::Answer(text) = &got else {
        panic!("one token, yet {got:?}");
    };
    let live = stored
        .iter()
        .find(|s| &s.signature == token && s.expires_at > now)
        .and_then(|s| Some((s, model_claims(&s.header_payload)?)));
    let Some((entry, claims)) = live else {
        assert_eq!(
            text, INACTIVE,
            "an unknown, expired or unreadable token is active"
        );
        return;
    };
    assert!(Signature::parse(token.as_bytes()).is_some());
    assert!(
        !text.contains(&entry.header_payload),
        "the answer holds header.payload"
    );
    let out: Map<String, Value> = serde_json::from_str(text).expect("the answer is not an object");
    assert_eq!(out.get("active"), Some(&Value::Bool(true)), "not active");
    let exp = out
        .get("exp")
        .and_then(Value::as_u64)
        .expect("exp is not an integer");
    assert!(exp <= entry.expires_at, "exp beyond the gateway's expiry");
    match claims.get("exp").and_then(Value::as_u64) {
        Some(issued) if issued <= entry.expires_at => assert_eq!(exp, issued, "exp changed"),
        _ => assert_eq!(exp, entry.expires_at, "exp is not the gateway's expiry"),
    }
    let token_type = if is_dpop_bound(entry.header_payload.as_bytes()) {
        "DPoP"
    } else {
        "Bearer"
    };
    assert_eq!(
        out.get("token_type").and_then(Value::as_str),
        Some(token_type),
        "token_type does not follow the token's binding (issued token_type: {:?})",
        claims.get("token_type")
    );
    for (name, v) in &claims {
        if !matches!(name.as_str(), "active" | "exp" | "token_type") {
            assert_eq!(out.get(name), Some(v), "claim {name:?} changed");
        }
    }
    let names: BTreeSet<&str> = claims
        .keys()
        .map(String::as_str)
        .chain(["active", "exp", "token_type"])
        .collect();
    assert_eq!(
        out.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        names,
        "members added or lost"
    );
}

fn put(store: &Store<'_, MemoryData>, stored: &Stored) {
    let key = Signature::parse(stored.signature.as_bytes())
        .unwrap()
        .store_key();
    store
        .put(
            &Entry {
                key,
                expires_at: stored.expires_at,
                header_payload: stored.header_payload.as_bytes(),
            },
            NOW,
        )
        .unwrap();
}

fn header_payload(header: &Value, payload: &str) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.as_bytes())
    )
}

/// A Bearer token, a DPoP-bound one, an expired one and one whose payload is not an object.
fn raw_introspect(body: &[u8]) {
    let header = json!({"alg": "ES256", "typ": "at+jwt"});
    let stored = [
        Stored {
            signature: b64(&[0x5a; 64]),
            header_payload: header_payload(
                &header,
                &json!({"sub": "alice", "exp": NOW + 7_200, "scope": "a b"}).to_string(),
            ),
            expires_at: NOW + 3_600,
        },
        Stored {
            signature: b64(&[0x6b; 64]),
            header_payload: header_payload(
                &header,
                &json!({"sub": "bob", "exp": NOW + 60, "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}).to_string(),
            ),
            expires_at: NOW + 3_600,
        },
        Stored {
            signature: b64(&[0x7c; 32]),
            header_payload: header_payload(&header, r#"{"sub":"carol"}"#),
            expires_at: NOW,
        },
        Stored {
            signature: b64(&[0x11; 48]),
            header_payload: header_payload(&header, "[1]"),
            expires_at: NOW + 3_600,
        },
    ];
    let host = MemoryData::default();
    let store = Store::new(&host, "in/", 2, 4);
    store.initialize().unwrap();
    for s in &stored {
        put(&store, s);
    }
    check_introspect(&host, &store, &stored, body, NOW);
}

/// An `exp` claim: around the gateway's expiry, or anything.
fn exp(u: &mut Unstructured<'_>, expires_at: u64) -> Result<Value> {
    Ok(match u.int_in_range(0..=4)? {
        0 => Value::from(expires_at.saturating_add(u.int_in_range(0..=2)?)),
        1 => Value::from(expires_at.saturating_sub(u.int_in_range(0..=2)?)),
        2 => Value::from(u.arbitrary::<u64>()?),
        3 => Value::from(-1),
        _ => value(u, 1)?,
    })
}

/// A `cnf` claim: a DPoP binding, a broken one, or anything.
fn cnf(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => json!({"jkt": string(u)?}),
        1 => json!({"jkt": value(u, 1)?}),
        2 => json!({"x5t#S256": "abc"}),
        _ => value(u, 2)?,
    })
}

/// A stored `header.payload`: usually a JWT's with chosen claims, sometimes unusual JSON, a
/// payload that is not an object, or bytes that are no JWT at all.
fn stored_header_payload(u: &mut Unstructured<'_>, expires_at: u64) -> Result<String> {
    let header = if u.ratio(3, 4)? {
        json!({"alg": "ES256", "typ": "at+jwt"})
    } else {
        value(u, 2)?
    };
    let payload = match u.int_in_range(0..=9)? {
        0 => (*u.choose(&PAYLOADS)?).to_owned(),
        1 => value(u, 2)?.to_string(),
        2 => u.arbitrary()?,
        _ => {
            let mut claims = Map::new();
            for _ in 0..u.int_in_range(0..=5)? {
                let name = match u.int_in_range(0..=6)? {
                    0 => "exp".to_owned(),
                    1 => "cnf".to_owned(),
                    2 => "token_type".to_owned(),
                    3 => "active".to_owned(),
                    _ => string(u)?,
                };
                let v = match name.as_str() {
                    "exp" => exp(u, expires_at)?,
                    "cnf" => cnf(u)?,
                    "token_type" => json!(*u.choose(&["Bearer", "DPoP", "N_A", "refresh"])?),
                    _ => value(u, 2)?,
                };
                claims.insert(name, v);
            }
            Value::Object(claims).to_string()
        }
    };
    Ok(match u.int_in_range(0..=15)? {
        0 => u.arbitrary()?,
        1 => b64(payload.as_bytes()),
        2 => format!("{}.", header_payload(&header, &payload)),
        _ => header_payload(&header, &payload),
    })
}

/// Up to three stored tokens, and a form naming one of them, another token or nothing.
fn structured_introspect(u: &mut Unstructured<'_>) -> Result<()> {
    let host = MemoryData::default();
    let store = Store::new(&host, "in/", u.int_in_range(1..=4)?, 4);
    store.initialize().unwrap();
    let mut stored: Vec<Stored> = Vec::new();
    for _ in 0..u.int_in_range(1..=3)? {
        let signature = b64(&signature_bytes(u.arbitrary()?));
        let expires_at = if u.ratio(7, 8)? {
            NOW - 3 + u.int_in_range(0..=6)?
        } else {
            u.arbitrary()?
        };
        let header_payload = stored_header_payload(u, expires_at)?;
        if stored.iter().any(|s| s.signature == signature) || header_payload.len() > 8_192 {
            continue;
        }
        let s = Stored {
            signature,
            header_payload,
            expires_at,
        };
        put(&store, &s);
        stored.push(s);
    }

    let mut params: Vec<(String, String)> = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let name = match u.int_in_range(0..=3)? {
            0 => "token_type_hint".to_owned(),
            1 => "client_id".to_owned(),
            2 => "token".to_owned(),
            _ => string(u)?,
        };
        params.push((name, string(u)?));
    }
    let named = &stored[u.choose_index(stored.len())?];
    let token = match u.int_in_range(0..=5)? {
        0 | 1 => named.signature.clone(),
        2 => format!("{}.{}", named.header_payload, named.signature),
        3 => b64(&[0x33; 32]),
        4 => String::new(),
        _ => u.arbitrary()?,
    };
    let at = u.int_in_range(0..=params.len())?;
    params.insert(at, ("token".to_owned(), token));
    let mut body = form_body(u, &params)?;
    match u.int_in_range(0..=7)? {
        0 => body.extend_from_slice(u.choose(&[&b"%"[..], b"%zz", b"&%FF", b"&&", b"&token"])?),
        1 => body.insert(0, b'&'),
        _ => {}
    }
    // Never before NOW: the puts dropped entries that had expired by then.
    let now = match u.int_in_range(0..=3)? {
        0 => named.expires_at,
        1 => named.expires_at.saturating_sub(1),
        _ => NOW,
    }
    .max(NOW);
    check_introspect(&host, &store, &stored, &body, now);
    Ok(())
}
