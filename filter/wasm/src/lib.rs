//! proxy-wasm glue for split-token: read headers and bodies, call the core, apply its plan.
//!
//! Everything that decides lives in `split_token_core`; this file only talks to the host. It
//! uses `proxy_wasm::hostcalls` with their `Result`s (the `Context` helpers unwrap), reads
//! client-controlled headers as bytes (the `String` getters unwrap on invalid UTF-8), and never
//! logs token material.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use split_token_core::reply::{issue_failure, IssueFailure, LocalReply};
use split_token_core::request::{authorize, Verdict};
use split_token_core::response::{classify, split, ResponseAction, SplitError};
use split_token_core::stats::Counter;
use split_token_core::store::{HostStatus, SetError, SharedData, Store, StoreError};
use split_token_core::{Config, Route};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SplitTokenRoot::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Seconds since the Unix epoch by the host's clock.
fn now() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Envoy shared data behind the core's store trait.
struct EnvoySharedData;

impl SharedData for EnvoySharedData {
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
        hostcalls::get_shared_data(key)
            .map(|(value, cas)| (value.unwrap_or_default(), cas))
            .map_err(|s| HostStatus(s as u32))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(s) => Err(SetError::Host(HostStatus(s as u32))),
        }
    }
}

/// Metric ids, by `Counter::index`.
#[derive(Default)]
struct Metrics(Vec<Option<u32>>);

impl Metrics {
    fn define() -> Self {
        Self(
            Counter::ALL
                .iter()
                .map(|c| hostcalls::define_metric(MetricType::Counter, c.name()).ok())
                .collect(),
        )
    }

    fn add(&self, counter: Counter, n: u32) {
        if n == 0 {
            return;
        }
        if let Some(Some(id)) = self.0.get(counter.index()) {
            let _ = hostcalls::increment_metric(*id, i64::from(n));
        }
    }

    fn bump(&self, counter: Counter) {
        self.add(counter, 1);
    }
}

#[derive(Default)]
struct SplitTokenRoot {
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
}

impl Context for SplitTokenRoot {}

impl RootContext for SplitTokenRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(config) => {
                if self.metrics.0.is_empty() {
                    self.metrics = Rc::new(Metrics::define());
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "configured {} token path(s), {} public prefix(es), {} store slots",
                        config.token_paths.len(),
                        config.public_prefixes.len(),
                        config.store_slots
                    ),
                );
                self.config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("invalid configuration: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(SplitTokenHttp {
            config,
            metrics: Rc::clone(&self.metrics),
            state: State::Request,
            body_size: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet.
    Request,
    /// A token endpoint request: its response headers are next.
    TokenEndpoint,
    /// A 200 token response, headers held back, body buffering.
    Buffering,
    /// Decided; let everything else through.
    Done,
}

struct SplitTokenHttp {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    state: State,
    body_size: usize,
}

impl SplitTokenHttp {
    fn store(&self) -> Store<'_, EnvoySharedData> {
        Store::new(
            &EnvoySharedData,
            &self.config.store_prefix,
            self.config.store_slots,
            self.config.slot_capacity,
        )
    }

    fn send(&self, reply: &LocalReply<'_>) {
        let mut headers: Vec<(&str, &str)> = LocalReply::HEADERS.to_vec();
        if let Some(challenge) = reply.www_authenticate {
            headers.push(("www-authenticate", challenge));
        }
        if let Err(status) =
            hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()))
        {
            log(
                LogLevel::Error,
                &format!("local reply failed with host status {status:?}"),
            );
        }
    }

    /// Answers a token request with a 502 instead of the token.
    fn fail_closed(&mut self, failure: IssueFailure<'_>) -> Action {
        match &failure {
            IssueFailure::Split(e) => log(LogLevel::Warn, &format!("{e}")),
            IssueFailure::Store(e) => {
                self.metrics.bump(Counter::StoreWriteFailures);
                log(LogLevel::Warn, &format!("token not stored: {e}"));
            }
        }
        self.metrics.bump(Counter::SplitFailures);
        self.send(&issue_failure(failure));
        self.state = State::Done;
        Action::Pause
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn on_protected_request(&mut self) -> Action {
        let authorization = self.request_header("authorization");
        let verdict = authorize(&self.config, &self.store(), authorization.as_deref(), now());
        self.state = State::Done;
        let verdict = match verdict {
            Ok(v) => v,
            Err((rejection, e)) => {
                log(LogLevel::Error, &format!("{e}"));
                Verdict::Reject(rejection)
            }
        };
        self.metrics.bump(verdict.counter());
        match verdict {
            Verdict::Forward { authorization } => {
                match hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "authorization",
                    Some(&authorization),
                ) {
                    Ok(()) => Action::Continue,
                    Err(status) => {
                        // Fail closed: without the rebuilt header the upstream must not be called.
                        log(
                            LogLevel::Error,
                            &format!("cannot set authorization: {status:?}"),
                        );
                        self.send(
                            &split_token_core::request::Rejection::StoreUnavailable
                                .reply(&self.config),
                        );
                        Action::Pause
                    }
                }
            }
            Verdict::PassThrough => Action::Continue,
            Verdict::Reject(rejection) => {
                self.send(&rejection.reply(&self.config));
                Action::Pause
            }
        }
    }

    /// The whole token response is buffered: split it, store the entry, replace the body.
    fn finish_split(&mut self) -> Action {
        let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, self.body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let now = now();
        let plan = match split(&self.config, &body, now) {
            Ok(plan) => plan,
            Err(e) => return self.fail_closed(IssueFailure::Split(&e)),
        };
        let report = match self.store().put(&plan.entry(), now) {
            Ok(report) => report,
            Err(e) => return self.fail_closed(IssueFailure::Store(&e)),
        };
        self.metrics.add(Counter::StoreEvictions, report.evicted);
        self.metrics
            .add(Counter::StoreExpiredDropped, report.expired);
        self.metrics.add(Counter::StoreCasRetries, report.retries);
        self.metrics
            .add(Counter::StoreCorruptSlots, u32::from(report.corrupt));

        let length = plan.body.len().to_string();
        let applied =
            hostcalls::set_buffer(BufferType::HttpResponseBody, 0, self.body_size, &plan.body)
                .and_then(|()| {
                    hostcalls::set_map_value(
                        MapType::HttpResponseHeaders,
                        "content-length",
                        Some(&length),
                    )
                });
        if let Err(status) = applied {
            let e = StoreError::Host {
                operation: "replace body",
                status: status as u32,
            };
            return self.fail_closed(IssueFailure::Store(&e));
        }
        self.metrics.bump(Counter::TokensSplit);
        self.state = State::Done;
        Action::Continue
    }
}

impl Context for SplitTokenHttp {}

impl HttpContext for SplitTokenHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.request_header(":path").unwrap_or_default();
        match self.config.route(&path) {
            Route::TokenEndpoint => {
                // Ask the IdP for an identity-encoded body: the filter cannot split gzip.
                let _ =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, "accept-encoding", None);
                self.state = State::TokenEndpoint;
                Action::Continue
            }
            Route::Public => {
                self.state = State::Done;
                Action::Continue
            }
            Route::Protected => self.on_protected_request(),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.state != State::TokenEndpoint {
            return Action::Continue;
        }
        let status = self.response_header(":status").unwrap_or_default();
        let encoding = self.response_header("content-encoding");
        match classify(&status, encoding.as_deref(), end_of_stream) {
            ResponseAction::PassThrough => {
                self.metrics.bump(Counter::TokenErrorsPassedThrough);
                self.state = State::Done;
                Action::Continue
            }
            ResponseAction::Fail(e) => self.fail_closed(IssueFailure::Split(&e)),
            ResponseAction::Split => {
                // The body changes, so its length and validators go; the new length is set once
                // known. Headers are held back (this needs `allow_on_headers_stop_iteration`) so a
                // failure can still become a 502 instead of the IdP's 200.
                for stale in ["content-length", "etag", "content-md5", "digest"] {
                    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, stale, None);
                }
                self.state = State::Buffering;
                Action::Pause
            }
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.state != State::Buffering {
            return Action::Continue;
        }
        self.body_size = body_size;
        if body_size > self.config.max_token_response_bytes {
            let e = SplitError::TooLarge {
                limit: self.config.max_token_response_bytes,
            };
            return self.fail_closed(IssueFailure::Split(&e));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.finish_split()
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.state != State::Buffering {
            return Action::Continue;
        }
        self.finish_split()
    }
}
