"""The etcd tier across three replicas: what it adds to issuance and to the first call on another
replica, and how long a revocation takes to reach the other replicas.

usage: python tests/bench/replicas.py [--quick] [--json OUT]

Three Envoys (`--concurrency 1` each) share one etcd (Debian etcd-server 3.4.23, from `just
deps`) and the real IdP, on loopback. API routes are `direct_response`, so no upstream adds
time. Replica A also has a listener without `etcd`, for the issuance baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stack  # noqa: E402
from bench import listener, wasm_filter  # noqa: E402

OK = {"status": 200, "body": {"inline_string": "ok"}}
FORM = {"grant_type": "client_credentials", "client_id": "bench", "client_secret": "s"}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def replica_config(idp_port: int, etcd_port: int, ports: dict[str, int], poll_ms: int) -> dict:
    base = {"token_paths": ["/auth/token"], "revocation_paths": ["/auth/revoke"],
            "store_slots": 4096}
    shared = {**base, "etcd": {"cluster": "etcd", "poll_ms": poll_ms}}
    routes = [
        {"match": {"path": "/auth/token"}, "route": {"cluster": "idp", "prefix_rewrite": "/token"}},
        {"match": {"path": "/auth/revoke"}, "route": {"cluster": "idp", "prefix_rewrite": "/revoke"}},
        {"match": {"prefix": "/"}, "direct_response": OK},
    ]
    listeners = [listener("shared", ports["shared"], [wasm_filter(shared)], routes)]
    if "local" in ports:
        listeners.append(listener("local", ports["local"], [wasm_filter(base)], routes))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports["admin"]}}},
        "static_resources": {"listeners": listeners, "clusters": [
            stack.static_cluster("idp", idp_port), stack.etcd_cluster(etcd_port)]},
    }


def timed(call) -> tuple[float, requests.Response]:
    t0 = time.perf_counter()
    r = call()
    return (time.perf_counter() - t0) * 1000, r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few samples: a smoke run")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--poll-ms", type=int, default=500)
    args = ap.parse_args()
    n_issue, n_first, n_revoke = (20, 10, 3) if args.quick else (300, 200, 40)

    run_dir = stack.ROOT / ".run" / "bench"
    etcd = stack.start_etcd(stack.free_port(), run_dir)
    idp = stack.start_idp(stack.free_port(), run_dir)
    envoys: list[stack.Envoy] = []
    try:
        urls = {}
        for name in "abc":
            ports = {"shared": stack.free_port(), "admin": stack.free_port()}
            if name == "a":
                ports["local"] = stack.free_port()
            config = replica_config(idp.port, etcd.port, ports, args.poll_ms)
            envoys.append(stack.Envoy(config, run_dir, name=f"bench-replica-{name}"))
            urls[name] = f"http://127.0.0.1:{ports['shared']}"
            if "local" in ports:
                urls["a-local"] = f"http://127.0.0.1:{ports['local']}"
        for envoy in envoys:
            envoy.wait_ready()
        session = requests.Session()

        def token(url: str, sub: str) -> str:
            r = session.post(url + "/auth/token", data={**FORM, "sub": sub}, timeout=5)
            assert r.status_code == 200, r.text
            return r.json()["access_token"]

        def call(url: str, sig: str) -> requests.Response:
            return session.get(url + "/api", headers={"Authorization": f"Bearer {sig}"}, timeout=5)

        # Issuance, alternating with and without the etcd write.
        issue = {"etcd": [], "local": []}
        for i in range(n_issue):
            for kind, url in (("etcd", urls["a"]), ("local", urls["a-local"])):
                ms, r = timed(lambda: session.post(url + "/auth/token", data={**FORM, "sub": f"i{kind}{i}"},
                                                   timeout=5))
                assert r.status_code == 200, r.text
                issue[kind].append(ms)

        # The first call on a replica that never saw the token reads etcd; the second is local.
        first, second = [], []
        for i in range(n_first):
            sig = token(urls["a"], f"f{i}")
            ms1, r1 = timed(lambda: call(urls["b"], sig))
            ms2, r2 = timed(lambda: call(urls["b"], sig))
            assert (r1.status_code, r2.status_code) == (200, 200), (r1.text, r2.text)
            first.append(ms1)
            second.append(ms2)

        # Revocation on A, watched on B and C (both hold the token, in store and cache).
        propagation = []
        for i in range(n_revoke):
            sig = token(urls["a"], f"r{i}")
            for name in "bc":
                assert call(urls[name], sig).status_code == 200
            seen: dict[str, float] = {}
            start = threading.Event()

            def watch(name: str):
                s = requests.Session()
                start.wait()
                while time.perf_counter() - t_revoked < 10:
                    if s.get(urls[name] + "/api", headers={"Authorization": f"Bearer {sig}"},
                             timeout=5).status_code == 401:
                        seen[name] = (time.perf_counter() - t_revoked) * 1000
                        return
                    time.sleep(0.005)

            threads = [threading.Thread(target=watch, args=(n,)) for n in "bc"]
            for t in threads:
                t.start()
            # The loop would otherwise lock onto the sweeps (each round ends just after one), so
            # revoke at a random point of the poll interval.
            time.sleep(random.uniform(0, args.poll_ms / 1000))
            r = session.post(urls["a"] + "/auth/revoke", data={"token": sig}, timeout=5)
            t_revoked = time.perf_counter()
            assert r.status_code == 200, r.text
            start.set()
            for t in threads:
                t.join()
            assert set(seen) == {"b", "c"}, f"revocation never reached {set('bc') - set(seen)}"
            propagation.append(max(seen.values()))

        result = {
            "poll_ms": args.poll_ms,
            "issue_ms": {k: statistics.median(v) for k, v in issue.items()},
            "n_issue": n_issue,
            "first_call_ms": statistics.median(first),
            "second_call_ms": statistics.median(second),
            "n_first": n_first,
            "propagation_ms": {"p50": statistics.median(propagation), "p90": percentile(propagation, 90),
                               "max": max(propagation)},
            "n_revoke": n_revoke,
            "etcd_keys": len(stack.etcd_range_prefix(etcd.port, "split-token/")),
        }
        lines = [
            "| measure | median | |",
            "|---|---:|---|",
            f"| token issuance, with the etcd write | {result['issue_ms']['etcd']:.2f} ms | "
            f"{result['issue_ms']['etcd'] - result['issue_ms']['local']:+.2f} ms vs without etcd "
            f"({result['issue_ms']['local']:.2f} ms); {n_issue} each, alternating |",
            f"| first call on another replica (read from etcd) | {result['first_call_ms']:.2f} ms | "
            f"{result['first_call_ms'] - result['second_call_ms']:+.2f} ms vs its second call "
            f"({result['second_call_ms']:.2f} ms, local); {n_first} tokens |",
            f"| revocation on A until B and C refuse | {result['propagation_ms']['p50']:.0f} ms | "
            f"p90 {result['propagation_ms']['p90']:.0f} ms, max {result['propagation_ms']['max']:.0f} ms; "
            f"poll_ms {args.poll_ms}; {n_revoke} revocations |",
        ]
        result["table"] = "\n".join(lines)
        print(result["table"])
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    finally:
        for envoy in envoys:
            envoy.stop()
        idp.stop()
        etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
