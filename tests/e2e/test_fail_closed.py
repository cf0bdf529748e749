"""A 200 from a token endpoint that cannot be split becomes a 502, never the token."""

import pytest
import requests

from conftest import BAD_TOKEN_ROUTES, BASE_FILTER, EXPIRED_JWT
from helpers import StatDelta


def assert_fail_closed(r: requests.Response, reason: str):
    assert r.status_code == 502, f"{r.status_code} {r.text[:300]}"
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get("content-encoding") is None
    body = r.json()
    assert body["error"] == "server_error"
    assert reason in body["error_description"], body
    assert "eyJ" not in r.text
    assert EXPIRED_JWT.split(".")[1] not in r.text


@pytest.mark.parametrize("path, reason", [
    ("/bad/html", "not a JSON object"),
    ("/bad/json", "no access_token"),
    ("/bad/gzip", "encoded"),
    ("/bad/empty", "no body"),
    ("/bad/bytes", "max_token_response_bytes"),
    ("/bad/opaque", "not a compact JWS"),
    ("/bad/expired", "already expired"),
    ("/bad/array", "not a JSON object"),
])
def test_unsplittable_200_yields_502_without_token(gateway, path, reason):
    assert path in BAD_TOKEN_ROUTES
    with StatDelta(gateway) as d:
        r = requests.get(gateway.url + path, timeout=10)
    assert_fail_closed(r, reason)
    assert d.split_token("split_failures") == 1
    assert d.split_token("tokens_split") == 0


def test_real_idp_token_over_the_size_limit_fails_closed(start_gateway):
    gw = start_gateway({**BASE_FILTER, "max_token_response_bytes": 256})
    r = gw.token_response()
    assert_fail_closed(r, "max_token_response_bytes")


def test_gateway_still_works_after_failures(gateway):
    for path in BAD_TOKEN_ROUTES:
        requests.get(gateway.url + path, timeout=10)
    token = gateway.token()
    assert gateway.call(f"Bearer {token}").status_code == 200
    assert gateway.envoy.process.alive()
