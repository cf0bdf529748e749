#!/usr/bin/env bash
# Fuzz every core parser for a bounded time each (not in CI): fuzz/run.sh [seconds-per-target] [target...]
#
# One libFuzzer job at a time. New inputs go to the git-ignored fuzz/.corpus/<target>/; the
# checked-in seeds in fuzz/corpus/<target>/ are read too. A finding stops that target, lands in
# fuzz/artifacts/<target>/ and makes the script fail after the other targets ran; libFuzzer's
# output is in fuzz/.logs/<target>.log. The table of
# executions is printed and kept in fuzz/.last-run.txt.
#
# Environment: FUZZ_SANITIZER (default none: the core forbids unsafe code, and without
# AddressSanitizer a target runs about ten times faster), FUZZ_ARGS (extra libFuzzer flags).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-120}
shift || true
sanitizer=${FUZZ_SANITIZER:-none}

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal

# The workspace's release profile is the .wasm's (fat LTO, one codegen unit, stripped): fuzz
# builds want to compile fast and keep symbols for stack traces.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  CARGO_PROFILE_RELEASE_STRIP=false

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Longest input per target: enough for every structure the target builds, short enough to keep
# executions fast.
max_len() {
  case $1 in
    authorization) echo 2600 ;;
    config) echo 2048 ;;
    slot | claims) echo 1024 ;;
    *) echo 4096 ;;
  esac
}

cargo +nightly fuzz build -s "$sanitizer"

logs=fuzz/.logs
mkdir -p "$logs"
rows=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/.corpus/$t"
  args=(-max_total_time="$secs" -print_final_stats=1 -max_len="$(max_len "$t")" -timeout=10)
  [ -f "fuzz/dicts/$t.dict" ] && args+=(-dict="fuzz/dicts/$t.dict")
  echo "== $t: ${secs}s" >&2
  status=ok
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  cargo +nightly fuzz run -s "$sanitizer" "$t" "fuzz/.corpus/$t" "fuzz/corpus/$t" -- \
    "${args[@]}" ${FUZZ_ARGS:-} >"$logs/$t.log" 2>&1 || status=FAILED
  if [ "$status" = FAILED ]; then
    failed=1
    grep -E "panicked at|^assertion|Test unit written" "$logs/$t.log" >&2 || tail -20 "$logs/$t.log" >&2
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
  rows+=("$(printf '%-16s %14s %10s  %s' "$t" "${execs:-?}" "${rate:-?}" "$status")")
done

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) ${secs}s per target, sanitizer $sanitizer"
  printf '%-16s %14s %10s  %s\n' target executions exec/s result
  printf '%s\n' "${rows[@]}"
} | tee fuzz/.last-run.txt
exit "$failed"
