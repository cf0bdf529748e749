"""`just oci`'s two images, for real: tests/oci/build.py writes the Wasm OCI artifact and the
"compat" image as OCI layouts, oras-py pushes them to a real registry (the CNCF distribution
registry, Debian's docker-registry) and pulls them back, their digests, sizes and media types
are checked against the bytes the registry serves and against the rules of Istio's and Envoy
Gateway's image fetcher, and a real Envoy loads the module straight from the registry as a
remote `http_uri` with its sha256 (as Envoy Gateway hands an HTTP code source to Envoy), and
refuses it under a wrong sha256."""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import io
import json
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import oras.layout
import oras.provider
import pytest

import conftest
import stack
from helpers import forwarded_authorization, free_port

# The images carry the .wasm: an OCI image is how Istio's WasmPlugin and Envoy Gateway's
# EnvoyExtensionPolicy fetch a Wasm module. The dynamic module has none: it is a file on the
# proxy's disk (Envoy Gateway: EnvoyProxy.spec.dynamicModules, a path or URL with its sha256).
pytestmark = pytest.mark.skipif(
    stack.HOST == "native",
    reason="OCI images carry the Wasm build only; the native module is deployed as a file")

BUILD = stack.ROOT / "tests" / "oci" / "build.py"
REGISTRY_BIN = stack.DEPS / "registry" / "usr" / "bin" / "docker-registry"
TAG = "e2e"
IMAGES = ("artifact", "compat")

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_CONTENT = "application/vnd.module.wasm.content.layer.v1+wasm"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Built:
    module: bytes  # the .wasm as it was when the layouts were built
    out: Path  # OUT_DIR: out/artifact, out/compat
    stdout: str


def run_build(module_path: Path, out: Path) -> str:
    r = subprocess.run([sys.executable, str(BUILD), str(module_path), str(out), "--tag", TAG],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"build.py exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def built(run_dir) -> Built:
    # A copy, so a rebuild of the .wasm while this module runs cannot change what it compares.
    work = run_dir / "oci"
    work.mkdir()
    module_path = work / "split_token_filter.wasm"
    shutil.copyfile(stack.WASM, module_path)
    stdout = run_build(module_path, work / "layouts")
    print(stdout)
    return Built(module_path.read_bytes(), work / "layouts", stdout)


def layout_manifest(layout: Path) -> tuple[str, bytes, dict]:
    """The digest, bytes and parsed form of a layout's one manifest, tagged TAG."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == TAG, entry
    data = layout_blob(layout, entry["digest"])
    got = (entry["mediaType"], entry["size"], entry["digest"])
    assert got == (MANIFEST, len(data), sha256(data)), (entry, len(data), sha256(data))
    return entry["digest"], data, json.loads(data)


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def descriptors(manifest: dict) -> list[dict]:
    return [manifest["config"], *manifest["layers"]]


class Registry:
    def __init__(self, run_dir: Path):
        self.port = free_port()
        root = run_dir / f"registry-{self.port}"
        root.mkdir()
        config = root / "config.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
            # A fixed secret only silences the warning about a generated one.
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "split-token-e2e"},
        }, indent=1))
        self.process = stack.Process("registry", [str(REGISTRY_BIN), "serve", str(config)],
                                     root / "registry.log")
        conftest._procs.append(self.process)  # its log is printed when a test fails
        stack.wait_for("registry", lambda: self.get("/v2/")[0] == 200, proc=self.process.proc)
        self.client = oras.provider.Registry(hostname=self.host, insecure=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(self, path: str, accept: str | None = None) -> tuple[int, dict, bytes]:
        """One plain GET, no oras: what the registry serves."""
        req = urllib.request.Request(f"http://{self.host}{path}",
                                     headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    def stop(self):
        self.process.stop()


@pytest.fixture(scope="module")
def registry(run_dir):
    reg = Registry(run_dir)
    yield reg
    reg.stop()


def repository(name: str) -> str:
    return f"split-token/{name}"


@pytest.fixture(scope="module")
def pulled(built, registry, run_dir) -> dict[str, Path]:
    """Both layouts pushed with oras-py and pulled back into fresh layouts: name -> path."""
    paths = {}
    for name in IMAGES:
        target = f"{registry.host}/{repository(name)}:{TAG}"
        layout = oras.layout.NewLayout(str(built.out / name))
        response = layout.push_to_registry(registry.client, target, tag=TAG)
        assert response.status_code == 201, (response.status_code, response.text)
        paths[name] = run_dir / "oci" / f"pulled-{name}"
        oras.layout.NewLayoutFromRegistry(str(paths[name]), registry.client, target, tag=TAG)
    return paths


def fetcher_extract(manifest: dict, blob) -> tuple[str, bytes]:
    """What Istio's and Envoy Gateway's image fetcher takes as the module, by its rules
    (istio pkg/wasm/imagefetcher.go, internal/wasm/imagefetcher.go in Envoy Gateway): a Docker
    manifest is read as a compat image of Docker layers; otherwise the compat variant is tried
    first (the last layer is tar+gzip and holds a file whose base name is plugin.wasm), then
    the oci variant (exactly two layers, one of the Wasm content type, taken raw). Returns the
    variant and the module; `blob(descriptor)` gives a blob's bytes."""
    assert manifest.get("mediaType") != DOCKER_MANIFEST, "not a Docker manifest"
    layers = manifest["layers"]
    if layers and layers[-1]["mediaType"] == TAR_GZIP:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layers[-1])))) as tar:
            for member in tar:
                if posixpath.basename(member.name) == "plugin.wasm":
                    return "compat", tar.extractfile(member).read()
    if len(layers) == 2:
        for layer in layers:
            if layer["mediaType"] == WASM_CONTENT:
                return "oci", blob(layer)
    raise AssertionError(f"the fetcher takes no module from {json.dumps(manifest)}")


# --- the layouts on disk -------------------------------------------------------------------------

def test_build_prints_the_manifest_digests(built):
    for name in IMAGES:
        digest, data, _ = layout_manifest(built.out / name)
        line = f"{name} {built.out / name} tag {TAG}: manifest {digest} ({len(data)} bytes)"
        assert line in built.stdout.splitlines(), (line, built.stdout)
    assert f"module {built.out.parent / 'split_token_filter.wasm'}: {sha256(built.module)} " \
           f"({len(built.module)} bytes)" in built.stdout, built.stdout


def test_layouts_are_complete_and_every_descriptor_matches_its_blob(built):
    for name in IMAGES:
        layout = built.out / name
        assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
        assert oras.layout.Layout.is_oci_layout(str(layout)), layout
        digest, _, manifest = layout_manifest(layout)
        assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST, manifest
        for d in descriptors(manifest):
            data = layout_blob(layout, d["digest"])
            assert (sha256(data), len(data)) == (d["digest"], d["size"]), (name, d, len(data))
        # Every blob is named by its digest, and none is left over.
        names = {p.name for p in (layout / "blobs" / "sha256").iterdir()}
        for p in (layout / "blobs" / "sha256").iterdir():
            assert sha256(p.read_bytes()) == "sha256:" + p.name, p
        wanted = {d["digest"].removeprefix("sha256:") for d in descriptors(manifest)}
        assert names == wanted | {digest.removeprefix("sha256:")}, (name, names, wanted)


def test_the_same_module_gives_the_same_bytes(built, run_dir):
    again = run_dir / "oci" / "again"
    stdout = run_build(built.out.parent / "split_token_filter.wasm", again)
    assert stdout.replace(str(again), str(built.out)) == built.stdout, (stdout, built.stdout)
    compared = filecmp.dircmp(built.out, again)
    files = []

    def same(c):
        assert not (c.left_only or c.right_only or c.diff_files or c.funny_files), \
            (c.left, c.left_only, c.right_only, c.diff_files)
        files.extend(c.same_files)
        for sub in c.subdirs.values():
            same(sub)
    same(compared)
    # dircmp compares by stat when it can: compare the bytes too.
    for path in built.out.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(built.out)).read_bytes(), path
    assert len(files) == 2 * (2 + 3), files  # each: oci-layout, index.json, 3 blobs


def test_a_non_wasm_file_is_refused(built, run_dir):
    bogus = run_dir / "oci" / "not.wasm"
    bogus.write_bytes(b"#!/bin/sh\n")
    r = subprocess.run([sys.executable, str(BUILD), str(bogus), str(run_dir / "oci" / "bogus")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert "not a WebAssembly binary module" in r.stderr, r.stderr
    assert not (run_dir / "oci" / "bogus").exists()


# --- through the registry ------------------------------------------------------------------------

def test_oras_round_trip_keeps_every_byte(built, pulled):
    for name in IMAGES:
        digest, data, manifest = layout_manifest(pulled[name])
        built_digest, built_data, _ = layout_manifest(built.out / name)
        assert (digest, data) == (built_digest, built_data), (name, digest, built_digest)
        for d in descriptors(manifest):
            blob = layout_blob(pulled[name], d["digest"])
            assert blob == layout_blob(built.out / name, d["digest"]), (name, d, len(blob))


def test_artifact_is_two_layers_config_and_raw_module(built, pulled):
    layout = pulled["artifact"]
    _, _, manifest = layout_manifest(layout)
    types = [layer["mediaType"] for layer in manifest["layers"]]
    assert types == [WASM_CONFIG, WASM_CONTENT], manifest
    config_layer, wasm_layer = manifest["layers"]
    assert layout_blob(layout, wasm_layer["digest"]) == built.module, wasm_layer
    assert wasm_layer["digest"] == sha256(built.module), (wasm_layer, sha256(built.module))
    assert wasm_layer["annotations"]["org.opencontainers.image.title"] == "plugin.wasm", wasm_layer
    runtime = json.loads(layout_blob(layout, config_layer["digest"]))
    assert runtime == {"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"],
                       "config": {"rootIds": ["split-token"]}}, runtime
    assert manifest["config"]["mediaType"] == WASM_CONFIG, manifest["config"]
    assert fetcher_extract(manifest, lambda d: layout_blob(layout, d["digest"])) == \
        ("oci", built.module)


def test_compat_image_is_a_gzip_tar_with_plugin_wasm(built, pulled):
    layout = pulled["compat"]
    _, _, manifest = layout_manifest(layout)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [TAR_GZIP], manifest
    assert manifest["annotations"] == {"module.wasm.image/variant": "compat"}, manifest
    layer = layout_blob(layout, manifest["layers"][-1]["digest"])
    # gzip's header: no name, no comment, no extra field (FLG 0) and MTIME 0.
    assert layer[:3] == b"\x1f\x8b\x08" and layer[3] == 0 and layer[4:8] == bytes(4), layer[:10]
    tar_bytes = gzip.decompress(layer)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        got = [(m.name, m.isreg(), m.mode, m.mtime, m.uid, m.gid) for m in members]
        assert got == [("plugin.wasm", True, 0o644, 0, 0, 0)], got
        assert tar.extractfile(members[0]).read() == built.module
    assert manifest["config"]["mediaType"] == IMAGE_CONFIG, manifest["config"]
    config = json.loads(layout_blob(layout, manifest["config"]["digest"]))
    assert config == {"architecture": "wasm", "os": "wasip1", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes)]}}, config
    assert fetcher_extract(manifest, lambda d: layout_blob(layout, d["digest"])) == \
        ("compat", built.module)


def test_registry_serves_what_the_manifests_say(built, pulled, registry):
    for name in IMAGES:
        built_digest, _, _ = layout_manifest(built.out / name)
        status, headers, data = registry.get(f"/v2/{repository(name)}/manifests/{TAG}", MANIFEST)
        assert status == 200 and headers["content-type"] == MANIFEST, (status, headers)
        assert sha256(data) == headers["docker-content-digest"] == built_digest, \
            (name, sha256(data), headers, built_digest)
        manifest = json.loads(data)
        for d in descriptors(manifest):
            status, headers, blob = registry.get(f"/v2/{repository(name)}/blobs/{d['digest']}")
            assert status == 200, (d, status)
            assert (sha256(blob), len(blob)) == (d["digest"], d["size"]), (name, d, len(blob))
            assert headers["docker-content-digest"] == d["digest"], (d, headers)
        # The fetcher, reading from the registry itself.
        got = fetcher_extract(manifest, lambda d: registry.get(
            f"/v2/{repository(name)}/blobs/{d['digest']}")[2])
        assert got == ({"artifact": "oci", "compat": "compat"}[name], built.module), got[0]


# --- Envoy loading the module from the registry --------------------------------------------------

def from_registry(registry: Registry, digest_hex: str, sha256_hex: str):
    """`customize` for start_gateway: the filter's code from the registry's blob URL of the
    artifact's Wasm layer, checked against `sha256_hex`, instead of the local file."""
    def customize(config):
        code = stack.wasm_filter(config)["vm_config"]["code"]
        del code["local"]
        code["remote"] = {
            "http_uri": {"uri": f"http://{registry.host}/v2/{repository('artifact')}/blobs/"
                                f"sha256:{digest_hex}",
                         "cluster": "oci-registry", "timeout": "10s"},
            "sha256": sha256_hex,
        }
    return customize


def wasm_layer_hex(pulled) -> str:
    _, _, manifest = layout_manifest(pulled["artifact"])
    (layer,) = [layer for layer in manifest["layers"] if layer["mediaType"] == WASM_CONTENT]
    return layer["digest"].removeprefix("sha256:")


def test_envoy_loads_the_module_from_the_registry_and_splits_tokens(built, pulled, registry,
                                                                    start_gateway):
    digest_hex = wasm_layer_hex(pulled)
    module_hex = hashlib.sha256(built.module).hexdigest()
    assert digest_hex == module_hex, (digest_hex, module_hex)
    gw = gateway_from_registry(start_gateway, registry, "envoy-oci", digest_hex, module_hex)
    code = stack.wasm_filter(gw.envoy.config)["vm_config"]["code"]
    assert list(code) == ["remote"], code
    assert fetch_stats(gw) == {"successes": 1, "failures": 0, "registry 200s": 1}
    token = gw.token()
    assert token and "." not in token and re.fullmatch(r"[A-Za-z0-9_-]+", token), token
    r = gw.call(f"Bearer {token}")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    full = forwarded_authorization(r)
    assert full.startswith("Bearer ") and full.endswith("." + token) and full.count(".") == 2, full


def gateway_from_registry(start_gateway, registry, name: str, digest_hex: str, sha256: str,
                          **options):
    """A gateway whose module Envoy fetches from the registry's blob, checked against `sha256`."""
    return start_gateway(name=name, customize=from_registry(registry, digest_hex, sha256),
                         extra_clusters=[stack.static_cluster("oci-registry", registry.port)],
                         **options)


def fetch_stats(gw) -> dict[str, int]:
    """How Envoy's remote fetch of the module went, and what the registry answered."""
    stats = gw.stats()
    return {"successes": stats.get("wasm.remote_load_fetch_successes", 0),
            "failures": stats.get("wasm.remote_load_fetch_failures", 0),
            "registry 200s": stats.get("cluster.oci-registry.upstream_rq_200", 0)}


def test_envoy_refuses_the_module_under_a_wrong_sha256(built, pulled, registry, start_gateway):
    digest_hex = wasm_layer_hex(pulled)
    wrong = ("1" if digest_hex[0] == "0" else "0") + digest_hex[1:]
    # config:debug makes Envoy say why it refused the fetched bytes.
    gw = gateway_from_registry(start_gateway, registry, "envoy-oci-wrong-sha", digest_hex, wrong,
                               extra_args=["--component-log-level", "config:debug"])
    # Ready means the listener's init is done: the fetch, its one retry, and the verdict.
    stack.wait_for("the plugin's load to fail",
                   lambda: "Plugin split-token failed to load" in gw.envoy.log(), timeout=30)
    log = gw.envoy.log()
    assert "data is invalid" in log and "Retry limit exceeded" in log, log[-3000:]
    # The registry served the module (both tries answered 200); Envoy refused its hash.
    assert fetch_stats(gw) == {"successes": 0, "failures": 1, "registry 200s": 2}
    # Fail closed: with no module nothing passes the filter; nothing reaches the IdP or httpbin.
    token = gw.token_response()
    public = gw.call(path="/public/x")
    assert (token.status_code, public.status_code) == (503, 503), (token.text, public.text)
    stats = gw.stats()
    upstream = {k: stats.get(k, 0) for k in ("cluster.idp.upstream_rq_total",
                                             "cluster.httpbin.upstream_rq_total")}
    assert upstream == {"cluster.idp.upstream_rq_total": 0,
                        "cluster.httpbin.upstream_rq_total": 0}, upstream
