"""Start the real parts on loopback: oauth2-mock-server, httpbin under gunicorn, and Envoy.

Used by `just demo` (fixed ports, as in envoy/envoy.yaml) and by the end-to-end tests (free
ports). Every process logs to a file under the run directory so a failing test can print them.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPS = ROOT / ".deps"
ENVOY_BIN = DEPS / "venv" / "bin" / "envoy"
GUNICORN_BIN = DEPS / "venv" / "bin" / "gunicorn"
ETCD_BIN = DEPS / "etcd" / "usr" / "bin" / "etcd"
IDP_SCRIPT = ROOT / "tests" / "idp" / "server.js"
# Cargo's target directory: CARGO_TARGET_DIR when set (the justfile exports it, absolute), else
# target/ at the root. A relative value is taken from the root, where the recipes run cargo.
TARGET_DIR = ROOT / os.environ.get("CARGO_TARGET_DIR", "target")
# The shipped module (`just build`: cargo's output after wasm-opt), and cargo's own output.
WASM = TARGET_DIR / "dist" / "split_token_filter.wasm"
CARGO_WASM = TARGET_DIR / "wasm32-wasip1" / "release" / "split_token_filter.wasm"
FAULT_WASM = TARGET_DIR / "wasm32-wasip1" / "fault" / "split_token_filter.wasm"
DEMO_CONFIG = ROOT / "envoy" / "envoy.yaml"
# The native build (issue 15): cargo's `native` profile output, an Envoy dynamic module found
# through ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
NATIVE_DIR = TARGET_DIR / "native"
NATIVE_MODULE = NATIVE_DIR / "libsplit_token_native.so"
# The dynamic module with fault injection (`just build-fault`, cargo's `native-fault` profile).
NATIVE_FAULT_DIR = TARGET_DIR / "native-fault"
DYNAMIC_MODULE_FILTER_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter")
# Which build of the filter Envoy runs: the .wasm (`wasm`, the default) or the dynamic module
# (`native`). Configs are written for the wasm build and, under `native`, rewritten by
# `apply_shape` into the same filter with the same JSON as a dynamic module.
# `pytest --host` (or SPLIT_TOKEN_HOST) picks one.
HOSTS = ("wasm", "native")
HOST = os.environ.get("SPLIT_TOKEN_HOST", "wasm")

WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
# The Envoy filter config the tests and benchmarks write, as each way of deploying the filter
# makes it (issue 12). `envoy`: a hand-written config, as envoy/envoy.yaml: Envoy's
# `allow_on_headers_stop_iteration` is set and the filter is told so, and a token response it
# cannot split becomes a 502. `istio` and `envoy-gateway`: exactly what a WasmPlugin and an
# EnvoyExtensionPolicy become (istio/istio pilot/pkg/model/extensions.go, envoyproxy/gateway
# internal/xds/translator/wasm.go): no such flag, so the filter lets headers go on first and a
# failed split resets the stream. `pytest --shape` (or SPLIT_TOKEN_SHAPE) picks one.
SHAPES = ("envoy", "istio", "envoy-gateway")
SHAPE = os.environ.get("SPLIT_TOKEN_SHAPE", "envoy")
# Envoy Gateway names the filter per policy, adds it disabled and enables it on each route the
# policy is attached to (here: every route, as a policy attached to the Gateway).
EG_FILTER_NAME = "envoy.filters.http.wasm/envoyextensionpolicy/default/split-token/wasm/0"
# The same for a policy's dynamicModule[0] (the native build; Envoy Gateway >= v1.8).
EG_NATIVE_FILTER_NAME = ("envoy.filters.http.dynamic_modules/envoyextensionpolicy/default/"
                         "split-token/dynamic-module/0")


# Ports this process has handed out. A port picked free is let go before its user binds it, so
# two picks made before either is bound could be the same port (Linux picks at random among
# ~14,000: about once in 14,000 gateway starts, listener and admin port collided). None is
# handed out twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port this process has not handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@contextlib.contextmanager
def refused_port():
    """A loopback port that refuses connections while the block runs: bound, so nothing else can
    take it (as a port picked free and left alone could be), but not listening."""
    held = []
    try:
        while True:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                break
        _HANDED_OUT.add(port)
        yield port
    finally:
        for s in held:
            s.close()


def wait_for(what: str, check, timeout: float = 20.0, proc: subprocess.Popen | None = None):
    """Polls `check` until it returns truthy; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - readiness probes fail in many ways
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout}s (last error: {last})")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path = ROOT, env=None):
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def start_idp(port: int, run_dir: Path, alg: str = "RS256", record: Path | None = None) -> Process:
    """oauth2-mock-server through tests/idp/server.js (adds sub/email/roles claims on request,
    binds tokens to DPoP keys; with `record`, logs revocation requests there as JSON lines)."""
    argv = ["node", str(IDP_SCRIPT), str(port), "--alg", alg]
    if record:
        argv += ["--record", str(record)]
    log = run_dir / f"idp-{port}.log"
    p = Process("idp", argv, log)
    p.port = port
    wait_for("oauth2-mock-server", lambda: http_ok(f"http://127.0.0.1:{port}/jwks"), proc=p.proc)
    return p


def start_httpbin(port: int, run_dir: Path) -> Process:
    # Keep-alive longer than Envoy's upstream idle timeout (1 s, envoy/envoy.yaml), so Envoy
    # always closes an idle connection first and never sends on one gunicorn is closing.
    argv = [str(GUNICORN_BIN), "-b", f"127.0.0.1:{port}", "-w", "2", "--threads", "8",
            "--keep-alive", "10", "--access-logfile", "-", "httpbin:app"]
    p = Process("httpbin", argv, run_dir / f"httpbin-{port}.log")
    p.port = port
    wait_for("httpbin", lambda: http_ok(f"http://127.0.0.1:{port}/get"), proc=p.proc)
    return p


def start_etcd(port: int, run_dir: Path, data_dir: Path | None = None,
               peer_port: int | None = None, *, name: str = "default",
               initial_cluster: str | None = None, extra_args: list[str] | None = None,
               wait: bool = True) -> Process:
    """A one-member etcd on loopback, ready when its v3 JSON gateway answers a range. Pass the
    `data_dir` and `peer_port` of a stopped one (`p.data_dir`, `p.peer_port`) to restart it
    with its data.

    A member of a cluster (tests/cluster.py) also gets its `name`, the `initial_cluster`
    (`name=http://127.0.0.1:<peer port>,...`), further flags in `extra_args`, and `wait=False`:
    a member answers a range only once a quorum of its cluster is up."""
    peer_port = peer_port or free_port()
    data_dir = data_dir or run_dir / f"etcd-{port}.data"
    client = f"http://127.0.0.1:{port}"
    peer = f"http://127.0.0.1:{peer_port}"
    argv = [str(ETCD_BIN), "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial_cluster or f"{name}={peer}"] + (extra_args or [])
    p = Process("etcd" if name == "default" else f"etcd-{name}", argv, run_dir / f"etcd-{port}.log")
    p.port, p.data_dir, p.peer_port = port, data_dir, peer_port
    if wait:
        wait_for("etcd", lambda: etcd_call(port, "/v3/kv/range", {"key": _b64(b"ready")}) is not None,
                 proc=p.proc)
    return p


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def etcd_call(port: int, path: str, body: dict, timeout: float = 5) -> dict:
    """One POST to etcd's v3 JSON gateway (keys and values base64, int64s as strings)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def etcd_range_prefix(port: int, prefix: str) -> list[tuple[str, bytes, str]]:
    """Every key under `prefix` ("" for all), as (key, value, lease id; "0" for none), in key
    order."""
    raw = prefix.encode()
    # etcd's range is [key, range_end); "\0" to "\0" is the whole keyspace.
    key, end = (raw, raw[:-1] + bytes([raw[-1] + 1])) if raw else (b"\0", b"\0")
    reply = etcd_call(port, "/v3/kv/range", {"key": _b64(key), "range_end": _b64(end)})
    return [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")),
             kv.get("lease", "0")) for kv in reply.get("kvs", [])]


def etcd_put(port: int, key: str, value: bytes, lease: str | None = None) -> dict:
    body = {"key": _b64(key.encode()), "value": _b64(value)}
    if lease:
        body["lease"] = lease
    return etcd_call(port, "/v3/kv/put", body)


def etcd_lease_ttl(port: int, lease_id: str) -> int:
    """Seconds the lease has left (-1 once it has expired or never existed)."""
    return int(etcd_call(port, "/v3/lease/timetolive", {"ID": lease_id})["TTL"])


def etcd_cluster(port: int) -> dict:
    """The Envoy cluster `etcd` the filter's etcd tier calls (HTTP/1.1, one loopback endpoint)."""
    return static_cluster("etcd", port)


def load_demo_config() -> dict:
    return yaml.safe_load(DEMO_CONFIG.read_text())


def _hcm(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def is_split_token(http_filter: dict) -> bool:
    """Whether an HTTP filter entry is split-token, as the Wasm filter or as the dynamic module."""
    typed = http_filter.get("typed_config", {})
    if typed.get("@type") == DYNAMIC_MODULE_FILTER_TYPE:
        return typed.get("filter_name") == "split-token"
    return typed.get("@type") == WASM_FILTER_TYPE and typed["config"].get("root_id") == "split-token"


def settings_value(settings: str) -> str:
    """The filter's JSON configuration text as the current host and shape deploy it."""
    return native_settings(settings) if HOST == "native" else shaped_settings(settings)


def set_filter_settings(http_filter: dict, settings: str):
    """Replaces the JSON configuration of a split-token filter entry, Wasm or native, in place,
    as the current host and shape deploy it."""
    typed = http_filter["typed_config"]
    if typed["@type"] == DYNAMIC_MODULE_FILTER_TYPE:
        typed["filter_config"]["value"] = native_settings(settings)
    else:
        typed["config"]["configuration"]["value"] = shaped_settings(settings)


def wasm_filter(config: dict) -> dict:
    """The split-token filter's `config` block inside an Envoy config."""
    for f in _hcm(config)["http_filters"]:
        if is_split_token(f):
            return f["typed_config"]["config"]
    raise KeyError("split-token filter not found")


def shaped_settings(value: str) -> str:
    """The filter's JSON configuration as the current shape deploys it: in `envoy`, where Envoy
    allows stopping in a headers callback, the filter is told so (unless the text says
    otherwise); elsewhere it is never told so (a WasmPlugin's pluginConfig that said it would
    stall). Added as text, so that any other byte (a duplicate key, odd spacing) stays."""
    key = "allow_on_headers_stop_iteration"
    head = value.lstrip()
    if SHAPE != "envoy":
        if key not in value:
            return value
        settings = json.loads(value)
        settings.pop(key, None)
        return json.dumps(settings)
    if key in value or not head.startswith("{"):
        return value
    rest = head[1:].lstrip()
    return '{"allow_on_headers_stop_iteration": true' + ("" if rest.startswith("}") else ", ") + rest


def stat_name(name: str) -> str:
    """The Envoy stat of a split-token counter (`lookup_hit`) under the current host."""
    prefix = "dynamicmodulescustom" if HOST == "native" else "wasmcustom"
    return f"{prefix}.split_token.{name}"


def native_settings(value: str) -> str:
    """The filter's JSON as the dynamic module is given it: a dynamic module can always hold
    headers, so the JSON says so as the hand-written (`envoy`) shape does (unless the text says
    otherwise), and as envoy/gateway/native/envoyextensionpolicy.yaml does. Added as text, as in
    `shaped_settings`."""
    key = "allow_on_headers_stop_iteration"
    head = value.lstrip()
    if key not in value and head.startswith("{"):
        rest = head[1:].lstrip()
        value = '{"allow_on_headers_stop_iteration": true' + ("" if rest.startswith("}") else ", ") + rest
    return value


def native_http_filter(http_filter: dict) -> dict:
    """The same split-token filter as a dynamic module: same name, same JSON. Under
    `envoy-gateway`: exactly what Envoy Gateway builds from envoy/gateway/native's policy and its
    EnvoyProxy's dynamicModules entry (internal/xds/translator/dynamicmodule.go): its filter
    name, added disabled (apply_shape enables it per route), the module by absolute path,
    do_not_close, filter_name, and the config as the API server hands it over (compact JSON,
    keys sorted)."""
    plugin = http_filter["typed_config"]["config"]
    value = native_settings(plugin["configuration"]["value"])
    if SHAPE == "envoy-gateway":
        try:  # the API server holds only valid JSON; a test's broken text stays as it is
            value = json.dumps(json.loads(value), separators=(",", ":"), sort_keys=True)
        except json.JSONDecodeError:
            pass
        return {"name": EG_NATIVE_FILTER_NAME, "disabled": True, "typed_config": {
            "@type": DYNAMIC_MODULE_FILTER_TYPE,
            "dynamic_module_config": {"module": {"local": {"filename": str(NATIVE_MODULE)}},
                                      "do_not_close": True},
            "filter_name": "split-token",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": value},
        }}
    return {
        **{k: v for k, v in http_filter.items() if k != "typed_config"},
        "typed_config": {
            "@type": DYNAMIC_MODULE_FILTER_TYPE,
            "dynamic_module_config": {"name": "split_token_native", "do_not_close": True},
            "filter_name": "split-token",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
        },
    }


def shape_http_filter(http_filter: dict) -> dict:
    """The split-token HTTP filter entry as the current shape (and host) writes it."""
    if HOST == "native":
        return native_http_filter(http_filter)
    plugin = http_filter["typed_config"]["config"]
    configuration = dict(plugin["configuration"], value=shaped_settings(plugin["configuration"]["value"]))
    vm = plugin["vm_config"]
    if SHAPE == "envoy":
        config = {**plugin, "allow_on_headers_stop_iteration": True, "configuration": configuration}
        return {**http_filter, "typed_config": {"@type": WASM_FILTER_TYPE, "config": config}}
    if SHAPE == "istio":
        # Name `<namespace>.<name>`, root_id the pluginName, no vm_id, the agent's local copy
        # of the module, its environment variables, pluginConfig as JSON, the failure policy.
        name = "istio-system.split-token"
        config = {
            "name": name, "root_id": plugin["root_id"],
            "vm_config": {"runtime": vm["runtime"], "code": vm["code"], "environment_variables": {
                "key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"}}},
            "configuration": configuration,
            "failure_policy": plugin.get("failure_policy", "FAIL_CLOSED"),
        }
        return {"name": name, "typed_config": {"@type": WASM_FILTER_TYPE, "config": config}}
    # envoy-gateway: the policy's wasm name, rootID, a vm_id of its own, the config as JSON,
    # failOpen false; no failure policy of its own (a dead VM fails closed until Envoy restarts).
    config = {
        "name": "split-token", "root_id": plugin["root_id"],
        "vm_config": {"vm_id": "envoyextensionpolicy/default/split-token/wasm/0",
                      "runtime": vm["runtime"], "code": vm["code"]},
        "configuration": configuration, "fail_open": False,
    }
    return {"name": EG_FILTER_NAME, "disabled": True,
            "typed_config": {"@type": WASM_FILTER_TYPE, "config": config}}


def introspection_route(path: str = "/auth/introspect", cluster: str = "idp") -> dict:
    """The route of an introspection path as we recommend it in the current shape. The filter
    answers such requests itself. Where it holds their headers, a direct_response 404 stops
    whatever it might let through. Where it cannot, Envoy would answer a direct_response as
    soon as the headers go on, before the filter read the body: then the path goes to the IdP's
    own introspection endpoint, which reads the body first; the filter answers, and Envoy ends
    the request to the IdP, which sees its headers only (not its credentials, which the filter
    keeps)."""
    if SHAPE == "envoy":
        return {"match": {"path": path}, "direct_response": {"status": 404}}
    return {"match": {"path": path}, "route": {"cluster": cluster, "prefix_rewrite": "/introspect"}}


def apply_shape(config: dict) -> dict:
    """Rewrites every split-token filter of a bootstrap config's static listeners in place as
    the current shape writes it (and, for Envoy Gateway, enables it on every route)."""
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                hcm = network_filter.get("typed_config", {})
                if "http_filters" not in hcm:
                    continue
                hcm["http_filters"] = [shape_http_filter(f) if is_split_token(f) else f
                                       for f in hcm["http_filters"]]
                if SHAPE != "envoy-gateway":
                    continue
                name = EG_NATIVE_FILTER_NAME if HOST == "native" else EG_FILTER_NAME
                for vhost in hcm.get("route_config", {}).get("virtual_hosts", []):
                    for route in vhost.get("routes", []):
                        route.setdefault("typed_per_filter_config", {})[name] = {
                            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                            "config": {}}  # an empty Any: enabled, no per-route config
    return config


def filter_settings(config: dict) -> dict:
    return json.loads(wasm_filter(config)["configuration"]["value"])


def render_config(
    *,
    listen_port: int,
    admin_port: int,
    idp_port: int,
    httpbin_port: int,
    filter_config: dict | str | None = None,
    extra_routes: list[dict] | None = None,
    extra_clusters: list[dict] | None = None,
    base: dict | None = None,
) -> dict:
    """The demo config with ports, the wasm path and (optionally) the filter config replaced."""
    config = copy.deepcopy(base or load_demo_config())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    ports = {"idp": idp_port, "httpbin": httpbin_port}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in ports:
            ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
    wasm = wasm_filter(config)
    wasm["vm_config"]["code"]["local"]["filename"] = str(WASM)
    if filter_config is not None:
        value = filter_config if isinstance(filter_config, str) else json.dumps(filter_config)
        wasm["configuration"]["value"] = value
    # The demo's issuer names the demo IdP's port.
    wasm["configuration"]["value"] = wasm["configuration"]["value"].replace(
        "localhost:8180", f"localhost:{idp_port}")
    if extra_routes:
        routes = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
        routes[:0] = extra_routes
    config["static_resources"]["clusters"] += extra_clusters or []
    return config


def listener_via_lds(config: dict, lds_path: Path) -> dict:
    """Moves the listener of a rendered config into an LDS file Envoy watches, so a test can
    change the filter config by rewriting the file (see `write_lds`). Returns the listener."""
    listener = config["static_resources"].pop("listeners")[0]
    config["node"] = {"id": "split-token", "cluster": "split-token"}  # required with LDS
    config["dynamic_resources"] = {"lds_config": {
        "resource_api_version": "V3",
        "path_config_source": {"path": str(lds_path), "watched_directory": {"path": str(lds_path.parent)}},
    }}
    write_lds(lds_path, listener)
    return listener


def write_lds(lds_path: Path, listener: dict):
    """Replaces the LDS file atomically (a rename is what Envoy's directory watch reacts to)."""
    resource = {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}
    tmp = lds_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"resources": [resource]}, indent=1))
    tmp.rename(lds_path)


def static_cluster(name: str, port: int) -> dict:
    """An HTTP/1.1 cluster of one loopback endpoint. Envoy closes idle connections after 1 s,
    before any upstream here does (see envoy/envoy.yaml)."""
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "1s"},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def wasm_http_filter(settings: dict, code: Path | None = None) -> dict:
    """The split-token HTTP filter entry, as the shipped configs write it, for generated configs
    (`code`: another module than the shipped one, under the same vm_id)."""
    return {
        "name": "split-token",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "split-token", "root_id": "split-token", "failure_policy": "FAIL_RELOAD",
                "allow_on_headers_stop_iteration": True,
                "vm_config": {"vm_id": "split-token", "runtime": "envoy.wasm.runtime.v8",
                              "code": {"local": {"filename": str(code or WASM)}}},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": shaped_settings(json.dumps(settings))},
            },
        },
    }


class Envoy:
    """A running Envoy with handy accessors for its listener, admin and logs."""

    def __init__(self, config: dict, run_dir: Path, name: str = "envoy", concurrency: int = 1,
                 log_level: str = "info", extra_args: list[str] | None = None,
                 listen_port: int | None = None, native_dir: Path | None = None):
        """`native_dir`: where Envoy finds the dynamic module under the native host (the built
        one, NATIVE_DIR, by default; another build or a copy for a test that needs one)."""
        self.config = config
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = run_dir / f"{name}.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.port = listen_port or (
            config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"])
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        argv = [str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", str(concurrency),
                "-l", log_level, "--base-id", str(free_port()),
                "--disable-hot-restart"] + (extra_args or [])
        env = None
        if HOST == "native":
            env = {**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(native_dir or NATIVE_DIR)}
        self.process = Process(name, argv, run_dir / f"{name}.log", env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 30.0) -> "Envoy":
        wait_for("envoy", lambda: urllib.request.urlopen(self.admin + "/ready", timeout=1).status == 200,
                 timeout=timeout, proc=self.process.proc)
        return self

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.admin + "/stats?format=json", timeout=5) as r:
            data = json.load(r)
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s}

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def stop(self):
        self.process.stop()

    def log(self) -> str:
        return self.process.output()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def demo() -> int:
    # SIGTERM (e.g. from `timeout`) stops the children too, like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    run_dir = ROOT / ".run" / "demo"
    procs: list[Process] = []
    try:
        return _run_demo(run_dir, procs)
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in reversed(procs):
            p.stop()


def _run_demo(run_dir: Path, procs: list[Process]) -> int:
    try:
        procs.append(start_idp(8180, run_dir))
        procs.append(start_httpbin(8280, run_dir))
        config = render_config(listen_port=8080, admin_port=9901, idp_port=8180, httpbin_port=8280)
        envoy = Envoy(config, run_dir)
        procs.append(envoy.process)
        envoy.wait_ready()
    except Exception as e:
        for p in procs:
            print(f"--- {p.name} log ({p.log}) ---\n{p.output()[-4000:]}", file=sys.stderr)
        print(f"demo failed to start: {e} (is a previous demo still running on 8080/8180/8280?)",
              file=sys.stderr)
        return 1
    print(f"""
split-token demo is running (logs in {run_dir.relative_to(ROOT)}/):
  Envoy     http://127.0.0.1:8080   (admin http://127.0.0.1:9901)
  IdP       http://127.0.0.1:8180   (oauth2-mock-server)
  upstream  http://127.0.0.1:8280   (httpbin)

1. Get a token through the gateway; access_token is only the JWT's signature:

   curl -s -X POST http://127.0.0.1:8080/auth/token \\
        -d grant_type=client_credentials -d client_id=demo -d client_secret=secret

2. Call the API with it; httpbin echoes the full JWT that Envoy forwarded:

   TOKEN=$(curl -s -X POST http://127.0.0.1:8080/auth/token \\
        -d grant_type=client_credentials -d client_id=demo -d client_secret=secret \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
   curl -s http://127.0.0.1:8080/basic-protected-api/get -H "Authorization: Bearer $TOKEN"

3. Identity translation: claims become headers, client-sent identity headers never arrive,
   and Envoy's RBAC admits /basic-protected-api/admin only to the admin role:

   TOKEN=$(curl -s -X POST http://127.0.0.1:8080/auth/token -d grant_type=client_credentials \\
        -d sub=alice -d roles=user,admin -d email=alice@example.com \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
   curl -s http://127.0.0.1:8080/basic-protected-api/get -H "Authorization: Bearer $TOKEN" -H "X-User-Id: mallory"
   curl -s http://127.0.0.1:8080/basic-protected-api/admin -H "Authorization: Bearer $TOKEN"

4. Anything else is refused before it reaches httpbin:

   curl -si http://127.0.0.1:8080/basic-protected-api/get -H "Authorization: Bearer nope"

5. Revoke the token (RFC 7009): the gateway forgets it at once and tells the IdP:

   curl -si -X POST http://127.0.0.1:8080/auth/revoke -u demo:secret -d token=$TOKEN
   curl -si http://127.0.0.1:8080/basic-protected-api/get -H "Authorization: Bearer $TOKEN"

6. The filter's counters:

   curl -s http://127.0.0.1:9901/stats | grep split_token

Press Ctrl-C to stop everything.
""", flush=True)
    while all(p.alive() for p in procs):
        time.sleep(0.5)
    for p in procs:
        if not p.alive():
            print(f"{p.name} exited; last log lines:\n{p.output()[-2000:]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:] == ["demo"]:
        sys.exit(demo())
    print("usage: stack.py demo", file=sys.stderr)
    sys.exit(2)
