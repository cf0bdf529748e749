#!/usr/bin/env python3
"""Checks the Kubernetes manifests under envoy/istio/ and envoy/gateway/, and the split-token
configuration inside them.

    .deps/venv/bin/python tests/manifests/check.py [--require-schemas] [--schemas-only] [PATH ...]

PATH (files or directories, default envoy/istio envoy/gateway) are read as multi-document YAML.

1. Every document against its kind's schema, from the npm packages pinned in
   tests/manifests/package-lock.json and installed into .deps/manifests/ by tests/deps.sh:
   @kubernetes-models/istio (generated from Istio's CRDs), @kubernetes-models/gateway-api and
   @kubernetes-models/envoy-gateway (from the projects' Go API types, which the CRDs are
   generated from too) and kubernetes-models (Kubernetes' own kinds). Each package ships, per
   kind, a validator compiled from the schema and TypeScript declarations of the same schema.
   Two checks use them:
   - the validator (node, validate.mjs): types, enums, patterns, required fields, bounds;
   - the declarations (tsc): unknown fields. The schemas allow unknown fields as CRDs do (the
     API server prunes them, or refuses them with kubectl's strict field validation), so the
     validators accept a typo. TypeScript's check of object literals against the declared
     type refuses any field the schema does not declare, at any depth, except inside
     free-form fields (pluginConfig, config, patch values); wrong types fail here too.
   A document whose kind no package covers is reported loudly as NOT CHECKED. A strategic
   merge patch (no apiVersion/kind) listed in PATCHES is checked as a partial object of its
   target kind. CEL rules (x-kubernetes-validations) are not evaluated.
2. Every split-token filter configuration (WasmPlugin spec.pluginConfig, EnvoyExtensionPolicy
   spec.wasm[].config, EnvoyFilter configuration.value) by the filter's own parser: a minimal
   Envoy config with the built .wasm, the Envoy Wasm filter set up as that control plane sets
   it up (Istio: empty vm_id and failure_policy from failStrategy; Envoy Gateway: its vm_id
   and fail_open; EnvoyFilter: its own PluginConfig), and clusters named as the configuration's
   verify.jwks_cluster and etcd.cluster (a cluster that an EnvoyPatchPolicy among the checked
   manifests adds is used as written, its TLS files replaced by a throwaway certificate; the
   others are static stand-ins),
   run through `envoy --mode validate`, which loads the .wasm and runs its on_configure.

One line per document and per configuration, then `check: N passed, N failed`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEPS = ROOT / ".deps" / "manifests"
NODE_MODULES = DEPS / "node_modules"
DEFAULT_PATHS = ["envoy/istio", "envoy/gateway"]
ENVOY = ROOT / ".deps" / "venv" / "bin" / "envoy"

# Model packages by API group. Anything else is looked up in kubernetes-models.
PACKAGES = {
    "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
    "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
}
ISTIO_PACKAGE = "@kubernetes-models/istio"
CORE_PACKAGE = "kubernetes-models"
REPORTED_PACKAGES = [ISTIO_PACKAGE, *PACKAGES.values(), CORE_PACKAGE, "typescript"]

# Strategic merge patches (no apiVersion/kind), checked as partial objects of their target.
PATCHES = {
    "envoy/istio/gateway-volume-patch.yaml": ("apps/v1", "Deployment"),
}

ROOT_ID = "split-token"
WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
TYPED_STRUCTS = {"type.googleapis.com/udpa.type.v1.TypedStruct",
                 "type.googleapis.com/xds.type.v3.TypedStruct"}
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
# Istio's mapping of WasmPlugin.failStrategy (pilot/pkg/model/extensions.go, proxies >= 1.25).
ISTIO_FAILURE_POLICY = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN",
                        "FAIL_RELOAD": "FAIL_RELOAD"}


@dataclass
class Doc:
    file: str
    index: int
    data: object
    module: str | None = None  # "<package>/<group>/<version>/<Kind>"
    kind: str = ""
    partial: bool = False  # a patch: checked as DeepPartial<kind>
    reason: str = ""  # why there is no schema
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.file}[{self.index}]"

    @property
    def title(self) -> str:
        if not isinstance(self.data, dict):
            return "(not an object)"
        if self.partial:
            return f"(a patch, no apiVersion/kind: checked as a partial {self.kind})"
        if "apiVersion" not in self.data or "kind" not in self.data:
            return "(no apiVersion/kind)"
        meta = self.data.get("metadata") or {}
        name = "/".join(str(p) for p in (meta.get("namespace"), meta.get("name")) if p)
        what = f"{self.data.get('apiVersion', '?')} {self.data.get('kind', '?')}"
        return f"{what} {name}".strip()


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def manifest_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p) if Path(p).is_absolute() else ROOT / p
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix in (".yaml", ".yml"))
        elif path.is_file():
            files.append(path)
        else:
            sys.exit(f"check: no such file or directory: {p}")
    return files


def load_docs(files: list[Path]) -> list[Doc]:
    docs = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                loaded = [d for d in yaml.safe_load_all(fh) if d is not None]
        except yaml.YAMLError as e:
            doc = Doc(rel(f), 0, None, reason="not YAML")
            doc.errors.append(f"yaml: {e}")
            docs.append(doc)
            continue
        for i, data in enumerate(loaded):
            docs.append(Doc(rel(f), i, json.loads(json.dumps(data, default=str))))
    return docs


def model_module(api_version: str, kind: str) -> tuple[str | None, str]:
    group, _, version = api_version.rpartition("/")
    if group.endswith(".istio.io"):
        package = ISTIO_PACKAGE
    else:
        package = PACKAGES.get(group, CORE_PACKAGE)
    sub = f"{group}/{version}/{kind}" if group else f"{version}/{kind}"
    dts = NODE_MODULES / package / f"{sub}.d.ts"
    if not dts.is_file() or not (NODE_MODULES / package / f"{sub}.js").is_file():
        return None, f"{package} {version_of(package)} has no model {sub}"
    if not re.search(rf"export interface I{re.escape(kind)}\b", dts.read_text(encoding="utf-8")):
        return None, f"{package}/{sub} declares no interface I{kind}"
    return f"{package}/{sub}", ""


def version_of(package: str) -> str:
    try:
        return json.loads((NODE_MODULES / package / "package.json").read_text())["version"]
    except OSError:
        return "(not installed)"


def resolve(doc: Doc) -> None:
    data = doc.data
    if not isinstance(data, dict):
        doc.reason = "not a YAML mapping"
        return
    if "apiVersion" not in data or "kind" not in data:
        target = PATCHES.get(doc.file)
        if target is None:
            doc.reason = "no apiVersion/kind, and not a known patch (check.py PATCHES)"
            return
        doc.partial = True
        api_version, kind = target
    else:
        api_version, kind = str(data["apiVersion"]), str(data["kind"])
    doc.kind = kind
    doc.module, doc.reason = model_module(api_version, kind)


# ---- schema checks ---------------------------------------------------------------------------

def run_validators(docs: list[Doc], work: Path) -> None:
    items = [{"id": i, "module": d.module, "kind": d.kind, "doc": d.data}
             for i, d in enumerate(docs) if d.module and not d.partial]
    if not items:
        return
    (work / "in.json").write_text(json.dumps(items))
    shutil.copy(HERE / "validate.mjs", work / "validate.mjs")
    out = subprocess.run(["node", str(work / "validate.mjs"), str(work / "in.json")],
                         capture_output=True, text=True, cwd=work)
    if out.returncode != 0:
        sys.exit(f"check: node validate.mjs failed:\n{out.stderr}")
    for result in json.loads(out.stdout):
        docs[result["id"]].errors += [f"schema: {e}" for e in result["errors"]]


def ts_lines(value, path: list, indent: int, out: list, any_scalars: bool) -> None:
    """Appends (text, path) lines of `value`'s members, one member a line, so that a
    compiler error's line number names the member it is about. With any_scalars, every
    scalar is written as `any`: only the objects' fields are then compared with the type."""
    pad = "  " * indent
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        head = f"{pad}{json.dumps(str(key))}: " if isinstance(value, dict) else pad
        p = path + [key]
        if isinstance(v, (dict, list)) and v:
            opening, closing = ("{", "}") if isinstance(v, dict) else ("[", "]")
            out.append((head + opening, p))
            ts_lines(v, p, indent + 1, out, any_scalars)
            out.append((f"{pad}{closing},", p))
        elif any_scalars and not isinstance(v, (dict, list)):
            out.append((head + "(null as any),", p))
        else:
            out.append((head + json.dumps(v) + ",", p))


# TypeScript's codes for a field the type does not declare (the second one with a suggestion).
UNKNOWN_FIELD = {"TS2353", "TS2561"}


def run_tsc(docs: list[Doc], work: Path) -> None:
    """Two literals per document: as written (wrong types, missing and unknown fields), and
    with every scalar as `any` (unknown fields only). TypeScript does not report an unknown
    field in an object that also has a field of the wrong type; the second one does."""
    checked = [(i, d) for i, d in enumerate(docs) if d.module]
    if not checked:
        return
    lines: list[tuple[str, tuple | None]] = [
        ("type DeepPartial<T> = T extends (infer U)[] ? DeepPartial<U>[]"
         " : T extends object ? { [K in keyof T]?: DeepPartial<T[K]> } : T;", None)]
    for i, d in checked:
        lines.append((f'import type {{ I{d.kind} as T{i} }} from "{d.module}";', None))
    for i, d in checked:
        target = f"DeepPartial<T{i}>" if d.partial else f"T{i}"
        for variant, any_scalars in (("d", False), ("u", True)):
            lines.append((f"export const {variant}{i}: {target} = {{", (i, [], any_scalars)))
            body: list = []
            ts_lines(d.data, [], 1, body, any_scalars)
            lines += [(text, (i, p, any_scalars)) for text, p in body]
            lines.append(("};", (i, [], any_scalars)))
    (work / "check.ts").write_text("\n".join(text for text, _ in lines) + "\n")
    (work / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext",
                            "moduleResolution": "nodenext", "target": "es2022",
                            "skipLibCheck": True, "types": []},
        "files": ["check.ts"]}))
    out = subprocess.run([str(NODE_MODULES / ".bin" / "tsc"), "-p", str(work / "tsconfig.json"),
                          "--pretty", "false"], capture_output=True, text=True, cwd=work)
    errors: list[list] = []  # [where, code, message]
    for line in out.stdout.splitlines():
        m = re.match(r"^check\.ts\((\d+),(\d+)\): error (TS\d+): (.*)$", line)
        if m:
            where = lines[int(m.group(1)) - 1][1]
            if where is None:
                sys.exit(f"check: tsc: {line}")
            errors.append([where, m.group(3), m.group(4)])
        elif errors and line.startswith(" "):
            errors[-1][2] += " / " + line.strip()
        elif line.strip():
            sys.exit(f"check: tsc: {line}")
    if out.returncode not in (0, 2) or (out.returncode == 2 and not errors):
        sys.exit(f"check: tsc failed:\n{out.stdout}{out.stderr}")
    seen = set()
    for (i, path, any_scalars), code, message in errors:
        if any_scalars and code not in UNKNOWN_FIELD:
            continue  # an artefact of the `any` values; the literal as written tells
        key = (i, tuple(path), "unknown" if code in UNKNOWN_FIELD else message)
        if key in seen:
            continue
        seen.add(key)
        if len(message) > 400:
            message = message[:400] + " ..."
        docs[i].errors.append(f"fields: /{'/'.join(str(p) for p in path)}: {message}")


# ---- filter configurations -------------------------------------------------------------------

@dataclass
class FilterConfig:
    doc: Doc
    what: str  # e.g. "spec.pluginConfig"
    plugin: dict | None  # the Envoy PluginConfig, without code
    config: object  # the filter's configuration, parsed
    built_as: str
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def string_value(config) -> dict:
    text = "" if config is None else json.dumps(config)
    return {"@type": STRING_VALUE, "value": text}


def filter_configs(docs: list[Doc]) -> tuple[list[FilterConfig], list[str]]:
    found, skipped = [], []
    for d in docs:
        data = d.data if isinstance(d.data, dict) else {}
        kind, spec = data.get("kind"), data.get("spec") or {}
        meta = data.get("metadata") or {}
        ns, name = meta.get("namespace", "default"), meta.get("name", "")
        if kind == "WasmPlugin":
            if spec.get("pluginName") != ROOT_ID:
                skipped.append(f"{d.label} WasmPlugin {name}: pluginName is not {ROOT_ID}")
                continue
            policy = ISTIO_FAILURE_POLICY.get(spec.get("failStrategy", "FAIL_CLOSE"), "FAIL_CLOSED")
            plugin = {"name": f"{ns}.{name}", "root_id": spec["pluginName"],
                      "vm_config": {"vm_id": "", "runtime": "envoy.wasm.runtime.v8"},
                      "configuration": string_value(spec.get("pluginConfig")),
                      "failure_policy": policy}
            found.append(FilterConfig(d, "spec.pluginConfig", plugin, spec.get("pluginConfig"),
                                      f'as Istio builds it: vm_id "", failure_policy {policy}'))
        elif kind == "EnvoyExtensionPolicy":
            for i, w in enumerate(spec.get("wasm") or []):
                if w.get("rootID") != ROOT_ID:
                    skipped.append(f"{d.label} EnvoyExtensionPolicy {name} wasm[{i}]: "
                                   f"rootID is not {ROOT_ID}")
                    continue
                vm_id = f"envoyextensionpolicy/{ns}/{name}/wasm/{i}"
                fail_open = w.get("failOpen") is True
                plugin = {"name": w.get("name") or vm_id, "root_id": w["rootID"],
                          "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8"},
                          "configuration": string_value(w.get("config")),
                          "fail_open": fail_open}
                found.append(FilterConfig(d, f"spec.wasm[{i}].config", plugin, w.get("config"),
                                          f'as Envoy Gateway builds it: vm_id "{vm_id}", '
                                          f"fail_open {str(fail_open).lower()}"))
        elif kind == "EnvoyFilter":
            for i, patch in enumerate(spec.get("configPatches") or []):
                typed = ((patch.get("patch") or {}).get("value") or {}).get("typed_config") or {}
                if typed.get("@type") in TYPED_STRUCTS:
                    type_url, wasm = typed.get("type_url"), typed.get("value") or {}
                else:
                    type_url, wasm = typed.get("@type"), typed
                if type_url != WASM_FILTER:
                    continue
                plugin = copy.deepcopy(wasm.get("config") or {})
                if plugin.get("root_id") != ROOT_ID:
                    skipped.append(f"{d.label} EnvoyFilter {name} configPatches[{i}]: "
                                   f"root_id is not {ROOT_ID}")
                    continue
                what = f"spec.configPatches[{i}] configuration.value"
                fc = FilterConfig(d, what, plugin, None, "its own PluginConfig")
                configuration = plugin.get("configuration") or {}
                try:
                    fc.config = json.loads(configuration.get("value", ""))
                except json.JSONDecodeError as e:
                    fc.errors.append(f"configuration.value is not JSON: {e}")
                plugin.get("vm_config", {}).pop("code", None)
                found.append(fc)
    return found, skipped


def patch_clusters(docs: list[Doc]) -> dict[str, tuple[dict, str]]:
    """Clusters that EnvoyPatchPolicies add as whole resources, by name."""
    clusters = {}
    for d in docs:
        data = d.data if isinstance(d.data, dict) else {}
        if data.get("kind") != "EnvoyPatchPolicy":
            continue
        meta = data.get("metadata") or {}
        for p in (data.get("spec") or {}).get("jsonPatches") or []:
            op = p.get("operation") or {}
            if p.get("type") == CLUSTER_TYPE and op.get("op") == "add" and op.get("path", "") == "":
                value = op.get("value") or {}
                where = f"EnvoyPatchPolicy {meta.get('namespace')}/{meta.get('name')} ({d.label})"
                clusters[value.get("name", p.get("name"))] = (value, where)
    return clusters


def throwaway_tls(cluster: dict, work: Path, notes: list[str]) -> dict:
    """The cluster with every file it names that does not exist here replaced by a
    throwaway self-signed certificate or its key, so that Envoy can build its TLS context."""
    cluster = copy.deepcopy(cluster)
    missing = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "filename" and isinstance(v, str) and not os.path.exists(v):
                    missing.append((node, v))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(cluster)
    if not missing:
        return cluster
    key, cert = work / "throwaway.key", work / "throwaway.crt"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-subj", "/CN=check.invalid", "-days", "2"],
                       check=True, capture_output=True)
    for node, name in missing:
        node["filename"] = str(key if "key" in os.path.basename(name) else cert)
    notes.append(f"TLS files {', '.join(sorted({n for _, n in missing}))} replaced by a throwaway "
                 "certificate")
    return cluster


def stand_in(name: str) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": 9}}}}]}]}}


def check_config(fc: FilterConfig, wasm: Path, envoy: Path, added: dict, work: Path,
                 n: int) -> None:
    if fc.errors:
        return
    if not isinstance(fc.config, dict):
        fc.errors.append("the configuration is missing or not a JSON object")
        return
    names = []
    for section, key in (("verify", "jwks_cluster"), ("etcd", "cluster")):
        block = fc.config.get(section)
        value = block.get(key) if isinstance(block, dict) else None
        if isinstance(value, str) and value not in names:
            names.append(value)
    clusters, described = [stand_in("check_upstream")], []
    for name in names:
        if name in added:
            cluster, where = added[name]
            clusters.append(throwaway_tls(cluster, work, fc.notes))
            described.append(f"{name} from {where}")
        else:
            clusters.append(stand_in(name))
            described.append(f"{name} (static stand-in)")
    if described:
        fc.notes.insert(0, "clusters " + ", ".join(described))
    plugin = copy.deepcopy(fc.plugin)
    plugin.setdefault("vm_config", {})["code"] = {"local": {"filename": str(wasm)}}
    bootstrap = {"static_resources": {
        "listeners": [{
            "name": "check",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "check",
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"},
                                    "route": {"cluster": "check_upstream"}}]}]},
                    "http_filters": [
                        {"name": "split-token",
                         "typed_config": {"@type": WASM_FILTER, "config": plugin}},
                        {"name": "envoy.filters.http.router",
                         "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                   "filters.http.router.v3.Router"}}]}}]}]}],
        "clusters": clusters}}
    path = work / f"envoy-{n}.json"
    path.write_text(json.dumps(bootstrap, indent=1))
    out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(path), "-l", "error"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        text = (out.stdout + out.stderr).strip().splitlines()
        shown = [line for line in text if "invalid configuration" in line] or text[-5:]
        fc.errors += [f"envoy --mode validate: {line.strip()}" for line in shown]


# ---- main ------------------------------------------------------------------------------------

def default_wasm() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    if not target.is_absolute():
        target = ROOT / target
    return target.resolve() / "dist" / "split_token_filter.wasm"


def report(what: str, label: str, errors: list[str], ok_text: str | None = None) -> bool:
    """Prints one checked item's line (and its errors); True when it passed."""
    if errors:
        print(f"FAIL   {what} {label}")
        for e in errors:
            print(f"         {e}")
        return False
    print(f"ok     {what} {ok_text or label}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS,
                        help="manifest files or directories (default: envoy/istio envoy/gateway)")
    parser.add_argument("--require-schemas", action="store_true",
                        help="fail on documents that no schema covers")
    parser.add_argument("--schemas-only", action="store_true",
                        help="skip the filter configurations (no .wasm, no Envoy needed)")
    parser.add_argument("--envoy", type=Path, default=ENVOY)
    parser.add_argument("--wasm", type=Path, default=None,
                        help="the built filter (default: $CARGO_TARGET_DIR or target/, "
                             "dist/split_token_filter.wasm)")
    args = parser.parse_args()

    if not (NODE_MODULES / ".bin" / "tsc").exists():
        sys.exit(f"check: {rel(DEPS)} is not installed: run tests/deps.sh (just deps)")
    wasm = args.wasm or default_wasm()
    if not args.schemas_only:
        for what, path in (("Envoy", args.envoy), ("the filter's .wasm", wasm)):
            if not path.is_file():
                sys.exit(f"check: {what} not found at {path} (just deps / just build, "
                         "or --schemas-only)")

    print("schemas: " + ", ".join(f"{p} {version_of(p)}" for p in REPORTED_PACKAGES))
    if not args.schemas_only:
        digest = hashlib.sha256(wasm.read_bytes()).hexdigest()
        print(f"filter:  {wasm} (sha256 {digest[:16]}...), {args.envoy}")
    docs = load_docs(manifest_files(args.paths))
    for d in docs:
        if not d.errors:
            resolve(d)

    DEPS.mkdir(parents=True, exist_ok=True)
    passed = failed = 0
    no_schema = []
    with tempfile.TemporaryDirectory(prefix="check-", dir=DEPS) as tmp:
        work = Path(tmp)
        run_validators(docs, work)
        run_tsc(docs, work)
        for d in docs:
            if d.errors and not d.module:
                failed += 1
                print(f"FAIL   manifest {d.label}")
                for e in d.errors:
                    print(f"         {e}")
                continue
            if not d.module:
                no_schema.append(d)
                print(f"NO SCHEMA !!! {d.label} {d.title}: NOT CHECKED: {d.reason}")
                continue
            if report("manifest", f"{d.label} {d.title}", d.errors):
                passed += 1
            else:
                failed += 1

        if not args.schemas_only:
            configs, skipped = filter_configs(docs)
            added = patch_clusters(docs)
            for line in skipped:
                print(f"skip   config   {line}")
            for n, fc in enumerate(configs):
                check_config(fc, wasm, args.envoy, added, work, n)
                label = f"{fc.doc.label} {fc.doc.data.get('kind')} {fc.what}"
                notes = "; ".join([fc.built_as, *fc.notes])
                ok_text = f"{label}: on_configure accepted it ({notes})"
                if report("config  ", f"{label} ({notes})", fc.errors, ok_text):
                    passed += 1
                else:
                    failed += 1

    if no_schema:
        print(f"NO SCHEMA !!! {len(no_schema)} document(s) NOT CHECKED against any schema: "
              + ", ".join(d.label for d in no_schema))
        if args.require_schemas:
            failed += len(no_schema)
    print(f"check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
