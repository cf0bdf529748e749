#!/usr/bin/env python3
"""Checks the Kubernetes manifests under envoy/istio/, envoy/gateway/ and envoy/gateway/native/,
and the split-token configuration inside them.

    .deps/venv/bin/python tests/manifests/check.py [--require-schemas] [--schemas-only] [PATH ...]

PATH (files or directories, default envoy/istio envoy/gateway envoy/gateway/native) are read as
multi-document YAML.

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
   Envoy Gateway v1.8 fields the packages do not have (dynamic modules: EnvoyProxy
   spec.dynamicModules, EnvoyExtensionPolicy spec.dynamicModule, and v1.8's filterOrder values)
   are checked against envoy-gateway-v1.8.schema.json beside this file, written from Envoy
   Gateway's v1.8 API (types, bounds, patterns, enums, unknown fields, and the CEL rules of a
   module's source). A document that uses a v1.8-only field has those fields checked there
   only, and the rest against the package; every other document keeps the package's check of
   everything, and its filterOrder is checked against v1.8 too.
2. Every split-token filter configuration (WasmPlugin spec.pluginConfig, EnvoyExtensionPolicy
   spec.wasm[].config and spec.dynamicModule[].config, EnvoyFilter configuration.value) by the
   filter's own parser: a minimal Envoy config with the built .wasm, the Envoy Wasm filter set
   up as that control plane sets it up (Istio: empty vm_id and failure_policy from
   failStrategy; Envoy Gateway: its vm_id and fail_open; EnvoyFilter: its own PluginConfig), or
   with the built libsplit_token_native.so in the dynamic-module filter that Envoy Gateway
   builds from the policy's entry and the EnvoyProxy's dynamicModules entry it names (the
   module path or URL replaced by the local build), and clusters named as the configuration's
   verify.jwks_cluster and etcd.cluster (a cluster that an EnvoyPatchPolicy among the checked
   manifests adds is used as written, its TLS files replaced by a throwaway certificate; the
   others are static stand-ins),
   run through `envoy --mode validate`, which loads the module and runs its configuration hook.
3. Variants: envoy/gateway/native/ replaces envoy/gateway/'s EnvoyProxy and
   EnvoyExtensionPolicy and keeps the rest; a resource that both define (the Gateway, its
   ClientTrafficPolicy) must be the same in both.

A policy's Gateway and EnvoyProxy are looked up in its own directory first, then in the
directories above it (envoy/gateway/native/ uses envoy/gateway/'s routes and etcd cluster).
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
DEFAULT_PATHS = ["envoy/istio", "envoy/gateway", "envoy/gateway/native"]
ENVOY = ROOT / ".deps" / "venv" / "bin" / "envoy"

# Model packages by API group. Anything else is looked up in kubernetes-models.
PACKAGES = {
    "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
    "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
}
ISTIO_PACKAGE = "@kubernetes-models/istio"
# Envoy Gateway v1.8 fields the model package does not know (see the docstring).
EG_V18_SCHEMA = HERE / "envoy-gateway-v1.8.schema.json"
CORE_PACKAGE = "kubernetes-models"
REPORTED_PACKAGES = [ISTIO_PACKAGE, *PACKAGES.values(), CORE_PACKAGE, "typescript"]

# Strategic merge patches (no apiVersion/kind), checked as partial objects of their target.
PATCHES = {
    "envoy/istio/gateway-volume-patch.yaml": ("apps/v1", "Deployment"),
}

ROOT_ID = "split-token"
WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
DYNAMIC_MODULE_FILTER = ("type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                         "DynamicModuleFilter")
# Resources envoy/gateway/native/ defines differently from envoy/gateway/ on purpose.
VARIANT_KINDS = {"EnvoyProxy", "EnvoyExtensionPolicy"}
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
    checked: object = None  # what the model packages check: data without the v1.8-only fields
    overlays: list[str] = field(default_factory=list)  # fields checked against EG v1.8

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
    if not doc.partial:
        apply_overlays(doc, f"{api_version}/{kind}")


def load_overlays() -> dict:
    return json.loads(EG_V18_SCHEMA.read_text(encoding="utf-8"))


def field_at(data: dict, dotted: str):
    """(parent, key) of a dotted path such as spec.dynamicModules, or None when absent."""
    *parents, key = dotted.split(".")
    node = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return (node, key) if isinstance(node, dict) and key in node else None


def apply_overlays(doc: Doc, kind_key: str) -> None:
    """Checks the fields Envoy Gateway v1.8 added against the vendored v1.8 schema, and takes
    them out of what the model package checks when the document needs v1.8."""
    from jsonschema import Draft202012Validator

    vendored = load_overlays()
    overlays = vendored["overlays"].get(kind_key)
    if not overlays:
        return
    needs_v18 = any(field_at(doc.data, f) for f in vendored["v1.8-only"] if f in overlays)
    checked = copy.deepcopy(doc.data)
    for dotted, schema in overlays.items():
        found = field_at(doc.data, dotted)
        if not found:
            continue
        parent, key = found
        validator = Draft202012Validator({"$schema": vendored["$schema"],
                                          "$defs": vendored["$defs"], **schema})
        where = "/" + dotted.replace(".", "/")
        for e in sorted(validator.iter_errors(parent[key]), key=lambda e: list(e.absolute_path)):
            path = "/".join(str(p) for p in e.absolute_path)
            doc.errors.append(f"schema (EG v1.8): {where}{'/' + path if path else ''}: {e.message}")
        doc.overlays.append(dotted)
        if needs_v18:
            checked_parent, _ = field_at(checked, dotted)
            del checked_parent[key]
    if needs_v18:
        doc.checked = checked


# ---- schema checks ---------------------------------------------------------------------------

def run_validators(docs: list[Doc], work: Path) -> None:
    items = [{"id": i, "module": d.module, "kind": d.kind,
              "doc": d.data if d.checked is None else d.checked}
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
            ts_lines(d.data if d.checked is None else d.checked, [], 1, body, any_scalars)
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
        # tsc names the file relative to its working directory, which .deps/ behind a symlink
        # (a git worktree sharing another checkout's .deps/) turns into a longer path.
        m = re.match(r"^(?:.*/)?check\.ts\((\d+),(\d+)\): error (TS\d+): (.*)$", line)
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
    # The dynamic-module filter (typed_config) Envoy Gateway builds, for the native build; its
    # module is replaced by the local build when checked.
    dynamic_module: dict | None = None


def string_value(config) -> dict:
    text = "" if config is None else json.dumps(config)
    return {"@type": STRING_VALUE, "value": text}


def eg_json(config) -> str:
    """A policy's config as Envoy Gateway passes it on: the raw JSON it gets from the API
    server, which serializes custom resources compactly with sorted keys."""
    return json.dumps(config, separators=(",", ":"), sort_keys=True)


def eg_dynamic_module_filter(entry: dict, dm: dict) -> dict:
    """The DynamicModuleFilter Envoy Gateway v1.8 builds from an EnvoyExtensionPolicy
    dynamicModule[] entry and the EnvoyProxy dynamicModules[] entry it names
    (internal/gatewayapi/envoyextensionpolicy.go buildDynamicModules,
    internal/xds/translator/dynamicmodule.go dynamicModuleConfig): the module by path (Local) or
    URL and sha256 (Remote), do_not_close and load_globally from the EnvoyProxy entry,
    filter_name (empty by default), terminal_filter, and config as a StringValue. Fields at
    their protobuf default are left out, as on the wire."""
    source = entry.get("source") or {}
    if (source.get("type") or "Local") == "Remote":
        remote = source.get("remote") or {}
        module = {"remote": {"http_uri": {"uri": remote.get("url")}, "sha256": remote.get("sha256")}}
    else:
        module = {"local": {"filename": (source.get("local") or {}).get("path")}}
    config = {"module": module}
    for ours, envoys in (("doNotClose", "do_not_close"), ("loadGlobally", "load_globally")):
        if entry.get(ours) is True:
            config[envoys] = True
    typed = {"@type": DYNAMIC_MODULE_FILTER, "dynamic_module_config": config}
    if dm.get("filterName"):
        typed["filter_name"] = dm["filterName"]
    if dm.get("terminalFilter") is True:
        typed["terminal_filter"] = True
    if dm.get("config") is not None:
        typed["filter_config"] = {"@type": STRING_VALUE, "value": eg_json(dm["config"])}
    return typed


def meta_of(doc: Doc) -> tuple[str, str, str]:
    data = doc.data if isinstance(doc.data, dict) else {}
    meta = data.get("metadata") or {}
    return str(data.get("kind", "")), meta.get("namespace", "default"), meta.get("name", "")


def nearest(docs: list[Doc], near: Doc, kind: str, ns: str, name: str) -> Doc | None:
    """The document of that kind, namespace and name that `near` is deployed with: from its
    own directory, else from the nearest directory above it (never a sibling's)."""
    here = Path(near.file).parent
    best = None
    for d in docs:
        if meta_of(d) != (kind, ns, name):
            continue
        there = Path(d.file).parent
        if here == there or here.is_relative_to(there):
            depth = len(here.parts) - len(there.parts)
            if best is None or depth < best[0]:
                best = (depth, d)
    return best[1] if best else None


def policy_envoy_proxies(docs: list[Doc], policy: Doc) -> tuple[list[Doc], list[str]]:
    """The EnvoyProxy documents of the Gateways a policy targets (Gateway
    spec.infrastructure.parametersRef), and what could not be found."""
    _, ns, _ = meta_of(policy)
    spec = policy.data.get("spec") or {}
    refs = list(spec.get("targetRefs") or []) + ([spec["targetRef"]] if spec.get("targetRef") else [])
    proxies, missing = [], []
    for ref in refs:
        if ref.get("kind") != "Gateway":
            missing.append(f"target {ref.get('kind')} {ref.get('name')}: only Gateway targets "
                           "are followed to an EnvoyProxy here")
            continue
        gateway = nearest(docs, policy, "Gateway", ns, ref.get("name", ""))
        params = ((gateway.data.get("spec") or {}).get("infrastructure") or {}).get(
            "parametersRef") or {} if gateway else {}
        if not gateway or params.get("kind") != "EnvoyProxy":
            missing.append(f"Gateway {ns}/{ref.get('name')} with an EnvoyProxy parametersRef: "
                           "not among the checked manifests")
            continue
        proxy = nearest(docs, gateway, "EnvoyProxy", ns, params.get("name", ""))
        if proxy is None:
            missing.append(f"EnvoyProxy {ns}/{params.get('name')}: not among the checked manifests")
        elif proxy not in proxies:
            proxies.append(proxy)
    return proxies, missing


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
            modules = spec.get("dynamicModule") or []
            proxies, missing = policy_envoy_proxies(docs, d) if modules else ([], [])
            for i, dm in enumerate(modules):
                what = f"spec.dynamicModule[{i}].config"
                if not proxies:
                    fc = FilterConfig(d, what, None, dm.get("config"), "as Envoy Gateway builds it")
                    fc.errors += missing or ["no EnvoyProxy found for the policy's targets"]
                    found.append(fc)
                for proxy in proxies:
                    registry = {e.get("name"): e for e in
                                (proxy.data.get("spec") or {}).get("dynamicModules") or []}
                    entry = registry.get(dm.get("name"))
                    # Envoy Gateway's HTTP filter name for it (perRouteFilterName).
                    filter_name = (f"envoy.filters.http.dynamic_modules/envoyextensionpolicy/"
                                   f"{ns}/{name}/dynamic-module/{i}")
                    fc = FilterConfig(d, what, None, dm.get("config"),
                                      f"as Envoy Gateway builds it: {filter_name}, module "
                                      f"{dm.get('name')!r} of EnvoyProxy {proxy.label}")
                    if entry is None:
                        # Envoy Gateway refuses the policy (buildDynamicModules).
                        fc.errors.append(f"dynamic module {dm.get('name')!r} is not registered in "
                                         f"the dynamicModules allowlist of EnvoyProxy {proxy.label}")
                    else:
                        fc.dynamic_module = eg_dynamic_module_filter(entry, dm)
                        module = fc.dynamic_module["dynamic_module_config"]["module"]
                        source = module.get("local", {}).get("filename") or (
                            module["remote"]["http_uri"]["uri"])
                        fc.notes.append(f"{source} replaced by the local build")
                    found.append(fc)
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


def variant_errors(docs: list[Doc]) -> list[str]:
    """A resource that two directories define (envoy/gateway/ and envoy/gateway/native/) must be
    the same in both, unless its kind is one the variants exist to differ in."""
    errors, first = [], {}
    for d in docs:
        if not isinstance(d.data, dict) or "kind" not in d.data:
            continue
        key = (d.data.get("apiVersion"), *meta_of(d))
        if key not in first:
            first[key] = d
        elif d.data.get("kind") not in VARIANT_KINDS and d.data != first[key].data:
            errors.append(f"{d.label} {d.title} differs from {first[key].label}: only "
                          f"{' and '.join(sorted(VARIANT_KINDS))} may differ between variants")
    return errors


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


def check_config(fc: FilterConfig, wasm: Path, native: Path, envoy: Path, added: dict,
                 work: Path, n: int) -> None:
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
    if fc.dynamic_module is not None:
        if not native.is_file():
            fc.errors.append(f"the native build is not at {native} (just build-native)")
            return
        typed = copy.deepcopy(fc.dynamic_module)
        typed["dynamic_module_config"]["module"] = {"local": {"filename": str(native)}}
    else:
        plugin = copy.deepcopy(fc.plugin)
        plugin.setdefault("vm_config", {})["code"] = {"local": {"filename": str(wasm)}}
        typed = {"@type": WASM_FILTER, "config": plugin}
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
                        {"name": "split-token", "typed_config": typed},
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

def target_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    if not target.is_absolute():
        target = ROOT / target
    return target.resolve()


def default_wasm() -> Path:
    return target_dir() / "dist" / "split_token_filter.wasm"


def default_native() -> Path:
    return target_dir() / "native" / "libsplit_token_native.so"


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
                        help="manifest files or directories (default: envoy/istio envoy/gateway "
                             "envoy/gateway/native)")
    parser.add_argument("--require-schemas", action="store_true",
                        help="fail on documents that no schema covers")
    parser.add_argument("--schemas-only", action="store_true",
                        help="skip the filter configurations (no .wasm, no Envoy needed)")
    parser.add_argument("--envoy", type=Path, default=ENVOY)
    parser.add_argument("--wasm", type=Path, default=None,
                        help="the built filter (default: $CARGO_TARGET_DIR or target/, "
                             "dist/split_token_filter.wasm)")
    parser.add_argument("--native", type=Path, default=None,
                        help="the built dynamic module (default: $CARGO_TARGET_DIR or target/, "
                             "native/libsplit_token_native.so)")
    args = parser.parse_args()

    if not (NODE_MODULES / ".bin" / "tsc").exists():
        sys.exit(f"check: {rel(DEPS)} is not installed: run tests/deps.sh (just deps)")
    wasm = args.wasm or default_wasm()
    native = args.native or default_native()
    if not args.schemas_only:
        for what, path in (("Envoy", args.envoy), ("the filter's .wasm", wasm)):
            if not path.is_file():
                sys.exit(f"check: {what} not found at {path} (just deps / just build, "
                         "or --schemas-only)")

    print("schemas: " + ", ".join(f"{p} {version_of(p)}" for p in REPORTED_PACKAGES)
          + f", Envoy Gateway v1.8 fields from {rel(EG_V18_SCHEMA)}")
    if not args.schemas_only:
        digest = hashlib.sha256(wasm.read_bytes()).hexdigest()
        print(f"filter:  {wasm} (sha256 {digest[:16]}...), {args.envoy}")
        if native.is_file():
            digest = hashlib.sha256(native.read_bytes()).hexdigest()
            print(f"native:  {native} (sha256 {digest[:16]}...)")
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
            v18 = f" [{', '.join(d.overlays)}: EG v1.8]" if d.overlays else ""
            if report("manifest", f"{d.label} {d.title}{v18}", d.errors):
                passed += 1
            else:
                failed += 1
        for line in variant_errors(docs):
            failed += 1
            print(f"FAIL   variant  {line}")

        if not args.schemas_only:
            configs, skipped = filter_configs(docs)
            added = patch_clusters(docs)
            for line in skipped:
                print(f"skip   config   {line}")
            for n, fc in enumerate(configs):
                check_config(fc, wasm, native, args.envoy, added, work, n)
                label = f"{fc.doc.label} {fc.doc.data.get('kind')} {fc.what}"
                notes = "; ".join([fc.built_as, *fc.notes])
                hook = "on_configure" if fc.dynamic_module is None else "its config hook"
                ok_text = f"{label}: {hook} accepted it ({notes})"
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
