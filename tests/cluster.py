"""A production-shaped deployment on loopback: a 3-member etcd cluster, gateway Envoys running
split-token with its `etcd` tier, and a front Envoy spreading clients over the gateways.

Used by tests/e2e/test_cluster.py and by benchmarks; nothing here imports pytest. Every process
is started by this module (through tests/stack.py) and logs into the run directory it is given.

    deployment = Deployment(run_dir, idp_port=idp.port).start()
    try:
        outcomes = Load(deployment.front.port, "bench", clients=2000, calls=10).run()
        deployment.etcd.kill(deployment.etcd.leader())      # SIGKILL
        deployment.restart_gateway(deployment.gateways[0])  # drained, as in production
    finally:
        deployment.stop()

What the parts are:
- `EtcdCluster`: three members, static bootstrap, the flags we recommend (`etcd_flags`,
  `ETCD_TUNING`); kill a member, restart it on its data, find the leader, wait until the
  members agree.
- `Replica`: a gateway Envoy (`--concurrency 2`) with the filter, its `etcd` cluster listing
  every member (`etcd_envoy_cluster`, the settings we recommend), the IdP for token and
  revocation requests, and a `direct_response` 200 for the protected API that echoes what an
  upstream would have received: `x-echo-authorization` (the Authorization the filter forwarded)
  and `x-echo-user-id` (the `sub` claim, projected by the filter), and marks its answers
  `x-upstream: echo` (`Answer.upstream`). Each replica names itself in the `server` header of
  every answer (`gateway-a`...), its own refusals included.
- `Front`: an Envoy without the filter in front of the replicas, as a cloud load balancer would
  be: round robin, active health checks on the replicas' `/healthz`, retries only where they are
  safe (`FRONT_RETRY_IDEMPOTENT`, `FRONT_RETRY_ANY`). It passes the replica's `server` header
  through, so an answer without one was made by the front itself.
- `Deployment`: all of it, plus `restart_gateway`, the rolling-restart procedure.
- `Connection`, `fresh`, `Load`, `parallel`: clients. `Answer.server` says which replica answered.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import shutil
import signal
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import stack

PROTECTED = "/basic-protected-api/get"  # the protected API path (as in tests/e2e/helpers.py)
TOKEN_PATH = "/auth/token"
REVOKE_PATH = "/auth/revoke"
HEALTH_PATH = "/healthz"  # the replicas' health check, answered by Envoy's health_check filter
KEY_PREFIX = "split-token/"  # the filter's default key_prefix

# The filter on every replica: the etcd block at its defaults (timeout_ms 3000, per_try_timeout_ms
# 500, retries 10, poll_ms 500).
SETTINGS = {
    "token_paths": [TOKEN_PATH],
    "revocation_paths": [REVOKE_PATH],
    "full_jwt": "reject",
    "max_ttl_seconds": 86400,
    "store_slots": 65536,
    "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}],
    "etcd": {"cluster": "etcd"},
}

# --- etcd ----------------------------------------------------------------------------------------

# The flags we recommend for a production etcd cluster behind the filter (etcd 3.4), beyond each
# member's name, URLs and data dir:
# - Static bootstrap: `--initial-cluster` lists every member, `--initial-cluster-state new` and a
#   token of the deployment's own, so members of two clusters can never join each other. The
#   same command line starts a member again on its data (etcd ignores the bootstrap flags once
#   its data dir has a member), as a StatefulSet restarts a pod.
# - `--auto-compaction-mode periodic --auto-compaction-retention 5m`: the filter reads only the
#   current revision (ranges, transactions, lease grants: no watch, no read at a revision), so
#   etcd's history is dead weight to it. Every issuance and revocation adds revisions, and
#   without compaction the database grows with every token ever issued until it reaches the
#   quota, when etcd refuses every write (alarm NOSPACE) and issuance fails closed everywhere.
#   Five minutes bound the history to five minutes of churn (at 100 issuances/s about 45 MB of
#   history, against about 540 MB for a retention of 1h), and still leave an operator's
#   `etcdctl watch` a window. Compaction frees pages for reuse; the file does not shrink
#   (`etcdctl defrag`, one member at a time, returns it).
# - `--quota-backend-bytes 2 GiB`: etcd's own default, written down because it is a decision:
#   about a million live tokens (a key is some 100 bytes, its value the token's header.payload,
#   a few hundred bytes to 1 KB), far above what our store sizing assumes, and below the 8 GiB
#   etcd suggests as a maximum (start-up and snapshot time grow with it). Alert on
#   `etcd_mvcc_db_total_size_in_bytes` well before it.
# - `--pre-vote` (etcd 3.5's default, off in 3.4): a member that restarts, or was cut off,
#   asks before it campaigns, so coming back does not depose a healthy leader; every election
#   costs about a second without writes, so issuance 503s.
# - Heartbeat 100 ms and election timeout 1000 ms, the defaults: right for members within one
#   region (round trips well under 10 ms); a leader that dies is replaced in about 1 to 1.5 s.
ETCD_TUNING = [
    "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m",
    "--quota-backend-bytes", str(2 * 1024 ** 3),
    "--pre-vote=true",
    "--heartbeat-interval", "100", "--election-timeout", "1000",
]


def etcd_flags(token: str) -> list[str]:
    """Every flag of a member but its name, URLs, data dir and `--initial-cluster`: the rest of
    the static bootstrap, then ETCD_TUNING."""
    return ["--initial-cluster-state", "new", "--initial-cluster-token", token, *ETCD_TUNING]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdMember:
    """One member: its name, ports, data dir and process (None once killed or stopped)."""

    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path):
        self.name, self.port, self.peer_port, self.data_dir = name, client_port, peer_port, data_dir
        self.process: stack.Process | None = None
        self.member_id: str | None = None  # etcd's id, known once it answered a status

    def __repr__(self) -> str:
        return f"etcd-{self.name}(:{self.port}{'' if self.alive() else ', down'})"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def call(self, path: str, body: dict, timeout: float = 5) -> dict:
        """One POST to this member's v3 JSON gateway."""
        return stack.etcd_call(self.port, path, body, timeout=timeout)

    def status(self, timeout: float = 2) -> dict:
        """`/v3/maintenance/status`: `leader` and `header.member_id`, `header.revision`,
        `raftIndex`, `raftTerm`, `dbSize` (etcd's uint64s as strings). The JSON gateway leaves
        out fields whose value is 0 (proto3): they are filled in here, so `leader` is "0"
        while the member has none."""
        reply = self.call("/v3/maintenance/status", {}, timeout=timeout)
        for key in ("leader", "raftIndex", "raftTerm", "raftAppliedIndex", "dbSize"):
            reply.setdefault(key, "0")
        reply["header"].setdefault("revision", "0")
        self.member_id = reply["header"]["member_id"]
        return reply

    def health(self, timeout: float = 2) -> bool:
        """`GET /health`: true only while the member has a leader and a quorum read succeeds."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def range_prefix(self, prefix: str, serializable: bool = False) -> dict[str, bytes]:
        """key -> value under `prefix`. `serializable`: this member's own copy, read without
        the leader (what it has applied), rather than the cluster's linearizable view."""
        raw = prefix.encode()
        body = {"key": _b64(raw), "range_end": _b64(raw[:-1] + bytes([raw[-1] + 1]))}
        if serializable:
            body["serializable"] = True
        reply = self.call("/v3/kv/range", body, timeout=10)
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                for kv in reply.get("kvs", [])}


class EtcdCluster:
    """A static 3-member etcd cluster on loopback, started with `etcd_flags`."""

    def __init__(self, run_dir: Path, names: tuple[str, ...] = ("e0", "e1", "e2"),
                 token: str = "split-token-e2e"):
        self.run_dir = run_dir
        self.token = token
        self.members = [EtcdMember(name, stack.free_port(), stack.free_port(),
                                   run_dir / f"etcd-{name}.data") for name in names]
        self.initial_cluster = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}"
                                        for m in self.members)
        self.on_start = lambda process: None  # called with every process started (logs)

    def _launch(self, m: EtcdMember):
        m.process = stack.start_etcd(m.port, self.run_dir, m.data_dir, m.peer_port, name=m.name,
                                     extra_args=etcd_flags(self.token),
                                     initial_cluster=self.initial_cluster, wait=False)
        self.on_start(m.process)

    def start(self, timeout: float = 30) -> "EtcdCluster":
        """Starts every member, then waits until they agree on a leader and are healthy."""
        for m in self.members:
            self._launch(m)
        self.wait_converged(timeout)
        return self

    def stop(self):
        for m in self.members:
            if m.process:
                m.process.stop()
                m.process = None

    def kill(self, member: EtcdMember):
        """SIGKILL: no shutdown of any kind, as when a node or container dies."""
        p = member.process
        assert p is not None and p.alive(), f"{member} is not running"
        try:
            os.killpg(p.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.proc.wait()
        p.stop()  # closes its log
        member.process = None

    def restart(self, member: EtcdMember, timeout: float = 30):
        """Starts a killed or stopped member again on its data dir, with the command line it
        first had, and waits until it follows the leader the others follow (or takes part in
        electing one, when it restores a quorum) and reports itself healthy."""
        assert member.process is None, f"{member} is still running"
        self._launch(member)
        stack.wait_for(f"{member} rejoins", lambda: self._joined(member), timeout=timeout,
                       proc=member.process.proc)

    def _joined(self, member: EtcdMember) -> bool:
        leader = member.status()["leader"]
        others = [m for m in self.running() if m is not member]
        return (leader != "0" and all(m.status()["leader"] == leader for m in others)
                and member.health())

    def running(self) -> list[EtcdMember]:
        return [m for m in self.members if m.alive()]

    def any_running(self) -> EtcdMember:
        """A running member with a leader, to read the cluster through."""
        for m in self.running():
            try:
                if m.status()["leader"] != "0":
                    return m
            except (OSError, ValueError, http.client.HTTPException):
                continue
        raise RuntimeError(f"no running member has a leader: {self.members}")

    def statuses(self) -> dict[str, dict | str]:
        """Each member's status, or why it has none."""
        out: dict[str, dict | str] = {}
        for m in self.members:
            if not m.alive():
                out[m.name] = "down"
                continue
            try:
                out[m.name] = m.status()
            except (OSError, ValueError, http.client.HTTPException) as e:
                out[m.name] = f"no status: {e}"
        return out

    def leader(self) -> EtcdMember | None:
        """The member that every running member names as leader (None while they disagree,
        or none has one)."""
        leaders = set()
        for m in self.running():
            try:
                leaders.add(m.status()["leader"])
            except (OSError, ValueError, http.client.HTTPException):
                return None
        if len(leaders) != 1 or leaders == {"0"}:
            return None
        (leader_id,) = leaders
        return next((m for m in self.running() if m.member_id == leader_id), None)

    def followers(self) -> list[EtcdMember]:
        leader = self.leader()
        assert leader is not None, f"no leader: {self.statuses()}"
        return [m for m in self.running() if m is not leader]

    def health(self) -> dict[str, bool]:
        return {m.name: m.alive() and m.health() for m in self.members}

    def converged(self) -> dict | None:
        """When every member runs, names the same leader (one of them), and reports the same
        revision and raft index, and is healthy: their statuses by name; else None."""
        statuses = self.statuses()
        if not all(isinstance(s, dict) for s in statuses.values()):
            return None
        ids = {s["header"]["member_id"] for s in statuses.values()}
        same = {(s["leader"], s["header"]["revision"], s["raftIndex"]) for s in statuses.values()}
        if len(same) != 1 or next(iter(same))[0] not in ids:
            return None
        return statuses if all(self.health().values()) else None

    def wait_converged(self, timeout: float = 30) -> dict:
        """Waits until `converged()` (writes must have stopped: revisions move with them)."""
        try:
            return stack.wait_for("etcd members agree on leader, revision and raft index",
                                  self.converged, timeout=timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; statuses: {self.brief(self.statuses())}") from None

    @staticmethod
    def brief(statuses: dict) -> dict:
        """The part of `statuses()` worth printing."""
        return {name: s if isinstance(s, str) else {
            "id": s["header"]["member_id"], "leader": s["leader"],
            "revision": s["header"]["revision"], "raftIndex": s["raftIndex"],
            "raftTerm": s.get("raftTerm")} for name, s in statuses.items()}

    def wait_no_leader(self, timeout: float = 15):
        """Waits until every running member says it has no leader (quorum lost)."""
        stack.wait_for("running etcd members lose their leader",
                       lambda: all(m.status()["leader"] == "0" for m in self.running()),
                       timeout=timeout)


def etcd_envoy_cluster(ports: list[int], name: str = "etcd", host: str = "127.0.0.1") -> dict:
    """The Envoy cluster of the filter's `etcd` tier as we recommend it (STATIC on loopback
    here; STRICT_DNS on a StatefulSet's stable names, `etcd-0.etcd`..., in Kubernetes):
    - Every member, HTTP/1.1 (etcd's JSON gateway; h2c on the client port goes to its gRPC
      server), round robin: reads and writes are equal to etcd, any member forwards to the
      leader.
    - `connect_timeout` 0.25 s: a member connects in well under 10 ms; one that does not in
      0.25 s is treated as down, and the call can still be retried elsewhere within the filter's
      `timeout_ms` (3 s by default).
    - Active health checks on `/health`, which etcd answers `{"health":"true"}` only while the
      member has a leader and a quorum read succeeds: a dead member, or one cut off from the
      quorum, leaves rotation within about 2 s (2 failures at 1 s) and comes back after 2
      passes. Every 1 s, not faster: etcd 3.4 answers /health with a quorum read that goes
      through raft (a proposal and a WAL fsync on every member), so the checks are most of an
      idle cluster's load (measured: 17 proposals/s at 0.5 s with 3 gateways, against the
      filter's 6 reads/s). `no_traffic_interval` 1 s is essential: Envoy checks a cluster it considers
      idle only every 60 s by default, and the filter's callouts do not count as traffic, so
      without it the checks hardly run, every host stays unhealthy, and the cluster routes in
      panic mode (`lb_healthy_panic`) to dead members as well. Timeout 1 s: etcd itself gives
      its quorum read 1 s before answering "false".
    - Outlier detection on local-origin failures only (`split_external_local_origin_errors`):
      three refused or timed-out connections in a row eject the member
      (`consecutive_local_origin_failure` 3: a dead member refuses three at once, before the
      health checks have noticed; one slow answer under load does not take a member out, which
      would leave more load to the others); at most
      one member of three (`max_ejection_percent` 34), for 5 s doubling per ejection, and a
      passing health check brings it back. etcd's own 5xx ("no leader", "request timed out")
      say the cluster is electing, not that this member is bad, so they eject nothing
      (`enforcing_consecutive_5xx` 0, success-rate ejection off).
    - `update_merge_window` 0: Envoy otherwise holds health changes for up to 1 s before its
      workers see them (the first goes through, the next are merged), so a member that died
      keeps being picked, or the cluster routes in panic mode although every member passes its
      checks again (seen here: ~200 calls in panic mode in the second after all three members
      had turned healthy). Merging saves CPU on clusters of hundreds of hosts; with three hosts
      it only delays failover and recovery.
    - The default panic threshold (50 %): with one member of three out, the others serve;
      with two out there is no quorum and nothing works anyway, and panic routing keeps the
      calls flowing (and failing fast) rather than answering "no healthy upstream", so the
      first call after the quorum returns can already succeed.
    - Circuit breakers: Envoy's default 1024 requests (see `max_pending_lookups` in
      docs/config.md), but `max_retries` 1024 instead of its default 3. The filter retries each
      etcd call through Envoy's retry headers, and during an election every call under way
      retries at once: with only 3 retries allowed in parallel, the others fail at once
      (`upstream_rq_retry_overflow`). Measured here: a leader SIGKILLed under load failed
      about 230 calls in 2 s with the default, every one of them a retry overflow.
    """
    return {
        "name": name, "type": "STATIC", "connect_timeout": "0.25s", "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "30s"},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            for port in ports]}]},
        "health_checks": [{
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
            "interval_jitter": "0.05s",
            "unhealthy_threshold": 2, "healthy_threshold": 2,
            "always_log_health_check_failures": True,
            "http_health_check": {"path": "/health"},
        }],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_local_origin_success_rate": 0,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "interval": "1s", "base_ejection_time": "5s", "max_ejection_time": "30s",
            "max_ejection_percent": 34,
        },
        "common_lb_config": {"update_merge_window": "0s"},
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": 1024}]},
    }


# --- Envoys --------------------------------------------------------------------------------------

def _cluster_hosts(envoy: stack.Envoy, cluster: str) -> dict[int, dict]:
    """Port -> health flags of every host of `cluster`, from the admin's /clusters."""
    with urllib.request.urlopen(envoy.admin + "/clusters?format=json", timeout=5) as r:
        data = json.load(r)
    for c in data.get("cluster_statuses", []):
        if c["name"] == cluster:
            return {h["address"]["socket_address"]["port_value"]: h.get("health_status", {})
                    for h in c.get("host_statuses", [])}
    raise KeyError(f"no cluster {cluster} in {envoy.process.name}")


def hosts_health(envoy: stack.Envoy, cluster: str) -> dict[int, bool]:
    """Port -> whether Envoy would route to that host of `cluster` now: healthy and not ejected
    (no `failed_*`, `pending_*` or `excluded_*` flag)."""
    return {port: flags.get("eds_health_status", "HEALTHY") == "HEALTHY"
            and not any(v is True for k, v in flags.items() if k != "eds_health_status")
            for port, flags in _cluster_hosts(envoy, cluster).items()}


def _admin_post(envoy: stack.Envoy, path: str):
    req = urllib.request.Request(envoy.admin + path, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def _hcm(stat_prefix: str, routes: list[dict], http_filters: list[dict], **extra) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {"name": "local", "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": http_filters + [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            **extra,
        },
    }


def _bootstrap(port: int, admin_port: int, hcm: dict, clusters: list[dict]) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "ingress", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}, "filter_chains": [{"filters": [hcm]}]}],
            "clusters": clusters,
        },
    }


# What the protected API's upstream would have received, echoed back to the client; `x-upstream`
# on every answer of the upstream, whatever the request carried (Envoy adds no header whose
# value is empty).
ECHO = [{"header": {"key": "x-upstream", "value": "echo"}},
        {"header": {"key": "x-echo-authorization", "value": "%REQ(authorization)%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-echo-user-id", "value": "%REQ(x-user-id)%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]

# Envoy's health_check filter, not passed through: answers /healthz itself, 200 until the admin
# is told `POST /healthcheck/fail`, then 503 (and every answer then carries
# x-envoy-immediate-health-check-fail, which takes the replica out of the front's rotation at
# once). First in the chain: a health check never meets the filter.
HEALTH_CHECK_FILTER = {"name": "envoy.filters.http.health_check", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
    "pass_through_mode": False,
    "headers": [{"name": ":path", "string_match": {"exact": HEALTH_PATH}}]}}


def gateway_config(name: str, port: int, admin_port: int, idp_port: int, etcd_ports: list[int],
                   settings: dict, wasm: Path) -> dict:
    """A replica: health check, split-token, router; token and revocation requests to the IdP,
    the protected API answered by Envoy itself with the echo headers."""
    routes = [
        {"match": {"path": TOKEN_PATH}, "route": {"cluster": "idp", "prefix_rewrite": "/token"}},
        {"match": {"path": REVOKE_PATH}, "route": {"cluster": "idp", "prefix_rewrite": "/revoke"}},
        {"match": {"prefix": "/basic-protected-api/"},
         "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
         "response_headers_to_add": ECHO},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    hcm = _hcm("ingress", routes, [HEALTH_CHECK_FILTER, stack.wasm_http_filter(settings, code=wasm)],
               server_name=f"gateway-{name}")
    config = _bootstrap(port, admin_port, hcm,
                        [stack.static_cluster("idp", idp_port), etcd_envoy_cluster(etcd_ports)])
    return stack.apply_shape(config)


def _retry(retry_on: str) -> dict:
    return {"retry_on": retry_on, "num_retries": 3,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                      "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 3}


# The front tier's retries, as a cloud load balancer does them: a request that never reached a
# replica (refused connection, refused stream, reset before any byte of it was sent) is retried
# on another replica whatever its method; a GET or HEAD is also retried after a reset, since it
# is idempotent. A POST that reached a replica is never replayed: a token request may spend a
# single-use grant (an authorization code) at the IdP. No status code is retried, 503 included:
# a replica's 503 says it could not reach etcd, which every replica shares, and replaying it
# would triple the load on etcd just when it struggles; the product must stand on its own.
FRONT_RETRY_IDEMPOTENT = _retry("reset,connect-failure,refused-stream")
FRONT_RETRY_ANY = _retry("connect-failure,refused-stream,reset-before-request")


def front_config(port: int, admin_port: int, gateway_ports: list[int]) -> dict:
    """The front tier: round robin over the replicas, active health checks on /healthz (a
    drained replica leaves rotation within 1 s, at once when it answers anything with
    x-envoy-immediate-health-check-fail), the retries above, the replica's `server` header
    passed through."""
    routes = [
        {"match": {"prefix": "/", "headers": [
            {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}]},
         "route": {"cluster": "gateways", "retry_policy": FRONT_RETRY_IDEMPOTENT}},
        {"match": {"prefix": "/"}, "route": {"cluster": "gateways", "retry_policy": FRONT_RETRY_ANY}},
    ]
    hcm = _hcm("front", routes, [], server_header_transformation="PASS_THROUGH")
    gateways = {
        "name": "gateways", "type": "STATIC", "connect_timeout": "0.25s", "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "30s"},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "gateways", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in gateway_ports]}]},
        "health_checks": [{
            "timeout": "1s", "interval": "0.5s", "no_traffic_interval": "0.5s",
            "interval_jitter": "0.05s", "unhealthy_threshold": 2, "healthy_threshold": 2,
            "http_health_check": {"path": HEALTH_PATH},
        }],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "enforcing_local_origin_success_rate": 0,
            "enforcing_consecutive_5xx": 0, "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 34,
        },
        # Health changes reach the workers at once (see etcd_envoy_cluster).
        "common_lb_config": {"update_merge_window": "0s"},
    }
    return _bootstrap(port, admin_port, hcm, [gateways])


class Replica:
    """One gateway Envoy with the filter; restartable on the same ports."""

    def __init__(self, name: str, config: dict, run_dir: Path, concurrency: int = 2,
                 native_dir: Path | None = None):
        """`native_dir`: where Envoy finds the dynamic module under the native host."""
        self.name, self.config, self.run_dir, self.concurrency = name, config, run_dir, concurrency
        self.native_dir = native_dir
        self.port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        self.envoy: stack.Envoy | None = None
        self.on_start = lambda envoy: None

    def __repr__(self) -> str:
        return f"gateway-{self.name}(:{self.port})"

    @property
    def server(self) -> str:
        """The `server` header of its answers."""
        return f"gateway-{self.name}"

    def start(self) -> "Replica":
        self.envoy = stack.Envoy(self.config, self.run_dir, name=f"gateway-{self.name}",
                                 concurrency=self.concurrency, listen_port=self.port,
                                 native_dir=self.native_dir)
        self.on_start(self.envoy)
        return self

    def wait_ready(self, timeout: float = 60) -> "Replica":
        self.envoy.wait_ready(timeout)
        return self

    def stop(self):
        if self.envoy:
            self.envoy.stop()

    def stats(self) -> dict[str, int]:
        return self.envoy.stats()

    def counter(self, name: str) -> int:
        """A split-token counter (docs/config.md, "Stats"), summed over workers."""
        return self.envoy.stat(stack.stat_name(name))

    def etcd_hosts(self) -> dict[int, bool]:
        """Member client port -> whether this replica routes etcd calls to it now."""
        return hosts_health(self.envoy, "etcd")


class Front:
    """The front tier's Envoy."""

    def __init__(self, config: dict, run_dir: Path, concurrency: int = 2):
        self.envoy = stack.Envoy(config, run_dir, name="front", concurrency=concurrency)
        self.port = self.envoy.port

    def gateway_health(self) -> dict[int, bool]:
        """Replica port -> whether the front routes to it now."""
        return hosts_health(self.envoy, "gateways")

    def wait_gateway(self, replica: Replica, healthy: bool, timeout: float = 30):
        stack.wait_for(f"front sees {replica} {'healthy' if healthy else 'out of rotation'}",
                       lambda: self.gateway_health()[replica.port] == healthy, timeout=timeout)

    def stats(self) -> dict[str, int]:
        return self.envoy.stats()

    def stop(self):
        self.envoy.stop()


class Deployment:
    """etcd cluster, replicas, front: started in that order by `start`, stopped by `stop`.

    `settings` is the filter's configuration on every replica (`SETTINGS` by default; its
    `etcd.cluster` must stay "etcd"). The filter's build (the .wasm, stack.WASM, or under the
    native host the dynamic module, stack.NATIVE_MODULE) is copied into the run dir at start,
    so every replica, restarted ones included, runs the same module even if it is rebuilt
    meanwhile. `on_start(process)` is called with every process started (a
    `stack.Process` for etcd, a `stack.Envoy` for the others), e.g. to show their logs."""

    def __init__(self, run_dir: Path, idp_port: int, *, settings: dict | None = None,
                 names: tuple[str, ...] = ("a", "b", "c"), concurrency: int = 2,
                 front_concurrency: int = 2, on_start=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.on_start = on_start or (lambda process: None)
        self.etcd = EtcdCluster(run_dir)
        self.etcd.on_start = self.on_start
        self.wasm = run_dir / "split_token_filter.wasm"
        self.native_dir = run_dir / "native"
        settings = settings or SETTINGS
        etcd_ports = [m.port for m in self.etcd.members]
        self.gateways = []
        for name in names:
            config = gateway_config(name, stack.free_port(), stack.free_port(), idp_port,
                                    etcd_ports, settings, self.wasm)
            replica = Replica(name, config, run_dir, concurrency, native_dir=self.native_dir)
            replica.on_start = self.on_start
            self.gateways.append(replica)
        self._front_args = (front_config(stack.free_port(), stack.free_port(),
                                         [g.port for g in self.gateways]), run_dir, front_concurrency)
        self.front: Front | None = None

    def start(self) -> "Deployment":
        if stack.HOST == "native":
            self.native_dir.mkdir(exist_ok=True)
            shutil.copyfile(stack.NATIVE_MODULE, self.native_dir / stack.NATIVE_MODULE.name)
        else:
            shutil.copyfile(stack.WASM, self.wasm)
        self.etcd.start()
        for g in self.gateways:
            g.start()
        for g in self.gateways:
            g.wait_ready()
        self.front = Front(*self._front_args)
        self.on_start(self.front.envoy)
        self.front.envoy.wait_ready()
        self.wait_healthy()
        return self

    def stop(self):
        if self.front:
            self.front.stop()
        for g in self.gateways:
            g.stop()
        self.etcd.stop()

    def gateway(self, server: str) -> Replica:
        return next(g for g in self.gateways if g.server == server)

    def wait_healthy(self, timeout: float = 60):
        """Until everything is in rotation: the etcd members agree (no writes may be under way),
        every replica routes to every member, and the front to every replica."""
        self.etcd.wait_converged(timeout)
        for g in self.gateways:
            stack.wait_for(f"{g} routes to every etcd member",
                           lambda g=g: all(g.etcd_hosts().values()), timeout=timeout)
        stack.wait_for("front routes to every gateway",
                       lambda: all(self.front.gateway_health().values()), timeout=timeout)

    def restart_gateway(self, replica: Replica, timeout: float = 30) -> dict[str, float]:
        """The rolling restart of one replica, as we recommend it (returns the seconds each
        step took):

        1. `POST /healthcheck/fail` on its admin: /healthz answers 503, and every answer
           carries x-envoy-immediate-health-check-fail and closes its connection.
        2. Wait until the front tier has taken it out of rotation (here: the front's admin says
           so; in Kubernetes: longer than the readiness probe's failure time, or the load
           balancer's deregistration delay: a preStop hook that fails the check and sleeps).
        3. Wait until no request is in flight on it (`http.ingress.downstream_rq_active` is 0;
           in production: sleep longer than the longest request, or `POST
           /drain_listeners?graceful` and `--drain-time-s`).
        4. SIGTERM (Envoy exits at once: nothing is in flight, only idle connections close).
        5. Start the new process on the same ports (here the same config; in production the
           new version), wait until /ready, then until the front routes to it again.
        The new process has an empty store: it reads every live token from etcd at its first
        call, and every live revocation marker at its first sweep."""
        front = self.front
        marks = [("start", time.monotonic())]
        _admin_post(replica.envoy, "/healthcheck/fail")
        front.wait_gateway(replica, healthy=False, timeout=timeout)
        marks.append(("out of rotation", time.monotonic()))
        time.sleep(0.2)  # a worker of the front may route one more request as its view updates
        stack.wait_for(f"{replica}: no request in flight",
                       lambda: replica.envoy.stat("http.ingress.downstream_rq_active") == 0,
                       timeout=timeout)
        marks.append(("drained", time.monotonic()))
        replica.stop()
        marks.append(("stopped", time.monotonic()))
        replica.start()
        replica.wait_ready(timeout)
        marks.append(("ready", time.monotonic()))
        front.wait_gateway(replica, healthy=True, timeout=timeout)
        marks.append(("in rotation", time.monotonic()))
        return {name: round(t - prev, 3) for (_, prev), (name, t) in zip(marks, marks[1:])}


# --- clients -------------------------------------------------------------------------------------

@dataclass
class Answer:
    """One answer; status 0 when none came (the error is in `body`)."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def upstream(self) -> bool:
        """Whether the request reached the protected API's upstream."""
        return "x-upstream" in self.headers

    @property
    def server(self) -> str | None:
        """The replica that answered (`gateway-a`...); None when the front answered itself."""
        return self.headers.get("server")

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, server={self.server}, {self.body[:200]!r})"


FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
CLIENT = {"grant_type": "client_credentials", "client_id": "e2e", "client_secret": "s"}


def token_form(sub: str) -> bytes:
    """A client_credentials request for a token whose `sub` is `sub` (tests/idp/server.js):
    distinct subjects give distinct tokens (RS256 gives equal claims equal signatures)."""
    return urllib.parse.urlencode({**CLIENT, "sub": sub}).encode()


def revoke_form(token: str) -> bytes:
    return urllib.parse.urlencode({"token": token, "client_id": "e2e", "client_secret": "s"}).encode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Connection:
    """One keep-alive HTTP/1.1 connection to a port, reopened after the server closed it."""

    def __init__(self, port: int, timeout: float = 15):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, headers: dict | None = None,
                body: bytes | None = None) -> Answer:
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            r = self.conn.getresponse()
            data = r.read()
            answer = Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
            if r.will_close:
                self.conn.close()
            return answer
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            return Answer(0, {}, repr(e).encode())

    def issue(self, sub: str) -> Answer:
        return self.request("POST", TOKEN_PATH, FORM_HEADERS, token_form(sub))

    def call(self, token: str, path: str = PROTECTED) -> Answer:
        return self.request("GET", path, bearer(token))

    def revoke(self, token: str) -> Answer:
        return self.request("POST", REVOKE_PATH, FORM_HEADERS, revoke_form(token))

    def close(self):
        self.conn.close()


def fresh(port: int, method: str, path: str, headers: dict | None = None,
          body: bytes | None = None) -> Answer:
    """One request on a connection of its own. Envoy gives each connection to one worker, so
    fresh connections are how a client reaches every worker of a replica."""
    c = Connection(port)
    try:
        return c.request(method, path, {**(headers or {}), "Connection": "close"}, body)
    finally:
        c.close()


def parallel(fn, items, concurrency: int = 64) -> list:
    """`fn(item)` for every item on `concurrency` threads; results in the items' order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(fn, items))


@dataclass
class Outcome:
    """One request of a virtual client: `kind` "issue" or "call", the client's `sub`, the token
    it held (None for a failed issuance), the answer, and when (time.monotonic())."""

    kind: str
    sub: str
    token: str | None
    answer: Answer
    at: float


@dataclass
class Load:
    """Virtual clients on `concurrency` threads, each thread with one keep-alive connection to
    `port`. Client n is `<prefix>-<n>`: it asks for a token of its own (its `sub`), then makes
    `calls` GETs of `path` with it; a failed issuance is recorded and the next client starts.
    `run()` runs `clients` of them and returns every outcome; `start()`/`stop()` run clients
    until stopped (the clients under way stop after their current request)."""

    port: int
    prefix: str
    clients: int | None = None
    calls: int = 10
    concurrency: int = 64
    path: str = PROTECTED
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _next(self) -> int | None:
        with self._lock:
            n = next(self._ids)
        return None if self.clients is not None and n >= self.clients else n

    def _work(self):
        conn = Connection(self.port)
        try:
            while not self._stop.is_set() and (n := self._next()) is not None:
                sub = f"{self.prefix}-{n}"
                answer = conn.issue(sub)
                token = answer.json().get("access_token") if answer.status == 200 else None
                self.outcomes.append(Outcome("issue", sub, token, answer, time.monotonic()))
                for _ in range(self.calls if token else 0):
                    if self._stop.is_set():
                        break
                    self.outcomes.append(Outcome("call", sub, token, conn.call(token, self.path),
                                                 time.monotonic()))
        finally:
            conn.close()

    def start(self) -> "Load":
        self._threads = [threading.Thread(target=self._work, daemon=True)
                         for _ in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self.outcomes

    def run(self) -> list[Outcome]:
        assert self.clients is not None, "run() needs a number of clients"
        self.start()
        for t in self._threads:
            t.join()
        return self.outcomes
