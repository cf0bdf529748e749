//! Host calls per token hit and per public request: the flow's share of a request's cost
//! (issue 14). The adapter adds none: each host method is one host call.

use super::*;

fn calls_of(proxy: &Proxy, f: impl FnOnce()) -> u32 {
    let before = proxy.world.hostcalls.get();
    f();
    proxy.world.hostcalls.get() - before
}

/// A cached hit: `:path`, `Authorization`, the clock, the counter, the rebuilt `Authorization`;
/// plus one write per claim header (a replace: it also drops what the client sent) and the
/// route recomputation; plus the epoch read with revocation configured (of an empty value: no
/// allocation in the VM), which a host's own map (the native build) answers without a host call.
/// A public request: `:path`, the removals and the route recomputation.
#[test]
fn host_calls_per_hit_and_per_public_request() {
    for (extra, hit, public) in [
        (json!({"claims_to_headers": []}), 5, 1),
        (json!({}), 7, 3),
        (json!({"revocation_paths": ["/auth/revoke"]}), 8, 3),
    ] {
        let mut c = config(extra);
        c["public_prefixes"] = json!(["/health/"]);
        let proxy = Proxy::new(&c);
        let in_map = proxy.world.maps.is_some();
        let epoch_read = u32::from(c.get("revocation_paths").is_some() && in_map);
        let hit = hit - epoch_read;
        let token = issue(&proxy, &jwt("alice"));
        let _warm = api(&proxy, &bearer(&token));
        let n = calls_of(&proxy, || {
            let (_, action) = api(&proxy, &bearer(&token));
            assert_eq!(action, Action::Continue);
        });
        assert_eq!(n, hit, "hit with {c}");
        let n = calls_of(&proxy, || {
            let mut ex = proxy.exchange();
            ex.request_headers(&[(":method", "GET"), (":path", "/health/x")], true);
        });
        assert_eq!(n, public, "public request with {c}");
    }
}
