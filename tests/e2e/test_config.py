"""Filter settings, end to end: stripping, expiry, full_jwt, store bounds, invalid configs."""

import time

import pytest

from stack import wait_for
from conftest import BASE_FILTER
from helpers import PROTECTED, StatDelta, claims_of, expires_in_choices, forwarded_authorization


def test_strip_response_fields_removes_them(start_gateway):
    gw = start_gateway({**BASE_FILTER, "strip_response_fields": ["scope", "token_type"]})
    before = time.time()
    r = gw.token_response(scope="secret-scope")
    after = time.time()
    assert r.status_code == 200, r.text
    body = r.json()
    assert "scope" not in body and "token_type" not in body
    jwt_text = forwarded_authorization(gw.call(f"Bearer {body['access_token']}")).removeprefix("Bearer ")
    # The IdP's 3600, or 3599 when a second ticked between its signing and the split.
    assert body["expires_in"] in expires_in_choices(3600, claims_of(jwt_text)["exp"], before, after), body


def test_tokens_expire_with_max_ttl_seconds(start_gateway):
    gw = start_gateway({**BASE_FILTER, "max_ttl_seconds": 2})
    # The store counts whole seconds: a token split during second s is served until s + 2, which
    # can be barely 1 s away. Split at the start of a second; a round whose first call still
    # ended 2 s after that second began proves nothing about it and is run again.
    for _ in range(3):
        time.sleep(1 - time.time() % 1)
        start = int(time.time())
        token = gw.token()
        first = gw.call(f"Bearer {token}")
        if int(time.time()) < start + 2:
            break
    else:
        pytest.fail("three rounds too slow to call a token within its 2 s")
    assert first.status_code == 200, first.text
    time.sleep(3.1)
    with StatDelta(gw) as d:
        r = gw.call(f"Bearer {token}")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="split-token", error="invalid_token"'
    assert r.json()["error_description"] == "the access token expired"
    assert d.split_token("rejected.expired_token") == 1
    assert d["cluster.httpbin.upstream_rq_total"] == 0


def test_full_jwt_allow_forwards_it_unchanged(start_gateway):
    gw = start_gateway({**BASE_FILTER, "full_jwt": "allow"})
    token = gw.token()
    full = forwarded_authorization(gw.call(f"Bearer {token}"))
    with StatDelta(gw) as d:
        again = forwarded_authorization(gw.call(full))
    assert again == full
    assert d.split_token("full_jwt_forwarded") == 1


def test_full_store_evicts_and_counts(start_gateway):
    gw = start_gateway({**BASE_FILTER, "store_slots": 1, "slot_capacity": 2})
    with StatDelta(gw) as d:
        tokens = [gw.token(scope=f"s{i}") for i in range(3)]
    assert d.split_token("store.evictions") == 1
    statuses = [gw.call(f"Bearer {t}").status_code for t in tokens]
    assert sorted(statuses) == [200, 200, 401], statuses


def test_realm_is_configurable(start_gateway):
    gw = start_gateway({**BASE_FILTER, "realm": "payments"})
    r = gw.call(None)
    assert r.headers["www-authenticate"] == 'Bearer realm="payments"'


@pytest.mark.parametrize("settings, field", [
    ({"token_paths": ["/auth/token"], "store_slots": 0}, "store_slots"),
    ({"token_paths": ["/auth/token"], "stor_slots": 5}, "stor_slots"),
    ({"token_paths": []}, "token_paths"),
    ({"token_paths": ["/auth/token"], "public_prefixes": [""]}, "public_prefixes[0]"),
    ({"public_prefixes": ["/x"]}, "token_paths"),
    ({"token_paths": ["/auth/token"], "full_jwt": "sometimes"}, "sometimes"),
], ids=["zero-slots", "unknown-field", "no-token-paths", "empty-prefix", "missing-token-paths", "bad-enum"])
def test_invalid_config_makes_envoy_refuse_to_start(start_gateway, settings, field):
    gw = start_gateway(settings, wait=False)
    proc = gw.envoy.process.proc
    wait_for("envoy to exit", lambda: proc.poll() is not None, timeout=30)
    assert proc.returncode != 0
    log = gw.envoy.log()
    assert "invalid configuration" in log and field in log, log[-3000:]


def test_broken_json_config_is_refused(start_gateway):
    gw = start_gateway('{"token_paths": [', wait=False)
    proc = gw.envoy.process.proc
    wait_for("envoy to exit", lambda: proc.poll() is not None, timeout=30)
    assert proc.returncode != 0
    assert "invalid configuration" in gw.envoy.log()


def test_demo_config_walkthrough(start_gateway):
    """The README's walkthrough, against the shipped filter settings (envoy/envoy.yaml)."""
    import stack
    settings = stack.filter_settings(stack.load_demo_config())
    gw = start_gateway(settings)
    token = gw.token()
    r = gw.call(f"Bearer {token}", path=PROTECTED)
    assert forwarded_authorization(r).endswith("." + token)
    assert gw.call("Bearer nope").status_code == 401
