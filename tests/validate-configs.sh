#!/usr/bin/env bash
# `envoy --mode validate` on every Envoy config the project ships. Validation loads the .wasm
# and runs its on_configure, so a bad filter configuration fails here too.
set -euo pipefail
envoy=$1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# CARGO_TARGET_DIR as the justfile exports it (absolute), else target/ at the root.
wasm="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")/dist/split_token_filter.wasm"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for config in envoy/envoy.yaml envoy/compose/envoy.yaml envoy/examples/*.yaml; do
  [ -f "$config" ] || continue
  # Configs meant for containers name the .wasm by its in-container path, envoy/envoy.yaml by
  # its path under the default target directory.
  sed -e "s#/etc/envoy/split_token_filter.wasm#$wasm#" \
      -e "s#filename: target/dist/split_token_filter.wasm#filename: $wasm#" \
      "$config" > "$tmp/config.yaml"
  if "$envoy" --mode validate -c "$tmp/config.yaml" -l error > "$tmp/out" 2>&1; then
    echo "validate: $config OK"
  else
    cat "$tmp/out" >&2
    echo "validate: $config FAILED" >&2
    exit 1
  fi
done
