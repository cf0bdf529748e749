//! Helpers shared by the targets: an in-memory host, an order-keeping JSON reader, token
//! builders and a generator of JSON values.

use arbitrary::{Result, Unstructured};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use split_token_core::store::{HostStatus, SetError, SharedData};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

/// Runs just before a `set` lands, as another worker would.
pub type Hook = Box<dyn FnOnce(&MemoryData)>;

/// Envoy's shared data in memory, with its CAS rules: a CAS token per key, bumped on each write;
/// a write with a stale token fails; a write without one always lands.
#[derive(Default)]
pub struct MemoryData {
    pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Runs once, just before the first write to its key lands.
    pub before_set: RefCell<Option<(String, Hook)>>,
}

impl MemoryData {
    /// Writes without CAS, bypassing the hooks: for corrupting a slot on purpose.
    pub fn raw_set(&self, key: &str, value: &[u8]) {
        let mut map = self.map.borrow_mut();
        let cas = map.get(key).map_or(1, |(_, c)| c.wrapping_add(1));
        map.insert(key.to_owned(), (value.to_vec(), cas));
    }
}

impl SharedData for MemoryData {
    fn get(&self, key: &str) -> std::result::Result<(Vec<u8>, Option<u32>), HostStatus> {
        Ok(self
            .map
            .borrow()
            .get(key)
            .map_or((Vec::new(), None), |(v, c)| (v.clone(), Some(*c))))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> std::result::Result<(), SetError> {
        let hook = {
            let mut pending = self.before_set.borrow_mut();
            match pending.as_ref() {
                Some((k, _)) if k == key => pending.take(),
                _ => None,
            }
        };
        if let Some((_, hook)) = hook {
            hook(self);
        }
        let current = self.map.borrow().get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != have {
                return Err(SetError::CasMismatch);
            }
        }
        self.raw_set(key, value);
        Ok(())
    }
}

/// A JSON object's members in order, duplicates kept, values as their raw text.
pub fn members(body: &[u8]) -> Option<Vec<(String, Box<RawValue>)>> {
    struct Members(Vec<(String, Box<RawValue>)>);
    impl<'de> serde::Deserialize<'de> for Members {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Members, A::Error> {
                    let mut out = Vec::new();
                    while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                        out.push(entry);
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Members>(body).ok().map(|m| m.0)
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.payload.signature` with the given JSON header and payload and signature bytes.
pub fn jwt(header: &Value, payload: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        b64(signature)
    )
}

/// Signature bytes whose base64url text is 1 to 2048 characters, as `CompactJws` accepts.
pub fn signature_bytes(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.truncate(1536);
    if bytes.is_empty() {
        bytes.push(0x5a);
    }
    bytes
}

/// Whether `text` may be sent as an HTTP field value by Envoy: no control character at all
/// (CR, LF and NUL split or truncate headers; the rest are refused by HTTP/2 peers), including
/// the C1 controls of Unicode.
pub fn is_safe_header_value(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

/// Strings the generators pick from: claim and member names, and tricky contents.
const WORDS: [&str; 16] = [
    "sub",
    "roles",
    "realm_access",
    "email",
    "a",
    "b",
    "a.b",
    "",
    ",",
    "x,y",
    "\r\n",
    "\u{0}",
    "\u{85}",
    "é",
    "https://example.com/roles",
    " ",
];

/// A string that is sometimes a chosen word, sometimes anything.
pub fn string(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(1, 2)? {
        Ok((*u.choose(&WORDS)?).to_owned())
    } else {
        u.arbitrary()
    }
}

/// A JSON value of bounded depth and size.
pub fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let leaf = depth == 0 || u.is_empty();
    let kind = if leaf {
        u.int_in_range(0..=5)?
    } else {
        u.int_in_range(0..=7)?
    };
    Ok(match kind {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::from(u.arbitrary::<u64>()?),
        4 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => Value::String(string(u)?),
        6 => {
            let n = u.int_in_range(0..=4)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(value(u, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut map = Map::new();
            for _ in 0..n {
                map.insert(string(u)?, value(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

/// Up to three parameters a revocation form carries besides its token: client ids, hints (the
/// known ones or any), repeated `token`s and arbitrary names.
pub fn form_params(u: &mut Unstructured<'_>) -> Result<Vec<(String, String)>> {
    let mut params = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let name = match u.int_in_range(0..=3)? {
            0 => "client_id".to_owned(),
            1 => "token_type_hint".to_owned(),
            2 => "token".to_owned(),
            _ => string(u)?,
        };
        let value = match u.int_in_range(0..=2)? {
            0 => "access_token".to_owned(),
            1 => "refresh_token".to_owned(),
            _ => string(u)?,
        };
        params.push((name, value));
    }
    Ok(params)
}

/// A form body for `params`: fully encoded, or with spaces as '+' and other characters left as
/// they are wherever that is unambiguous, as clients send them.
pub fn form_body(u: &mut Unstructured<'_>, params: &[(String, String)]) -> Result<Vec<u8>> {
    use split_token_core::lifecycle::revoke::encode_form;
    if u.arbitrary()? {
        return Ok(encode_form(params));
    }
    Ok(params
        .iter()
        .map(|(n, v)| {
            let plain = |s: &str| !s.contains(['&', '=', '%', '+']);
            if plain(n) && plain(v) {
                format!("{}={}", n.replace(' ', "+"), v.replace(' ', "+"))
            } else {
                String::from_utf8(encode_form(&[(n.clone(), v.clone())])).unwrap()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes())
}
