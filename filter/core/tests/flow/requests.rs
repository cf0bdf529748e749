//! API calls: hits, rejections, and misses read from etcd.

use super::*;
use std::rc::Rc;

#[test]
fn a_hit_forwards_the_rebuilt_jwt_and_claims() {
    let proxy = Proxy::new(&config(json!({})));
    let jwt = jwt("alice");
    let token = issue(&proxy, &jwt);
    for _ in 0..2 {
        // The second call is a hit in the worker's cache.
        let (ex, action) = api(&proxy, &bearer(&token));
        assert_eq!(action, Action::Continue);
        assert_eq!(
            ex.host.request_header_text("authorization"),
            Some(bearer(&jwt))
        );
        assert_eq!(
            ex.host.request_header_text("x-user-id").as_deref(),
            Some("alice")
        );
        assert_eq!(
            ex.host.route_cleared.get(),
            1,
            "routed on the identity headers"
        );
        ex.assert_clean();
    }
    assert_eq!(proxy.world.counter(Counter::LookupHit), 2);
}

#[test]
fn unknown_and_missing_tokens_are_refused_locally() {
    let proxy = Proxy::new(&config(json!({})));
    // (The client's x-user-id stays on a request that is answered here: it reaches no upstream.)
    let (ex, action) = api(&proxy, "Bearer nope");
    assert_eq!(action, Action::Pause);
    let reply = ex.reply().unwrap();
    assert_eq!(reply.status, 401);
    assert!(reply
        .header("www-authenticate")
        .unwrap()
        .contains("invalid_token"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let mut ex = proxy.exchange();
    ex.request_headers(&[(":method", "GET"), (":path", "/api")], true);
    assert_eq!(ex.reply().unwrap().status, 401);
    assert_eq!(proxy.world.counter(Counter::RejectedUnknown), 1);
    assert_eq!(proxy.world.counter(Counter::RejectedMissing), 1);
}

#[test]
fn a_public_request_goes_on_untouched() {
    let proxy = Proxy::new(&config(json!({"public_prefixes": ["/health/"]})));
    let mut ex = proxy.exchange();
    let action = ex.request_headers(&[(":method", "GET"), (":path", "/health/live")], true);
    assert_eq!(action, Action::Continue);
    assert!(ex.reply().is_none());
}

#[test]
fn a_miss_is_read_from_etcd_once_then_is_a_local_hit() {
    let issuer = Proxy::new(&config(json!({})));
    let jwt = jwt("alice");
    let token = issue(&issuer, &jwt);
    // Another replica: its own shared data.
    let replica = Proxy::new(&config(json!({"etcd": etcd()})));
    let (mut ex, action) = api(&replica, &bearer(&token));
    assert_eq!(action, Action::Pause);
    let range = replica.world.take_calls().remove(0);
    assert_eq!(range.path, "/v3/kv/range");
    ex.answer(range.token, Some("200"), &etcd_holds(&jwt));
    assert!(is_request(&ex.resumed()));
    assert_eq!(
        ex.host.request_header_text("authorization"),
        Some(bearer(&jwt))
    );
    assert_eq!(replica.world.counter(Counter::EtcdFetched), 1);
    ex.assert_clean();
    let (_, action) = api(&replica, &bearer(&token));
    assert_eq!(action, Action::Continue);
    assert!(replica.world.take_calls().is_empty());
}

#[test]
fn a_miss_etcd_does_not_hold_is_a_401_and_a_failed_read_a_503() {
    let replica = Proxy::new(&config(json!({"etcd": etcd()})));
    let token = signature(&jwt("alice")).to_owned();
    let (mut ex, _) = api(&replica, &bearer(&token));
    let range = replica.world.take_calls().remove(0);
    ex.answer(range.token, Some("200"), NOT_FOUND);
    assert_eq!(ex.reply().unwrap().status, 401);
    assert!(ex.resumed().is_empty());
    assert_eq!(replica.world.counter(Counter::EtcdNotFound), 1);

    let (mut ex, _) = api(&replica, &bearer(&token));
    let range = replica.world.take_calls().remove(0);
    ex.answer(range.token, None, "");
    assert_eq!(ex.reply().unwrap().status, 503);
    assert_eq!(replica.world.counter(Counter::EtcdFailures), 1);
}

#[test]
fn lookups_under_way_are_bounded_per_worker_and_released_when_the_request_goes() {
    let mut etcd = etcd();
    etcd["max_pending_lookups"] = json!(1);
    let replica = Proxy::new(&config(json!({ "etcd": etcd })));
    let token = signature(&jwt("alice")).to_owned();
    let (mut first, action) = api(&replica, &bearer(&token));
    assert_eq!(action, Action::Pause);
    let (second, action) = api(&replica, &bearer(&token));
    assert_eq!(action, Action::Pause);
    assert_eq!(
        second.reply().unwrap().status,
        503,
        "over max_pending_lookups"
    );
    // The client of the first went away while its call was under way.
    first.drop_stream();
    let (third, action) = api(&replica, &bearer(&token));
    assert_eq!(action, Action::Pause);
    assert!(third.reply().is_none(), "the slot was released");
    assert_eq!(replica.world.take_calls().len(), 2);
    drop(Rc::clone(&replica.world));
}

/// Every request that goes on carries, under each identity header name, the token's verified
/// value or nothing: whatever the client sent there (once or twice) is gone, also
/// when the token lacks the claim and when a full JWT passes through.
#[test]
fn client_identity_headers_never_go_on() {
    let mappings = json!([
        {"claim": "sub", "header": "x-user-id"},
        {"claim": "email", "header": "x-user-email"},
    ]);
    let proxy = Proxy::new(&config(
        json!({"claims_to_headers": mappings, "full_jwt": "allow"}),
    ));
    let jwt = jwt("alice");
    let token = issue(&proxy, &jwt);
    let spoofed = |authorization: &str| {
        let mut ex = proxy.exchange();
        let headers = [
            (":method", "GET"),
            (":path", "/api/get"),
            ("authorization", authorization),
            ("x-user-id", "mallory"),
            ("x-user-id", "mallory-again"),
            ("x-user-email", "mallory@example.com"),
        ];
        let action = ex.request_headers(&headers, true);
        (ex, action)
    };
    for _ in 0..2 {
        // A store hit, then a cache hit.
        let (ex, action) = spoofed(&bearer(&token));
        assert_eq!(action, Action::Continue);
        assert_eq!(
            ex.host.request_values("x-user-id"),
            vec!["alice".to_owned()]
        );
        assert_eq!(
            ex.host.request_values("x-user-email"),
            Vec::<String>::new(),
            "the token has no email claim"
        );
    }
    let (ex, action) = spoofed(&bearer(&jwt));
    assert_eq!(action, Action::Continue, "a full JWT passes through");
    assert_eq!(ex.host.request_values("x-user-id"), Vec::<String>::new());
    assert_eq!(ex.host.request_values("x-user-email"), Vec::<String>::new());
    assert_eq!(proxy.world.counter(Counter::FullJwtForwarded), 1);
}

/// A refused API call is answered here with the client's identity headers gone: the request
/// reaches no upstream, and Envoy's access log must not record a spoofed user either.
#[test]
fn a_refused_call_drops_the_client_identity_before_the_answer() {
    let proxy = Proxy::new(&config(json!({})));
    for authorization in ["Bearer nope", "Basic eA==", ""] {
        let (ex, action) = api(&proxy, authorization);
        assert_eq!(action, Action::Pause);
        assert_eq!(ex.reply().unwrap().status, 401, "{authorization:?}");
        assert_eq!(
            ex.host.request_values("x-user-id"),
            Vec::<String>::new(),
            "{authorization:?}"
        );
    }
}
