"""What claim projection costs on the hot path: token hits with 0 vs 3 claim headers.

Two Envoys (--concurrency 1, pinned to CPU 0), same demo config except claims_to_headers, a
direct_response route so no upstream adds noise, h2load on CPU 1. Runs alternate, several rounds;
medians are printed. Usage: python tests/bench/claims_cost.py [--rounds N] [--requests N]
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import subprocess
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stack  # noqa: E402

CLAIMS = [
    {"claim": "sub", "header": "x-user-id"},
    {"claim": "realm_access.roles", "header": "x-user-roles"},
    {"claim": "email", "header": "x-user-email"},
]


def bench_config(idp_port: int, httpbin_port: int, claims: list) -> dict:
    base = stack.load_demo_config()
    settings = copy.deepcopy(stack.filter_settings(base))
    settings["claims_to_headers"] = claims
    config = stack.render_config(listen_port=stack.free_port(), admin_port=stack.free_port(),
                                 idp_port=idp_port, httpbin_port=httpbin_port,
                                 filter_config=settings, base=base,
                                 extra_routes=[{"match": {"prefix": "/bench/"},
                                                "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("access_log", None)
    return config


def h2load(url: str, token: str, requests_n: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "h2load", "-n", str(requests_n), "-c", "16", "-t", "1",
         "-H", f"authorization: Bearer {token}", url],
        capture_output=True, text=True, check=True).stdout
    ok = re.search(r"(\d+) succeeded", out)
    if not ok or int(ok.group(1)) != requests_n:
        raise RuntimeError(f"h2load: not every request succeeded:\n{out}")
    return float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100_000)
    args = ap.parse_args()
    run_dir = stack.ROOT / ".run" / "bench"
    idp = stack.start_idp(stack.free_port(), run_dir)
    envoys = {}
    try:
        for name, claims in (("0 claim headers", []), ("3 claim headers", CLAIMS)):
            envoy = stack.Envoy(bench_config(idp.port, 9, claims), run_dir, name=f"bench-{len(envoys)}",
                                extra_args=[])
            envoy.wait_ready()
            subprocess.run(["taskset", "-pc", "0", str(envoy.process.proc.pid)], check=True,
                           capture_output=True)
            r = requests.post(envoy.url + "/auth/token", data={
                "grant_type": "client_credentials", "sub": "alice", "roles": "user,admin",
                "email": "alice@example.com"}, timeout=10)
            token = r.json()["access_token"]
            probe = requests.get(envoy.url + "/bench/x", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert probe.status_code == 200, probe.text
            envoys[name] = (envoy, token)
        results = {name: [] for name in envoys}
        for _ in range(args.rounds):
            for name, (envoy, token) in envoys.items():
                results[name].append(h2load(envoy.url + "/bench/x", token, args.requests))
        base = statistics.median(results["0 claim headers"])
        print(f"{'variant':<18} {'median req/s':>12} {'ratio':>6}  rounds")
        for name, values in results.items():
            med = statistics.median(values)
            print(f"{name:<18} {med:>12.0f} {med / base:>6.3f}  {', '.join(f'{v:.0f}' for v in values)}")
        return 0
    finally:
        for envoy, _ in envoys.values():
            envoy.stop()
        idp.stop()


if __name__ == "__main__":
    sys.exit(main())
