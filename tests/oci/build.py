#!/usr/bin/env python3
"""Packs the filter's .wasm as the two OCI images that Istio's and Envoy Gateway's image fetcher
accept, as OCI image layouts on disk (no Docker, no registry): `build.py WASM OUT_DIR [--tag TAG]`.

OUT_DIR/artifact/  the Wasm OCI artifact ("oci" variant of the solo-io Wasm image spec): a manifest
                   with exactly two layers, the runtime config
                   (application/vnd.module.wasm.config.v1+json) and the raw module
                   (application/vnd.module.wasm.content.layer.v1+wasm). The fetcher takes the
                   layer of that second type as the module, byte for byte. The manifest's config is
                   the same runtime-config blob, with the same media type.
OUT_DIR/compat/    the "compat" image, which standard image tools can handle: one
                   application/vnd.oci.image.layer.v1.tar+gzip layer, a tar holding `plugin.wasm`
                   at its root, an OCI image config (rootfs.diff_ids = sha256 of the uncompressed
                   tar) and the annotation module.wasm.image/variant=compat. The fetcher takes the
                   last layer and the first tar entry named plugin.wasm in any directory; one
                   layer with the file at the root suits every version of it and the spec.

Each layout is `oci-layout`, `index.json` (its one manifest tagged TAG by
org.opencontainers.image.ref.name) and `blobs/sha256/<hex>`. The output is reproducible: tar
entries have mtime 0, uid/gid 0 and mode 0644, gzip's header has mtime 0 and no file name, JSON
is written compactly in a fixed key order, and nothing records the time or the machine. So the
same .wasm gives the same digests (the gzip layer's bytes depend on the deflate of the zlib that
Python links, which does not change within a machine's Python).

Push a layout as it is (the manifest bytes unchanged, so its digest too), e.g. with oras-py's
`oras.layout.Layout(dir).push_to_registry(...)`, `oras cp --from-oci-layout`, `skopeo copy
oci:DIR:TAG docker://...` or `crane push DIR`. Stdlib only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_CONTENT = "application/vnd.module.wasm.content.layer.v1+wasm"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"

MODULE_NAME = "plugin.wasm"  # the name the compat variant requires; the artifact's title too
RUNTIME_CONFIG_NAME = "runtime-config.json"
ROOT_ID = "split-token"  # the root_id the shipped Envoy configs give the filter


def canonical_json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout being written: blobs by digest, then index.json."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            # Stale blobs of an older module would stay otherwise; but never wipe a directory
            # that is not one of these layouts.
            if any(path.iterdir()) and not (path / "oci-layout").is_file():
                sys.exit(f"build.py: {path} exists and is not an OCI layout; not replacing it")
            shutil.rmtree(path)
        (path / "blobs" / "sha256").mkdir(parents=True)

    def blob(self, data: bytes, media_type: str, annotations: dict | None = None) -> dict:
        """Stores `data` and returns its descriptor."""
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        descriptor = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor

    def finish(self, manifest: dict, tag: str) -> tuple[dict, bytes]:
        """Stores the manifest, tags it in index.json; returns its descriptor and bytes."""
        data = canonical_json(manifest)
        descriptor = self.blob(data, MANIFEST, {REF_NAME: tag})
        # Not blobs, so not content-addressed: ended by a newline like any text file.
        layout_file = canonical_json({"imageLayoutVersion": "1.0.0"})
        (self.path / "oci-layout").write_bytes(layout_file + b"\n")
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [descriptor]}
        (self.path / "index.json").write_bytes(canonical_json(index) + b"\n")
        return descriptor, data


def runtime_config(module: bytes) -> bytes:
    """The solo-io spec's runtime config: the proxy-wasm ABI versions the module exports."""
    abis = sorted({m.decode() for m in re.findall(rb"proxy_abi_version_\d+_\d+_\d+", module)})
    return canonical_json({"type": "envoy_proxy", "abiVersions": abis,
                           "config": {"rootIds": [ROOT_ID]}})


def plugin_tar(module: bytes) -> bytes:
    """A tar of one regular file, plugin.wasm, with nothing that varies between builds."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(MODULE_NAME)
        info.size = len(module)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(module))
    return out.getvalue()


def build_artifact(path: Path, module: bytes, tag: str) -> tuple[dict, bytes, dict]:
    layout = Layout(path)
    config = runtime_config(module)
    config_descriptor = layout.blob(config, WASM_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_descriptor,
        "layers": [
            layout.blob(config, WASM_CONFIG, {TITLE: RUNTIME_CONFIG_NAME}),
            layout.blob(module, WASM_CONTENT, {TITLE: MODULE_NAME}),
        ],
    }
    descriptor, data = layout.finish(manifest, tag)
    return descriptor, data, manifest


def build_compat(path: Path, module: bytes, tag: str) -> tuple[dict, bytes, dict]:
    layout = Layout(path)
    tar = plugin_tar(module)
    layer = gzip.compress(tar, compresslevel=9, mtime=0)
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": layout.blob(canonical_json(config), IMAGE_CONFIG),
        "layers": [layout.blob(layer, TAR_GZIP, {TITLE: "plugin.tar.gz"})],
        "annotations": {"module.wasm.image/variant": "compat"},
    }
    descriptor, data = layout.finish(manifest, tag)
    return descriptor, data, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wasm", type=Path, help="the .wasm module")
    parser.add_argument("out_dir", type=Path, help="writes OUT_DIR/artifact and OUT_DIR/compat")
    parser.add_argument("--tag", default="latest", help="the tag in index.json (default: latest)")
    args = parser.parse_args(argv)
    module = args.wasm.read_bytes()
    if module[:8] != b"\0asm\x01\0\0\0":
        sys.exit(f"build.py: {args.wasm} is not a WebAssembly binary module")
    print(f"module {args.wasm}: {sha256(module)} ({len(module)} bytes)")
    for name, build in (("artifact", build_artifact), ("compat", build_compat)):
        path = args.out_dir / name
        descriptor, _, manifest = build(path, module, args.tag)
        print(f"{name} {path} tag {args.tag}: manifest {descriptor['digest']} "
              f"({descriptor['size']} bytes)")
        roles = [("config", manifest["config"])] + [("layer", d) for d in manifest["layers"]]
        for role, d in roles:
            print(f"  {role:6} {d['mediaType']} {d['digest']} ({d['size']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
