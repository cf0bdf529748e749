//! Revocation, logout and introspection, with and without etcd, in both modes.

use super::*;
use sha2::{Digest, Sha256};

fn revocation_config(allow_hold: bool, etcd_on: bool) -> Value {
    let mut c = config(json!({
        "revocation_paths": ["/auth/revoke"],
        "logout_paths": ["/auth/logout"],
    }));
    if etcd_on {
        c["etcd"] = etcd();
    }
    with_mode(c, allow_hold)
}

/// A revocation request's headers: held (allowed) or gone on without `content-length`.
fn revocation(proxy: &Proxy, allow_hold: bool) -> Exchange {
    let mut ex = proxy.exchange();
    let headers = [
        (":method", "POST"),
        (":path", "/auth/revoke"),
        ("content-length", "50"),
    ];
    let action = ex.request_headers(&headers, false);
    assert_eq!(
        action,
        if allow_hold {
            Action::Pause
        } else {
            Action::Continue
        }
    );
    assert_eq!(
        ex.host.request_header_text("content-length").is_some(),
        allow_hold
    );
    ex
}

#[test]
fn revocation_without_etcd_forwards_the_full_jwt_and_refuses_the_token() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&revocation_config(allow_hold, false));
        let jwt = jwt("alice");
        let token = issue(&proxy, &jwt);
        let mut ex = revocation(&proxy, allow_hold);
        assert_eq!(ex.request_body(&format!("token={token}")), Action::Continue);
        let body = String::from_utf8(ex.host.request_body.borrow().clone()).unwrap();
        assert_eq!(body, format!("token={jwt}"));
        ex.assert_clean();
        assert_eq!(proxy.world.counter(Counter::Revoked), 1);
        let (ex, _) = api(&proxy, &bearer(&token));
        assert_eq!(ex.reply().unwrap().status, 401);
    }
}

#[test]
fn a_revocation_must_be_a_post() {
    let proxy = Proxy::new(&revocation_config(true, false));
    let mut ex = proxy.exchange();
    let action = ex.request_headers(&[(":method", "GET"), (":path", "/auth/revoke")], true);
    assert_eq!(action, Action::Pause);
    assert_eq!(ex.reply().unwrap().status, 400);
}

#[test]
fn revocation_with_etcd_revokes_once_etcd_has_it() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&revocation_config(allow_hold, true));
        let jwt = jwt("alice");
        let (mut issuing, _) = token_exchange(&proxy);
        issuing.response_body(&token_response(&jwt));
        for call in proxy.world.take_calls() {
            let answer = if call.path == "/v3/lease/grant" {
                GRANTED
            } else {
                WRITTEN
            };
            issuing.answer(call.token, Some("200"), answer);
            for call in proxy.world.take_calls() {
                issuing.answer(call.token, Some("200"), WRITTEN);
            }
        }
        let token = access_token(&issuing);
        let mut ex = revocation(&proxy, allow_hold);
        assert_eq!(ex.request_body(&format!("token={token}")), Action::Pause);
        let txn = proxy.world.take_calls().remove(0);
        assert_eq!(txn.path, "/v3/kv/txn");
        ex.answer(txn.token, Some("200"), WRITTEN);
        assert!(is_request(&ex.resumed()));
        assert_eq!(
            String::from_utf8(ex.host.request_body.borrow().clone()).unwrap(),
            format!("token={jwt}")
        );
        assert_eq!(proxy.world.counter(Counter::EtcdRevocationsPublished), 1);
        ex.assert_clean();
    }
}

#[test]
fn a_revocation_etcd_refuses_revokes_nothing() {
    let proxy = Proxy::new(&revocation_config(true, true));
    let jwt = jwt("alice");
    // Stored here through a replica's read (no etcd write needed for the test).
    let token = signature(&jwt).to_owned();
    let (mut read, _) = api(&proxy, &bearer(&token));
    let range = proxy.world.take_calls().remove(0);
    read.answer(range.token, Some("200"), &etcd_holds(&jwt));
    let mut ex = revocation(&proxy, true);
    ex.request_body(&format!("token={token}"));
    let grant = proxy.world.take_calls().remove(0);
    ex.answer(grant.token, None, "");
    assert_eq!(ex.reply().unwrap().status, 503);
    // Still valid here.
    let (_, action) = api(&proxy, &bearer(&token));
    assert_eq!(action, Action::Continue);
}

#[test]
fn logout_revokes_with_and_without_etcd() {
    for etcd_on in [false, true] {
        let proxy = Proxy::new(&revocation_config(true, etcd_on));
        let jwt = jwt("alice");
        let token = signature(&jwt).to_owned();
        if etcd_on {
            let (mut read, _) = api(&proxy, &bearer(&token));
            let range = proxy.world.take_calls().remove(0);
            read.answer(range.token, Some("200"), &etcd_holds(&jwt));
        } else {
            issue(&proxy, &jwt);
        }
        let mut ex = proxy.exchange();
        let headers = [
            (":method", "POST"),
            (":path", "/auth/logout"),
            ("authorization", &bearer(&token)),
        ];
        let action = ex.request_headers(&headers, true);
        if etcd_on {
            assert_eq!(action, Action::Pause);
            let grant = proxy.world.take_calls().remove(0);
            ex.answer(grant.token, Some("200"), GRANTED);
            let txn = proxy.world.take_calls().remove(0);
            ex.answer(txn.token, Some("200"), WRITTEN);
            assert!(is_request(&ex.resumed()));
        } else {
            assert_eq!(action, Action::Continue);
        }
        assert_eq!(
            ex.host.request_header_text("authorization"),
            Some(bearer(&jwt))
        );
        // Gone here; with etcd a miss asks etcd, where it is gone too.
        let (mut ex, _) = api(&proxy, &bearer(&token));
        if etcd_on {
            let range = proxy.world.take_calls().remove(0);
            assert_eq!(range.path, "/v3/kv/range");
            ex.answer(range.token, Some("200"), NOT_FOUND);
        }
        assert_eq!(ex.reply().map(|r| r.status), Some(401), "etcd {etcd_on}");
    }
}

#[test]
fn introspection_answers_here_in_both_modes() {
    let secret_hash = hex(&Sha256::digest(b"secret"));
    for allow_hold in MODES {
        let c = config(json!({"introspection": {
            "paths": ["/auth/introspect"],
            "clients": [{"client_id": "rs", "client_secret_sha256": secret_hash}],
        }}));
        let proxy = Proxy::new(&with_mode(c, allow_hold));
        let token = issue(&proxy, &jwt("alice"));
        let basic = format!("Basic {}", STANDARD.encode("rs:secret"));
        for (authorization, body, status, active) in [
            (basic.as_str(), format!("token={token}"), 200, Some(true)),
            (basic.as_str(), "token=unknown".to_owned(), 200, Some(false)),
            ("Basic bm8=", format!("token={token}"), 401, None),
        ] {
            let mut ex = proxy.exchange();
            let headers = [
                (":method", "POST"),
                (":path", "/auth/introspect"),
                ("authorization", authorization),
            ];
            ex.request_headers(&headers, false);
            // Without the hold, the credentials never go on.
            assert_eq!(
                ex.host.request_header_text("authorization").is_some(),
                allow_hold
            );
            assert_eq!(ex.request_body(&body), Action::Pause);
            let reply = ex.reply().unwrap();
            assert_eq!(reply.status, status);
            if let Some(active) = active {
                let answer: Value = serde_json::from_str(&reply.body).unwrap();
                assert_eq!(answer["active"], json!(active));
            }
            ex.assert_clean();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
