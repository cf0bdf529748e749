"""Token responses through the gateway: split, stored, and the JWT rebuilt byte for byte."""

import http.client
import json
import time

import jwt
import requests

from helpers import (PROTECTED, StatDelta, claims_of, expires_in_choices, forwarded_authorization,
                     headers_held)


def test_client_credentials_returns_only_the_signature_and_keeps_other_fields(gateway):
    before = time.time()
    r = gateway.token_response(scope="read write")
    after = time.time()
    assert r.status_code == 200, r.text
    body = r.json()
    token = body["access_token"]
    assert "." not in token and token, body
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "read write"
    # The random signature itself holds "eyJ" about once in 800 tokens: look at the rest.
    assert "eyJ" not in r.text.replace(token, "")
    if headers_held():
        assert int(r.headers["content-length"]) == len(r.content)
    else:  # the headers went on before the body was split: the new body goes out chunked
        assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
    assert "etag" not in r.headers
    jwt_text = forwarded_authorization(gateway.call(f"Bearer {token}")).removeprefix("Bearer ")
    assert jwt_text.rsplit(".", 1)[0] not in r.text
    # The IdP's 3600, or 3599 when a second ticked between its signing and the split.
    assert body["expires_in"] in expires_in_choices(3600, claims_of(jwt_text)["exp"], before, after), body


def test_upstream_receives_the_issued_jwt_byte_identical_and_verifiable(gateway):
    token = gateway.token(scope="identity-check")
    forwarded = forwarded_authorization(gateway.call(f"Bearer {token}"))
    assert forwarded.startswith("Bearer ")
    jwt_text = forwarded[len("Bearer "):]
    header_payload, signature = jwt_text.rsplit(".", 1)
    assert signature == token
    # It verifies against the IdP's published keys, so it is the IdP's token, unchanged.
    key = gateway.jwks_client().get_signing_key_from_jwt(jwt_text).key
    claims = jwt.decode(jwt_text, key, algorithms=["RS256"], options={"verify_aud": False})
    assert claims["scope"] == "identity-check"


def test_bare_token_without_scheme_is_accepted(gateway):
    token = gateway.token()
    forwarded = forwarded_authorization(gateway.call(token))
    assert forwarded.endswith("." + token)


def test_scheme_is_case_insensitive(gateway):
    token = gateway.token()
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert gateway.call(f"{scheme} {token}").status_code == 200, scheme


def test_keep_alive_client_reuses_the_connection(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.envoy.port, timeout=10)
    try:
        conn.request("POST", "/auth/token",
                     body="grant_type=client_credentials&client_id=ka&client_secret=s",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        first = conn.getresponse()
        token = json.loads(first.read())["access_token"]
        assert first.status == 200
        # Same connection: only works if the rewritten body's framing was right.
        conn.request("GET", PROTECTED, headers={"Authorization": f"Bearer {token}"})
        second = conn.getresponse()
        echoed = json.loads(second.read())
        assert second.status == 200
        assert echoed["headers"]["Authorization"].endswith("." + token)
    finally:
        conn.close()


def test_idp_error_responses_pass_through_unchanged(gateway, idp):
    form = {"grant_type": "unsupported", "client_id": "e2e"}
    direct = requests.post(f"http://127.0.0.1:{idp.port}/token", data=form, timeout=10)
    with StatDelta(gateway) as d:
        via = gateway.token_response(**form)
    assert via.status_code == direct.status_code == 400
    assert via.content == direct.content == b'{"error":"invalid_grant"}'
    assert d.split_token("token_errors_passed_through") == 1
    assert d.split_token("tokens_split") == 0


def test_client_asking_for_gzip_still_gets_a_split_token(gateway):
    r = requests.post(gateway.url + "/auth/token",
                      data={"grant_type": "client_credentials", "client_id": "gz"},
                      headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers.get("content-encoding") in (None, "identity")
    token = r.json()["access_token"]
    assert "." not in token
    assert gateway.call(f"Bearer {token}").status_code == 200


def test_each_token_maps_to_its_own_jwt(gateway):
    tokens = {gateway.token(scope=f"scope-{i}"): f"scope-{i}" for i in range(5)}
    assert len(tokens) == 5
    for token, scope in tokens.items():
        forwarded = forwarded_authorization(gateway.call(f"Bearer {token}"))
        assert claims_of(forwarded[len("Bearer "):])["scope"] == scope
