"""What the etcd tier costs etcd, against a real 3-member cluster (issue 13, "Cost and scale").

usage: python tests/bench/cluster_cost.py [--quick] [--tokens N] [--idle-seconds S] [--json OUT]

The cluster and the gateways are tests/cluster.py's: `EtcdCluster` (three etcd 3.4.23 members
with the flags we recommend, `ETCD_TUNING`), gateway Envoys built by `gateway_config` (the
filter with its `etcd` block, the `etcd` Envoy cluster listing every member with its health
checks). Tokens come from the fast local token endpoint (tests/bench/token_server.js, real
HS256 JWTs with a 360-byte `header.payload`) behind the gateways' token route, not from the
IdP, which is far slower than the gateways.

1. Idle load: three gateways with W workers each and no traffic; requests into etcd over a
   window, counted by each gateway (`cluster.etcd.upstream_rq_total`: the filter's calls;
   `cluster.etcd.health_check.attempt`: Envoy's active health checks) and by etcd itself
   (`grpc_server_handled_total`, `etcd_server_health_success`, raft proposals), for two worker
   counts.
2. Cost per token: N tokens issued through one gateway (`--concurrency 1`, CPU 0; h2load and
   the token server on CPU 1; etcd unpinned) with the write-through; etcd's `dbSize` and
   `dbSizeInUse` (`/v3/maintenance/status`), its keys (a paged range), its leases, WAL bytes
   and raft proposals, before and after. Then the tokens' end of life, as their lease expiry
   does it (the leases revoked), a compaction and a defragmentation, measured at each step;
   what revoked tokens leave; and the issuance rate against the requests in flight.
3. Latency and throughput: the first call of a token on another gateway (read from the
   cluster) against its second call, and h2load hits on one gateway's listener with the `etcd`
   block against a listener of the same Envoy with the same settings but no `etcd`.

Benchmarks report figures; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cluster  # noqa: E402
import stack  # noqa: E402
from bench import h2load  # noqa: E402
from scale import signature  # noqa: E402

HERE = Path(__file__).resolve().parent
SECRET = "cluster-bench-secret"
PAD = 200  # filler claim: a 360-byte header.payload, as in scale.py
LIFETIME = 3600  # each token expires an hour after it is issued (token_server.js, EXP < 0)
POLL_MS = 500
PER_TRY_TIMEOUT_MS = 500  # the filter's default (docs/config.md, "etcd")
TOKEN_KEYS = cluster.KEY_PREFIX + "t/"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


# --- etcd side ------------------------------------------------------------------------------------

METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|\+Inf)$')


def etcd_metrics(member: cluster.EtcdMember) -> dict[str, float]:
    """The counters we read from a member's `/metrics`, summed over their labels (and the
    `grpc_server_handled_total` per method as `grpc:<Method>`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{member.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ("grpc_server_handled_total", "etcd_server_health_success", "etcd_server_health_failures",
              "etcd_server_proposals_committed_total", "etcd_disk_wal_write_bytes_total",
              "etcd_disk_wal_fsync_duration_seconds_count", "etcd_disk_wal_fsync_duration_seconds_sum",
              "etcd_mvcc_range_total", "etcd_mvcc_put_total", "etcd_debugging_lease_granted_total",
              "etcd_debugging_lease_revoked_total")
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m or m.group(1) not in wanted:
            continue
        value = float(m.group(3))
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
        if m.group(1) == "grpc_server_handled_total":
            method = re.search(r'grpc_method="([^"]+)"', m.group(2) or "")
            if method:
                key = f"grpc:{method.group(1)}"
                out[key] = out.get(key, 0.0) + value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}


def cpu_seconds(member: cluster.EtcdMember) -> float:
    """User + system CPU time the member's process has used."""
    fields = Path(f"/proc/{member.process.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(member: cluster.EtcdMember) -> int:
    for line in Path(f"/proc/{member.process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def sizes(etcd: cluster.EtcdCluster) -> dict:
    """Per member: dbSize (allocated pages, free ones included: what the quota counts),
    dbSizeInUse and the process's RSS; the largest of each; and the cluster's revision."""
    members = {}
    revision = 0
    for m in etcd.members:
        s = m.status()
        members[m.name] = {"db": int(s["dbSize"]), "in_use": int(s["dbSizeInUse"]), "rss": rss_bytes(m)}
        revision = max(revision, int(s["header"]["revision"]))
    return {"members": members, "revision": revision,
            "db": max(v["db"] for v in members.values()),
            "in_use": max(v["in_use"] for v in members.values()),
            "rss": max(v["rss"] for v in members.values())}


def token_keys(member: cluster.EtcdMember) -> dict:
    """Count of the token keys and their key + value bytes, read in pages."""
    start, end = TOKEN_KEYS.encode(), prefix_end(TOKEN_KEYS.encode())
    count = kv_bytes = 0
    while True:
        reply = member.call("/v3/kv/range", {"key": _b64(start), "range_end": _b64(end), "limit": "2000"},
                            timeout=30)
        kvs = reply.get("kvs", [])
        for kv in kvs:
            kv_bytes += len(base64.b64decode(kv["key"])) + len(base64.b64decode(kv.get("value", "")))
        count += len(kvs)
        if not reply.get("more") or not kvs:
            break
        start = base64.b64decode(kvs[-1]["key"]) + b"\0"
    listed = member.call("/v3/kv/range", {"key": _b64(TOKEN_KEYS.encode()), "range_end": _b64(end),
                                          "count_only": True})
    return {"count": count, "count_only": int(listed.get("count", 0)), "kv_bytes": kv_bytes}


def leases(member: cluster.EtcdMember) -> list[str]:
    return [lease["ID"] for lease in member.call("/v3/lease/leases", {}).get("leases", [])]


def settle(etcd: cluster.EtcdCluster, timeout: float = 60):
    """Until every member has applied the same revision and its database stopped shrinking
    (a member compacts its own copy, in batches, after it applied the compaction)."""
    stack.wait_for("etcd members at the same revision",
                   lambda: len({m.status()["header"]["revision"] for m in etcd.members}) == 1, timeout=timeout)
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = [int(m.status()["dbSizeInUse"]) for m in etcd.members]
        if now == last:
            return
        last = now
        time.sleep(1)


def compact_and_defrag(etcd: cluster.EtcdCluster):
    """Compaction to the current revision (physical: done when etcd answers), then a
    defragmentation of every member, one at a time."""
    member = etcd.any_running()  # any member with a leader
    revision = int(member.status()["header"]["revision"])
    member.call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout=60)
    settle(etcd)
    for m in etcd.members:
        m.call("/v3/maintenance/defragment", {}, timeout=120)


# --- gateways ------------------------------------------------------------------------------------

def settings(etcd: bool) -> dict:
    s = copy.deepcopy(cluster.SETTINGS)
    if etcd:
        s["etcd"] = {"cluster": "etcd", "poll_ms": POLL_MS}
    else:
        s.pop("etcd")
    return s


def gateway(name: str, run_dir: Path, token_port: int, etcd: cluster.EtcdCluster, wasm: Path,
            workers: int, local_listener: bool = False) -> cluster.Replica:
    """A gateway as tests/cluster.py builds it, its token route to the fast token server. With
    `local_listener`, a second listener of the same Envoy (same vm_id, so the same store) has
    the same settings without `etcd` (its port: `replica.local_port`)."""
    ports = [m.port for m in etcd.members]
    config = cluster.gateway_config(name, stack.free_port(), stack.free_port(), token_port, ports,
                                    settings(True), wasm)
    local_port = None
    if local_listener:
        local_port = stack.free_port()
        other = cluster.gateway_config(name, local_port, stack.free_port(), token_port, ports,
                                       settings(False), wasm)
        listener = other["static_resources"]["listeners"][0]
        listener["name"] = "ingress-no-etcd"
        config["static_resources"]["listeners"].append(listener)
    replica = cluster.Replica(name, config, run_dir, concurrency=workers)
    replica.local_port = local_port
    return replica


def wait_routes_to_every_member(replicas: list[cluster.Replica], timeout: float = 30):
    for g in replicas:
        stack.wait_for(f"{g} routes to every etcd member", lambda g=g: all(g.etcd_hosts().values()),
                       timeout=timeout)


def pin(replica: cluster.Replica, cpu: str):
    subprocess.run(["taskset", "-apc", cpu, str(replica.envoy.process.proc.pid)], check=True,
                   capture_output=True)


def envoy_etcd_counters(replica: cluster.Replica) -> dict[str, int]:
    s = replica.stats()
    return {"rq": s.get("cluster.etcd.upstream_rq_total", 0),
            "hc": s.get("cluster.etcd.health_check.attempt", 0)}


# --- 1. idle load --------------------------------------------------------------------------------

def idle_load(run_dir: Path, token_port: int, etcd: cluster.EtcdCluster, wasm: Path, workers: int,
              seconds: float) -> dict:
    replicas = [gateway(f"idle{workers}{n}", run_dir, token_port, etcd, wasm, workers) for n in "abc"]
    try:
        for g in replicas:
            g.start()
        for g in replicas:
            g.wait_ready()
        wait_routes_to_every_member(replicas)
        time.sleep(2 * POLL_MS / 1000 + 1)  # past the first sweeps and the poller's election
        before_envoy = [envoy_etcd_counters(g) for g in replicas]
        before_etcd = {m.name: etcd_metrics(m) for m in etcd.members}
        t0 = time.monotonic()
        time.sleep(seconds)
        after_envoy = [envoy_etcd_counters(g) for g in replicas]
        after_etcd = {m.name: etcd_metrics(m) for m in etcd.members}
        elapsed = time.monotonic() - t0
    finally:
        for g in replicas:
            g.stop()
    per_gateway = [round((a["rq"] - b["rq"]) / elapsed, 2) for a, b in zip(after_envoy, before_envoy)]
    hc = [round((a["hc"] - b["hc"]) / elapsed, 2) for a, b in zip(after_envoy, before_envoy)]
    d = {name: delta(after_etcd[name], before_etcd[name]) for name in after_etcd}
    return {
        "replicas": len(replicas), "workers": workers, "seconds": round(elapsed, 1),
        "filter_rps_per_gateway": per_gateway, "filter_rps": round(sum(per_gateway), 2),
        "health_check_rps_per_gateway": hc, "health_check_rps": round(sum(hc), 2),
        "etcd_grpc_rps": round(sum(v["grpc_server_handled_total"] for v in d.values()) / elapsed, 2),
        "etcd_health_rps": round(sum(v["etcd_server_health_success"] + v["etcd_server_health_failures"]
                                     for v in d.values()) / elapsed, 2),
        "etcd_proposals_per_s": round(max(v["etcd_server_proposals_committed_total"] for v in d.values())
                                      / elapsed, 2),
        "etcd_fsyncs_per_s_per_member": round(statistics.median(
            v["etcd_disk_wal_fsync_duration_seconds_count"] for v in d.values()) / elapsed, 2),
        "expected_filter_rps": round(len(replicas) * 1000 / POLL_MS, 2),
        "previous_design_rps": round(len(replicas) * workers * 1000 / POLL_MS, 2),
    }


# --- 2. cost per token ---------------------------------------------------------------------------

def issue(url: str, n: int, connections: int, streams: int) -> dict:
    """n token requests through the gateway, h2load on CPU 1, connections x streams in flight."""
    with tempfile.NamedTemporaryFile() as form:
        form.write(b"grant_type=client_credentials")
        form.flush()
        out = subprocess.run(["taskset", "-c", "1", "h2load", "-n", str(n), "-c", str(connections),
                              "-m", str(streams), "-t", "1", "-d", form.name, url + cluster.TOKEN_PATH],
                             capture_output=True, text=True, check=True).stdout
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    latency = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)  # min, max, mean
    return {"n": n, "in_flight": connections * streams, "connections": connections, "streams": streams,
            "ok": int(codes.group(1)) if codes else 0, "5xx": int(codes.group(4)) if codes else 0,
            "rate": round(float(rate.group(1))) if rate else 0,
            "max": latency.group(2) if latency else "?", "mean": latency.group(3) if latency else "?"}


def revocations(etcd: cluster.EtcdCluster, issuer: cluster.Replica, n: int) -> dict:
    """What n revoked (unexpired) tokens leave in etcd: n tokens issued and revoked through the
    gateway, 16 at a time; database in use before and after the revocations."""
    member = etcd.any_running()  # any member with a leader

    def issued(i: int) -> str | None:
        answer = cluster.fresh(issuer.port, "POST", cluster.TOKEN_PATH, cluster.FORM_HEADERS,
                               cluster.token_form(f"revoke-{i}"))
        return answer.json()["access_token"] if answer.status == 200 else None

    def revoke(token: str) -> int:
        return cluster.fresh(issuer.port, "POST", cluster.REVOKE_PATH, cluster.FORM_HEADERS,
                             cluster.revoke_form(token)).status

    # A 503 (etcd too slow on a loaded machine) is counted, not fatal: this is a benchmark.
    tokens = [t for t in cluster.parallel(issued, range(n), concurrency=16) if t]
    settle(etcd)
    before = sizes(etcd)
    statuses = cluster.parallel(revoke, tokens, concurrency=16)
    settle(etcd)
    after = sizes(etcd)
    done = statuses.count(200)
    kinds = {}
    for kind in ("t/", "r/", "x/"):
        prefix = (cluster.KEY_PREFIX + kind).encode()
        kinds[kind] = int(member.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                                       "count_only": True}).get("count", "0"))
    return {"n": done, "failed": n - done, "keys": kinds,
            "in_use_per_revocation": round((after["in_use"] - before["in_use"]) / done, 1) if done else 0,
            "revisions_per_revocation": round((after["revision"] - before["revision"]) / done, 3) if done else 0}


def cost_per_token(etcd: cluster.EtcdCluster, issuer: cluster.Replica, n: int, n_local: int,
                   n_sweep: int, n_revoke: int) -> dict:
    member = etcd.any_running()  # any member with a leader
    compact_and_defrag(etcd)
    base = sizes(etcd)
    base_count = token_keys(member)["count"]  # the tokens of the latency runs
    before = {m.name: etcd_metrics(m) for m in etcd.members}
    cpu_before = sum(cpu_seconds(m) for m in etcd.members)
    # 64 in flight: near etcd's commit rate on this machine (the sweep below), with latencies
    # well below per_try_timeout_ms.
    result = issue(issuer.envoy.url, n, 64, 1)
    cpu = sum(cpu_seconds(m) for m in etcd.members) - cpu_before
    after = {m.name: etcd_metrics(m) for m in etcd.members}
    settle(etcd)
    live = sizes(etcd)
    keys = token_keys(member)
    lease_ids = leases(member)
    d = {name: delta(after[name], before[name]) for name in after}
    count = keys["count"] - base_count  # the tokens this run added
    # Issuance without etcd on the same Envoy (the listener without the etcd block).
    local = issue(f"http://127.0.0.1:{issuer.local_port}", n_local, 64, 1)

    for m in etcd.members:
        m.call("/v3/maintenance/defragment", {}, timeout=120)
    defragged = sizes(etcd)
    # The tokens' end of life as etcd runs it: an expired lease is revoked, deleting its keys.
    t0 = time.monotonic()
    for lease_id in lease_ids:
        member.call("/v3/lease/revoke", {"ID": lease_id}, timeout=60)
    revoke_s = time.monotonic() - t0
    settle(etcd)
    expired = sizes(etcd)
    left = member.call("/v3/kv/range", {"key": _b64(TOKEN_KEYS.encode()),
                                        "range_end": _b64(prefix_end(TOKEN_KEYS.encode())),
                                        "count_only": True}).get("count", "0")
    revision = int(member.status()["header"]["revision"])
    member.call("/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout=60)
    settle(etcd)
    compacted = sizes(etcd)
    for m in etcd.members:
        m.call("/v3/maintenance/defragment", {}, timeout=120)
    final = sizes(etcd)
    revoked = revocations(etcd, issuer, n_revoke)
    # The issuance rate against the requests in flight, on the emptied cluster: past etcd's
    # saturation only the latency grows (in queue at etcd), until it passes per_try_timeout_ms
    # and writes are given up while etcd may still apply them.
    grants0 = sum(etcd_metrics(m).get("grpc:LeaseGrant", 0.0) for m in etcd.members)
    sweep = [issue(issuer.envoy.url, n_sweep, c, m) for c, m in ((1, 1), (4, 1), (16, 1), (64, 1), (32, 4))]
    settle(etcd)
    in_etcd = token_keys(member)["count"]
    sweep_grants = round(sum(etcd_metrics(m).get("grpc:LeaseGrant", 0.0) for m in etcd.members) - grants0)

    def per_token(after_: dict, before_: dict, field: str) -> float:
        # A state smaller than the empty cluster (a compacted database) counts as 0.
        return round(max(0, after_[field] - before_[field]) / count, 1) if count else 0.0

    wal = [v["etcd_disk_wal_write_bytes_total"] for v in d.values()]
    fsync_n = sum(v["etcd_disk_wal_fsync_duration_seconds_count"] for v in d.values())
    fsync_s = sum(v["etcd_disk_wal_fsync_duration_seconds_sum"] for v in d.values())
    return {
        "issue": result, "issue_no_etcd": local, "revoked": revoked,
        "sweep": sweep, "sweep_lease_grants": sweep_grants,
        "written_not_issued": count - result["ok"] + in_etcd - sum(r["ok"] for r in sweep), "tokens_in_etcd": count, "tokens_before": base_count,
        "count_only": keys["count_only"], "kv_bytes_per_token": round(keys["kv_bytes"] / keys["count"], 1),
        "etcd_cpu_us_per_token": round(1e6 * cpu / count) if count else 0,
        "leases": len(lease_ids),
        "revisions": live["revision"] - base["revision"],
        "proposals_per_token": round(max(v["etcd_server_proposals_committed_total"] for v in d.values())
                                     / count, 3) if count else 0,
        "writes": round(sum(v.get("grpc:Put", 0.0) + v.get("grpc:Txn", 0.0) for v in d.values())),
        "lease_grants": round(sum(v.get("grpc:LeaseGrant", 0.0) for v in d.values())),
        "wal_bytes_per_token_per_member": round(statistics.median(wal) / count, 1) if count else 0,
        "fsyncs_per_token_per_member": round(fsync_n / len(d) / count, 3) if count else 0,
        "wal_fsync_mean_ms": round(1000 * fsync_s / fsync_n, 2) if fsync_n else 0,
        "sizes": {"base": base, "live": live, "defragmented": defragged, "expired": expired,
                  "compacted": compacted, "final": final},
        "in_use_per_token": per_token(live, base, "in_use"),
        "db_per_token": per_token(live, base, "db"),
        "defragmented_per_token": per_token(defragged, base, "db"),
        "history_per_token": per_token(expired, base, "in_use"),
        "compacted_in_use_per_token": per_token(compacted, base, "in_use"),
        "rss_per_token": per_token(live, base, "rss"),
        "lease_revoke_seconds": round(revoke_s, 2), "keys_left_after_expiry": int(left),
    }


# --- 3. latency and throughput -------------------------------------------------------------------

def first_calls(issuer: cluster.Replica, other: cluster.Replica, n: int) -> dict:
    """Sequential: a token issued on `issuer`, then its first call on `other` (read from etcd),
    then its second (local)."""
    a, b = cluster.Connection(issuer.port), cluster.Connection(other.port)
    first, second = [], []
    try:
        for i in range(n):
            issued = a.issue(f"first-{i}")
            assert issued.status == 200, issued
            token = issued.json()["access_token"]
            for out in (first, second):
                t0 = time.perf_counter()
                answer = b.call(token)
                out.append((time.perf_counter() - t0) * 1000)
                assert answer.status == 200, answer
    finally:
        a.close()
        b.close()
    first.sort()
    return {"n": n, "first_ms": statistics.median(first), "first_p90_ms": first[int(0.9 * (n - 1))],
            "second_ms": statistics.median(second)}


def hits(gw: cluster.Replica, rounds: int, requests: int) -> dict:
    """h2load hits on the etcd listener and on the listener without etcd, alternating."""
    conn = cluster.Connection(gw.port)
    try:
        token = conn.issue("hits").json()["access_token"]
    finally:
        conn.close()
    urls = {"etcd": f"{gw.envoy.url}{cluster.PROTECTED}",
            "no_etcd": f"http://127.0.0.1:{gw.local_port}{cluster.PROTECTED}"}
    runs: dict[str, list[dict]] = {k: [] for k in urls}
    for _ in range(rounds):
        for kind, url in urls.items():
            r = h2load(url, f"Bearer {token}", requests, 16)
            if r["statuses"] != {"200"}:
                raise RuntimeError(f"hits on {kind}: statuses {r['statuses']}")
            runs[kind].append(r)
    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("rps", "p50", "p99")} for k, rs in runs.items()}
    med["rounds"] = {k: [round(r["rps"]) for r in rs] for k, rs in runs.items()}
    med["command"] = runs["etcd"][0]["cmd"]
    return med


# --- report --------------------------------------------------------------------------------------

def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def tables(idle: list[dict], cost: dict, first: dict, hit: dict) -> dict:
    rows = ["| gateways x workers | filter's calls/s (all gateways) | per gateway | expected: gateways x 1000 / poll_ms | "
            "previous design (every worker polled) | Envoy health checks/s | etcd: gRPC calls/s | etcd: `/health`/s | raft proposals/s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in idle:
        rows.append(f"| {r['replicas']} x {r['workers']} | {r['filter_rps']:.1f} | "
                    f"{', '.join(f'{x:.1f}' for x in r['filter_rps_per_gateway'])} | {r['expected_filter_rps']:.0f} | "
                    f"{r['previous_design_rps']:.0f} (arithmetic) | {r['health_check_rps']:.1f} | "
                    f"{r['etcd_grpc_rps']:.1f} | {r['etcd_health_rps']:.1f} | {r['etcd_proposals_per_s']:.1f} |")
    s, n = cost["sizes"], cost["tokens_in_etcd"]
    size_rows = [
        "| state | dbSize (allocated; the quota counts it) | dbSizeInUse | per token (over the empty cluster) | etcd RSS |",
        "|---|---:|---:|---|---:|",
        f"| empty (compacted, defragmented) | {mib(s['base']['db'])} | {mib(s['base']['in_use'])} | | {mib(s['base']['rss'])} |",
        f"| {n:,} live tokens, as written | {mib(s['live']['db'])} | {mib(s['live']['in_use'])} | "
        f"{cost['db_per_token']:,.0f} B allocated, {cost['in_use_per_token']:,.0f} B in use, {cost['rss_per_token']:,.0f} B RSS | "
        f"{mib(s['live']['rss'])} |",
        f"| the same, defragmented | {mib(s['defragmented']['db'])} | {mib(s['defragmented']['in_use'])} | "
        f"{cost['defragmented_per_token']:,.0f} B allocated | {mib(s['defragmented']['rss'])} |",
        f"| all expired (leases revoked), not compacted | {mib(s['expired']['db'])} | {mib(s['expired']['in_use'])} | "
        f"{cost['history_per_token']:,.0f} B in use (history: each token's put and its deletion) | {mib(s['expired']['rss'])} |",
        f"| compacted | {mib(s['compacted']['db'])} | {mib(s['compacted']['in_use'])} | "
        f"{cost['compacted_in_use_per_token']:,.0f} B in use | {mib(s['compacted']['rss'])} |",
        f"| defragmented | {mib(s['final']['db'])} | {mib(s['final']['in_use'])} | | {mib(s['final']['rss'])} |",
    ]
    i, loc = cost["issue"], cost["issue_no_etcd"]
    write_rows = [
        "| measure | value |",
        "|---|---:|",
        f"| issuance with the write-through, {i['in_flight']} in flight | {i['rate']:,}/s; "
        f"mean {i['mean']}, max {i['max']}; {i['ok']:,} of {i['n']:,} answered 200, {i['5xx']:,} 5xx |",
        f"| the same gateway without `etcd`, {loc['in_flight']} in flight | {loc['rate']:,}/s; mean {loc['mean']}, "
        f"max {loc['max']} ({loc['n']:,} tokens) |",
    ]
    for r in cost["sweep"]:
        write_rows.append(f"| with the write-through, {r['in_flight']} in flight ({r['connections']} x {r['streams']}; "
                          f"{r['n']:,} tokens, emptied cluster) | {r['rate']:,}/s; mean {r['mean']}, max {r['max']}; "
                          f"{r['5xx']:,} 5xx |")
    write_rows += [
        f"| a revoked, unexpired token ({cost['revoked']['n']:,} revoked) | "
        f"{cost['revoked']['in_use_per_revocation']:,.0f} B more in use, "
        f"{cost['revoked']['revisions_per_revocation']:.2f} revisions each; keys left: "
        f"{', '.join(f'{v:,} `{k}`' for k, v in cost['revoked']['keys'].items())} |",
        f"| tokens written to etcd whose client got no token (write answered too late) | "
        f"{cost['written_not_issued']:,} |",
        f"| key + value bytes per token (range of all {n + cost['tokens_before']:,} token keys) | {cost['kv_bytes_per_token']:,.0f} B |",
        f"| revisions per token | {cost['revisions'] / n:.3f} |" if n else "| revisions per token | - |",
        f"| raft proposals per token | {cost['proposals_per_token']:.3f} |",
        f"| etcd calls: token writes, lease grants | {cost['writes']:,}, {cost['lease_grants']:,} |",
        f"| leases holding the {n:,} tokens | {cost['leases']} |",
        f"| WAL bytes written per token, per member | {cost['wal_bytes_per_token_per_member']:,.0f} B |",
        f"| WAL fsyncs per token, per member (mean fsync) | {cost['fsyncs_per_token_per_member']:.3f} "
        f"({cost['wal_fsync_mean_ms']:.2f} ms) |",
        f"| etcd CPU per token, three members together | {cost['etcd_cpu_us_per_token']:,} us |",
    ]
    lat_rows = [
        "| measure | etcd configured (3-member cluster) | without etcd | |",
        "|---|---:|---:|---|",
        f"| token hit, req/s (median) | {hit['etcd']['rps']:,.0f} | {hit['no_etcd']['rps']:,.0f} | "
        f"{hit['etcd']['rps'] / hit['no_etcd']['rps']:.2f}x; rounds {', '.join(f'{x:,}' for x in hit['rounds']['etcd'])} vs "
        f"{', '.join(f'{x:,}' for x in hit['rounds']['no_etcd'])} |",
        f"| token hit, p50 / p99 ms | {hit['etcd']['p50']:.2f} / {hit['etcd']['p99']:.2f} | "
        f"{hit['no_etcd']['p50']:.2f} / {hit['no_etcd']['p99']:.2f} | |",
        f"| first call on another gateway (read from etcd), median | {first['first_ms']:.2f} ms | | "
        f"p90 {first['first_p90_ms']:.2f} ms; its second call (local) {first['second_ms']:.2f} ms; {first['n']} tokens |",
    ]
    return {"idle": "\n".join(rows), "size": "\n".join(size_rows), "write": "\n".join(write_rows),
            "latency": "\n".join(lat_rows)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--idle-seconds", type=float, default=15)
    ap.add_argument("--workers", default="2,4", help="worker counts of the idle runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.idle_seconds = 2000, 3
    n_local = min(args.tokens, 20_000)
    n_sweep = 300 if args.quick else 2000
    n_revoke = 50 if args.quick else 1000
    rounds, requests = (1, 5000) if args.quick else (3, 50_000)
    n_first = 10 if args.quick else 200
    workers = [int(w) for w in args.workers.split(",")]

    run_dir = stack.ROOT / ".run" / "cluster-cost"
    shutil.rmtree(run_dir, ignore_errors=True)  # etcd data dirs of an earlier run
    run_dir.mkdir(parents=True)
    wasm = run_dir / "split_token_filter.wasm"
    shutil.copyfile(stack.WASM, wasm)  # the same module throughout, even if rebuilt meanwhile
    started = time.monotonic()
    token_port = stack.free_port()
    tokens = stack.Process("token-server", ["taskset", "-c", "1", "node", str(HERE / "token_server.js"),
                                            str(token_port), SECRET, str(-LIFETIME), str(PAD)],
                           run_dir / "token-server.log")
    etcd = cluster.EtcdCluster(run_dir, token="split-token-bench")
    gateways: list[cluster.Replica] = []
    try:
        stack.wait_for("token server", lambda: "token server" in tokens.output(), proc=tokens.proc)
        etcd.start()
        idle = [idle_load(run_dir, token_port, etcd, wasm, w, args.idle_seconds) for w in workers]
        for r in idle:
            print(json.dumps(r), flush=True)

        issuer = gateway("a", run_dir, token_port, etcd, wasm, 1, local_listener=True)
        other = gateway("b", run_dir, token_port, etcd, wasm, 1)
        gateways += [issuer, other]
        for g in gateways:
            g.start()
        for g in gateways:
            g.wait_ready()
        wait_routes_to_every_member(gateways)
        pin(issuer, "0")
        pin(other, "0")
        first = first_calls(issuer, other, n_first)
        print(json.dumps(first), flush=True)
        hit = hits(issuer, rounds, requests)
        print(json.dumps(hit), flush=True)
        cost = cost_per_token(etcd, issuer, args.tokens, n_local, n_sweep, n_revoke)
        print(json.dumps({k: v for k, v in cost.items() if k != "sizes"}), flush=True)
    finally:
        for g in gateways:
            g.stop()
        etcd.stop()
        tokens.stop()
    result = {"poll_ms": POLL_MS, "per_try_timeout_ms": PER_TRY_TIMEOUT_MS, "tokens": args.tokens, "lifetime": LIFETIME, "quick": args.quick,
              "header_payload_bytes": signature(0, int(time.time()) + LIFETIME)[1],
              "etcd_flags": cluster.ETCD_TUNING, "idle": idle, "cost": cost, "first": first, "hits": hit,
              "hit_requests": requests, "hit_rounds": rounds, "seconds": round(time.monotonic() - started)}
    result["tables"] = tables(idle, cost, first, hit)
    for t in result["tables"].values():
        print(t + "\n")
    print(f"cluster_cost: {result['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
