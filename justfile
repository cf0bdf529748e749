# split-token: build, demo, test. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".deps/venv"
envoy := venv / "bin/envoy"
# Cargo's target directory, as cargo resolves it: CARGO_TARGET_DIR when set, else target/.
# Exported as an absolute path, so cargo and the Python tests agree on where the .wasm is.
export CARGO_TARGET_DIR := absolute_path(env("CARGO_TARGET_DIR", "target"))
# The shipped module: cargo's release .wasm after wasm-opt (tests/wasm-opt.sh).
cargo_wasm := CARGO_TARGET_DIR / "wasm32-wasip1/release/split_token_filter.wasm"
wasm := CARGO_TARGET_DIR / "dist/split_token_filter.wasm"
# The native build (issue 15): an Envoy dynamic module, found through ENVOY_DYNAMIC_MODULES_SEARCH_PATH
native := CARGO_TARGET_DIR / "native/libsplit_token_native.so"
# The shipped module's size limit: it must fit a Kubernetes ConfigMap (1 MiB, binaryData base64)
max_wasm_bytes := "786000"

default:
    @just --list

# Install the pinned demo/test parts into .deps/ (Envoy 1.40.0, oauth2-mock-server 7.2.1, httpbin, etcd 3.4.23)
deps:
    tests/deps.sh

# The pinned Rust toolchain of rust-toolchain.toml, with its components and the wasm32-wasip1 target
toolchain:
    tests/toolchain.sh

# Build the shipped .wasm: the plain cargo command (the workspace's default members are the filter), then wasm-opt
build: toolchain
    cargo build --release --target wasm32-wasip1
    tests/wasm-opt.sh {{cargo_wasm}} {{wasm}}
    @ls -l {{cargo_wasm}} {{wasm}} | awk '{print "built " $9 " (" $5 " bytes)"}'
    @size=$(stat -c %s {{wasm}}); [ "$size" -le {{max_wasm_bytes}} ] || \
      { echo "build: {{wasm}} is $size bytes, over {{max_wasm_bytes}} (a ConfigMap's 1 MiB as base64)" >&2; exit 1; }

# The release .wasm as OCI image layouts for Istio and Envoy Gateway (Wasm artifact, compat image) in $CARGO_TARGET_DIR/oci: just oci [--tag TAG]
oci *args: deps build
    {{venv}}/bin/python tests/oci/build.py {{wasm}} {{CARGO_TARGET_DIR}}/oci {{args}}

# The no-op proxy-wasm filter of the benchmarks (tests/bench/noop), built and optimized like the shipped module
build-noop: toolchain
    cargo build --release --target wasm32-wasip1 -p split-token-bench-noop
    tests/wasm-opt.sh {{CARGO_TARGET_DIR}}/wasm32-wasip1/release/split_token_bench_noop.wasm {{CARGO_TARGET_DIR}}/dist/split_token_bench_noop.wasm

# The no-op dynamic module of the benchmarks (tests/bench/noop-native), built like the native module, next to it
build-noop-native: toolchain
    cargo build --profile native -p split-token-bench-noop-native

# Build the native dynamic module (libsplit_token_native.so, for the pinned Envoy 1.40.0 only): cargo's `native` profile (release, panics unwind to each hook's guard)
build-native: toolchain
    cargo build --profile native -p split-token-native
    @ls -l {{native}} | awk '{print "built " $9 " (" $5 " bytes)"}'

# The .wasm and the native module with fault injection, for the VM-failure and panic tests only: never ship them
build-fault: toolchain
    cargo build --profile fault --target wasm32-wasip1 -p split-token-filter --features fault-injection
    cargo build --profile native-fault -p split-token-native --features fault-injection

# Run the Tyk-style walkthrough: IdP, httpbin and Envoy on loopback; Ctrl-C stops them
demo: deps build
    {{venv}}/bin/python tests/stack.py demo

# Formatting, clippy (native and wasm), `envoy --mode validate` on every shipped config, the Kubernetes manifests against their CRD schemas, the docker-compose files
lint: deps build build-native
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --target wasm32-wasip1 -p split-token-filter -- -D warnings
    tests/validate-configs.sh {{envoy}}
    {{venv}}/bin/python tests/manifests/check.py --require-schemas
    {{venv}}/bin/python tests/compose/check.py

# Unit tests of the host-free core (plain cargo test); the flow's again with tokens in a host's map (the native build's store)
unit: toolchain
    cargo test --workspace
    SPLIT_TOKEN_SIM_STORE=map cargo test -p split-token-core --features host-map --test flow

# The whole suite runs under the .wasm, then again under the native dynamic module (one test
# suite, two builds; tests of a Wasm VM skip there with their reason); then the suites whose
# behaviour depends on it again under the Envoy filter config that Istio's WasmPlugin and Envoy
# Gateway's EnvoyExtensionPolicy generate (no allow_on_headers_stop_iteration).
# End-to-end tests against real Envoy, IdP and httpbin, under both builds (extra args go to pytest)
e2e *args: deps build build-native build-fault
    #!/usr/bin/env bash
    set -euo pipefail
    {{venv}}/bin/pytest tests/e2e {{args}}
    echo "e2e: again under the native build (--host native)"
    status=0
    {{venv}}/bin/pytest --host native tests/e2e {{args}} || status=$?
    # 5: extra args (say -k) selected none of these tests
    [ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"
    for shape in istio envoy-gateway; do
      echo "e2e: again as $shape generates the filter config"
      status=0
      {{venv}}/bin/pytest --shape "$shape" tests/e2e/test_issuance.py tests/e2e/test_rejections.py \
        tests/e2e/test_fail_closed.py tests/e2e/test_identity.py tests/e2e/test_lifecycle.py \
        tests/e2e/test_replicas.py tests/e2e/test_corpus.py tests/e2e/test_monitoring.py \
        {{args}} || status=$?
      # 5: extra args (say -k) selected none of these suites
      [ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"
    done

# Everything CI runs (the benchmark smoke run checks the bench still works, not its numbers)
test: lint unit (bench "--quick") e2e

# Hot-path cost of claim projection: token hits with 0 vs 3 claim headers (h2load, medians)
bench-claims *args: deps build bench-deps
    {{venv}}/bin/python tests/bench/claims_cost.py {{args}}

# Load tools from Debian (h2load, wrk) for the benchmarks
bench-deps:
    command -v h2load >/dev/null && command -v wrk >/dev/null || \
      (apt-get update -qq && apt-get install -y -qq nghttp2-client wrk >/dev/null)

# Throughput of both builds (wasm, native) vs bare Envoy and jwt_authn, store scale and churn, the etcd tier across replicas, its cost in a 3-member etcd cluster -> docs/benchmarks.md (--quick: smoke run)
bench *args: deps build build-noop build-native build-noop-native bench-deps
    #!/usr/bin/env bash
    set -euo pipefail
    quick=""; [[ " {{args}} " == *" --quick "* ]] && quick="--quick"
    mkdir -p .run/bench
    {{venv}}/bin/python tests/bench/bench.py $quick --json .run/bench/throughput.json
    {{venv}}/bin/python tests/bench/scale.py $quick --json .run/bench/scale.json
    {{venv}}/bin/python tests/bench/replicas.py $quick --json .run/bench/replicas.json
    {{venv}}/bin/python tests/bench/cluster_cost.py $quick --json .run/bench/cluster.json
    if [ -z "$quick" ]; then
      {{venv}}/bin/python tests/bench/report.py .run/bench/throughput.json .run/bench/scale.json \
        .run/bench/replicas.json .run/bench/cluster.json
    fi

# Fuzz every core parser for a bounded time each (not in CI): just fuzz [seconds-per-target] [target...]
fuzz *args:
    fuzz/run.sh {{args}}
