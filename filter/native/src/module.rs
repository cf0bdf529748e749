//! The adapter proper: Envoy's dynamic-module hooks in (through [`crate::abi`]), the core's host
//! calls out. No `unsafe` here.
//!
//! Where a proxy-wasm filter has one root context per worker, a dynamic module has one filter
//! config per Envoy filter config (made on the main thread, shared by every worker) and one filter
//! per stream (on a worker thread). So:
//! - [`FilterConfig`] (`Sync`) holds the configuration bytes, the counter ids and the ticker;
//! - each worker thread lazily makes its own core [`Worker`] for a config on its first stream
//!   (thread-local, so the core's `Rc`/`RefCell` state stays on one thread), which hands out
//!   the [`Stream`]s;
//! - the main thread has one more `Worker` per config, configured when Envoy loads the config
//!   (so a bad configuration is refused then, with its reason in Envoy's log), and ticked by a
//!   timer thread through the config scheduler: it runs the periodic duties whose effect is
//!   process-wide (the etcd revocation poller writes the process store).
//!
//! The store is process-wide ([`crate::store::STORE`]): a token split on one worker is found by
//! every other, and a revocation is seen by all at once.

use crate::abi::{self, ConfigEnvoy, FilterEnvoy, Half, Scheduler, CONTINUE, STOP};
use crate::store::STORE;
use split_token_core::flow::host::{Answer, Host, Level, Message, StreamHost};
use split_token_core::flow::{self, Action, Stream, Worker};
use split_token_core::stats::Counter;
use split_token_core::store::{HostStatus, SetError, SharedData};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `HostStatus` for a host call the ABI refused (proxy-wasm's `BadArgument`, as logs name it).
const REFUSED: HostStatus = HostStatus(2);
/// `HostStatus` for a call this context cannot make (proxy-wasm's `InternalFailure`).
const UNAVAILABLE: HostStatus = HostStatus(10);

static NEXT_CONFIG: AtomicU64 = AtomicU64::new(1);

/// One Envoy filter config of this module: shared by the main thread and every worker.
pub struct FilterConfig {
    id: u64,
    bytes: Vec<u8>,
    envoy: ConfigEnvoy,
    /// Counter ids, by `Counter::index`.
    counters: Vec<Option<usize>>,
    ticker: Mutex<Option<Ticker>>,
}

/// A finished callout's answer, copied out of Envoy.
#[derive(Default)]
pub struct CalloutAnswer {
    /// How many headers came (0: no answer).
    pub headers: usize,
    pub status: Option<Vec<u8>>,
    pub body: Vec<u8>,
}

impl CalloutAnswer {
    fn sizes(&self) -> Answer {
        Answer {
            headers: self.headers,
            body_size: self.body.len(),
        }
    }
}

/// The timer thread of the main thread's worker: it commits one scheduler event per period.
struct Ticker {
    /// Dropped to stop the thread.
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
    /// Deleted on the main thread, after the thread that commits to it was joined.
    scheduler: Arc<Scheduler>,
}

impl Ticker {
    fn start(scheduler: Scheduler, period: Duration) -> Option<Self> {
        let scheduler = Arc::new(scheduler);
        let commits = Arc::clone(&scheduler);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("split-token-tick".into())
            .spawn(move || {
                // Ends when the sender is dropped (`stop`).
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    commits.commit(0);
                }
            })
            .ok()?;
        Some(Self {
            stop,
            thread,
            scheduler,
        })
    }

    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
        drop(self.scheduler);
    }
}

thread_local! {
    /// The main thread's worker of each config.
    static MAIN: RefCell<HashMap<u64, Worker>> = RefCell::new(HashMap::new());
    /// Answers to the main worker's calls that came while it was busy (a callout that failed
    /// inside the call that started it).
    static MAIN_DEFERRED: RefCell<Vec<(u64, u64, CalloutAnswer)>> = const { RefCell::new(Vec::new()) };
    /// This worker thread's worker of each config (the config is held weakly: a replaced
    /// config's worker goes when the next one is made).
    static WORKERS: RefCell<HashMap<u64, (Weak<FilterConfig>, Worker)>> = RefCell::new(HashMap::new());
}

/// The host of one call into the core: the config, and the stream's Envoy filter if any.
struct Native<'a> {
    config: &'a FilterConfig,
    filter: Option<FilterEnvoy>,
    /// The main thread's worker: its calls are the config's callouts, its period the ticker's.
    main: bool,
    /// Inside a body hook of this half: the received chunk is readable.
    body_hook: Option<Half>,
    answer: Option<&'a CalloutAnswer>,
    /// The period the core asked for (main thread only).
    tick: Cell<Option<Duration>>,
}

impl<'a> Native<'a> {
    fn worker(config: &'a FilterConfig, main: bool) -> Self {
        Self {
            config,
            filter: None,
            main,
            body_hook: None,
            answer: None,
            tick: Cell::new(None),
        }
    }

    fn stream(config: &'a FilterConfig, filter: FilterEnvoy, body_hook: Option<Half>) -> Self {
        Self {
            filter: Some(filter),
            body_hook,
            ..Self::worker(config, false)
        }
    }
}

fn half(message: Message) -> Half {
    match message {
        Message::Request => Half::Request,
        Message::Response => Half::Response,
    }
}

fn status(action: Action) -> u32 {
    match action {
        Action::Continue => CONTINUE,
        Action::Pause => STOP,
    }
}

impl SharedData for Native<'_> {
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
        STORE.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        STORE.set(key, value, cas)
    }
}

impl Host for Native<'_> {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Info => abi::LOG_INFO,
            Level::Warn => abi::LOG_WARN,
            Level::Error => abi::LOG_ERROR,
        };
        abi::log(level, &format!("split-token: {message}"));
    }

    fn count(&self, counter: Counter, n: u32) {
        let Some(Some(id)) = self.config.counters.get(counter.index()).copied() else {
            return;
        };
        match self.filter {
            Some(filter) => filter.increment_counter(id, u64::from(n)),
            None => self.config.envoy.increment_counter(id, u64::from(n)),
        };
    }

    /// Counters are defined once per config, in `config_new` (Envoy freezes stat creation later).
    fn define_counters(&self) {}

    fn set_tick_period(&self, period: Duration) {
        if self.main {
            self.tick.set(Some(period));
        }
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus> {
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let id = match self.filter {
            Some(filter) => filter.callout(cluster, &headers, body, timeout),
            None if self.main => self.config.envoy.callout(cluster, &headers, body, timeout),
            None => return Err(UNAVAILABLE),
        };
        // Envoy numbers callouts per filter from 1; the core's tokens are u32.
        id.map_err(|_| REFUSED)
            .and_then(|id| u32::try_from(id).map_err(|_| UNAVAILABLE))
    }

    fn call_status(&self) -> Option<Vec<u8>> {
        self.answer.and_then(|a| a.status.clone())
    }

    fn call_body(&self, size: usize) -> Vec<u8> {
        self.answer
            .map(|a| {
                a.body
                    .get(..size.min(a.body.len()))
                    .unwrap_or_default()
                    .to_vec()
            })
            .unwrap_or_default()
    }
}

impl StreamHost for Native<'_> {
    fn header(&self, message: Message, name: &str) -> Option<Vec<u8>> {
        self.filter?.header(half(message), name)
    }

    fn request_header_values(&self, name: &str) -> Vec<Vec<u8>> {
        self.filter
            .map(|f| f.header_values(Half::Request, name))
            .unwrap_or_default()
    }

    fn set_header(
        &self,
        message: Message,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), HostStatus> {
        let filter = self.filter.ok_or(UNAVAILABLE)?;
        if filter.set_header(half(message), name, value) {
            Ok(())
        } else {
            Err(REFUSED)
        }
    }

    fn body(&self, message: Message, size: usize) -> Vec<u8> {
        let Some(filter) = self.filter else {
            return Vec::new();
        };
        let in_hook = self.body_hook == Some(half(message));
        let mut body = filter.body(half(message), in_hook);
        body.truncate(size);
        body
    }

    /// The core replaces the whole body it read (`size` is what it read).
    fn set_body(&self, message: Message, _size: usize, body: &[u8]) -> Result<(), HostStatus> {
        let filter = self.filter.ok_or(UNAVAILABLE)?;
        let in_hook = self.body_hook == Some(half(message));
        if filter.replace_body(half(message), in_hook, body) {
            Ok(())
        } else {
            Err(REFUSED)
        }
    }

    fn send_response(
        &self,
        status: u32,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), HostStatus> {
        let filter = self.filter.ok_or(UNAVAILABLE)?;
        filter.send_response(status, &headers, body);
        Ok(())
    }

    fn reset(&self) {
        if let Some(filter) = self.filter {
            filter.reset();
        }
    }

    fn resume(&self, message: Message) {
        if let Some(filter) = self.filter {
            match message {
                Message::Request => filter.continue_decoding(),
                Message::Response => filter.continue_encoding(),
            }
        }
    }

    fn clear_route_cache(&self) {
        if let Some(filter) = self.filter {
            filter.clear_route_cache();
        }
    }

    fn response_code_details(&self) -> Option<Vec<u8>> {
        self.filter?.response_code_details()
    }
}

// ------------------------------------ Config ------------------------------------

/// A new filter config (main thread): counters defined, the main worker configured. `None`
/// refuses the config; the reason is in Envoy's log.
pub fn config_new(envoy: ConfigEnvoy, _name: &[u8], bytes: &[u8]) -> Option<Arc<FilterConfig>> {
    let counters = Counter::ALL
        .iter()
        .map(|c| envoy.define_counter(c.name()))
        .collect();
    let config = Arc::new(FilterConfig {
        id: NEXT_CONFIG.fetch_add(1, Ordering::Relaxed),
        bytes: bytes.to_vec(),
        envoy,
        counters,
        ticker: Mutex::new(None),
    });
    let host = Native::worker(&config, true);
    let mut worker = Worker::default();
    if !worker.configure(&host, bytes) {
        abi::log(
            abi::LOG_ERROR,
            "split-token: configuration refused (see the line above)",
        );
        return None;
    }
    if let Some(period) = host.tick.get() {
        start_ticker(&config, period);
    }
    MAIN.with(|m| m.borrow_mut().insert(config.id, worker));
    Some(config)
}

fn start_ticker(config: &FilterConfig, period: Duration) {
    if abi::is_validation_mode() {
        return;
    }
    let Some(scheduler) = config.envoy.scheduler() else {
        abi::log(
            abi::LOG_WARN,
            "split-token: no scheduler: periodic duties off",
        );
        return;
    };
    let mut ticker = config.ticker.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = ticker.take() {
        old.stop();
    }
    *ticker = Ticker::start(scheduler, period);
}

pub fn config_destroy(config: &FilterConfig) {
    let ticker = config
        .ticker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(ticker) = ticker {
        ticker.stop();
    }
    MAIN.with(|m| m.borrow_mut().remove(&config.id));
}

/// Runs `f` on the main worker of `config`, then any answer that came meanwhile.
fn with_main(config: &FilterConfig, f: impl FnOnce(&mut Worker, &Native<'_>)) {
    let host = Native::worker(config, true);
    MAIN.with(|m| {
        let Ok(mut workers) = m.try_borrow_mut() else {
            return;
        };
        if let Some(worker) = workers.get_mut(&config.id) {
            f(worker, &host);
        }
    });
    let deferred = MAIN_DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for (id, callout, answer) in deferred {
        if id == config.id {
            config_callout_done(config, callout, answer);
        }
    }
}

pub fn config_scheduled(config: &FilterConfig, _event: u64) {
    with_main(config, |worker, host| worker.on_tick(host));
}

pub fn config_callout_done(config: &FilterConfig, callout: u64, answer: CalloutAnswer) {
    let busy = MAIN.with(|m| m.try_borrow_mut().is_err());
    if busy {
        MAIN_DEFERRED.with(|d| d.borrow_mut().push((config.id, callout, answer)));
        return;
    }
    let Ok(token) = u32::try_from(callout) else {
        return;
    };
    let sizes = answer.sizes();
    let host = Native {
        answer: Some(&answer),
        ..Native::worker(config, true)
    };
    MAIN.with(|m| {
        if let Ok(mut workers) = m.try_borrow_mut() {
            if let Some(worker) = workers.get_mut(&config.id) {
                worker.on_call_answer(&host, token, sizes);
            }
        }
    });
}

// ------------------------------------ Streams ------------------------------------

/// One stream's filter: the core's state machine for it, or nothing (unconfigured: refused).
pub struct NativeFilter {
    config: Arc<FilterConfig>,
    stream: RefCell<Option<Stream>>,
    /// Callout answers that came while a hook was running (a callout failing inside the call
    /// that started it): delivered as that hook ends.
    deferred: RefCell<Vec<(u64, CalloutAnswer)>>,
}

/// A new stream (worker thread): its `Stream` from this thread's worker of the config.
pub fn filter_new(config: Arc<FilterConfig>) -> NativeFilter {
    let stream = WORKERS.with(|w| {
        let mut workers = w.try_borrow_mut().ok()?;
        if !workers.contains_key(&config.id) {
            workers.retain(|_, (config, _)| config.strong_count() > 0);
            let mut worker = Worker::default();
            // Parsed and accepted on the main thread already: this cannot fail but for the
            // store, and then the stream is refused.
            let _ = worker.configure(&Native::worker(&config, false), &config.bytes);
            workers.insert(config.id, (Arc::downgrade(&config), worker));
        }
        workers
            .get(&config.id)
            .and_then(|(_, worker)| worker.stream())
    });
    NativeFilter {
        config,
        stream: RefCell::new(stream),
        deferred: RefCell::new(Vec::new()),
    }
}

impl NativeFilter {
    /// Runs one callback of the core with this stream's host. Not re-entrant: a hook that comes
    /// while another runs (only a callout's answer can) is deferred to its end.
    fn run(
        &self,
        envoy: FilterEnvoy,
        body_hook: Option<Half>,
        f: impl FnOnce(&mut Stream, &Native<'_>) -> Action,
    ) -> u32 {
        let host = Native::stream(&self.config, envoy, body_hook);
        let action = {
            let Ok(mut stream) = self.stream.try_borrow_mut() else {
                return STOP;
            };
            match stream.as_mut() {
                Some(stream) => f(stream, &host),
                None => flow::refuse_unconfigured(&host),
            }
        };
        let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
        for (callout, answer) in deferred {
            self.callout_done(envoy, callout, answer);
        }
        status(action)
    }

    pub fn request_headers(&self, envoy: FilterEnvoy, end_of_stream: bool) -> u32 {
        self.run(envoy, None, |s, h| s.on_request_headers(h, end_of_stream))
    }

    pub fn request_body(&self, envoy: FilterEnvoy, end_of_stream: bool) -> u32 {
        if self.unconfigured() {
            return STOP;
        }
        let size = envoy.body_size(Half::Request, true);
        self.run(envoy, Some(Half::Request), |s, h| {
            s.on_request_body(h, size, end_of_stream)
        })
    }

    pub fn request_trailers(&self, envoy: FilterEnvoy) -> u32 {
        if self.unconfigured() {
            return STOP;
        }
        self.run(envoy, None, |s, h| s.on_request_trailers(h))
    }

    pub fn response_headers(&self, envoy: FilterEnvoy, end_of_stream: bool) -> u32 {
        if self.unconfigured() {
            return CONTINUE; // the filter's own 503
        }
        self.run(envoy, None, |s, h| s.on_response_headers(h, end_of_stream))
    }

    pub fn response_body(&self, envoy: FilterEnvoy, end_of_stream: bool) -> u32 {
        if self.unconfigured() {
            return CONTINUE;
        }
        let size = envoy.body_size(Half::Response, true);
        self.run(envoy, Some(Half::Response), |s, h| {
            s.on_response_body(h, size, end_of_stream)
        })
    }

    pub fn response_trailers(&self, envoy: FilterEnvoy) -> u32 {
        if self.unconfigured() {
            return CONTINUE;
        }
        self.run(envoy, None, |s, h| s.on_response_trailers(h))
    }

    pub fn callout_done(&self, envoy: FilterEnvoy, callout: u64, answer: CalloutAnswer) {
        {
            let Ok(mut guard) = self.stream.try_borrow_mut() else {
                self.deferred.borrow_mut().push((callout, answer));
                return;
            };
            let (Some(stream), Ok(token)) = (guard.as_mut(), u32::try_from(callout)) else {
                return;
            };
            let host = Native {
                answer: Some(&answer),
                ..Native::stream(&self.config, envoy, None)
            };
            stream.on_call_answer(&host, token, answer.sizes());
        }
        let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
        for (callout, answer) in deferred {
            self.callout_done(envoy, callout, answer);
        }
    }

    fn unconfigured(&self) -> bool {
        matches!(self.stream.try_borrow().as_deref(), Ok(None))
    }
}
