//! Issuance: the token response is split, verified (waiting for keys), written to etcd.

use super::*;

#[test]
fn a_token_response_is_split_and_stored_in_both_modes() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&with_mode(config(json!({})), allow_hold));
        let jwt = jwt("alice");
        let (mut ex, _) = token_exchange(&proxy);
        assert_eq!(ex.response_body(&token_response(&jwt)), Action::Continue);
        assert_eq!(access_token(&ex), signature(&jwt));
        // Stale validators go; the new length is set only while the headers are still held.
        assert_eq!(ex.host.response_header_text("etag"), None);
        let length = ex.host.response_header_text("content-length");
        let body_len = ex.host.response_body.borrow().len().to_string();
        assert_eq!(
            length,
            allow_hold.then_some(body_len),
            "allow_hold {allow_hold}"
        );
        ex.assert_clean();
        assert_eq!(proxy.world.counter(Counter::TokensSplit), 1);
    }
}

#[test]
fn an_unsplittable_response_fails_closed_with_a_502_or_a_reset() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&with_mode(config(json!({})), allow_hold));
        let (mut ex, _) = token_exchange(&proxy);
        assert_eq!(
            ex.response_body(r#"{"token_type":"Bearer"}"#),
            Action::Pause
        );
        if allow_hold {
            assert_eq!(ex.reply().unwrap().status, 502);
            assert!(!ex.host.reset.get());
        } else {
            assert!(ex.reply().is_none());
            assert!(ex.host.reset.get());
            assert_eq!(proxy.world.counter(Counter::SplitResets), 1);
        }
        assert_eq!(proxy.world.counter(Counter::SplitFailures), 1);
        ex.assert_clean();
    }
}

#[test]
fn an_error_answer_passes_through() {
    let proxy = Proxy::new(&config(json!({})));
    let mut ex = proxy.exchange();
    ex.request_headers(&[(":method", "POST"), (":path", "/auth/token")], true);
    let action = ex.response_headers(&[(":status", "400")], false);
    assert_eq!(action, Action::Continue);
    assert_eq!(ex.response_body("{}"), Action::Continue);
    assert_eq!(proxy.world.counter(Counter::TokenErrorsPassedThrough), 1);
}

#[test]
fn the_first_token_waits_for_keys_then_issues() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&with_mode(config(json!({"verify": verify()})), allow_hold));
        let jwt = jwt("alice");
        let (mut ex, _) = token_exchange(&proxy);
        assert_eq!(ex.response_body(&token_response(&jwt)), Action::Pause);
        let calls = proxy.world.take_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].cluster.as_str(), calls[0].path.as_str()),
            ("idp", "/jwks")
        );
        let accept = ("accept".to_owned(), "application/json".to_owned());
        assert!(calls[0].headers.contains(&accept));
        ex.answer(calls[0].token, Some("200"), &jwks());
        assert_eq!(ex.resumed(), [Message::Response]);
        assert_eq!(access_token(&ex), signature(&jwt));
        assert_eq!(proxy.world.counter(Counter::KeysFetched), 1);
        ex.assert_clean();

        // The worker has the keys now: the next token is issued at once.
        let (mut ex, _) = token_exchange(&proxy);
        assert_eq!(ex.response_body(&token_response(&jwt)), Action::Continue);
        assert!(proxy.world.take_calls().is_empty());
    }
}

#[test]
fn no_keys_fails_closed() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&with_mode(config(json!({"verify": verify()})), allow_hold));
        let (mut ex, _) = token_exchange(&proxy);
        assert_eq!(
            ex.response_body(&token_response(&jwt("alice"))),
            Action::Pause
        );
        let call = proxy.world.take_calls().remove(0);
        // The IdP did not answer in time.
        ex.answer(call.token, None, "");
        assert!(ex.resumed().is_empty());
        assert_eq!(ex.reply().map(|r| r.status), allow_hold.then_some(502));
        assert_eq!(ex.host.reset.get(), !allow_hold);
        assert_eq!(proxy.world.counter(Counter::KeyFetchFailures), 1);
        assert_eq!(proxy.world.counter(Counter::VerifyFailed), 1);
        assert!(proxy.world.logged("key fetch failed"));
    }
}

#[test]
fn a_bad_signature_refetches_once_then_fails() {
    let proxy = Proxy::new(&with_mode(config(json!({"verify": verify()})), true));
    let (mut ex, _) = token_exchange(&proxy);
    ex.response_body(&token_response(&jwt("alice")));
    let call = proxy.world.take_calls().remove(0);
    ex.answer(call.token, Some("200"), &jwks());
    // Keys loaded; a token signed with another secret fetches again (rotation?), once.
    let forged = jwt_signed(2, "mallory");
    let (mut ex, _) = token_exchange(&proxy);
    proxy.world.advance(std::time::Duration::from_secs(60));
    assert_eq!(ex.response_body(&token_response(&forged)), Action::Pause);
    let call = proxy.world.take_calls().remove(0);
    ex.answer(call.token, Some("200"), &jwks());
    assert_eq!(ex.reply().unwrap().status, 502);
    assert!(ex.reply().unwrap().body.contains("failed verification"));
    assert!(proxy.world.take_calls().is_empty());
}

/// Issues through etcd: lease grant, then the write; returns the exchange after the answers.
fn issue_through_etcd(proxy: &Proxy, jwt: &str, put_answer: Option<&str>) -> Exchange {
    let (mut ex, _) = token_exchange(proxy);
    assert_eq!(ex.response_body(&token_response(jwt)), Action::Pause);
    let grant = proxy.world.take_calls().remove(0);
    assert_eq!(grant.path, "/v3/lease/grant");
    ex.answer(grant.token, Some("200"), GRANTED);
    let put = proxy.world.take_calls().remove(0);
    assert_eq!(put.path, "/v3/kv/txn");
    assert!(put.body_text().contains(r#""lease":"42""#));
    match put_answer {
        Some(body) => ex.answer(put.token, Some("200"), body),
        None => ex.answer(put.token, None, ""),
    }
    ex
}

#[test]
fn with_etcd_the_token_is_written_there_first() {
    for allow_hold in MODES {
        let proxy = Proxy::new(&with_mode(config(json!({"etcd": etcd()})), allow_hold));
        let alice = jwt("alice");
        let ex = issue_through_etcd(&proxy, &alice, Some(WRITTEN));
        assert_eq!(ex.resumed(), [Message::Response]);
        assert_eq!(access_token(&ex), signature(&alice));
        assert_eq!(proxy.world.counter(Counter::EtcdPublished), 1);
        ex.assert_clean();
        // Same expiry bucket: the lease is reused, no second grant.
        let (mut ex, _) = token_exchange(&proxy);
        ex.response_body(&token_response(&jwt("bob")));
        let calls = proxy.world.take_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].path, "/v3/kv/txn");
    }
}

#[test]
fn a_failed_or_timed_out_etcd_write_issues_nothing() {
    for allow_hold in MODES {
        for put_answer in [None, Some(r#"{"code":14,"message":"unavailable"}"#)] {
            let proxy = Proxy::new(&with_mode(config(json!({"etcd": etcd()})), allow_hold));
            let (mut ex, _) = token_exchange(&proxy);
            let jwt = jwt("alice");
            ex.response_body(&token_response(&jwt));
            let grant = proxy.world.take_calls().remove(0);
            ex.answer(grant.token, Some("200"), GRANTED);
            let put = proxy.world.take_calls().remove(0);
            match put_answer {
                Some(body) => ex.answer(put.token, Some("503"), body),
                None => ex.answer(put.token, None, ""),
            }
            assert!(ex.resumed().is_empty());
            assert_eq!(ex.reply().map(|r| r.status), allow_hold.then_some(503));
            assert_eq!(ex.host.reset.get(), !allow_hold);
            assert_eq!(proxy.world.counter(Counter::EtcdFailures), 1);
            // Not stored here either: the signature is unknown.
            let (ex, action) = api(&proxy, &bearer(signature(&jwt)));
            assert_eq!(action, Action::Pause);
            let calls = proxy.world.take_calls();
            assert_eq!(calls[0].path, "/v3/kv/range", "a miss asks etcd");
            drop(ex);
        }
    }
}

#[test]
fn a_token_write_refused_because_the_token_was_revoked_issues_nothing() {
    // The IdP hands out a JWT that was revoked before (an IdP that caches its tokens): the
    // write's compare finds the token's `x/` key, and etcd 3.4 answers without `succeeded`.
    for allow_hold in MODES {
        let proxy = Proxy::new(&with_mode(config(json!({"etcd": etcd()})), allow_hold));
        let alice = jwt("alice");
        let ex = issue_through_etcd(&proxy, &alice, Some(r#"{"header":{"revision":"7"}}"#));
        assert!(ex.resumed().is_empty());
        assert_eq!(ex.reply().map(|r| r.status), allow_hold.then_some(503));
        assert_eq!(ex.host.reset.get(), !allow_hold);
        assert_eq!(proxy.world.counter(Counter::EtcdPublished), 0);
        assert_eq!(proxy.world.counter(Counter::EtcdFailures), 1);
        drop(ex);
        // Not stored here: the signature is unknown (asked of etcd).
        let (ex, action) = api(&proxy, &bearer(signature(&alice)));
        assert_eq!(action, Action::Pause);
        assert_eq!(proxy.world.take_calls()[0].path, "/v3/kv/range");
        drop(ex);
    }
}

#[test]
fn a_lost_lease_is_granted_again_once() {
    let proxy = Proxy::new(&with_mode(config(json!({"etcd": etcd()})), true));
    let lost = r#"{"code":5,"message":"etcdserver: requested lease not found"}"#;
    let (mut ex, _) = token_exchange(&proxy);
    ex.response_body(&token_response(&jwt("alice")));
    let grant = proxy.world.take_calls().remove(0);
    ex.answer(grant.token, Some("200"), GRANTED);
    let put = proxy.world.take_calls().remove(0);
    ex.answer(put.token, Some("400"), lost);
    let regrant = proxy.world.take_calls().remove(0);
    assert_eq!(regrant.path, "/v3/lease/grant");
    ex.answer(regrant.token, Some("200"), GRANTED);
    let put = proxy.world.take_calls().remove(0);
    ex.answer(put.token, Some("400"), lost);
    assert_eq!(ex.reply().unwrap().status, 503, "a second loss fails");
}

#[test]
fn an_etcd_call_that_cannot_start_fails_closed() {
    let proxy = Proxy::new(&with_mode(config(json!({"etcd": etcd()})), true));
    proxy.world.refuse_dispatch.set(true);
    let (mut ex, _) = token_exchange(&proxy);
    assert_eq!(
        ex.response_body(&token_response(&jwt("alice"))),
        Action::Pause
    );
    assert_eq!(ex.reply().unwrap().status, 503);
    assert!(proxy
        .world
        .logged("Envoy did not start the call (host status 2"));
}
