//! The host-free core of split-token.
//!
//! # The flow
//! 1. A client asks a token endpoint (one of `token_paths`) for a token. The IdP answers with a
//!    JWT `header.payload.signature`. [`response::split`] rewrites the answer so `access_token`
//!    is only the signature, and yields the store entry: `header.payload` under
//!    SHA-256(signature), expiring with the token.
//! 2. The client calls APIs with `Authorization: Bearer <signature>`. [`request::authorize`]
//!    finds the entry and rebuilds `Bearer <header.payload.signature>`, byte for byte what the
//!    IdP issued, or rejects the request per RFC 6750 ([`reply`]).
//!
//! # Design choices
//! - **No host here.** Nothing in this crate imports `proxy_wasm`: the glue reads headers and
//!   bodies, calls in here, and applies the returned plan ([`request::Verdict`],
//!   [`response::SplitPlan`], [`reply::LocalReply`]). The store reaches shared data only
//!   through the [`store::SharedData`] trait, so its CAS logic is tested with forced races.
//! - **A fixed key space.** Envoy never frees a shared-data key; the store uses exactly
//!   `store_slots` keys and packs a few entries into each ([`store`]).
//! - **Credentials stay secret.** The store holds SHA-256(signature), never the signature. Types
//!   that hold token text do not print it, and error messages describe inputs by kind and
//!   position, never by content.
//! - **Fail closed.** A token response that cannot be split or stored becomes a 502, never the
//!   JWT; a request that cannot be authorized never reaches the upstream.
#![forbid(unsafe_code)]

pub mod cache;
pub mod claims;
pub mod config;
pub mod etcd;
pub mod flow;
pub mod introspect;
pub mod keys;
pub mod reply;
pub mod request;
pub mod response;
pub mod revoke;
pub mod stats;
pub mod store;
pub mod token;
pub mod verify;

pub use config::{Config, ConfigError, Route};
