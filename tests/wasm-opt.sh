#!/usr/bin/env bash
# The shipped module: cargo's release .wasm run through wasm-opt (binaryen, pinned, from npm into
# .deps/binaryen). Usage: tests/wasm-opt.sh IN.wasm OUT.wasm
#
# Why a separate file: cargo re-links its output on every build, and wasm-opt run on its own
# output changes it again. Why these flags: rustc's wasm32-wasip1 output uses these features and
# the stripped module no longer lists them; naming just these keeps wasm-opt from introducing
# others. -O3, not -Oz: the hot path keeps its speed (dependencies off the hot path are already
# compiled for size, see Cargo.toml).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=132.0.0
dir="$root/.deps/binaryen"
if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$version" ]; then
  echo "deps: binaryen@$version (wasm-opt) -> .deps/binaryen"
  rm -rf "$dir"
  npm install --silent --no-audit --no-fund --prefix "$dir" "binaryen@$version"
  echo "$version" > "$dir/.stamp"
fi
mkdir -p "$(dirname "$2")"
# cargo relinks its output on every build: optimize only when its bytes changed.
source_hash=$(sha256sum "$1" | cut -d' ' -f1)
[ -f "$2" ] && [ "$(cat "$2.source-sha256" 2>/dev/null)" = "$source_hash" ] && exit 0
"$dir/node_modules/binaryen/bin/wasm-opt" --enable-bulk-memory --enable-bulk-memory-opt \
  --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
  -O3 --strip-debug --strip-producers "$1" -o "$2.tmp"
mv "$2.tmp" "$2"
echo "$source_hash" > "$2.source-sha256"
