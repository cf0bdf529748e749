//! What the flow needs from its host, and nothing more.
//!
//! Two traits, one per kind of context a proxy gives a filter:
//! - [`Host`]: what any context can do, the worker's own included: the clock, the log, the
//!   counters, the shared data (the store's [`SharedData`]), outgoing HTTP calls and the answer
//!   of the call being delivered.
//! - [`StreamHost`]: what a context bound to one HTTP exchange can do on top: read and change its
//!   request's and response's headers and bodies, answer it locally, reset it, resume it.
//!
//! The methods mirror the host calls one for one (a proxy-wasm adapter implements each with one
//! call of `proxy_wasm::hostcalls`), so the flow's cost in host calls is what it reads here: a
//! method is called only when a decision needs what it returns. Failures come back as the host's
//! status; a host never panics on them and the flow decides what a failure means.

use crate::stats::Counter;
use crate::store::map::MapStore;
use crate::store::{HostStatus, SharedData};
use std::sync::Arc;
use std::time::Duration;

/// How loud a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// The two halves of an HTTP exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Request,
    Response,
}

/// How much of a finished outgoing call's answer there is (`headers` is 0 when no answer came:
/// a timeout, a reset, no healthy host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub headers: usize,
    pub body_size: usize,
}

/// What any context of the filter can ask of its host.
pub trait Host: SharedData {
    /// Time since the Unix epoch by the host's clock (zero if it cannot be read).
    fn now(&self) -> Duration;
    /// Writes one log line. The flow never passes token material.
    fn log(&self, level: Level, message: &str);
    /// Adds `n` (never 0) to a counter.
    fn count(&self, counter: Counter, n: u32);
    /// Defines every counter, once per worker; later calls do nothing.
    fn define_counters(&self);
    /// Calls the worker back every `period`.
    fn set_tick_period(&self, period: Duration);
    /// Starts an HTTP call through `cluster`; its answer comes back to the same context with the
    /// returned token.
    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus>;
    /// The `:status` of the answer being delivered.
    fn call_status(&self) -> Option<Vec<u8>>;
    /// The first `size` bytes of the answer being delivered (empty if it cannot be read).
    fn call_body(&self, size: usize) -> Vec<u8>;
    /// The process-wide map of the tokens stored under `prefix`, holding at most `capacity`,
    /// for a host that lets the filter own memory shared by its workers (the native build).
    /// `None`, the default, keeps them in slots of the host's shared data.
    fn token_map(&self, prefix: &str, capacity: usize) -> Option<Arc<MapStore>> {
        let _ = (prefix, capacity);
        None
    }
}

/// What the context of one HTTP exchange can ask of its host on top.
pub trait StreamHost: Host {
    /// The first value of a header of `message`.
    fn header(&self, message: Message, name: &str) -> Option<Vec<u8>>;
    /// Every value of a request header, in order (for headers Envoy does not join).
    fn request_header_values(&self, name: &str) -> Vec<Vec<u8>>;
    /// Replaces every value of a header of `message`; `None` removes it.
    fn set_header(
        &self,
        message: Message,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), HostStatus>;
    /// The first `size` bytes of the body buffered so far (empty if it cannot be read).
    fn body(&self, message: Message, size: usize) -> Vec<u8>;
    /// Replaces the first `size` bytes of the buffered body.
    fn set_body(&self, message: Message, size: usize, body: &[u8]) -> Result<(), HostStatus>;
    /// Answers the request here: it never reaches the upstream, or the response is replaced.
    fn send_response(
        &self,
        status: u32,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), HostStatus>;
    /// Resets the exchange (the answer ends where it is, unfinished).
    fn reset(&self);
    /// Lets a held message go on.
    fn resume(&self, message: Message);
    /// Has the proxy pick the route again, on the headers as they are now.
    fn clear_route_cache(&self);
    /// How the proxy says the response came about (Envoy's `response.code_details`).
    fn response_code_details(&self) -> Option<Vec<u8>>;
}

/// Shorthands the flow uses on any host.
pub(crate) trait HostExt: Host {
    fn now_s(&self) -> u64 {
        self.now().as_secs()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.now().as_millis()).unwrap_or(u64::MAX)
    }

    fn bump(&self, counter: Counter) {
        self.count(counter, 1);
    }

    /// A counter increment must be above zero.
    fn add(&self, counter: Counter, n: u32) {
        if n > 0 {
            self.count(counter, n);
        }
    }

    /// The counters of one store write.
    fn record_put(&self, report: &crate::store::PutReport) {
        self.add(Counter::StoreEvictions, report.evicted);
        self.add(Counter::StoreExpiredDropped, report.expired);
        self.add(Counter::StoreCasRetries, report.retries);
        self.add(Counter::StoreCorruptSlots, u32::from(report.corrupt));
    }

    /// A finished call's `:status` (`None` when no answer came) and body.
    fn answer(&self, answer: Answer) -> (Option<Vec<u8>>, Vec<u8>) {
        let status = if answer.headers == 0 {
            None
        } else {
            self.call_status()
        };
        (status, self.call_body(answer.body_size))
    }
}

impl<H: Host + ?Sized> HostExt for H {}
