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
# The native build's configs (issue 15): Envoy loads libsplit_token_native.so from the search
# path and runs its config hook, so a bad filter configuration fails here too. Configs meant for
# containers name the module by its name only, as the demo does: the local build is on the search
# path here. Built by `just build-native`; skipped (said so) when it is not.
native_dir="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")/native"
for config in envoy/native/envoy.yaml envoy/compose-native/envoy.yaml; do
  if [ ! -f "$native_dir/libsplit_token_native.so" ]; then
    echo "validate: $config skipped ($native_dir/libsplit_token_native.so not built)"
  elif ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$native_dir" "$envoy" --mode validate \
      -c "$config" -l error > "$tmp/out" 2>&1; then
    echo "validate: $config OK"
  else
    cat "$tmp/out" >&2
    echo "validate: $config FAILED" >&2
    exit 1
  fi
done
