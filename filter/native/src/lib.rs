//! split-token as an Envoy dynamic module: the same core as the proxy-wasm build
//! (`split_token_core::flow`), run in Envoy's process.
//!
//! - [`abi`] (private): the FFI edge, the only `unsafe` code: the subset of Envoy's
//!   dynamic-module ABI used, safe wrappers that copy out of Envoy's memory, and the exported
//!   hooks, each behind `catch_unwind` (the `native` profile unwinds, so a panic fails the one
//!   request closed instead of aborting Envoy).
//! - `module` (private): the core's host traits over those wrappers; per-thread workers; the
//!   main thread's worker and its ticker.
//! - [`store`]: the process-wide store every worker shares.
//! - [`keys`]: the main thread's key refresh, handed to the worker threads' workers.
//!
//! Build: `cargo build --profile native -p split-token-native` gives
//! `libsplit_token_native.so`; Envoy finds it through `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`
//! (see `envoy/native/envoy.yaml`).
//!
//! Unit tests run without Envoy, so they build only what needs no Envoy symbol (the store, the
//! key hand-over): the hooks and host are exercised by the e2e suite (`pytest --host native`).

// Every hook's guard relies on unwinding: a build that aborts on panic would take Envoy down.
#[cfg(panic = "abort")]
compile_error!("the native module needs panic = \"unwind\": build it with `--profile native`");

#[cfg(not(test))]
mod abi;
pub mod keys;
#[cfg(not(test))]
mod module;
pub mod store;
