"""API requests the filter must refuse (RFC 6750), without ever calling the upstream."""

import pytest

from helpers import PROTECTED, StatDelta, tampered_signature

REALM = 'Bearer realm="split-token"'
INVALID_TOKEN = 'Bearer realm="split-token", error="invalid_token"'
INVALID_REQUEST = 'Bearer realm="split-token", error="invalid_request"'


def assert_rejected(reply, status, challenge, error):
    assert reply.status == status, reply
    assert reply.headers.get("www-authenticate") == challenge, reply
    assert reply.headers.get("content-type") == "application/json"
    body = reply.json()
    assert body.get("error") == error, body
    assert "eyJ" not in reply.body.decode()


@pytest.mark.parametrize("headers, status, challenge, error, counter", [
    ([], 401, REALM, None, "rejected.missing_token"),
    ([("Authorization", "Basic ZTJlOnM=")], 401, REALM, None, "rejected.missing_token"),
    ([("Authorization", "Bearer unknown-signature")], 401, INVALID_TOKEN, "invalid_token", "rejected.unknown_token"),
    ([("Authorization", "Bearer")], 401, INVALID_TOKEN, "invalid_token", "rejected.malformed_token"),
    ([("Authorization", "Bearer not/base64+url")], 401, INVALID_TOKEN, "invalid_token", "rejected.malformed_token"),
    ([("Authorization", "Bearer a b")], 401, INVALID_TOKEN, "invalid_token", "rejected.malformed_token"),
    ([("Authorization", "Bearer a"), ("Authorization", "Bearer b")], 400, INVALID_REQUEST, "invalid_request", "rejected.multiple_authorization"),
], ids=["missing", "basic-scheme", "unknown", "empty-bearer", "not-base64url", "two-words", "duplicate-header"])
def test_rejections_have_exact_status_and_challenge(gateway, headers, status, challenge, error, counter):
    with StatDelta(gateway) as d:
        reply = gateway.raw("GET", PROTECTED, headers)
    assert_rejected(reply, status, challenge, error)
    assert d.split_token(counter) == 1
    assert d["cluster.httpbin.upstream_rq_total"] == 0


def test_full_jwt_from_a_client_is_rejected(gateway):
    token = gateway.token()
    full = gateway.call(f"Bearer {token}").json()["headers"]["Authorization"][len("Bearer "):]
    with StatDelta(gateway) as d:
        reply = gateway.raw("GET", PROTECTED, [("Authorization", f"Bearer {full}")])
    assert_rejected(reply, 401, INVALID_TOKEN, "invalid_token")
    assert d.split_token("rejected.full_jwt") == 1
    assert d["cluster.httpbin.upstream_rq_total"] == 0


def test_valid_token_plus_a_second_header_is_refused(gateway):
    token = gateway.token()
    reply = gateway.raw("GET", PROTECTED, [("Authorization", f"Bearer {token}"),
                                           ("Authorization", f"Bearer {token}")])
    assert_rejected(reply, 400, INVALID_REQUEST, "invalid_request")


def test_signature_with_one_character_changed_is_unknown(gateway):
    token = gateway.token()
    # Not `token[:-1] + "B"`: for a token ending in "A" that is not canonical base64url.
    flipped = tampered_signature(token)
    with StatDelta(gateway) as d:
        reply = gateway.raw("GET", PROTECTED, [("Authorization", f"Bearer {flipped}")])
    assert_rejected(reply, 401, INVALID_TOKEN, "invalid_token")
    assert d.split_token("rejected.unknown_token") == 1


def test_unprotected_paths_need_no_token_and_token_paths_are_not_protected(gateway):
    # public_prefixes covers /basic-protected-api/status/ in the test config.
    r = gateway.call(None, path="/basic-protected-api/status/204")
    assert r.status_code == 204
    # A token endpoint request carries client credentials, not a bearer token.
    assert gateway.token_response().status_code == 200


def test_query_string_does_not_change_routing(gateway):
    reply = gateway.raw("GET", PROTECTED + "?x=/auth/token", [])
    assert reply.status == 401
    token_reply = gateway.raw(
        "POST", "/auth/token?foo=bar",
        [("Content-Type", "application/x-www-form-urlencoded")],
        b"grant_type=client_credentials&client_id=q",
    )
    assert token_reply.status == 200
    assert "." not in token_reply.json()["access_token"]
