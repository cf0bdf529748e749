"""Fixtures for the end-to-end suite: a real oauth2-mock-server, a real httpbin and real Envoys
loading the built .wasm, all on free loopback ports. On a failing test the logs of every process
the test used are printed (as envoyproxy/examples' verify-common.sh does)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stack  # noqa: E402

from helpers import Gateway, free_port  # noqa: E402

RUN_ROOT = stack.ROOT / ".run" / "e2e"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def httpbin_base64_path(body: dict | str) -> str:
    """An httpbin path that answers 200 with exactly `body`."""
    text = body if isinstance(body, str) else json.dumps(body)
    return "/base64/" + base64.urlsafe_b64encode(text.encode()).decode()


# A JWS-shaped token whose exp is long past: parseable, never splittable.
EXPIRED_JWT = ".".join([
    b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()),
    b64url(json.dumps({"sub": "old", "exp": 1000}).encode()),
    b64url(b"not-a-real-signature"),
])

# Token paths served by httpbin with 200 bodies the filter must refuse to split.
BAD_TOKEN_ROUTES = {
    "/bad/html": "/html",
    "/bad/json": "/json",
    "/bad/gzip": "/gzip",
    "/bad/empty": "/status/200",
    "/bad/bytes": "/bytes/70000",
    "/bad/opaque": httpbin_base64_path({"access_token": "opaque-abc", "token_type": "Bearer"}),
    "/bad/expired": httpbin_base64_path({"access_token": EXPIRED_JWT, "token_type": "Bearer"}),
    "/bad/array": httpbin_base64_path("[1, 2, 3]"),
}

BASE_FILTER = {
    "token_paths": ["/auth/token", *BAD_TOKEN_ROUTES],
    "public_prefixes": ["/basic-protected-api/status/", "/public/"],
    "full_jwt": "reject",
    "strip_response_fields": [],
    "max_ttl_seconds": 86400,
    "store_slots": 65536,
}


def pytest_addoption(parser):
    parser.addoption("--shape", choices=stack.SHAPES, default=stack.SHAPE,
                     help="the Envoy filter config to test under: hand-written (envoy), or what an "
                          "Istio WasmPlugin or an Envoy Gateway EnvoyExtensionPolicy becomes")
    parser.addoption("--host", choices=stack.HOSTS, default=stack.HOST,
                     help="the build of the filter Envoy runs: the .wasm (wasm) or the dynamic "
                          "module (native, target/native/libsplit_token_native.so)")


def pytest_configure(config):
    stack.SHAPE = config.getoption("--shape")
    stack.HOST = config.getoption("--host")


def pytest_report_header(config):
    return f"split-token filter config shape: {stack.SHAPE}, host: {stack.HOST}"


@pytest.fixture(scope="session")
def run_dir() -> Path:
    # Unique even for two sessions started in the same second: they would share logs, configs
    # and the IdPs' revocation records.
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=RUN_ROOT))


_started: list = []
_procs: list = []


def _session_process(start, run_dir):
    """Starts a shared part on a free port; its log is printed when a test fails."""
    proc = start(free_port(), run_dir)
    _procs.append(proc)
    return proc


@pytest.fixture(scope="session")
def idp(run_dir):
    proc = _session_process(stack.start_idp, run_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def httpbin(run_dir):
    proc = _session_process(stack.start_httpbin, run_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def start_etcd(run_dir):
    """Starts an etcd on a free port (or `port`); its log is printed when a test fails. To restart
    a stopped one with its data: `start_etcd(old.port, data_dir=old.data_dir,
    peer_port=old.peer_port)`. Whatever is still running (or frozen) stops at session end."""
    started = []

    def start(port=None, **options):
        proc = stack.start_etcd(port or free_port(), run_dir, **options)
        started.append(proc)
        if all(p.log != proc.log for p in _procs):  # a restart logs to the same file
            _procs.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            os.kill(proc.proc.pid, signal.SIGCONT)  # a test may have frozen it
        proc.stop()


@pytest.fixture(scope="module")
def recording_idp(run_dir, request):
    """An IdP of the test module's own that records the revocation requests it receives."""
    record = run_dir / f"revocations-{request.module.__name__}.jsonl"
    idp = stack.start_idp(free_port(), run_dir, record=record)
    idp.record = record
    _procs.append(idp)
    yield idp
    idp.stop()


@pytest.fixture(scope="session")
def start_gateway(run_dir, idp, httpbin):
    """Starts an Envoy with the demo config, the given filter settings and options."""
    counter = iter(range(1000))

    def start(filter_config=None, *, concurrency=1, extra_routes=None, wait=True, log_level="info",
              extra_args=None, name=None, idp_port=None, extra_clusters=None,
              customize=None, lds=False, native_dir=None) -> Gateway:
        """`customize(config)` edits the rendered config in place; `lds=True` serves the
        listener from a watched file, so `gateway.reload(settings)` can change it live;
        `native_dir` is where Envoy finds the dynamic module under `--host native`."""
        routes = [
            {"match": {"path": path}, "route": {"cluster": "httpbin", "prefix_rewrite": target}}
            for path, target in BAD_TOKEN_ROUTES.items()
        ] + [
            # An echoing public path, to see what a request without a token carries upstream.
            {"match": {"prefix": "/public/"}, "route": {"cluster": "httpbin", "prefix_rewrite": "/anything/"}},
        ] + (extra_routes or [])
        idp_port = idp_port or idp.port
        config = stack.render_config(
            listen_port=free_port(), admin_port=free_port(),
            idp_port=idp_port, httpbin_port=httpbin.port,
            filter_config=BASE_FILTER if filter_config is None else filter_config,
            extra_routes=routes, extra_clusters=extra_clusters,
        )
        if customize:
            customize(config)
        stack.apply_shape(config)
        name = name or f"envoy-{next(counter)}"
        listen_port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        lds_path = run_dir / f"{name}-lds" / "lds.json" if lds else None
        if lds_path:
            lds_path.parent.mkdir(parents=True, exist_ok=True)
            listener = stack.listener_via_lds(config, lds_path)
            # A replaced listener drains for this long (600 s by default) before it goes away.
            extra_args = (extra_args or []) + ["--drain-time-s", "1"]
        envoy = stack.Envoy(config, run_dir, name=name, concurrency=concurrency,
                            log_level=log_level, extra_args=extra_args, listen_port=listen_port,
                            native_dir=native_dir)
        _started.append(envoy)
        gateway = Gateway(envoy, idp_port=idp_port)
        if lds_path:
            gateway.lds = (lds_path, listener)
        if wait:
            envoy.wait_ready()
            if lds_path:
                stack.wait_for("listener from LDS", lambda: gateway.call(path="/public/x").status_code == 200)
        return gateway

    yield start
    for envoy in _started:
        envoy.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway) -> Gateway:
    """The shared gateway: demo config plus the bad token routes. Tests compare stat deltas."""
    return start_gateway(name="envoy-shared")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for envoy in _started:
            # Start-up chatter (extension lists, header maps) hides what matters.
            lines = [line for line in envoy.log().splitlines()
                     if "][main]" not in line or "][info][main]" not in line]
            report.sections.append((f"{envoy.process.name} log (tail)", "\n".join(lines)[-6000:]))
        for proc in _procs:
            report.sections.append((f"{proc.name} log (tail)", proc.output()[-3000:]))
