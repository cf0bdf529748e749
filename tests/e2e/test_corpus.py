"""The adversarial corpus: every row of tests/corpus/*.yaml against a real Envoy, the real IdP
and a scripted upstream (tests/e2e/scripted.py).

Each row is one test. Whatever the row expects, every case also checks that no header.payload of
any token it used reaches the client, and that only the rows expected to pass reach the
upstream. After the corpus, Envoy must still be up, its wasm VM must never have failed, and a
normal token flow must still work (test_after_the_corpus).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import os
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt as pyjwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import stack
from helpers import (FORM, Exchange, StatDelta, assert_split_refused, b64url_decode, encode_value,
                     h1, h2, random_signature, tampered_signature)
from scripted import Script, ScriptedUpstream

CORPUS = stack.ROOT / "tests" / "corpus"
REALM = 'Bearer realm="split-token"'
API = "/corpus/api/"
PUBLIC = "/corpus/public/"
TOKEN = "/corpus/token/"
CLAIM_HEADERS = ("x-user-id", "x-user-roles", "x-user-email")
IDENTITY = {"sub": "corpus-user", "roles": "user", "email": "corpus@example.com"}
VERIFIED = {"x-user-id": "corpus-user", "x-user-roles": "user", "x-user-email": "corpus@example.com"}
# Anything shaped like the first two segments of a JWT.
# As deep as max_token_response_bytes allows; more than Python's json module can parse.
NESTED = "[" * 32000 + "]" * 32000
VMS_CREATED = "wasm.envoy.wasm.runtime.v8.created"
JWT_PREFIX = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")


def load(name: str) -> list[dict]:
    rows = yaml.safe_load((CORPUS / name).read_text())
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{name}: duplicate ids"
    return rows


AUTHORIZATION = load("authorization.yaml")
RESPONSES = load("token_responses.yaml")
IDENTITY_ROWS = load("identity_headers.yaml")
REVOCATIONS = load("revocations.yaml")
INTROSPECTIONS = load("introspection.yaml")
DPOP_ROWS = load("dpop.yaml")
DPOP_TOKEN = "/corpus/token/dpop-issue"
REVOKE = "/corpus/revoke"
INTROSPECT = "/corpus/introspect"


def b64url(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value) -> str:
    return b64url(json.dumps(value, separators=(",", ":")))


# --- the parts ---------------------------------------------------------------------------------

@dataclass
class Corpus:
    gateway: object
    upstream: ScriptedUpstream
    key: rsa.RSAPrivateKey
    other_key: rsa.RSAPrivateKey
    issuer: str
    vms_at_start: int = 0
    expired: tuple[str, str] | None = None  # (signature, jwt) of a token left to expire

    def sign(self, claims: dict, *, key=None, kid: str | None = "corpus") -> str:
        headers = {"kid": kid} if kid else {}
        return pyjwt.encode(claims, key or self.key, algorithm="RS256", headers=headers)

    def claims(self, **extra) -> dict:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "corpus", "iat": now, "exp": now + 3600,
                  "jti": uuid.uuid4().hex}
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict:
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


@pytest.fixture(scope="module")
def corpus(start_gateway, idp) -> Corpus:
    upstream = ScriptedUpstream().start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp_keys = httpx.get(f"http://127.0.0.1:{idp.port}/jwks").json()["keys"]
    issuer = f"http://localhost:{idp.port}"
    settings = {
        "token_paths": ["/auth/token", DPOP_TOKEN] + [TOKEN + r["id"] for r in RESPONSES],
        "public_prefixes": [PUBLIC],
        "revocation_paths": [REVOKE],
        "introspection": {"paths": [INTROSPECT], "clients": [
            {"client_id": "rs", "client_secret_sha256": hashlib.sha256(b"rs-secret").hexdigest()}]},
        "verify": {"jwks": {"keys": idp_keys + [_jwk(key, "corpus")]}, "issuer": issuer},
        "claims_to_headers": [
            {"claim": "sub", "header": "x-user-id"},
            {"claim": "realm_access.roles", "header": "x-user-roles"},
            {"claim": "email", "header": "x-user-email"},
        ],
    }
    gateway = start_gateway(
        settings, name="envoy-corpus",
        extra_clusters=[stack.static_cluster("scripted", upstream.port)],
        extra_routes=[{"match": {"prefix": "/corpus/"},
                       "route": {"cluster": "scripted", "timeout": "20s"}}],
    )
    yield Corpus(gateway, upstream, key, other, issuer, gateway.envoy.stat(VMS_CREATED))
    upstream.stop()


# --- clients: h1 and h2 in helpers.py -----------------------------------------------------

def exchange(corpus: Corpus, row: dict, method: str, path: str,
             headers: list[tuple[str, bytes]], body: bytes = b"") -> Exchange:
    client = {"h1": h1, "h2": h2}[row.get("client", "h1")]
    return client(corpus.gateway.envoy.port, method, path, headers, body)


# --- tokens --------------------------------------------------------------------------------------

class Tokens:
    """The tokens a case names, made on first use. `secrets` collects every header.payload."""

    def __init__(self, corpus: Corpus, form: dict | None = None):
        self.corpus = corpus
        self.form = form or {}
        self.values: dict[str, str] = {}
        self.secrets: set[str] = set()
        self.jwts: dict[str, str] = {}  # signature -> full JWT, for issued tokens

    def issue(self) -> tuple[str, str]:
        """A token through the gateway from the real IdP: (signature, full JWT)."""
        gw = self.corpus.gateway
        # The IdP's tokens carry no jti and RS256 is deterministic: without a claim of its own,
        # a token issued in the same second as another would be the same token (and {sig2}
        # would be {sig}).
        data = {"grant_type": "client_credentials", "client_id": "corpus",
                "scope": f"corpus-{uuid.uuid4().hex}", **self.form}
        r = httpx.post(gw.url + "/auth/token", data=data, timeout=10)
        assert r.status_code == 200, r.text
        sig = r.json()["access_token"]
        probe = API + "probe-" + uuid.uuid4().hex
        assert httpx.get(gw.url + probe, headers={"Authorization": f"Bearer {sig}"}).status_code == 200
        (seen,) = self.corpus.upstream.received(probe)
        full = seen.header("authorization")[0].removeprefix("Bearer ")
        self.jwts[sig] = full
        self.secrets.add(full.rsplit(".", 1)[0])
        return sig, full

    def issued(self, name: str) -> tuple[str, str]:
        if name not in self.values:
            sig, full = self.issue()
            self.values[name] = full
            self.values["sig" if name == "jwt" else "sig2"] = sig
        return self.values[name].rsplit(".", 1)[1], self.values[name]

    def get(self, name: str) -> str:
        if name in self.values:
            return self.values[name]
        value = self._make(name)
        self.values[name] = value
        return value

    def _make(self, name: str) -> str:
        if name in ("sig", "jwt", "hp", "header", "payload") or name.startswith("sig_") or name in (
                "random_same_length", "alg_none_jwt", "alg_none_with_sig"):
            sig, full = self.issued("jwt")
            h, p, _ = full.split(".")
            variants = {
                "sig": sig, "jwt": full, "hp": f"{h}.{p}", "header": h, "payload": p,
                # Other canonical signatures of the same length, one character apart.
                "sig_flip_first": tampered_signature(sig, 0),
                "sig_flip_middle": tampered_signature(sig, len(sig) // 2),
                "sig_flip_last": tampered_signature(sig, -1), "sig_case_swapped": sig.swapcase(),
                "sig_minus_one": sig[:-1], "sig_half": sig[: len(sig) // 2],
                "sig_first_char": sig[0], "sig_reversed": sig[::-1],
                "sig_std_base64": base64.b64encode(b64url_decode(sig)).decode(),
                # Not a cut of a longer encoding: its last character may be non-canonical.
                "random_same_length": random_signature(len(b64url_decode(sig)), unlike=sig),
                "sig_percent": "".join(f"%{ord(c):02X}" for c in sig),
                "sig_lowercase_escapes": "".join(f"%{ord(c):02x}" for c in sig),
                "alg_none_jwt": f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{p}.",
                "alg_none_with_sig": f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{p}.{sig}",
            }
            return variants[name]
        if name in ("sig2", "jwt2_issued"):
            sig2, _ = self.issued("jwt2_issued")
            return sig2
        if name == "expired_sig":
            return self.corpus_expired()
        if name in ("random_rs256", "random_hs256"):
            return b64url(os.urandom(256 if name == "random_rs256" else 32))
        if name == "uuid":
            return str(uuid.uuid4())
        if name in ("a_8k", "a_16k", "a_60k"):
            return "A" * {"a_8k": 8192, "a_16k": 16384, "a_60k": 61440}[name]
        return self._response_token(name)

    def corpus_expired(self) -> str:
        c = self.corpus
        if c.expired is None:
            # At the start of a second, so the 2 s token has nearly 2 s to be issued and probed.
            time.sleep(1 - time.time() % 1)
            saved = self.form
            self.form = {"exp_in": "2"}
            c.expired = self.issue()
            self.form = saved
        sig, full = c.expired
        self.secrets.add(full.rsplit(".", 1)[0])
        while int(time.time()) <= pyjwt.decode(full, options={"verify_signature": False})["exp"]:
            time.sleep(0.2)
        return sig

    def signed(self, **claims) -> str:
        kid = claims.pop("kid", "corpus")
        key = claims.pop("key", None)
        token = self.corpus.sign(self.corpus.claims(**claims), key=key, kid=kid)
        self.secrets.add(token.rsplit(".", 1)[0])
        return token

    def _response_token(self, name: str) -> str:
        c = self.corpus
        now = int(time.time())
        if name == "jwt_json_escaped":
            return self.get("jwt_resp").replace("e", "\\u0065")
        if name == "deep_nesting":  # as deep as max_token_response_bytes allows
            return '{"access_token": "' + self.get("jwt_resp") + '", "x": ' + NESTED + "}"
        if name == "deep_array":
            return "[" * 32000 + '{"access_token": "' + self.get("jwt_resp") + '"}' + "]" * 32000
        made = {
            "jwt_resp": lambda: self.signed(),
            "jwt2": lambda: self.signed(),
            "jwt_no_exp": lambda: self.signed(exp=None),
            "jwt_expired": lambda: self.signed(exp=now - 600),
            "jwt_exp_far": lambda: self.signed(exp=253402300799),
            "jwt_exp_string": lambda: self.signed(exp="soon"),
            "jwt_nbf_future": lambda: self.signed(nbf=now + 3600),
            "wrong_issuer": lambda: self.signed(iss="https://evil.example"),
            "unknown_kid": lambda: self.signed(kid="no-such-kid"),
            "untrusted_no_kid": lambda: self.signed(kid=None, key=c.other_key),
        }
        if name in made:
            return made[name]()
        base = self.get("jwt_resp")
        h, p, s = base.split(".")
        other = self.get("jwt2").split(".")[2]
        shapes = {
            "two_part": f"{h}.{p}",
            "four_part": f"{h}.{p}.{s}.{s}",
            "five_part": f"{h}.{p}.{s}.{s}.{s}",
            "header_not_json": f"{b64url('hello')}.{p}.{s}",
            "header_no_alg": f"{b64json({'typ': 'JWT', 'kid': 'corpus'})}.{p}.{s}",
            "header_not_base64url": f"e30@!.{p}.{s}",
            "payload_not_json": f"{h}.{b64url('nope')}.{s}",
            "payload_array": f"{h}.{b64url('[1,2]')}.{s}",
            "empty_signature": f"{h}.{p}.",
            "signature_not_base64url": f"{h}.{p}.ab+/cd",
            "signature_too_long": f"{h}.{p}.{'A' * 3000}",
            "alg_none": f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{p}.",
            "alg_none_with_signature": f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{p}.{s}",
            "forged_signature": f"{h}.{p}.{other}",
            "forged_claims": f"{h}.{b64json({**c.claims(), 'sub': 'admin'})}.{s}",
            "alg_swapped": f"{b64json({'alg': 'ES256', 'kid': 'corpus'})}.{p}.{s}",
            "hs256_confusion": _hs256(c, p),
        }
        return shapes[name]


def _hs256(c: Corpus, payload: str) -> str:
    """HS256 keyed with the trusted RSA public key: the classic algorithm-confusion forgery."""
    secret = c.key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64json({'alg': 'HS256', 'kid': 'corpus'})}.{payload}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)\}")
DOLLAR = re.compile(r"\$([a-z0-9_]+)")


def fill(template: str, tokens: Tokens, pattern=PLACEHOLDER) -> str:
    return pattern.sub(lambda m: tokens.get(response_name(m.group(1), pattern)), template)


def response_name(name: str, pattern) -> str:
    """In a token response `$jwt` is a token the test signs, not one the IdP issued."""
    return "jwt_resp" if pattern is DOLLAR and name == "jwt" else name


# --- checks --------------------------------------------------------------------------------------

def assert_no_leak(x: Exchange, tokens: Tokens):
    for secret in tokens.secrets:
        assert secret.encode() not in x.raw, f"a header.payload reached the client: {x!r}"
    assert not JWT_PREFIX.search(x.raw), f"something JWT-shaped reached the client: {x!r}"


def assert_challenge(x: Exchange, status: int, error: str | None, realm: str = REALM):
    assert x.status == status and not x.broken, x
    challenge = realm if error is None else f'{realm}, error="{error}"'
    assert x.headers.get("www-authenticate") == challenge, x
    assert x.headers.get("content-type") == "application/json", x
    assert x.json().get("error") == error, x


def check_expectation(x: Exchange, expect, upstream: list, verified: str | None,
                      identity: dict | None):
    """Shared by the request-side rows: status, challenge, and what reached the upstream."""
    if expect == "forward":
        assert x.status == 200 and not x.broken, x
        assert len(upstream) == 1, f"upstream saw {len(upstream)} requests"
        assert upstream[0].header("authorization") == [f"Bearer {verified}"], upstream[0].headers
        for name, value in (identity or {}).items():
            assert upstream[0].header(name) == [value], (name, upstream[0].headers)
        return
    if expect == "public":
        assert x.status == 200 and not x.broken, x
        assert len(upstream) == 1
        for name in CLAIM_HEADERS:
            assert upstream[0].header(name) == [], (name, upstream[0].headers)
        return
    assert upstream == [], f"a refused request reached the upstream: {upstream[0].headers}"
    if expect == "reset":
        assert x.broken and x.status is None, x
    elif expect == "missing":
        assert_challenge(x, 401, None)
    elif expect == "invalid_token":
        assert_challenge(x, 401, "invalid_token")
    elif expect == "invalid_request":
        assert_challenge(x, 400, "invalid_request")
    elif expect == "invalid_dpop_proof":
        assert_challenge(x, 401, "invalid_dpop_proof", realm='DPoP realm="split-token"')
    else:
        assert isinstance(expect, int), f"unknown expectation {expect!r}"
        assert x.status == expect, x


# --- request-side rows ---------------------------------------------------------------------------

@pytest.mark.parametrize("row", AUTHORIZATION, ids=[r["id"] for r in AUTHORIZATION])
def test_authorization(corpus, row):
    tokens = Tokens(corpus)
    values = [fill(v, tokens) for v in row["send"]]
    path = API + row["id"]
    with StatDelta(corpus.gateway) as d:
        x = exchange(corpus, row, "GET", path, [("Authorization", encode_value(v)) for v in values])
    assert_no_leak(x, tokens)
    forwarded = tokens.jwts.get(tokens.values.get("sig2" if "{sig2}" in str(row["send"]) else "sig", ""))
    check_expectation(x, row["expect"], corpus.upstream.received(path), forwarded, None)
    if "counter" in row:
        assert d.split_token(row["counter"]) == 1, row["counter"]


@pytest.mark.parametrize("row", IDENTITY_ROWS, ids=[r["id"] for r in IDENTITY_ROWS])
def test_identity_headers(corpus, row):
    tokens = Tokens(corpus, form=IDENTITY)
    headers = [(name, encode_value(value)) for name, value in row["headers"]]
    if "authorization" in row:
        headers.append(("Authorization", encode_value(fill(row["authorization"], tokens))))
    elif row.get("token", True):
        headers.append(("Authorization", f"Bearer {tokens.get('sig')}".encode()))
    path = (PUBLIC if row.get("path") == "public" else API) + row["id"]
    x = exchange(corpus, row, "GET", path, headers)
    assert_no_leak(x, tokens)
    upstream = corpus.upstream.received(path)
    check_expectation(x, row["expect"], upstream, tokens.values.get("jwt"), VERIFIED)
    for r in upstream:
        assert not any("mallory" in v or v == "admin" for _, v in r.headers), r.headers


# --- token responses -------------------------------------------------------------------------------

def positions(body: bytes, token: str | None) -> dict[str, int]:
    named = {"open": body.find(b"{") + 1, "key": body.find(b"access_token") + 6,
             "last": len(body) - 1, "all": len(body)}
    if token and token.encode() in body:
        start = body.find(token.encode())
        first = token.find(".")
        second = token.find(".", first + 1)
        named.update(value=start, dot1=start + first, dot2=start + second,
                     sig=start + (second + len(token)) // 2, end=start + len(token))
    return named


def build_script(row: dict, tokens: Tokens) -> tuple[Script, str | None]:
    """The scripted answer for a row, and the main token in it (if any)."""
    text = fill(row.get("body", ""), tokens, DOLLAR)
    main = None
    for name in DOLLAR.findall(row.get("body", "")):
        name = response_name(name, DOLLAR)
        # These wrap the plain token in something else; the token inside is what matters.
        main = tokens.values["jwt_resp" if name in ("jwt_json_escaped", "deep_nesting", "deep_array") else name]
        break
    body = text.encode("utf-8")
    if "pad_to" in row:
        filler = row["pad_to"] - len(body) - len(b'"padding": "", ')
        body = b'{"padding": "' + b"a" * filler + b'", ' + body[1:]
    where = positions(body, main)
    splits = row.get("splits", [])
    if splits == "every":
        splits = list(range(1, len(body)))
    else:
        splits = [where[s] if isinstance(s, str) else s for s in splits]
    if row.get("gzip"):
        body = gzip.compress(body)
    headers = [tuple(h) for h in row.get("headers", [["content-type", "application/json"]])]
    reset = row.get("reset_after")
    script = Script(
        status=row.get("status", 200), headers=headers, body=body,
        framing=row.get("framing", "length"), splits=splits,
        pause=0 if row.get("splits") == "every" else 0.005,
        reset_after=where[reset] if isinstance(reset, str) else reset,
    )
    if "declare_length" in row:
        script.headers.append(("content-length", str(row["declare_length"])))
        script.framing = "close"
    return script, main


@pytest.mark.parametrize("row", RESPONSES, ids=[r["id"] for r in RESPONSES])
def test_token_response(corpus, row):
    tokens = Tokens(corpus)
    script, main = build_script(row, tokens)
    path = TOKEN + row["id"]
    corpus.upstream.play(path, script)
    with StatDelta(corpus.gateway) as d:
        x = exchange(corpus, row, "POST", path, [], b"grant_type=client_credentials&client_id=corpus")
    assert_no_leak(x, tokens)
    expect = row["expect"]
    main_sig = main.split(".")[2] if main and main.count(".") == 2 and main.split(".")[2] else None

    if expect == "split":
        assert x.status == row.get("status", 200) and not x.broken, x
        body = json.loads(x.body.replace(NESTED.encode(), b"[]"))
        assert body["access_token"] == main_sig, body
        assert d.split_token("tokens_split") == 1
        if "expires_in" in row:
            want, got = row["expires_in"], body.get("expires_in")
            if isinstance(want, int) and not isinstance(want, bool):
                assert want - 5 <= got <= want, body
            else:
                assert got == want, body
        api = API + "after-" + row["id"]
        r = h1(corpus.gateway.envoy.port, "GET", api, [("Authorization", f"Bearer {main_sig}".encode())])
        assert r.status == 200, r
        (seen,) = corpus.upstream.received(api)
        assert seen.header("authorization") == [f"Bearer {main}"]
        return

    assert d.split_token("tokens_split") == 0
    if expect == "passthrough":
        assert x.status == row["status"] and not x.broken, x
        assert x.body == script.body, x
    elif expect == "broken":
        assert x.broken or (x.status or 0) >= 500, x
        if x.status == 200:  # the headers had gone out: then not one byte of body followed
            assert x.body == b"", x
    elif row.get("over_envoy_buffer") and x.status == 500 and not x.broken:
        # Envoy's own answer to a buffer overflow, which may come before the filter's.
        assert (x.headers.get("content-type"), x.body) == ("text/plain", b"Internal Server Error"), x
    else:
        # (Envoy's own reset of an overflow, after the headers, moves no filter counter.)
        resets = None if row.get("over_envoy_buffer") else d.split_token("split_resets")
        assert_split_refused(x, expect["fail"], resets=resets, in_headers=row.get("in_headers", False))
    if main_sig:
        # Nothing was stored: the signature is unknown to the gateway.
        api = API + "after-" + row["id"]
        r = h1(corpus.gateway.envoy.port, "GET", api, [("Authorization", f"Bearer {main_sig}".encode())])
        assert_challenge(r, 401, "invalid_token")
        assert corpus.upstream.received(api) == []


# --- revocation and introspection ------------------------------------------------------------------

def _case_requests(corpus: Corpus, path: str, case: str) -> list:
    return [r for r in corpus.upstream.received(path) if r.header("x-corpus-case") == [case]]


@pytest.mark.parametrize("row", REVOCATIONS, ids=[r["id"] for r in REVOCATIONS])
def test_revocation(corpus, row):
    tokens = Tokens(corpus)
    body = fill(row["body"], tokens).encode()
    headers = [("x-corpus-case", row["id"].encode())]
    if "content_type" in row:
        headers.append(("Content-Type", row["content_type"].encode()))
    with StatDelta(corpus.gateway) as d:
        x = exchange(corpus, row, "POST", REVOKE, headers, body)
    assert_no_leak(x, tokens)
    seen = _case_requests(corpus, REVOKE, row["id"])
    expect = row["expect"]
    if expect == "revoked":
        assert x.status == 200 and not x.broken, x
        assert len(seen) == 1, seen
        form = urllib.parse.parse_qs(seen[0].body.decode(), keep_blank_values=True)
        assert form["token"] == [tokens.get("jwt")], form
        assert d.split_token("revoked") == 1
        r = h1(corpus.gateway.envoy.port, "GET", API + "revoked-" + row["id"],
               [("Authorization", f"Bearer {tokens.get('sig')}".encode())])
        assert_challenge(r, 401, "invalid_token")
        return
    if expect == "unchanged":
        assert x.status == 200 and not x.broken, x
        assert [r.body for r in seen] == [body]
        assert d.split_token("revocations.forwarded_unchanged") == 1
        return
    assert seen == [], "nothing may be forwarded"
    if expect == "local":
        assert (x.status, x.body, x.broken) == (200, b"", False), x
        assert d.split_token("revocations.unknown") == 1
    else:
        assert expect == "invalid"
        assert x.status == 400 and x.json()["error"] == "invalid_request", x
        assert d.split_token("revocations.invalid") == 1


@pytest.mark.parametrize("row", INTROSPECTIONS, ids=[r["id"] for r in INTROSPECTIONS])
def test_introspection(corpus, row):
    tokens = Tokens(corpus)
    body = fill(row["body"], tokens).encode()
    headers = [("x-corpus-case", row["id"].encode())]
    auth = row.get("auth")
    if isinstance(auth, list):
        headers.append(("Authorization", b"Basic " + base64.b64encode(":".join(auth).encode())))
    elif isinstance(auth, dict):
        headers.append(("Authorization", fill(auth["raw"], tokens).encode()))
    x = exchange(corpus, row, "POST", INTROSPECT, headers, body)
    assert_no_leak(x, tokens)
    assert _case_requests(corpus, INTROSPECT, row["id"]) == [], "introspection is answered here"
    expect = row["expect"]
    if expect == "unauthorized":
        assert x.status == 401, x
        assert x.headers.get("www-authenticate") == 'Basic realm="split-token"', x
        assert x.json()["error"] == "invalid_client"
    elif expect == "invalid":
        assert x.status == 400 and x.json()["error"] == "invalid_request", x
    else:
        assert x.status == 200 and x.headers.get("cache-control") == "no-store", x
        answer = x.json()
        if expect == "inactive":
            assert answer == {"active": False}, answer
        else:
            assert expect == "active"
            assert answer["active"] is True and answer["iss"] == corpus.issuer, answer
            assert answer["exp"] > time.time()


# --- DPoP ----------------------------------------------------------------------------------------

def dpop_proof(url: str) -> str:
    """A proof-shaped JWT (RFC 9449 §4.2). The gateway checks only its shape; no upstream here
    verifies it."""
    header = {"typ": "dpop+jwt", "alg": "ES256",
              "jwk": {"kty": "EC", "crv": "P-256", "x": b64url(os.urandom(32)), "y": b64url(os.urandom(32))}}
    claims = {"htm": "GET", "htu": url, "iat": int(time.time()), "jti": uuid.uuid4().hex}
    return f"{b64json(header)}.{b64json(claims)}.{b64url(os.urandom(64))}"


@pytest.mark.parametrize("row", DPOP_ROWS, ids=[r["id"] for r in DPOP_ROWS])
def test_dpop(corpus, row):
    tokens = Tokens(corpus)
    bound = row.get("token", "bound") == "bound"
    cnf = {"cnf": {"jkt": b64url(os.urandom(32))}} if bound else {}
    jwt_text = tokens.signed(**cnf)
    body = json.dumps({"access_token": jwt_text, "token_type": "DPoP" if bound else "Bearer"})
    corpus.upstream.play(DPOP_TOKEN, Script(headers=[("content-type", "application/json")],
                                            body=body.encode()))
    issued = h1(corpus.gateway.envoy.port, "POST", DPOP_TOKEN, [], b"grant_type=client_credentials")
    sig = issued.json()["access_token"]
    assert sig == jwt_text.split(".")[2], issued
    path = API + "dpop-" + row["id"]
    values = {"sig": sig, "jwt": jwt_text, "sig_flip_last": tampered_signature(sig),
              "proof": dpop_proof(corpus.gateway.url + path)}
    render = lambda t: PLACEHOLDER.sub(lambda m: values[m.group(1)], t)  # noqa: E731
    proofs = [render(v) for v in row["dpop"]]
    headers = [("Authorization", encode_value(render(row["authorization"])))]
    headers += [("DPoP", encode_value(p)) for p in proofs]
    x = exchange(corpus, row, "GET", path, headers)
    assert_no_leak(x, tokens)
    upstream = corpus.upstream.received(path)
    expect = row["expect"]
    if expect in ("forward", "forward_bearer"):
        assert x.status == 200 and not x.broken, x
        assert len(upstream) == 1, upstream
        scheme = "DPoP" if expect == "forward" else "Bearer"
        assert upstream[0].header("authorization") == [f"{scheme} {jwt_text}"], upstream[0].headers
        assert upstream[0].header("dpop") == [p.strip() for p in proofs]
        return
    assert upstream == [], f"a refused request reached the upstream: {upstream[0].headers}"
    dpop_realm = 'DPoP realm="split-token"'
    if expect == "invalid_dpop_proof":
        assert_challenge(x, 401, "invalid_dpop_proof", realm=dpop_realm)
    elif expect == "dpop_invalid_token":
        assert_challenge(x, 401, "invalid_token", realm=dpop_realm)
    else:
        assert expect == "invalid_token"
        assert_challenge(x, 401, "invalid_token")


# --- afterwards ------------------------------------------------------------------------------------

def test_after_the_corpus(corpus):
    """Envoy is up, the VM never failed or restarted, and a normal flow works."""
    gw = corpus.gateway
    assert gw.envoy.process.alive()
    # A failed VM is replaced (FAIL_RELOAD) or fails every request (FAIL_CLOSED): either way no
    # VM may have been created since the corpus began. The native build has no VM: no hook may
    # have panicked (each would have reset its stream).
    if stack.HOST == "wasm":
        assert corpus.vms_at_start > 0
        assert gw.envoy.stat(VMS_CREATED) == corpus.vms_at_start
    else:
        assert "split-token: panic" not in gw.envoy.log()
    print({k: v for k, v in gw.stats().items() if "wasm" in k and "split_token" not in k})
    log = gw.envoy.log()
    for bad in ("Function: proxy_on", "wasm trap", "panicked", "Uncaught", "Failed to"):
        assert bad not in log, f"Envoy log mentions {bad!r}"
    token = gw.token()
    r = gw.call(f"Bearer {token}")
    assert r.status_code == 200
    assert r.json()["headers"]["Authorization"].endswith("." + token)
    counted = sum(map(len, (AUTHORIZATION, RESPONSES, IDENTITY_ROWS, REVOCATIONS, INTROSPECTIONS,
                            DPOP_ROWS)))
    assert counted >= 200, counted
