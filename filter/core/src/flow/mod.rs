//! The flow: what happens to each exchange and what each worker does, written against a host.
//!
//! The modules beside this one decide single steps (split a token response, authorize a
//! request, revoke, build an etcd call). The flow strings them together: which step comes
//! next, what is read from the host for it, which message is held while a call is under way,
//! and what is resumed, answered or reset when the call comes back. It is sans-IO: every read,
//! write and call goes through the [`host`] traits, so a proxy-wasm adapter, a native Envoy
//! module or a test's simulated host can drive it, and the tests replay whole exchanges.
//!
//! - [`Worker`]: one per worker (proxy-wasm's root context): configuration, key refresh, the
//!   revocation poller and its lease. It hands out one [`Stream`] per HTTP exchange.
//! - [`Stream`]: one exchange's state machine, fed the exchange's callbacks.
//!
//! # Design choices
//! - **The host is passed in, not held.** Each callback takes `&H`, so a `Stream` holds only its
//!   state and one `Rc` to what the worker's exchanges share, and an adapter's host can be a
//!   zero-sized type over global host calls.
//! - **Reads only what decides.** The flow asks the host for a header, a body or the clock only
//!   where a decision needs it, in the same order as the glue did before: the host-call count
//!   of a token hit is the adapter's floor plus these reads.
//! - **Answers are read lazily.** A call's answer comes in as its sizes ([`host::Answer`]); the
//!   flow reads status and body only for a call it still waits for.

pub mod host;
mod stream;
mod worker;

pub use stream::Stream;
pub use worker::{LoadedKeys, Worker};

use host::StreamHost;

/// What a callback tells the host: let the message go on, or hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// The answer of a worker whose configuration was refused: it fails closed.
pub fn refuse_unconfigured<H: StreamHost>(host: &H) -> Action {
    let _ = host.send_response(
        503,
        crate::reply::LocalReply::HEADERS.to_vec(),
        br#"{"error":"temporarily_unavailable","error_description":"the split-token filter is not configured"}"#,
    );
    Action::Pause
}
