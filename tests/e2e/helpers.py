"""Helpers that make end-to-end failures readable."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass

import httpx
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

    def token_exchange(self, path: str = "/auth/token", **form) -> Exchange:
        """A token request read as raw bytes (`h1`): what a client sees when a split fails."""
        data = {"grant_type": "client_credentials", "client_id": "e2e", "client_secret": "s", **form}
        body = urllib.parse.urlencode(data).encode()
        return h1(self.envoy.port, "POST", path, [], body)

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
        """Rewrites the LDS listener with new filter settings (or, for the Wasm filter, a new
        vm_id or other .wasm code) and waits until Envoy has taken the update: returns
        "accepted" or "rejected"."""
        lds_path, listener = self.lds
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (http_filter,) = [f for f in hcm["http_filters"] if stack.is_split_token(f)]
        if settings is not None:
            stack.set_filter_settings(http_filter, json.dumps(settings))
        if vm_id is not None or code is not None:
            assert stack.HOST == "wasm", "vm_id and code are the Wasm filter's"
            vm = http_filter["typed_config"]["config"]["vm_config"]
            if vm_id is not None:
                vm["vm_id"] = vm_id
            if code is not None:
                vm["code"]["local"]["filename"] = code
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
        return self.envoy.stat(stack.stat_name(name))

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
        return self[stack.stat_name(name)]


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


# --- raw clients: what a client reading bytes gets ---------------------------------------------

@dataclass
class Exchange:
    """What came back, raw: `broken` when the connection was cut or the framing was short."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    raw: bytes
    broken: bool = False
    http2: bool = False

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Exchange({self.status}, broken={self.broken}, {self.headers}, {self.body[:200]!r})"


def encode_value(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


FORM = b"application/x-www-form-urlencoded"


def h1(port: int, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes = b"") -> Exchange:
    """One HTTP/1.1 exchange on a raw socket: the bytes go out exactly as given."""
    request = f"{method} {path} HTTP/1.1\r\nHost: corpus\r\nConnection: close\r\n".encode()
    for name, value in headers:
        request += name.encode() + b": " + value + b"\r\n"
    if method == "POST":
        if not any(name.lower() == "content-type" for name, _ in headers):
            request += b"Content-Type: " + FORM + b"\r\n"
        request += f"Content-Length: {len(body)}\r\n".encode()
    request += b"\r\n" + body
    raw, broken = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        try:
            # Stop at the end of the response: Envoy waits up to its delayed_close_timeout (1 s)
            # for the client to close first.
            while not _complete(raw) and (chunk := s.recv(65536)):
                raw += chunk
        except (ConnectionResetError, TimeoutError):
            broken = True
    return _parse_h1(raw, broken)


def _complete(raw: bytes) -> bool:
    x = _parse_h1(raw, False)
    return x.status is not None and not x.broken and (
        "content-length" in x.headers or "transfer-encoding" in x.headers or x.status in (204, 304))


def _parse_h1(raw: bytes, broken: bool) -> Exchange:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return Exchange(None, {}, b"", raw, broken=True)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rest
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = b"", False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                complete = True
                break
            body += rest[:size]
            rest = rest[size + 2:]
        broken = broken or not complete
    elif "content-length" in headers:
        length = int(headers["content-length"])
        body = rest[:length]
        broken = broken or len(rest) < length
    return Exchange(status, headers, body, raw, broken)


def h2(port: int, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes = b"") -> Exchange:
    """One HTTP/2 exchange (prior knowledge, h2c)."""
    hdrs = [(k.lower().encode(), v) for k, v in headers]
    if method == "POST" and not any(k == b"content-type" for k, _ in hdrs):
        hdrs.append((b"content-type", FORM))
    received, status, resp_headers, broken, error = b"", None, {}, False, b""
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        try:
            with client.stream(method, f"http://127.0.0.1:{port}{path}", headers=hdrs,
                               content=body or None) as r:
                status = r.status_code
                resp_headers = {k.lower(): v for k, v in r.headers.items()}
                for chunk in r.iter_raw():
                    received += chunk
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.LocalProtocolError) as e:
            broken = True
            error = str(e).encode()
    raw = json.dumps(resp_headers).encode() + b"\n" + received
    if broken:
        raw += b"\n" + error
    return Exchange(status, resp_headers, received, raw, broken, http2=True)


def headers_held() -> bool:
    """Whether the filter may hold a token response's headers: in the `envoy` shape, and in the
    native build under any shape (a dynamic module needs no Envoy setting for it, and its
    configs say so)."""
    return stack.SHAPE == "envoy" or stack.HOST == "native"


def assert_split_refused(x: Exchange, reason: str, resets: int | None = None,
                         in_headers: bool = False, status: int = 502, error: str = "server_error"):
    """A 200 token response the filter could not split, as the client got it, byte for byte.
    Where the filter could hold the headers (Envoy allows it, or the failure was found
    `in_headers`: an encoding, a response that ends with its headers): an OAuth error naming
    `reason` (`status` and `error`: 502 server_error, or 503 temporarily_unavailable when etcd
    is down), never the token. Otherwise the IdP's status line and headers went out before the
    body was read: then the stream is reset and not one byte of body follows. `resets` is the
    change of `split_resets`, when the caller has it."""
    if headers_held() or in_headers:
        assert x.status == status and not x.broken, x
        assert x.headers.get("content-type") == "application/json", x
        assert x.headers.get("content-encoding") is None, x
        body = x.json()
        assert body["error"] == error, body
        assert reason in body["error_description"], body
        assert resets in (None, 0), f"split_resets moved by {resets} on a 502"
        return
    assert x.status == 200 and x.broken, f"expected the IdP's 200 headers, then a reset: {x}"
    assert x.body == b"", f"body bytes reached the client before the reset: {x.body[:200]!r}"
    if not x.http2:  # HTTP/1.1: nothing at all after the header block
        head, _, rest = x.raw.partition(b"\r\n\r\n")
        assert rest == b"", f"bytes after the headers: {rest[:200]!r}"
        assert x.headers.get("transfer-encoding") == "chunked", x
    assert "content-length" not in x.headers, x
    assert resets in (None, 1), f"split_resets moved by {resets} on a reset"


def assert_not_forwarded(d: StatDelta, cluster: str = "idp"):
    """No request that the filter answered itself (a revocation or introspection, decided on
    its body) reached `cluster` whole. Where the filter holds the headers, none even started.
    Otherwise its headers went on before the body was read: the upstream request may have
    started, and then the gateway cancelled or reset it, and no answer came back from it."""
    c = f"cluster.{cluster}"
    if headers_held():
        assert d[f"{c}.upstream_rq_total"] == 0 and d[f"{c}.upstream_rq_pending_total"] == 0
        return
    # Ended by the gateway: reset (HTTP/2), or its HTTP/1.1 connection closed under it; one
    # still waiting for a connection is cancelled and never counts as started.
    ended = ("upstream_rq_tx_reset", "upstream_cx_destroy_local_with_active_rq")
    assert d[f"{c}.upstream_rq_total"] == sum(d[f"{c}.{k}"] for k in ended), \
        {k: d[f"{c}.{k}"] for k in ("upstream_rq_total", *ended)}
    answers = {k: d[f"{c}.upstream_rq_{k}"] for k in ("1xx", "2xx", "3xx", "4xx", "5xx")}
    assert not any(answers.values()), f"{cluster} answered: {answers}"
