"""`just bench`: the filter against bare Envoy and Envoy's own jwt_authn, in one run.

One Envoy (--concurrency 1, pinned to CPU 0) serves every variant on its own listener with a
direct_response route, so no upstream adds noise; h2load runs on CPU 1. Variants alternate
within each round; medians over rounds are reported. Latency percentiles come from h2load's
per-request log. tests/bench/report.py turns its --json output into docs/benchmarks.md.

usage: python tests/bench/bench.py [--rounds N] [--requests N] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stack  # noqa: E402

OK = {"status": 200, "body": {"inline_string": "ok"}}
CLAIMS = [
    {"claim": "sub", "header": "x-user-id"},
    {"claim": "realm_access.roles", "header": "x-user-roles"},
    {"claim": "email", "header": "x-user-email"},
]
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


wasm_filter = stack.wasm_http_filter
# The floor of any Wasm filter: every callback continues (tests/bench/noop, built and put through
# wasm-opt like the shipped module by `just build-noop`).
NOOP_WASM = stack.TARGET_DIR / "dist" / "split_token_bench_noop.wasm"


def noop_filter() -> dict:
    entry = wasm_filter({}, code=NOOP_WASM)
    config = entry["typed_config"]["config"]
    config["name"] = config["root_id"] = config["vm_config"]["vm_id"] = "noop"
    return entry


def jwt_authn_filter(jwks: str, cache: bool) -> dict:
    provider = {"local_jwks": {"inline_string": jwks}, "forward": True}
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1000}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"idp": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
        },
    }


def listener(name: str, port: int, filters: list, routes: list) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
                "http_filters": filters + [ROUTER],
            },
        }]}],
    }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def h2load(url: str, authorization: str | None, n: int, clients: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        argv = ["taskset", "-c", "1", "h2load", "-n", str(n), "-c", str(clients), "-t", "1",
                "--log-file", log.name]
        if authorization:
            argv += ["-H", f"authorization: {authorization}"]
        out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        lat = sorted(int(line.split("\t")[2]) / 1000.0 for line in Path(log.name).read_text().splitlines() if line)
        statuses = {line.split("\t")[1] for line in Path(log.name).read_text().splitlines() if line}
    shown = [a if a != log.name else "requests.log" for a in argv[3:]]
    return {"rps": rps, "p50": percentile(lat, 50), "p99": percentile(lat, 99), "statuses": statuses,
            "cmd": " ".join(shown + [url]).replace(authorization or "\0", "<token>")}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="1 round of 5000 requests")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.requests = 1, 5000

    run_dir = stack.ROOT / ".run" / "bench"
    idp = stack.start_idp(stack.free_port(), run_dir)
    envoy = None
    try:
        jwks = requests.get(f"http://127.0.0.1:{idp.port}/jwks", timeout=5).text
        ports = {name: stack.free_port() for name in
                 ("bare", "noop", "floor", "hit", "hitnoopt", "hitrev", "hit3", "hit3rev", "hit3k", "miss",
                  "jwt_authn", "jwt_authn_cache",
                  "issue", "issue_bare")}
        base = {"token_paths": ["/auth/token"], "public_prefixes": ["/public/"],
                "store_slots": 65536}
        idp_route = {"match": {"path": "/auth/token"}, "route": {"cluster": "idp", "prefix_rewrite": "/token"}}
        ok_route = {"match": {"prefix": "/"}, "direct_response": OK}
        listeners = [
            listener("bare", ports["bare"], [], [ok_route]),
            listener("noop", ports["noop"], [noop_filter()], [ok_route]),
            listener("floor", ports["floor"], [wasm_filter(base)], [ok_route]),
            listener("hit", ports["hit"], [wasm_filter(base)], [idp_route, ok_route]),
            # cargo's output before wasm-opt, under the same vm_id (so the same store): what the
            # size optimizations cost on the hot path.
            listener("hitnoopt", ports["hitnoopt"], [wasm_filter(base, code=stack.CARGO_WASM)], [ok_route]),
            # Revocation on: every request also reads the revocation epoch from shared data.
            listener("hitrev", ports["hitrev"], [wasm_filter({**base, "revocation_paths": ["/auth/revoke"]})],
                     [idp_route, ok_route]),
            listener("hit3", ports["hit3"], [wasm_filter({**base, "claims_to_headers": CLAIMS})], [idp_route, ok_route]),
            listener("hit3rev", ports["hit3rev"],
                     [wasm_filter({**base, "claims_to_headers": CLAIMS, "revocation_paths": ["/auth/revoke"]})],
                     [idp_route, ok_route]),
            listener("hit3k", ports["hit3k"],
                     [wasm_filter({**base, "claims_to_headers": CLAIMS, "recompute_route": False})],
                     [idp_route, ok_route]),
            listener("miss", ports["miss"], [wasm_filter(base)], [ok_route]),
            listener("jwt_authn", ports["jwt_authn"], [jwt_authn_filter(jwks, False)], [ok_route]),
            listener("jwt_authn_cache", ports["jwt_authn_cache"], [jwt_authn_filter(jwks, True)], [ok_route]),
            listener("issue", ports["issue"], [wasm_filter(base)], [idp_route]),
            listener("issue_bare", ports["issue_bare"], [], [idp_route]),
        ]
        config = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": stack.free_port()}}},
            "static_resources": {"listeners": listeners, "clusters": [{
                "name": "idp", "type": "STATIC", "connect_timeout": "2s",
                "load_assignment": {"cluster_name": "idp", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": idp.port}}}}]}]},
            }]},
        }
        envoy = stack.Envoy(config, run_dir, name="bench-envoy")
        envoy.wait_ready()
        subprocess.run(["taskset", "-apc", "0", str(envoy.process.proc.pid)], check=True, capture_output=True)

        form = {"grant_type": "client_credentials", "sub": "alice", "roles": "user,admin",
                "email": "alice@example.com"}
        sig = requests.post(f"http://127.0.0.1:{ports['hit']}/auth/token", data=form, timeout=5).json()["access_token"]
        full = requests.post(f"http://127.0.0.1:{idp.port}/token", data=form, timeout=5).json()["access_token"]
        url = lambda name, path="/x": f"http://127.0.0.1:{ports[name]}{path}"  # noqa: E731
        rows = {
            "bare Envoy (no filter)": (url("bare"), None, "200"),
            "no-op wasm filter (every callback continues)": (url("noop"), None, "200"),
            "filter loaded, public path (floor)": (url("floor", "/public/x"), None, "200"),
            "token hit, 0 claim headers": (url("hit"), f"Bearer {sig}", "200"),
            "token hit, 0 claim headers, module before wasm-opt": (url("hitnoopt"), f"Bearer {sig}", "200"),
            "token hit, 0 claim headers, revocation on": (url("hitrev"), f"Bearer {sig}", "200"),
            "token hit, 3 claim headers": (url("hit3"), f"Bearer {sig}", "200"),
            "token hit, 3 claim headers, revocation on": (url("hit3rev"), f"Bearer {sig}", "200"),
            "token hit, 3 claim headers, recompute_route off": (url("hit3k"), f"Bearer {sig}", "200"),
            "token miss (401)": (url("miss"), "Bearer unknown-signature", "401"),
            "jwt_authn RS256, no cache": (url("jwt_authn"), f"Bearer {full}", "200"),
            "jwt_authn RS256, jwt_cache_config": (url("jwt_authn_cache"), f"Bearer {full}", "200"),
        }
        results: dict[str, list[dict]] = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, (u, auth, want) in rows.items():
                r = h2load(u, auth, args.requests, args.clients)
                if r["statuses"] != {want}:
                    raise RuntimeError(f"{name}: statuses {r['statuses']}, expected {want}")
                results[name].append(r)

        # Issuance: sequential token requests, with and without the filter, alternating.
        issue = {"issue": [], "issue_bare": []}
        n_issue = 50 if args.quick else 300
        for _ in range(n_issue):
            for name in issue:
                t0 = time.perf_counter()
                r = requests.post(url(name, "/auth/token"), data=form, timeout=5)
                issue[name].append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
        issue_added = statistics.median(issue["issue"]) - statistics.median(issue["issue_bare"])

        wasm_size = stack.WASM.stat().st_size
        cargo_wasm_size = stack.CARGO_WASM.stat().st_size
        med = {name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
               for name, rs in results.items()}
        bare, floor = med["bare Envoy (no filter)"], med["filter loaded, public path (floor)"]
        noop = med["no-op wasm filter (every callback continues)"]
        lines = ["| variant | req/s | vs bare | vs no-op wasm | vs floor | p50 ms | p99 ms | p99 vs bare | p99 vs no-op |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in med.items():
            lines.append(f"| {name} | {m['rps']:.0f} | {m['rps'] / bare['rps']:.2f}x | "
                         f"{m['rps'] / noop['rps']:.2f}x | "
                         f"{m['rps'] / floor['rps']:.2f}x | {m['p50']:.2f} | {m['p99']:.2f} | "
                         f"{m['p99'] / bare['p99']:.2f}x | {m['p99'] / noop['p99']:.2f}x |")
        table = "\n".join(lines)
        issuance = (f"Token issuance through the filter: median {statistics.median(issue['issue']):.2f} ms vs "
                    f"{statistics.median(issue['issue_bare']):.2f} ms with the filter off "
                    f"(added {issue_added:.2f} ms; {n_issue} sequential requests each, alternating).")
        print(table)
        print()
        print(issuance)
        print(f".wasm size: {wasm_size} bytes shipped (after wasm-opt), {cargo_wasm_size} bytes from cargo")
        if args.json:
            args.json.write_text(json.dumps({
                "machine": machine(), "rounds": args.rounds, "requests": args.requests,
                "clients": args.clients, "table": table, "issuance": issuance, "wasm_size": wasm_size, "cargo_wasm_size": cargo_wasm_size,
                "median": med, "issue_ms": {k: statistics.median(v) for k, v in issue.items()},
                "command": results["token hit, 0 claim headers"][0]["cmd"],
            }, indent=1))
        return 0
    finally:
        if envoy is not None:
            envoy.stop()
        idp.stop()


if __name__ == "__main__":
    sys.exit(main())
