# split-token: build, demo, test. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".deps/venv"
envoy := venv / "bin/envoy"
# Cargo's target directory, as cargo resolves it: CARGO_TARGET_DIR when set, else target/.
# Exported as an absolute path, so cargo and the Python tests agree on where the .wasm is.
export CARGO_TARGET_DIR := absolute_path(env("CARGO_TARGET_DIR", "target"))
wasm := CARGO_TARGET_DIR / "wasm32-wasip1/release/split_token_filter.wasm"

default:
    @just --list

# Install the pinned demo/test parts into .deps/ (Envoy 1.40.0, oauth2-mock-server 7.2.1, httpbin, etcd 3.4.23)
deps:
    tests/deps.sh

# The pinned Rust toolchain of rust-toolchain.toml, with its components and the wasm32-wasip1 target
toolchain:
    tests/toolchain.sh

# Build the release .wasm (the plain cargo command: the workspace's default members are the filter)
build: toolchain
    cargo build --release --target wasm32-wasip1
    @ls -l {{wasm}} | awk '{print "built {{wasm}} (" $5 " bytes)"}'

# The .wasm with fault injection, for the VM-failure tests only: never ship it
build-fault: toolchain
    cargo build --profile fault --target wasm32-wasip1 -p split-token-filter --features fault-injection

# Run the Tyk-style walkthrough: IdP, httpbin and Envoy on loopback; Ctrl-C stops them
demo: deps build
    {{venv}}/bin/python tests/stack.py demo

# Formatting, clippy (native and wasm) and `envoy --mode validate` on every shipped config
lint: deps build
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --target wasm32-wasip1 -p split-token-filter -- -D warnings
    tests/validate-configs.sh {{envoy}}

# Unit tests of the host-free core (plain cargo test)
unit: toolchain
    cargo test --workspace

# End-to-end tests against real Envoy, IdP and httpbin; extra args go to pytest
e2e *args: deps build build-fault
    {{venv}}/bin/pytest tests/e2e {{args}}

# Everything CI runs (the benchmark smoke run checks the bench still works, not its numbers)
test: lint unit (bench "--quick") e2e

# Hot-path cost of claim projection: token hits with 0 vs 3 claim headers (h2load, medians)
bench-claims *args: deps build bench-deps
    {{venv}}/bin/python tests/bench/claims_cost.py {{args}}

# Load tools from Debian (h2load, wrk) for the benchmarks
bench-deps:
    command -v h2load >/dev/null && command -v wrk >/dev/null || \
      (apt-get update -qq && apt-get install -y -qq nghttp2-client wrk >/dev/null)

# Throughput vs bare Envoy and jwt_authn, store scale and churn, the etcd tier across replicas -> docs/benchmarks.md (--quick: smoke run)
bench *args: deps build bench-deps
    #!/usr/bin/env bash
    set -euo pipefail
    quick=""; [[ " {{args}} " == *" --quick "* ]] && quick="--quick"
    mkdir -p .run/bench
    {{venv}}/bin/python tests/bench/bench.py $quick --json .run/bench/throughput.json
    {{venv}}/bin/python tests/bench/scale.py $quick --json .run/bench/scale.json
    {{venv}}/bin/python tests/bench/replicas.py $quick --json .run/bench/replicas.json
    if [ -z "$quick" ]; then
      {{venv}}/bin/python tests/bench/report.py .run/bench/throughput.json .run/bench/scale.json \
        .run/bench/replicas.json
    fi

# Fuzz every core parser for a bounded time each (not in CI): just fuzz [seconds-per-target] [target...]
fuzz *args:
    fuzz/run.sh {{args}}
