"""No token material in Envoy's log, with the filter's logger at debug (wasm, or dynamic_modules
for the native build)."""

import requests

import stack

from conftest import BASE_FILTER
from helpers import PROTECTED


def test_no_token_material_in_logs(start_gateway):
    logger, marker = ("wasm", "wasm log") if stack.HOST == "wasm" else (
        "dynamic_modules", "[dynamic_modules] [:] split-token:")
    gw = start_gateway({**BASE_FILTER, "store_slots": 1, "slot_capacity": 1},
                       extra_args=["--component-log-level", f"{logger}:debug"])
    secrets = []
    for i in range(3):
        token = gw.token(scope=f"log-{i}")
        full = gw.call(f"Bearer {token}").json()["headers"]["Authorization"][len("Bearer "):]
        secrets += [token, full.rsplit(".", 1)[0], full.split(".")[1]]
    # Rejections, failures and evictions log too: none of them may carry a token.
    gw.raw("GET", PROTECTED, [("Authorization", f"Bearer {secrets[0]}x")])
    gw.raw("GET", PROTECTED, [("Authorization", f"Bearer {full}")])
    requests.get(gw.url + "/bad/expired", timeout=10)
    requests.get(gw.url + "/bad/opaque", timeout=10)
    log = gw.envoy.log()
    assert marker in log  # the filter did log something at this level
    for secret in secrets:
        assert secret not in log
    assert "eyJ" not in log
