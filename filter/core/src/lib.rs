//! The host-free core of split-token: every decision, and the flow that strings them together.
//!
//! # The flow
//! 1. A client asks a token endpoint (one of `token_paths`) for a token. The IdP answers with a
//!    JWT `header.payload.signature`. [`issue::response::split`] rewrites the answer so
//!    `access_token` is only the signature, and yields the store entry: `header.payload` under
//!    SHA-256(signature), expiring with the token.
//! 2. The client calls APIs with `Authorization: Bearer <signature>`. [`request::authorize`]
//!    finds the entry and rebuilds `Bearer <header.payload.signature>`, byte for byte what the
//!    IdP issued, or rejects the request per RFC 6750 ([`reply`]).
//!
//! # Layout
//! The modules follow a token's life: [`config`] (what the filter is told), [`token`] (what a
//! JWT is: parsed, hashed, verified), [`issue`] (the token response: split, keys), [`store`]
//! (the slots in shared data, the worker's cache), [`request`] and [`claims`] (a request
//! rebuilt), [`lifecycle`] (revocation, logout, introspection), [`replicas`] (etcd). [`flow`] sits on top: the per-request state machine and
//! the per-worker duties, written against a host trait. No module imports one that imports it
//! back.
//!
//! # Design choices
//! - **No host here.** Nothing in this crate imports `proxy_wasm`. The [`flow`] reaches the host
//!   only through [`flow::host`]'s traits, which an adapter implements (the proxy-wasm one in
//!   `filter/wasm`, one host call per method) and the tests simulate; the single steps take
//!   bytes in and return a plan ([`request::Verdict`], [`issue::response::SplitPlan`],
//!   [`reply::LocalReply`]). The store reaches shared data only through the
//!   [`store::SharedData`] trait, so its CAS logic is tested with forced races.
//! - **A fixed key space.** Envoy never frees a shared-data key; the store uses exactly
//!   `store_slots` keys and packs a few entries into each ([`store`]).
//! - **Credentials stay secret.** The store holds SHA-256(signature), never the signature. Types
//!   that hold token text do not print it, and error messages describe inputs by kind and
//!   position, never by content.
//! - **Fail closed.** A token response that cannot be split or stored becomes a 502, never the
//!   JWT; a request that cannot be authorized never reaches the upstream.
#![forbid(unsafe_code)]

// In the order a token moves through them; `flow` strings them together.
pub mod claims;
pub mod config;
pub mod flow;
pub mod issue;
pub mod lifecycle;
pub mod replicas;
pub mod reply;
pub mod request;
pub mod stats;
pub mod store;
pub mod token;

pub use config::{Config, ConfigError, Route};
