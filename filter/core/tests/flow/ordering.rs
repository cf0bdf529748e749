//! Answers late, out of order, for a request that went away, and upstreams that answer before
//! the filter read the request.

use super::*;

#[test]
fn answers_out_of_order_reach_their_own_requests() {
    let issuer = Proxy::new(&config(json!({})));
    let (alice, bob) = (jwt("alice"), jwt("bob"));
    let (a, b) = (issue(&issuer, &alice), issue(&issuer, &bob));
    let replica = Proxy::new(&config(json!({"etcd": etcd()})));
    let (mut first, _) = api(&replica, &bearer(&a));
    let (mut second, _) = api(&replica, &bearer(&b));
    let calls = replica.world.take_calls();
    // The second answer first; then a stale token to the first, which it ignores.
    second.answer(calls[1].token, Some("200"), &etcd_holds(&bob));
    first.answer(calls[1].token, Some("200"), &etcd_holds(&bob));
    assert!(first.resumed().is_empty());
    first.answer(calls[0].token, Some("200"), &etcd_holds(&alice));
    assert_eq!(
        first.host.request_header_text("authorization"),
        Some(bearer(&alice))
    );
    assert_eq!(
        second.host.request_header_text("authorization"),
        Some(bearer(&bob))
    );
    // A late duplicate of an answer already handled changes nothing.
    first.answer(calls[0].token, None, "");
    assert_eq!(first.resumed().len(), 1);
    assert!(first.reply().is_none());
}

#[test]
fn a_request_that_went_away_leaves_no_trace_of_its_call() {
    let replica = Proxy::new(&config(json!({"etcd": etcd()})));
    let token = signature(&jwt("alice")).to_owned();
    let (mut ex, _) = api(&replica, &bearer(&token));
    let call = replica.world.take_calls().remove(0);
    ex.drop_stream();
    // Envoy drops the answer of a gone context; the worker's own answer path ignores it too.
    let mut replica = replica;
    replica.answer(call.token, Some("200"), NOT_FOUND);
    assert_eq!(replica.world.counter(Counter::EtcdNotFound), 0);
}

#[test]
fn an_upstream_answering_before_the_body_was_read_is_reset() {
    let c = with_mode(config(json!({"revocation_paths": ["/auth/revoke"]})), false);
    let proxy = Proxy::new(&c);
    let mut ex = proxy.exchange();
    let action = ex.request_headers(&[(":method", "POST"), (":path", "/auth/revoke")], false);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        ex.response_headers(&[(":status", "200")], false),
        Action::Pause
    );
    assert!(ex.host.reset.get());
    assert_eq!(proxy.world.counter(Counter::EarlyAnswers), 1);
    // The body never goes on after that.
    assert_eq!(ex.request_body("token=x"), Action::Pause);
    ex.assert_clean();
}

#[test]
fn a_body_that_arrives_while_etcd_is_asked_is_held() {
    let replica = Proxy::new(&config(json!({"etcd": etcd()})));
    let token = signature(&jwt("alice")).to_owned();
    let mut ex = replica.exchange();
    let headers = [
        (":method", "POST"),
        (":path", "/api"),
        ("authorization", &bearer(&token)),
    ];
    assert_eq!(ex.request_headers(&headers, false), Action::Pause);
    assert_eq!(ex.request_body("payload"), Action::Pause);
    let call = replica.world.take_calls().remove(0);
    ex.answer(call.token, Some("200"), &etcd_holds(&jwt("alice")));
    assert!(is_request(&ex.resumed()));
}
