"""Helpers that make end-to-end failures readable."""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
from dataclasses import dataclass

import jwt
import requests

import stack

PROTECTED = "/basic-protected-api/get"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def tampered_signature(signature: str, char: int = -1) -> str:
    """`signature` with one bit of the value it encodes flipped, so that exactly its character at
    index `char` changes: always a different value of the same length, in canonical base64url.

    Editing the text instead fails by chance: a 256-byte RS256 signature is 342 characters whose
    last one carries 2 bits and 4 zero padding bits (A, Q, g or w), so `...AA` turned into `...BB`
    is not canonical base64url and is refused as malformed before anything is looked up or
    verified; and replacing a character by a fixed one is a no-op when it already is that one.
    The last character's bit is the value's lowest: an RSA signature stays below its modulus."""
    data = bytearray(b64url_decode(signature))
    assert data and b64url(bytes(data)) == signature, "not canonical base64url"
    char %= len(signature)
    bit = min(6 * char + 5, 8 * len(data) - 1)  # the lowest data bit the character carries
    data[bit // 8] ^= 0x80 >> (bit % 8)
    tampered = b64url(bytes(data))
    assert [i for i, (a, b) in enumerate(zip(signature, tampered)) if a != b] == [char]
    assert len(tampered) == len(signature)
    return tampered


def random_signature(size: int, unlike: str = "") -> str:
    """A canonical base64url signature of `size` random bytes (RS256: 256), never `unlike`."""
    while (signature := b64url(os.urandom(size))) == unlike:
        pass
    return signature


# Never the same port twice in a session, and ports that refuse connections (see stack.py).
free_port = stack.free_port
refused_port = stack.refused_port


def expires_in_choices(announced: int, exp: int, before: float, after: float) -> set[int]:
    """The expires_in a split token response may carry when the IdP announced `announced` for a
    token with this `exp`, split at some second between `before` and `after`: the gateway honours
    min(announced, exp - now) and says so when that is shorter, as it is when a second ticked
    between the IdP's signing and the split."""
    return {min(announced, exp - now) for now in range(int(before), int(after) + 1)}


def claims_of(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[1]))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers}, {self.body[:300]!r})"


class Gateway:
    """An Envoy running split-token, with the calls tests make against it."""

    def __init__(self, envoy: stack.Envoy, idp_port: int):
        self.envoy = envoy
        self.idp_port = idp_port
        self.lds: tuple | None = None  # (path, listener) when the listener comes from LDS

    @property
    def url(self) -> str:
        return self.envoy.url

    def token_response(self, path: str = "/auth/token", session=None, **form) -> requests.Response:
        data = {"grant_type": "client_credentials", "client_id": "e2e", "client_secret": "s"}
        data.update(form)
        return (session or requests).post(self.url + path, data=data, timeout=10)

    def token(self, **form) -> str:
        r = self.token_response(**form)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def call(self, authorization: str | None = None, path: str = PROTECTED, session=None,
             headers: dict | None = None) -> requests.Response:
        h = dict(headers or {})
        if authorization is not None:
            h["Authorization"] = authorization
        return (session or requests).get(self.url + path, headers=h, timeout=10)

    def raw(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None = None) -> Reply:
        """One request with exactly these headers (repeats allowed), on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def stats(self) -> dict[str, int]:
        return self.envoy.stats()

    def reload(self, settings: dict | None = None, vm_id: str | None = None,
               code: str | None = None) -> str:
        """Rewrites the LDS listener with new filter settings (or a new vm_id, or other .wasm
        code) and waits until Envoy has taken the update: returns "accepted" or "rejected"."""
        lds_path, listener = self.lds
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (wasm,) = [f for f in hcm["http_filters"] if f["name"] == "split-token"]
        if settings is not None:
            wasm["typed_config"]["config"]["configuration"]["value"] = json.dumps(settings)
        if vm_id is not None:
            wasm["typed_config"]["config"]["vm_config"]["vm_id"] = vm_id
        if code is not None:
            wasm["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = code
        before = self.stats()
        stack.write_lds(lds_path, listener)

        def outcome():
            now = self.stats()
            for result in ("success", "rejected"):
                name = f"listener_manager.lds.update_{result}"
                if now.get(name, 0) > before.get(name, 0):
                    return "accepted" if result == "success" else "rejected"
            return None
        result = stack.wait_for("LDS update", outcome)

        def settled():
            now = self.stats()
            return all(now.get(f"listener_manager.total_listeners_{state}", 0) == 0
                       for state in ("warming", "draining"))
        # Only the new listener serves from here on.
        stack.wait_for("listener swap", settled)
        return result

    def upstream_requests(self) -> int:
        return self.envoy.stat("cluster.httpbin.upstream_rq_total")

    def counter(self, name: str) -> int:
        return self.envoy.stat(f"wasmcustom.split_token.{name}")

    def jwks_client(self) -> jwt.PyJWKClient:
        return jwt.PyJWKClient(f"http://127.0.0.1:{self.idp_port}/jwks")


def forwarded_authorization(response: requests.Response) -> str | None:
    """The Authorization header httpbin received, from its /get echo."""
    assert response.status_code == 200, f"{response.status_code} {response.text[:300]}"
    return response.json()["headers"].get("Authorization")


class StatDelta:
    """Counts how much stats moved across a block: `with StatDelta(gw) as d: ...; d["x"]`."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def __enter__(self):
        self.before = self.gateway.stats()
        return self

    def __exit__(self, *exc):
        self.after = self.gateway.stats()
        return False

    def __getitem__(self, name: str) -> int:
        return self.after.get(name, 0) - self.before.get(name, 0)

    def split_token(self, name: str) -> int:
        return self[f"wasmcustom.split_token.{name}"]


def revocations(idp) -> list[dict]:
    try:
        return [json.loads(line) for line in idp.record.read_text().splitlines()]
    except FileNotFoundError:
        return []


def revocations_since(idp, before: int, expected: int) -> list[dict]:
    """The requests recorded after the first `before`, once `expected` of them have arrived
    (the IdP writes its record after answering)."""
    if expected:
        stack.wait_for("recorded revocations", lambda: len(revocations(idp)) >= before + expected)
    else:
        time.sleep(0.3)
    return revocations(idp)[before:]
