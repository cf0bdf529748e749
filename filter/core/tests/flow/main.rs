//! Whole exchanges through the flow, natively, against a simulated host (issue 14): the same
//! callbacks Envoy would make, in both header-holding modes, with calls answered, failed, timed
//! out, late, out of order, or never read because the request went away.

// A test binary: its helpers report failures by panicking.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

mod sim;

mod hostcalls; // host calls per token hit and per public request
mod issuance; // split, verify with key waits, the etcd write
mod lifecycle; // revocation, logout, introspection, with and without etcd
mod ordering; // late, out-of-order and orphaned answers; early upstream answers
mod requests; // hits, misses, rejections, misses read from etcd
mod worker; // key refresh and the revocation poller

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_compact::{KeyPair, Seed};
use jwt_compact::alg::Ed25519;
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt, Claims, Header};
use serde_json::{json, Value};
use sim::{Exchange, Proxy, T0};
use split_token_core::flow::host::Message;
use split_token_core::flow::Action;
use split_token_core::stats::Counter;

/// Both header-holding modes: with and without `allow_on_headers_stop_iteration` (Envoy's and
/// the filter's).
const MODES: [bool; 2] = [true, false];

/// The IdP's signing key (seed 1), or another one.
fn key_pair(seed: u8) -> KeyPair {
    KeyPair::from_seed(Seed::new([seed; 32]))
}

/// A JWT signed with the key of `seed` (EdDSA, kid `k1`), for `sub`, expiring an hour after
/// `T0`.
fn jwt_signed(seed: u8, sub: &str) -> String {
    let header = Header::empty().with_key_id("k1");
    let claims = Claims::new(json!({
        "sub": sub,
        "roles": "user,admin",
        "exp": T0 + 3600,
    }));
    Ed25519.token(&header, &claims, &key_pair(seed).sk).unwrap()
}

fn jwt(sub: &str) -> String {
    jwt_signed(1, sub)
}

fn signature(jwt: &str) -> &str {
    jwt.rsplit('.').next().unwrap()
}

/// The IdP's JWKS: the public key of seed 1 as `k1`.
fn jwks() -> String {
    let mut key = serde_json::to_value(JsonWebKey::from(&key_pair(1).pk)).unwrap();
    key["kid"] = json!("k1");
    json!({ "keys": [key] }).to_string()
}

fn token_response(jwt: &str) -> String {
    json!({"access_token": jwt, "token_type": "Bearer", "expires_in": 3600}).to_string()
}

/// The smallest configuration, with `extra` fields merged in.
fn config(extra: Value) -> Value {
    let mut base = json!({
        "token_paths": ["/auth/token"],
        "store_slots": 16,
        "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}],
    });
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

fn with_mode(mut config: Value, allow_hold: bool) -> Value {
    config["allow_on_headers_stop_iteration"] = json!(allow_hold);
    config
}

fn etcd() -> Value {
    json!({"cluster": "etcd", "key_prefix": "st/", "timeout_ms": 1000, "poll_ms": 500})
}

fn verify() -> Value {
    json!({"jwks_cluster": "idp", "jwks_path": "/jwks", "algorithms": ["EdDSA"]})
}

const GRANTED: &str = r#"{"header":{},"ID":"42"}"#;
const WRITTEN: &str = r#"{"header":{},"succeeded":true}"#;
const NOT_FOUND: &str = r#"{"header":{}}"#;

/// etcd's answer to a range that finds `jwt` (stored as `<expires_at>:<header.payload>`).
fn etcd_holds(jwt: &str) -> String {
    let (hp, _) = jwt.rsplit_once('.').unwrap();
    let value = STANDARD.encode(format!("{}:{hp}", T0 + 3600));
    json!({"header": {}, "kvs": [{"key": "eA==", "value": value}]}).to_string()
}

/// A token request, up to its response's headers: what the flow did with them.
fn token_exchange(proxy: &Proxy) -> (Exchange, Action) {
    let allow_hold = proxy.allow_hold();
    let mut ex = proxy.exchange();
    let headers = [
        (":method", "POST"),
        (":path", "/auth/token"),
        ("accept-encoding", "gzip"),
    ];
    assert_eq!(ex.request_headers(&headers, true), Action::Continue);
    assert_eq!(ex.host.request_header_text("accept-encoding"), None);
    let response = [
        (":status", "200"),
        ("content-length", "999"),
        ("etag", "\"x\""),
        ("content-type", "application/json"),
    ];
    let action = ex.response_headers(&response, false);
    assert_eq!(
        action,
        if allow_hold {
            Action::Pause
        } else {
            Action::Continue
        }
    );
    (ex, action)
}

/// The access token the client got (its `access_token`).
fn access_token(ex: &Exchange) -> String {
    let body = ex.host.response_body.borrow();
    let body: Value = serde_json::from_slice(&body).unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// Issues `jwt` through a proxy without verification or etcd; returns the client's token.
fn issue(proxy: &Proxy, jwt: &str) -> String {
    let (mut ex, _) = token_exchange(proxy);
    assert_eq!(ex.response_body(&token_response(jwt)), Action::Continue);
    ex.assert_clean();
    access_token(&ex)
}

/// An API call with `authorization`, up to its request headers.
fn api(proxy: &Proxy, authorization: &str) -> (Exchange, Action) {
    let mut ex = proxy.exchange();
    let headers = [
        (":method", "GET"),
        (":path", "/api/get"),
        ("authorization", authorization),
        ("x-user-id", "mallory"),
    ];
    let action = ex.request_headers(&headers, true);
    (ex, action)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn is_request(m: &[Message]) -> bool {
    m == [Message::Request]
}
