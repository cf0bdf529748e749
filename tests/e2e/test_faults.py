"""Faults around the filter: the IdP down or frozen, a live config reload, a full store, and the
filter's code failing: a wasm VM that dies (the Wasm build), a panic in a hook (the native
build). (An IdP that resets mid-response is in the corpus: tests/corpus/token_responses.yaml,
rows reset-*.)"""

from __future__ import annotations

import os
import signal

import pytest
import requests

import stack
from conftest import BASE_FILTER
from helpers import PROTECTED, StatDelta, free_port, h1, refused_port

FAULT_WASM = stack.FAULT_WASM
TRAP = {"x-split-token-fault": "trap"}

# Tests of what only the Wasm build has: a VM (its vm_id, its code, its failure_policy).
wasm_vm_only = pytest.mark.skipif(
    stack.HOST == "native",
    reason="about the Wasm VM (vm_id, code reload, trap, failure_policy); a dynamic module has no "
           "VM: it is loaded once per process, its store is process-wide, a panic fails one "
           "request (test_a_panic_in_a_native_hook_fails_only_that_request_closed)")


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

    # An invalid config never replaces a working one, and the log names the field.
    assert gw.reload({**BASE_FILTER, "store_slots": 0}) == "rejected"
    assert 'realm="reloaded"' in gw.call("Bearer nope").headers["www-authenticate"]
    assert gw.call(f"Bearer {token}").status_code == 200
    refused = [line for line in gw.envoy.log().splitlines() if "invalid configuration" in line]
    assert refused and "store_slots" in refused[-1], refused


@wasm_vm_only
def test_new_filter_code_under_the_same_vm_id_keeps_the_store(start_gateway):
    gw = start_gateway(BASE_FILTER, name="envoy-lds-code", lds=True)
    token = gw.token()
    # New filter code under the same vm_id (an upgrade) is a new VM on the same shared data.
    vms = gw.envoy.stat("wasm.envoy.wasm.runtime.v8.created")
    assert gw.reload({**BASE_FILTER, "realm": "reloaded"}, code=str(FAULT_WASM)) == "accepted"
    assert gw.envoy.stat("wasm.envoy.wasm.runtime.v8.created") > vms
    assert gw.call(f"Bearer {token}").status_code == 200


def test_a_new_store_prefix_starts_an_empty_store(start_gateway):
    gw = start_gateway(BASE_FILTER, name="envoy-lds-prefix", lds=True)
    token = gw.token()
    assert gw.reload({**BASE_FILTER, "store_prefix": "split-token-v2/"}) == "accepted"
    # Documented (docs/faq.md): a new store_prefix is a new, empty store.
    assert gw.call(f"Bearer {token}").status_code == 401
    assert gw.call(f"Bearer {gw.token()}").status_code == 200


@wasm_vm_only
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


@wasm_vm_only
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


@wasm_vm_only
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


@pytest.mark.skipif(stack.HOST != "native",
                    reason="the native build's hook guard; a Wasm trap kills the VM (the dead VM "
                           "tests above)")
def test_a_panic_in_a_native_hook_fails_only_that_request_closed(start_gateway):
    """Every hook of the dynamic module runs behind catch_unwind (filter/native/src/abi.rs): a
    panic resets that one stream, nothing reaches the upstream, and Envoy, the store and every
    other request go on. The fault-injection build panics on `x-split-token-fault: panic`."""
    gw = start_gateway(name="envoy-native-panic", native_dir=stack.NATIVE_FAULT_DIR)
    token = gw.token()
    with StatDelta(gw) as d:
        x = h1(gw.envoy.port, "GET", PROTECTED, [("Authorization", f"Bearer {token}".encode()),
                                                ("x-split-token-fault", b"panic")])
    assert x.status is None or x.status >= 500, x
    assert token.encode() not in x.raw
    assert d["cluster.httpbin.upstream_rq_total"] == 0
    assert "split-token: panic in request_headers, stream reset" in gw.envoy.log()
    assert "injected fault" not in gw.envoy.log()  # the payload could name request data
    # The same worker, the same store: the token, refusals and issuance work as before.
    assert gw.call(f"Bearer {token}").status_code == 200
    assert gw.call("Bearer nope").status_code == 401
    assert gw.call(f"Bearer {gw.token()}").status_code == 200
    assert gw.envoy.process.alive()
