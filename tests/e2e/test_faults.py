"""Faults around the filter: the IdP down or frozen, a live config reload, a full store, and a
wasm VM that dies. (An IdP that resets mid-response is in the corpus: tests/corpus/
token_responses.yaml, rows reset-*.)"""

from __future__ import annotations

import os
import signal

import pytest
import requests

import stack
from conftest import BASE_FILTER
from helpers import StatDelta, free_port, refused_port

FAULT_WASM = stack.FAULT_WASM
TRAP = {"x-split-token-fault": "trap"}


def test_idp_down_gives_envoys_503_unchanged_and_stores_nothing(start_gateway):
    with refused_port() as port:  # nothing listens there, and nothing else can
        gw = start_gateway(idp_port=port, name="envoy-idp-down")
        with StatDelta(gw) as d:
            r = gw.token_response()
    assert r.status_code == 503, r.text
    assert r.text.startswith("upstream connect error"), r.text
    assert r.headers["content-type"] == "text/plain"
    assert d.split_token("tokens_split") == 0
    assert d.split_token("token_errors_passed_through") == 1
    assert gw.envoy.process.alive()


@pytest.fixture
def own_idp(run_dir):
    """An IdP only this test uses, so it can be frozen."""
    idp = stack.start_idp(free_port(), run_dir)
    yield idp
    os.kill(idp.proc.pid, signal.SIGCONT)
    idp.stop()


def test_frozen_idp_gives_envoys_504_and_issued_tokens_keep_working(start_gateway, own_idp):
    gw = start_gateway(idp_port=own_idp.port, name="envoy-slow-idp", extra_routes=[
        {"match": {"path": "/auth/token"},
         "route": {"cluster": "idp", "prefix_rewrite": "/token", "timeout": "1s"}},
    ])
    token = gw.token()
    os.kill(own_idp.proc.pid, signal.SIGSTOP)
    with StatDelta(gw) as d:
        r = gw.token_response()
    assert r.status_code == 504, r.text
    assert r.text == "upstream request timeout"
    assert d.split_token("tokens_split") == 0
    # API calls never need the IdP: the store answers them.
    assert gw.call(f"Bearer {token}").status_code == 200
    os.kill(own_idp.proc.pid, signal.SIGCONT)
    assert gw.call(f"Bearer {gw.token()}").status_code == 200


def test_config_reload_keeps_live_tokens_and_applies_the_new_settings(start_gateway):
    gw = start_gateway(BASE_FILTER, name="envoy-lds", lds=True)
    token = gw.token()
    assert gw.call(f"Bearer {token}").status_code == 200

    assert gw.reload({**BASE_FILTER, "realm": "reloaded"}) == "accepted"
    assert 'realm="reloaded"' in gw.call("Bearer nope").headers["www-authenticate"]
    # Same vm_id and code: the VM and its shared data live on, and so do the tokens.
    assert gw.call(f"Bearer {token}").status_code == 200

    # An invalid config never replaces a working one.
    assert gw.reload({**BASE_FILTER, "store_slots": 0}) == "rejected"
    assert 'realm="reloaded"' in gw.call("Bearer nope").headers["www-authenticate"]
    assert gw.call(f"Bearer {token}").status_code == 200
    assert "store_slots" in gw.envoy.log()

    # New filter code under the same vm_id (an upgrade) is a new VM on the same shared data.
    vms = gw.envoy.stat("wasm.envoy.wasm.runtime.v8.created")
    assert gw.reload({**BASE_FILTER, "realm": "reloaded"}, code=str(FAULT_WASM)) == "accepted"
    assert gw.envoy.stat("wasm.envoy.wasm.runtime.v8.created") > vms
    assert gw.call(f"Bearer {token}").status_code == 200


def test_a_new_vm_id_starts_an_empty_store(start_gateway):
    gw = start_gateway(BASE_FILTER, name="envoy-lds-vm", lds=True)
    token = gw.token()
    assert gw.reload(vm_id="split-token-v2") == "accepted"
    # Documented: shared data belongs to a vm_id; a new one is a new store.
    assert gw.call(f"Bearer {token}").status_code == 401
    assert gw.call(f"Bearer {gw.token()}").status_code == 200


def test_full_store_evicts_the_oldest_and_keeps_serving(start_gateway):
    gw = start_gateway({**BASE_FILTER, "store_slots": 1, "slot_capacity": 2}, name="envoy-full")
    with StatDelta(gw) as d:
        # Distinct subjects: RS256 is deterministic, so equal claims would be one token.
        tokens = [gw.token(sub=f"user-{i}") for i in range(40)]
    assert d.split_token("tokens_split") == 40
    assert d.split_token("store.evictions") == 38
    assert d.split_token("store.write_failures") == 0
    for token in tokens[-2:]:
        assert gw.call(f"Bearer {token}").status_code == 200
    for token in tokens[:5]:
        r = gw.call(f"Bearer {token}")
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert gw.envoy.process.alive()


def _fault_filter(policy: str | None = None):
    """The demo config with the fault-injection build; `policy` None keeps the shipped one."""
    def customize(config):
        wasm = stack.wasm_filter(config)
        wasm["vm_config"]["code"]["local"]["filename"] = str(FAULT_WASM)
        if policy:
            wasm["failure_policy"] = policy
    return customize


def _trap(gw, token: str) -> requests.Response:
    with StatDelta(gw) as d:
        r = gw.call(f"Bearer {token}", headers=TRAP)
    assert r.status_code >= 500, r.text
    assert d["cluster.httpbin.upstream_rq_total"] == 0
    return r


def test_dead_vm_with_fail_closed_refuses_everything(start_gateway):
    gw = start_gateway(name="envoy-fail-closed", customize=_fault_filter("FAIL_CLOSED"))
    token = gw.token()
    assert gw.call(f"Bearer {token}").status_code == 200
    _trap(gw, token)
    with StatDelta(gw) as d:
        for path in ("/basic-protected-api/get", "/public/x"):
            r = gw.call(f"Bearer {token}", path=path)
            assert r.status_code == 503, r.text
        assert gw.token_response().status_code == 503
    assert d["cluster.httpbin.upstream_rq_total"] == 0
    assert d["cluster.idp.upstream_rq_total"] == 0
    assert gw.envoy.process.alive()


def test_dead_vm_with_the_shipped_fail_reload_comes_back_with_the_store(start_gateway):
    assert stack.wasm_filter(stack.load_demo_config())["failure_policy"] == "FAIL_RELOAD"
    gw = start_gateway(name="envoy-fail-reload", customize=_fault_filter())
    token = gw.token()
    _trap(gw, token)
    # Whether the next request meets the dead VM or its replacement, it is never let through.
    with StatDelta(gw) as d:
        assert gw.call("Bearer nope").status_code in (401, 503)
    assert d["cluster.httpbin.upstream_rq_total"] == 0
    # A new VM replaces the dead one; shared data outlives it, so the token still works.
    stack.wait_for("reloaded VM", lambda: gw.call(f"Bearer {token}").status_code == 200, timeout=10)
    assert gw.stats().get("wasm.split-token.vm_reload_success", 0) >= 1
    assert gw.call("Bearer nope").status_code == 401
    assert gw.call(f"Bearer {gw.token()}").status_code == 200
