//! proxy-wasm adapter for split-token: callbacks in, host calls out.
//!
//! Everything that decides lives in `split_token_core::flow`; this file translates. Each
//! proxy-wasm callback is forwarded to the core's [`Worker`] or [`Stream`], and [`Wasm`]
//! implements the core's host traits with one `proxy_wasm::hostcalls` call per method. It uses
//! the hostcalls with their `Result`s (the `Context` helpers unwrap), reads client-controlled
//! headers as bytes (the `String` getters unwrap on invalid UTF-8), and never logs token
//! material.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use split_token_core::flow::host::{Answer, Host, Level, Message, StreamHost};
use split_token_core::flow::{self, Stream, Worker};
use split_token_core::stats::Counter;
use split_token_core::store::{HostStatus, SetError, SharedData};
use std::cell::OnceCell;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

thread_local! {
    /// Metric ids, by `Counter::index`: one VM, one set.
    static METRICS: OnceCell<Vec<Option<u32>>> = const { OnceCell::new() };
}

/// The proxy-wasm host: every method is one host call.
struct Wasm;

fn status(s: Status) -> HostStatus {
    HostStatus(s as u32)
}

fn map(message: Message) -> MapType {
    match message {
        Message::Request => MapType::HttpRequestHeaders,
        Message::Response => MapType::HttpResponseHeaders,
    }
}

fn buffer(message: Message) -> BufferType {
    match message {
        Message::Request => BufferType::HttpRequestBody,
        Message::Response => BufferType::HttpResponseBody,
    }
}

fn action(action: flow::Action) -> Action {
    match action {
        flow::Action::Continue => Action::Continue,
        flow::Action::Pause => Action::Pause,
    }
}

impl SharedData for Wasm {
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
        hostcalls::get_shared_data(key)
            .map(|(value, cas)| (value.unwrap_or_default(), cas))
            .map_err(status)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(s) => Err(SetError::Host(status(s))),
        }
    }
}

impl Host for Wasm {
    fn now(&self) -> Duration {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default()
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }

    fn count(&self, counter: Counter, n: u32) {
        let id = METRICS.with(|m| m.get().and_then(|ids| ids.get(counter.index()).copied()));
        if let Some(Some(id)) = id {
            let _ = hostcalls::increment_metric(id, i64::from(n));
        }
    }

    fn define_counters(&self) {
        METRICS.with(|m| {
            m.get_or_init(|| {
                Counter::ALL
                    .iter()
                    .map(|c| hostcalls::define_metric(MetricType::Counter, c.name()).ok())
                    .collect()
            });
        });
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus> {
        hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout).map_err(status)
    }

    fn call_status(&self) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
    }

    fn call_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }
}

impl StreamHost for Wasm {
    fn header(&self, message: Message, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(map(message), name)
            .ok()
            .flatten()
    }

    fn request_header_values(&self, name: &str) -> Vec<Vec<u8>> {
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        headers
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, value)| value)
            .collect()
    }

    fn set_header(
        &self,
        message: Message,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), HostStatus> {
        hostcalls::set_map_value(map(message), name, value).map_err(status)
    }

    fn body(&self, message: Message, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(buffer(message), 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn set_body(&self, message: Message, size: usize, body: &[u8]) -> Result<(), HostStatus> {
        hostcalls::set_buffer(buffer(message), 0, size, body).map_err(status)
    }

    fn send_response(
        &self,
        code: u32,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), HostStatus> {
        hostcalls::send_http_response(code, headers, Some(body)).map_err(status)
    }

    fn reset(&self) {
        let _ = hostcalls::reset_http_response();
    }

    fn resume(&self, message: Message) {
        let _ = match message {
            Message::Request => hostcalls::resume_http_request(),
            Message::Response => hostcalls::resume_http_response(),
        };
    }

    fn clear_route_cache(&self) {
        // Envoy 1.40's wasm host also clears the route cache on every request-header write, but
        // Envoy has been moving that to this foreign function (envoyproxy/envoy#36671): ask, so
        // routing on identity holds on any Envoy a control plane runs.
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }

    fn response_code_details(&self) -> Option<Vec<u8>> {
        hostcalls::get_property(vec!["response", "code_details"])
            .ok()
            .flatten()
    }
}

#[derive(Default)]
struct Root(Worker);

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _: usize) {
        self.0
            .on_call_answer(&Wasm, token, Answer { headers, body_size });
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.0.configure(&Wasm, &bytes)
    }

    fn on_tick(&mut self) {
        self.0.on_tick(&Wasm);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on None; a VM without a valid configuration refuses requests.
        Some(match self.0.stream() {
            Some(stream) => Box::new(Http(stream)),
            None => Box::new(Unconfigured),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The HTTP context of a VM whose configuration was refused.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(flow::refuse_unconfigured(&Wasm))
    }
}

struct Http(Stream);

impl Context for Http {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _: usize) {
        self.0
            .on_call_answer(&Wasm, token, Answer { headers, body_size });
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(all(feature = "fault-injection", target_arch = "wasm32"))]
        if Wasm
            .header(Message::Request, "x-split-token-fault")
            .as_deref()
            == Some(b"trap")
        {
            core::arch::wasm32::unreachable();
        }
        action(self.0.on_request_headers(&Wasm, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_headers(&Wasm, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_body(&Wasm, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.0.on_request_trailers(&Wasm))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_body(&Wasm, body_size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.0.on_response_trailers(&Wasm))
    }
}
