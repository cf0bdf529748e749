"""A scripted HTTP/1.1 upstream that runs inside the test process.

Envoy routes the adversarial corpus to it. Under `/corpus/token/<case>` it plays a scripted token
response byte for byte: any status and headers, bodies written in pieces at chosen offsets (so
the filter sees the body split at every kind of boundary), chunked or close-delimited framing,
a delay before the headers (a slow IdP), or a TCP reset part-way through the body. Under every
other path it records the request it received and answers a small JSON body that echoes
nothing, so a test can tell exactly what reached the upstream without the upstream leaking it
back to the client.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Script:
    """One scripted response."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # "length": Content-Length; "chunked": Transfer-Encoding chunked; "close": ends at close.
    framing: str = "length"
    # Body offsets at which to break the body into separate writes (and chunks, if chunked).
    splits: list[int] = field(default_factory=list)
    pause: float = 0.005
    delay_headers: float = 0.0
    # Send this many body bytes, then reset the connection (RST, not FIN).
    reset_after: int | None = None


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        server: ScriptedUpstream = self.server.owner  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        sock.settimeout(30)
        reader = sock.makefile("rb")
        try:
            while True:
                request = _read_request(reader)
                if request is None:
                    return
                script = server.script_for(request)
                if script is None:
                    server.record(request)
                    _send(sock, Script(headers=[("content-type", "application/json")],
                                       body=b'{"upstream":"scripted","ok":true}'))
                    continue
                server.record(request)
                _send(sock, script)
                return  # every scripted answer closes its connection
        except (OSError, ValueError):
            return


def _read_request(reader) -> Received | None:
    line = reader.readline(65536)
    if not line:
        return None
    method, path, _ = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = []
    while True:
        h = reader.readline(65536)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v for k, v in headers}
    body = b""
    if lower.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += reader.read(size)
            reader.readline()
    elif "content-length" in lower:
        body = reader.read(int(lower["content-length"]))
    return Received(method, path, headers, body)


def _pieces(body: bytes, splits: list[int]) -> list[bytes]:
    cuts = sorted({s for s in splits if 0 < s < len(body)})
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:])]


def _send(sock: socket.socket, s: Script):
    if s.delay_headers:
        time.sleep(s.delay_headers)
    head = [f"HTTP/1.1 {s.status} Scripted"]
    head += [f"{k}: {v}" for k, v in s.headers]
    no_body = s.status in (204, 304) or 100 <= s.status < 200
    if not no_body:
        if s.framing == "length":
            head.append(f"content-length: {len(s.body)}")
        elif s.framing == "chunked":
            head.append("transfer-encoding: chunked")
    head.append("connection: close")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if no_body:
        return
    sent = 0
    for piece in _pieces(s.body, s.splits):
        if s.reset_after is not None and sent + len(piece) >= s.reset_after:
            piece = piece[: s.reset_after - sent]
            _write(sock, piece, s.framing)
            time.sleep(s.pause)
            _reset(sock)
            return
        _write(sock, piece, s.framing)
        sent += len(piece)
        if s.pause:
            time.sleep(s.pause)
    if s.reset_after is not None:
        _reset(sock)
        return
    if s.framing == "chunked":
        sock.sendall(b"0\r\n\r\n")


def _write(sock: socket.socket, piece: bytes, framing: str):
    if not piece:
        return
    if framing == "chunked":
        sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    else:
        sock.sendall(piece)


def _reset(sock: socket.socket):
    # SO_LINGER with a zero timeout makes close() send RST.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ScriptedUpstream:
    """Start with `ScriptedUpstream().start()`; `play(path, script)` arms a scripted answer."""

    def __init__(self):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._lock = threading.Lock()
        self._scripts: dict[str, Script] = {}
        self._received: list[Received] = []

    def start(self) -> "ScriptedUpstream":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def play(self, path: str, script: Script):
        with self._lock:
            self._scripts[path] = script

    def script_for(self, request: Received) -> Script | None:
        with self._lock:
            return self._scripts.get(request.path.split("?")[0])

    def record(self, request: Received):
        with self._lock:
            self._received.append(request)

    def received(self, path_prefix: str = "") -> list[Received]:
        with self._lock:
            return [r for r in self._received if r.path.startswith(path_prefix)]
