#!/usr/bin/env bash
# Makes the pinned Rust toolchain of rust-toolchain.toml complete: installed, with its components
# and its targets (wasm32-wasip1). rustup installs the `targets` of rust-toolchain.toml only when
# it installs the toolchain itself; a machine that already has the pinned version without the
# wasm target would fail with `E0463 can't find crate for core`. Fast when nothing is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
toml="$root/rust-toolchain.toml"

command -v rustup >/dev/null || {
  echo "toolchain: rustup not found; install Rust with rustup (https://rustup.rs)" >&2; exit 1; }

# The values of one `key = [...]` or `key = "..."` line of rust-toolchain.toml, one per line.
values() { sed -n "s/^$1 *= *//p" "$toml" | tr -d '[]",' | tr ' ' '\n' | sed '/^$/d'; }
channel=$(values channel)
[ -n "$channel" ] || { echo "toolchain: no channel in $toml" >&2; exit 1; }
mapfile -t components < <(values components)
mapfile -t targets < <(values targets)

if ! rustup toolchain list | grep -q "^$channel-"; then
  echo "toolchain: installing Rust $channel"
  # --no-self-update: rustup would otherwise replace itself with the dist server's release, which
  # can be older than the rustup a machine has (seen here: 1.29.0 "updated" to 1.28.2).
  rustup toolchain install "$channel" --profile minimal --no-self-update
fi
installed=$(rustup component list --installed --toolchain "$channel")
for c in "${components[@]}"; do
  grep -q "^$c\(-\|$\)" <<<"$installed" || {
    echo "toolchain: adding component $c to $channel"; rustup component add --toolchain "$channel" "$c"; }
done
installed=$(rustup target list --installed --toolchain "$channel")
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || {
    echo "toolchain: adding target $t to $channel"; rustup target add --toolchain "$channel" "$t"; }
done
