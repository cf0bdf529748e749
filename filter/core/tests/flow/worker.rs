//! The worker's own duties: key refresh on its tick, the revocation poller.

use super::*;
use split_token_core::replicas::etcd::marker_key;
use split_token_core::token::Signature;
use std::time::Duration;

#[test]
fn the_first_tick_fetches_keys_and_a_failure_is_counted() {
    let mut proxy = Proxy::new(&config(json!({"verify": verify()})));
    assert_eq!(proxy.world.tick.get(), Some(Duration::from_secs(1)));
    proxy.tick();
    let call = proxy.world.take_calls().remove(0);
    assert_eq!(call.path, "/jwks");
    proxy.answer(call.token, Some("500"), "");
    assert_eq!(proxy.world.counter(Counter::KeyFetchFailures), 1);
    proxy.world.advance(Duration::from_secs(6));
    proxy.tick();
    let call = proxy.world.take_calls().remove(0);
    proxy.answer(call.token, Some("200"), &jwks());
    assert_eq!(proxy.world.counter(Counter::KeysFetched), 1);
    assert!(proxy
        .world
        .logged("loaded 1 verification key(s) from /jwks"));
    // A token is now issued without waiting.
    let (mut ex, _) = token_exchange(&proxy);
    assert_eq!(
        ex.response_body(&token_response(&jwt("alice"))),
        Action::Continue
    );
}

#[test]
fn the_poller_applies_markers_from_other_replicas() {
    let mut proxy = Proxy::new(&config(json!({"etcd": etcd()})));
    let jwt = jwt("alice");
    let token = signature(&jwt).to_owned();
    let (mut read, _) = api(&proxy, &bearer(&token));
    let range = proxy.world.take_calls().remove(0);
    read.answer(range.token, Some("200"), &etcd_holds(&jwt));

    proxy.tick();
    let poll = proxy.world.take_calls().remove(0);
    assert_eq!(poll.path, "/v3/kv/range");
    let key = Signature::parse(token.as_bytes()).unwrap().store_key();
    let marker = STANDARD.encode(marker_key("st/", &key, T0 * 1000));
    let answer = json!({"header": {}, "kvs": [{"key": marker}]}).to_string();
    proxy.answer(poll.token, Some("200"), &answer);
    assert_eq!(proxy.world.counter(Counter::EtcdRevocationsApplied), 1);
    // Gone here; a miss asks etcd, which no longer has it either.
    let (mut ex, _) = api(&proxy, &bearer(&token));
    let range = proxy.world.take_calls().remove(0);
    ex.answer(range.token, Some("200"), NOT_FOUND);
    assert_eq!(ex.reply().unwrap().status, 401);

    // A failing poll logs once per outage.
    proxy.world.advance(Duration::from_secs(1));
    proxy.tick();
    let poll = proxy.world.take_calls().remove(0);
    proxy.answer(poll.token, None, "");
    assert!(proxy.world.logged("revocation poll failed"));
}

#[test]
fn an_unconfigured_worker_refuses_requests() {
    let mut worker = split_token_core::flow::Worker::default();
    let world = sim::World::new();
    assert!(!worker.configure(&*world, b"{\"store_slots\": 0}"));
    assert!(worker.stream().is_none());
    assert!(world.logged("invalid configuration"));
}
