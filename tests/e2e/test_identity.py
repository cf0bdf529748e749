"""Identity translation: verification at issuance, claims projected into headers, and client-sent
identity headers that never reach an upstream. Uses the demo config (envoy/envoy.yaml), which
verifies against the IdP's JWKS (found through OpenID discovery), projects sub/roles/email, runs
Envoy's RBAC on the projected roles and logs x-user-id."""

import copy
import json

import pytest
import requests

import stack
from conftest import httpbin_base64_path
from helpers import (PROTECTED, StatDelta, assert_split_refused, b64url, b64url_decode,
                     forwarded_authorization, free_port, h1, refused_port, tampered_signature)

ALICE = {"sub": "alice", "roles": "user,admin", "email": "alice@example.com"}
BOB = {"sub": "bob", "roles": "user", "email": "bob@example.com"}


def demo_settings(**verify_overrides) -> dict:
    settings = copy.deepcopy(stack.filter_settings(stack.load_demo_config()))
    settings["verify"].update(verify_overrides)
    settings["public_prefixes"] = ["/public/"]  # an echoing public path (see conftest)
    return settings


@pytest.fixture(scope="module")
def identity_gateway(start_gateway):
    return start_gateway(demo_settings(), name="envoy-identity")


def echoed_headers(r: requests.Response) -> dict:
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"
    return r.json()["headers"]


def test_verified_issuance_splits_and_counts_the_key_fetch(identity_gateway):
    gw = identity_gateway
    with StatDelta(gw) as d:
        token = gw.token(**ALICE)
    assert "." not in token
    assert d.split_token("tokens_split") == 1
    assert d.split_token("verify.failed") == 0
    assert gw.counter("keys.fetched") >= 1


def test_claims_arrive_as_headers(identity_gateway):
    gw = identity_gateway
    token = gw.token(**ALICE)
    headers = echoed_headers(gw.call(f"Bearer {token}"))
    assert headers["X-User-Id"] == "alice"
    assert headers["X-User-Roles"] == "user,admin"
    assert headers["X-User-Email"] == "alice@example.com"
    assert headers["Authorization"].endswith("." + token)


@pytest.mark.parametrize("spoof_name", ["x-user-id", "X-User-Id", "X-USER-ID", "x-uSeR-iD"])
def test_spoofed_identity_headers_never_arrive_with_a_token(identity_gateway, spoof_name):
    gw = identity_gateway
    token = gw.token(**BOB)
    reply = gw.raw("GET", PROTECTED, [
        ("Authorization", f"Bearer {token}"),
        (spoof_name, "mallory"), (spoof_name, "admin"),
        ("X-User-Roles", "admin"),
    ])
    assert reply.status == 200, reply
    headers = reply.json()["headers"]
    assert headers["X-User-Id"] == "bob"
    assert headers["X-User-Roles"] == "user"


def test_spoofed_identity_headers_are_removed_on_public_paths(identity_gateway):
    reply = identity_gateway.raw("GET", "/public/echo", [
        ("X-User-Id", "mallory"), ("X-User-Roles", "admin"), ("X-User-Email", "m@evil"),
    ])
    assert reply.status == 200, reply
    headers = reply.json()["headers"]
    assert not {"X-User-Id", "X-User-Roles", "X-User-Email"} & set(headers), headers


def test_spoofed_identity_headers_without_a_token_do_not_help(identity_gateway):
    reply = identity_gateway.raw("GET", PROTECTED, [("X-User-Id", "alice")])
    assert reply.status == 401


def test_underscore_spelling_is_refused(identity_gateway):
    # WSGI and CGI upstreams fold x_user_id into X-User-Id; the demo config makes Envoy refuse it.
    token = identity_gateway.token(**BOB)
    reply = identity_gateway.raw("GET", PROTECTED, [
        ("Authorization", f"Bearer {token}"), ("x_user_id", "mallory"),
    ])
    assert reply.status == 400, reply


def test_rbac_after_the_filter_acts_on_projected_roles(identity_gateway):
    gw = identity_gateway
    admin = gw.token(**ALICE)
    user = gw.token(**BOB)
    r = gw.call(f"Bearer {admin}", path="/basic-protected-api/admin")
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["X-User-Id"] == "alice"
    assert gw.call(f"Bearer {user}", path="/basic-protected-api/admin").status_code == 403
    # Claiming the role in a header does not help.
    spoofed = gw.call(f"Bearer {user}", path="/basic-protected-api/admin",
                      headers={"X-User-Roles": "admin"})
    assert spoofed.status_code == 403
    # "nonadmin" is not "admin".
    other = gw.token(sub="carol", roles="nonadmin")
    assert gw.call(f"Bearer {other}", path="/basic-protected-api/admin").status_code == 403


def test_access_log_records_the_user(identity_gateway):
    gw = identity_gateway
    token = gw.token(sub="dave-logged", roles="user")
    assert gw.call(f"Bearer {token}").status_code == 200
    stack.wait_for("access log line", lambda: "user=dave-logged" in gw.envoy.log(), timeout=10)
    line = next(line for line in gw.envoy.log().splitlines() if "user=dave-logged" in line)
    assert "[access] GET /basic-protected-api/get 200" in line
    assert token not in gw.envoy.log()


def test_forward_jwt_false_sends_claims_but_no_authorization(start_gateway):
    settings = demo_settings()
    settings["forward_jwt"] = False
    gw = start_gateway(settings)
    token = gw.token(**ALICE)
    headers = echoed_headers(gw.call(f"Bearer {token}"))
    assert "Authorization" not in headers
    assert headers["X-User-Id"] == "alice"


def tampered_routes(gateway_token: str) -> tuple[list, dict]:
    """httpbin routes serving token responses whose JWT must fail verification."""
    header, payload, signature = gateway_token.split(".")
    # Canonical base64url of another 256-byte value: only verification can refuse it.
    flipped = tampered_signature(signature)
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = "root"
    forged_payload = b64url(json.dumps(claims).encode())
    none_header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    bodies = {
        "/forged/signature": f"{header}.{payload}.{flipped}",
        "/forged/claims": f"{header}.{forged_payload}.{signature}",
        "/forged/none": f"{none_header}.{payload}.{signature}",
    }
    routes = [
        {"match": {"path": path},
         "route": {"cluster": "httpbin", "prefix_rewrite": httpbin_base64_path({"access_token": jwt})}}
        for path, jwt in bodies.items()
    ]
    return routes, bodies


def test_tokens_that_fail_verification_are_not_issued(start_gateway, idp):
    # A real token from the IdP, then altered three ways and served as token responses.
    real = requests.post(f"http://127.0.0.1:{idp.port}/token",
                         data={"grant_type": "client_credentials", "sub": "x"}, timeout=10).json()
    routes, bodies = tampered_routes(real["access_token"])
    settings = demo_settings()
    settings["token_paths"] = settings["token_paths"] + list(bodies)
    gw = start_gateway(settings, extra_routes=routes)
    gw.token()  # keys loaded
    for path, jwt in bodies.items():
        with StatDelta(gw) as d:
            x = h1(gw.envoy.port, "GET", path, [])
        assert_split_refused(x, "verification", resets=d.split_token("split_resets"))
        assert jwt.split(".")[1].encode() not in x.raw and jwt.split(".")[2].encode() not in x.raw
        assert d.split_token("verify.failed") == 1, path
        assert d.split_token("tokens_split") == 0


def test_wrong_issuer_is_refused(start_gateway):
    gw = start_gateway(demo_settings(issuer="https://someone-else.example"))
    assert_split_refused(gw.token_exchange(), "issuer")


def test_wrong_audience_is_refused(start_gateway):
    gw = start_gateway(demo_settings(audiences=["payments"]))
    assert_split_refused(gw.token_exchange(aud="orders"), "audience")
    assert gw.token_response(aud="payments").status_code == 200


def test_key_rotation_without_restarting_envoy(start_gateway, run_dir):
    port = free_port()
    idp = stack.start_idp(port, run_dir)
    try:
        gw = start_gateway(demo_settings(min_refetch_seconds=0), idp_port=port)
        before = gw.token(sub="rotation-1")
        # A new IdP process generates a new signing key with a new kid.
        idp.stop()
        idp = stack.start_idp(port, run_dir)
        with StatDelta(gw) as d:
            after = gw.token(sub="rotation-2")
        assert d.split_token("keys.fetched") >= 1
        assert d.split_token("verify.failed") == 0
        for token, sub in ((before, "rotation-1"), (after, "rotation-2")):
            assert echoed_headers(gw.call(f"Bearer {token}"))["X-User-Id"] == sub
    finally:
        idp.stop()


def exact_balance(config):
    """Envoy gives a new connection to the worker with the fewest: two connections held open
    are on two workers, whatever the kernel would have picked."""
    listener = config["static_resources"]["listeners"][0]
    listener["connection_balance_config"] = {"exact_balance": {}}
    listener["enable_reuse_port"] = False


def connections_per_worker(gw, workers: int) -> list[int]:
    port = gw.envoy.port
    stats = gw.stats()
    return [stats.get(f"listener.127.0.0.1_{port}.worker_{n}.downstream_cx_active", 0)
            for n in range(workers)]


def issued_on(session: requests.Session, gw, path: str = "/auth/token", **form) -> str | None:
    """A token through `session`'s connection, or None when the filter refused to issue (a 502,
    or a reset where the shape lets the headers go on first)."""
    try:
        r = gw.token_response(path=path, session=session, **form)
    except requests.RequestException:
        return None
    return r.json()["access_token"] if r.status_code == 200 else None


def test_a_key_rotated_at_the_idp_reaches_every_worker_with_the_periodic_refresh(start_gateway,
                                                                                  run_dir):
    """The periodic refresh alone (refresh_seconds) brings a rotated key to every worker: each
    worker first spends its on-demand fetch of the hour (min_refetch_seconds) on a token whose
    kid no key has, then the IdP rotates its key. The native build has a timer on the main thread
    only; what its refresh loads reaches the worker threads' workers (issue 15)."""
    retired = ".".join([b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "retired"}).encode()),
                        b64url(json.dumps({"sub": "x", "exp": 4_000_000_000}).encode()),
                        b64url(b"s" * 256)])
    forged = {"match": {"path": "/forged/retired-kid"}, "route": {
        "cluster": "httpbin", "prefix_rewrite": httpbin_base64_path({"access_token": retired})}}
    settings = demo_settings(refresh_seconds=2, min_refetch_seconds=3600)
    settings["token_paths"] = settings["token_paths"] + ["/forged/retired-kid"]
    port = free_port()
    idp = stack.start_idp(port, run_dir)
    try:
        gw = start_gateway(settings, idp_port=port, concurrency=2, extra_routes=[forged],
                           customize=exact_balance)
        sessions = [requests.Session(), requests.Session()]  # one connection each
        before = [issued_on(s, gw, sub=f"before-{n}") for n, s in enumerate(sessions)]
        assert all(before), before
        assert connections_per_worker(gw, 2) == [1, 1]
        for s in sessions:
            assert issued_on(s, gw, path="/forged/retired-kid") is None
        # A new IdP process generates a new signing key with a new kid.
        idp.stop()
        idp = stack.start_idp(port, run_dir)
        after = [stack.wait_for(f"a token of the new key on worker connection {n}",
                                lambda s=s, n=n: issued_on(s, gw, sub=f"after-{n}"), timeout=30)
                 for n, s in enumerate(sessions)]
        assert connections_per_worker(gw, 2) == [1, 1]  # both workers it was, to the end
        for n, (old, new) in enumerate(zip(before, after)):
            assert echoed_headers(gw.call(f"Bearer {old}"))["X-User-Id"] == f"before-{n}"
            assert echoed_headers(gw.call(f"Bearer {new}"))["X-User-Id"] == f"after-{n}"
    finally:
        idp.stop()


@pytest.mark.parametrize("alg", ["ES256", "PS256", "EdDSA"])
def test_other_signature_algorithms_verify(start_gateway, run_dir, alg):
    port = free_port()
    idp = stack.start_idp(port, run_dir, alg=alg)
    try:
        gw = start_gateway(demo_settings(), idp_port=port)
        token = gw.token(sub=f"alg-{alg}")
        assert echoed_headers(gw.call(f"Bearer {token}"))["X-User-Id"] == f"alg-{alg}"
    finally:
        idp.stop()


def test_issuance_waits_for_keys_when_none_are_loaded(start_gateway, run_dir):
    """Envoy starts before the IdP, so its first key fetch fails and it has no keys. The first
    token request then fetches keys itself and waits for them instead of failing."""
    # A failed periodic fetch is tried again 5 s later (KeyState::RETRY_SECONDS). Should the IdP
    # take about that long to start, the retry loads the keys before the token request, which
    # then proves nothing: such a round is run again with a new Envoy.
    for _ in range(3):
        with refused_port() as port:  # nothing can take the port before the IdP does
            gw = start_gateway(demo_settings(refresh_seconds=3600), idp_port=port)
            stack.wait_for("a failed key fetch", lambda: gw.counter("keys.fetch_failures") >= 1,
                           timeout=10)
        idp = stack.start_idp(port, run_dir)
        try:
            if gw.counter("keys.fetched") > 0:
                continue
            with StatDelta(gw) as d:
                r = gw.token_response(sub="early")
            assert r.status_code == 200, r.text
            assert d.split_token("keys.fetched") == 1
            assert echoed_headers(gw.call(f"Bearer {r.json()['access_token']}"))["X-User-Id"] == "early"
            return
        finally:
            idp.stop()
    pytest.fail("every round, the periodic retry had loaded the keys before the token request")


def test_idp_down_at_issuance_fails_closed(start_gateway, run_dir):
    with refused_port() as port:  # nothing listens here, and nothing else can
        gw = start_gateway(demo_settings(fetch_timeout_ms=500), idp_port=port)
        r = gw.token_response()
    assert r.status_code in (502, 503), r.text
    assert "eyJ" not in r.text


def test_routes_matching_identity_headers_see_the_injected_values(start_gateway):
    """Envoy chooses a route before filters run; the filter has it recomputed after removing
    client-sent identity headers and adding the real ones (review finding on issue 3)."""
    admin_route = {
        "match": {"prefix": "/basic-protected-api/",
                  "headers": [{"name": "x-user-roles", "string_match": {"exact": "admin"}}]},
        "direct_response": {"status": 418, "body": {"inline_string": "routed-as-admin"}},
    }
    gw = start_gateway(demo_settings(), extra_routes=[admin_route])
    user = gw.token(sub="u", roles="user")
    admin = gw.token(sub="a", roles="admin")
    spoofed = gw.call(f"Bearer {user}", headers={"X-User-Roles": "admin"})
    assert spoofed.status_code == 200, spoofed.text  # not routed as admin
    assert spoofed.json()["headers"]["X-User-Roles"] == "user"
    real = gw.call(f"Bearer {admin}")
    assert real.status_code == 418 and real.text == "routed-as-admin"
