"""Token lifecycle through the gateway with the real IdP: revocation (RFC 7009) and logout,
refresh, password and authorization-code grants, id_token, and DPoP-bound tokens (RFC 9449)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

import stack
from conftest import BASE_FILTER
from helpers import (PROTECTED, StatDelta, assert_not_forwarded, claims_of, forwarded_authorization,
                     revocations, revocations_since)

LIFECYCLE = {
    **BASE_FILTER,
    "revocation_paths": ["/auth/revoke"],
    "logout_paths": ["/auth/logout"],
    "introspection": {"paths": ["/auth/introspect"], "clients": [
        {"client_id": "rs", "client_secret_sha256": hashlib.sha256(b"rs-secret").hexdigest()}]},
}


@pytest.fixture(scope="module")
def gw(start_gateway, recording_idp):
    # Two workers: a revocation must reach the cache of the worker that did not handle it.
    introspect_route = stack.introspection_route()
    return start_gateway(LIFECYCLE, concurrency=2, name="envoy-lifecycle", idp_port=recording_idp.port,
                         extra_routes=[introspect_route])


def full_jwt(gw, token: str) -> str:
    return forwarded_authorization(gw.call(f"Bearer {token}")).removeprefix("Bearer ")


def revoke(gw, **form) -> requests.Response:
    return requests.post(gw.url + "/auth/revoke", data=form, auth=("e2e", "s"), timeout=10)


# --- revocation ------------------------------------------------------------------------------------

def test_revoked_token_is_refused_on_every_worker_and_the_idp_gets_the_full_jwt(gw, recording_idp):
    token = gw.token(sub=f"revoke-{uuid.uuid4().hex}")
    jwt_text = full_jwt(gw, token)
    # Fresh connections spread over both workers, so both cache the token.
    for _ in range(20):
        assert gw.call(f"Bearer {token}").status_code == 200
    before = len(revocations(recording_idp))
    with StatDelta(gw) as d:
        r = revoke(gw, token=token, token_type_hint="access_token")
    assert r.status_code == 200, r.text
    assert d.split_token("revoked") == 1
    sent = revocations_since(recording_idp, before, 1)
    assert sent == [{"token": jwt_text, "token_type_hint": "access_token"}]
    with StatDelta(gw) as d:
        for _ in range(20):
            r = gw.call(f"Bearer {token}")
            assert r.status_code == 401, r.text
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert d["cluster.httpbin.upstream_rq_total"] == 0


def test_unknown_signature_answers_200_and_nothing_is_forwarded(gw, recording_idp):
    unknown = base64.urlsafe_b64encode(os.urandom(256)).rstrip(b"=").decode()  # RS256-sized
    before = len(revocations(recording_idp))
    with StatDelta(gw) as d:
        r = revoke(gw, token=unknown)
    assert r.status_code == 200 and r.text == ""
    assert "content-type" not in r.headers
    assert_not_forwarded(d)
    assert d.split_token("revocations.unknown") == 1
    assert revocations_since(recording_idp, before, 0) == []
    # A known token revoked twice: the second time it is unknown, and answered the same way.
    token = gw.token(sub=f"twice-{uuid.uuid4().hex}")
    before = len(revocations(recording_idp))
    assert revoke(gw, token=token).status_code == 200
    # Recorded after the IdP answered: wait, or the next test could count it as its own.
    assert len(revocations_since(recording_idp, before, 1)) == 1
    with StatDelta(gw) as d:
        again = revoke(gw, token=token)
    assert (again.status_code, again.text) == (200, "")
    assert_not_forwarded(d)


def test_refresh_token_revocation_is_forwarded_unchanged(gw, recording_idp):
    r = gw.token_response(grant_type="password", username="alice", password="pw")
    refresh = r.json()["refresh_token"]
    before = len(revocations(recording_idp))
    for form in ({"token": refresh, "token_type_hint": "refresh_token"}, {"token": refresh}):
        with StatDelta(gw) as d:
            assert revoke(gw, **form).status_code == 200
        assert d.split_token("revocations.forwarded_unchanged") == 1
    assert revocations_since(recording_idp, before, 2) == [
        {"token": refresh, "token_type_hint": "refresh_token"}, {"token": refresh}]


def test_revocation_and_introspection_take_post_only(gw):
    token = gw.token(sub=f"get-{uuid.uuid4().hex}")
    with StatDelta(gw) as d:
        for path in ("/auth/revoke", "/auth/introspect"):
            r = requests.get(f"{gw.url}{path}?token={token}", auth=("rs", "rs-secret"), timeout=10)
            assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    assert d["cluster.idp.upstream_rq_total"] == 0
    assert gw.call(f"Bearer {token}").status_code == 200


@pytest.mark.parametrize("body", [b"", b"client_id=e2e", b"token=a&token=b", b"token=%zz"],
                         ids=["empty", "no-token", "two-tokens", "bad-escape"])
def test_malformed_revocation_is_refused_and_not_forwarded(gw, body):
    with StatDelta(gw) as d:
        r = requests.post(gw.url + "/auth/revoke", data=body, timeout=10,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request"
    assert_not_forwarded(d)


# --- logout ----------------------------------------------------------------------------------------

def test_logout_revokes_then_reaches_the_idp(gw):
    token = gw.token(sub=f"logout-{uuid.uuid4().hex}")
    assert gw.call(f"Bearer {token}").status_code == 200
    with StatDelta(gw) as d:
        r = requests.get(gw.url + "/auth/logout?post_logout_redirect_uri=http://app.example/bye",
                         headers={"Authorization": f"Bearer {token}"}, allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["location"] == "http://app.example/bye"
    assert d["cluster.idp.upstream_rq_total"] == 1
    assert gw.call(f"Bearer {token}").status_code == 401
    # Without a valid token, logout is refused like any protected call and the IdP never hears.
    with StatDelta(gw) as d:
        r = requests.get(gw.url + "/auth/logout?post_logout_redirect_uri=http://app.example/bye",
                         headers={"Authorization": f"Bearer {token}"}, allow_redirects=False, timeout=10)
    assert r.status_code == 401
    assert d["cluster.idp.upstream_rq_total"] == 0


# --- grants and id_token ---------------------------------------------------------------------------

def test_password_grant_is_split_and_id_token_and_refresh_token_are_untouched(gw):
    r = gw.token_response(grant_type="password", username="alice", password="pw")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "." not in body["access_token"]
    # The id_token is the IdP's own, byte for byte: its signature still verifies.
    key = gw.jwks_client().get_signing_key_from_jwt(body["id_token"]).key
    id_claims = jwt.decode(body["id_token"], key, algorithms=["RS256"], audience="e2e")
    assert id_claims["sub"] == "johndoe"
    uuid.UUID(body["refresh_token"])  # opaque, as issued
    assert claims_of(full_jwt(gw, body["access_token"]))["sub"] == "alice"


def test_refresh_grant_is_split_and_the_old_token_stays_valid(gw):
    first = gw.token_response(grant_type="password", username="bob", password="pw").json()
    time.sleep(1.1)  # a new iat, so the refreshed token differs (RS256 is deterministic)
    r = gw.token_response(grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert "." not in second["access_token"] and second["access_token"] != first["access_token"]
    for token in (first["access_token"], second["access_token"]):
        assert gw.call(f"Bearer {token}").status_code == 200


def test_authorization_code_grant_is_split(gw):
    r = gw.token_response(grant_type="authorization_code", code="abc",
                          redirect_uri="http://app.example/cb")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "." not in body["access_token"]
    assert body["id_token"].count(".") == 2
    assert gw.call(f"Bearer {body['access_token']}").status_code == 200


# --- DPoP ------------------------------------------------------------------------------------------

class DpopKey:
    """A client's DPoP key pair, making proofs (RFC 9449 §4.2)."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))

    def proof(self, method: str, url: str) -> str:
        claims = {"htm": method, "htu": url, "iat": int(time.time()), "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.key, algorithm="ES256",
                          headers={"typ": "dpop+jwt", "jwk": self.jwk})


def test_dpop_bound_token_keeps_its_scheme_and_proof(gw):
    key = DpopKey()
    url = gw.url + "/auth/token"
    r = requests.post(url, data={"grant_type": "client_credentials", "client_id": "e2e",
                                 "sub": f"dpop-{uuid.uuid4().hex}"},
                      headers={"DPoP": key.proof("POST", url)}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "DPoP"
    sig = body["access_token"]
    assert "." not in sig

    api = gw.url + PROTECTED
    proof = key.proof("GET", api)
    r = requests.get(api, headers={"Authorization": f"DPoP {sig}", "DPoP": proof}, timeout=10)
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    scheme, token = seen["Authorization"].split(" ")
    assert scheme == "DPoP" and token.endswith("." + sig)
    assert claims_of(token)["cnf"]["jkt"]
    assert seen["Dpop"] == proof  # left for the upstream to check

    with StatDelta(gw) as d:
        as_bearer = gw.call(f"Bearer {sig}")
        no_proof = gw.call(f"DPoP {sig}")
    assert as_bearer.status_code == 401
    assert as_bearer.headers["www-authenticate"] == 'DPoP realm="split-token", error="invalid_token"'
    assert no_proof.status_code == 401
    assert no_proof.headers["www-authenticate"] == 'DPoP realm="split-token", error="invalid_dpop_proof"'
    assert d["cluster.httpbin.upstream_rq_total"] == 0
    assert d.split_token("rejected.dpop_binding") == 1
    assert d.split_token("rejected.missing_dpop_proof") == 1

    # Two proofs (RFC 9449 §4.3: exactly one). Envoy hands a filter only the first of repeated
    # headers it does not join, so the filter reads them all (found in review).
    with StatDelta(gw) as d:
        reply = gw.raw("GET", PROTECTED, [("Authorization", f"DPoP {sig}"), ("DPoP", proof),
                                          ("DPoP", key.proof("GET", api))])
    assert reply.status == 401, reply
    assert 'error="invalid_dpop_proof"' in reply.headers["www-authenticate"]
    assert d["cluster.httpbin.upstream_rq_total"] == 0


def test_bearer_token_under_the_dpop_scheme_is_refused(gw):
    token = gw.token(sub=f"plain-{uuid.uuid4().hex}")
    key = DpopKey()
    r = gw.call(f"DPoP {token}", headers={"DPoP": key.proof("GET", gw.url + PROTECTED)})
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


# --- introspection ---------------------------------------------------------------------------------

def introspect(gw, token: str, auth=("rs", "rs-secret")) -> requests.Response:
    return requests.post(gw.url + "/auth/introspect", data={"token": token}, auth=auth, timeout=10)


def test_introspection_answers_configured_clients_only_and_never_reaches_the_idp(gw):
    token = gw.token(sub=f"introspect-{uuid.uuid4().hex}", roles="user")
    with StatDelta(gw) as d:
        for auth in (None, ("rs", "wrong"), ("other", "rs-secret")):
            r = introspect(gw, token, auth=auth)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == 'Basic realm="split-token"'
            assert r.json()["error"] == "invalid_client"
        live = introspect(gw, token)
        unknown = introspect(gw, "A" * 342)
    assert live.status_code == 200 and live.headers["cache-control"] == "no-store"
    claims = live.json()
    assert claims["active"] is True and claims["sub"].startswith("introspect-")
    assert claims["token_type"] == "Bearer" and claims["realm_access"] == {"roles": ["user"]}
    assert unknown.json() == {"active": False}
    assert claims["exp"] <= time.time() + 86400
    assert_not_forwarded(d)
    assert d.split_token("introspections.refused") == 3
    # Revoked is inactive, at once.
    assert revoke(gw, token=token).status_code == 200
    assert introspect(gw, token).json() == {"active": False}
