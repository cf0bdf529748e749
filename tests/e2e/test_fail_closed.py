"""A 200 from a token endpoint that cannot be split never gives the client the token: a 502
where the filter can hold the response's headers, else a reset before any byte of the body
(checked on the raw bytes, see helpers.assert_split_refused)."""

import pytest

from conftest import BAD_TOKEN_ROUTES, BASE_FILTER, EXPIRED_JWT
from helpers import StatDelta, assert_split_refused, h1

TOKEN_FORM = b"grant_type=client_credentials&client_id=e2e&client_secret=s"


def assert_fail_closed(x, reason: str, resets: int | None = None, in_headers: bool = False):
    assert_split_refused(x, reason, resets, in_headers)
    assert b"eyJ" not in x.body
    assert EXPIRED_JWT.split(".")[1].encode() not in x.raw


@pytest.mark.parametrize("path, reason, in_headers", [
    ("/bad/html", "not a JSON object", False),
    ("/bad/json", "no access_token", False),
    ("/bad/gzip", "encoded", True),
    ("/bad/empty", "no body", True),
    ("/bad/bytes", "max_token_response_bytes", False),
    ("/bad/opaque", "not a compact JWS", False),
    ("/bad/expired", "already expired", False),
    ("/bad/array", "not a JSON object", False),
])
def test_unsplittable_200_never_gives_the_token(gateway, path, reason, in_headers):
    assert path in BAD_TOKEN_ROUTES
    with StatDelta(gateway) as d:
        x = h1(gateway.envoy.port, "GET", path, [])
    assert_fail_closed(x, reason, resets=d.split_token("split_resets"), in_headers=in_headers)
    assert d.split_token("split_failures") == 1
    assert d.split_token("tokens_split") == 0


def test_real_idp_token_over_the_size_limit_fails_closed(start_gateway):
    gw = start_gateway({**BASE_FILTER, "max_token_response_bytes": 256})
    with StatDelta(gw) as d:
        x = h1(gw.envoy.port, "POST", "/auth/token", [], TOKEN_FORM)
    assert_fail_closed(x, "max_token_response_bytes", resets=d.split_token("split_resets"))


def test_gateway_still_works_after_failures(gateway):
    for path in BAD_TOKEN_ROUTES:
        h1(gateway.envoy.port, "GET", path, [])  # a 502, or a reset
    token = gateway.token()
    assert gateway.call(f"Bearer {token}").status_code == 200
    assert gateway.envoy.process.alive()
