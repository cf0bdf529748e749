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
//!   timer thread through the config scheduler: it runs the periodic duties, the etcd revocation
//!   poller (one per process: it writes the process store) and the key refresh, whose keys every
//!   worker thread's worker takes over at its next stream ([`crate::keys`]);
//! - each stream's [`NativeFilter`] is an `Rc`: Envoy may destroy the filter inside one of its
//!   own hooks (a local reply or a reset ends the stream, and Envoy destroys its filters at
//!   once), so each hook holds a reference of its own until it returns, and no call reaches
//!   Envoy for a filter it destroyed;
//! - resuming a held message is done when the core's callback has returned: Envoy runs the
//!   rest of the filter chain inside `continue_decoding`, and a response made there (a
//!   `direct_response` route, a local reply of a later filter) comes back to this filter's
//!   response hooks at once, which must find the stream free.
//!
//! The stores are process-wide ([`crate::store::token_map`] for tokens, [`crate::store::STORE`]
//! for the rest): a token split on one worker is found by every other, and a revocation is seen
//! by all at once.

use crate::abi::{self, ConfigEnvoy, FilterEnvoy, Half, Scheduler, CONTINUE, STOP};
use crate::keys::SharedKeys;
use crate::store::STORE;
use split_token_core::flow::host::{Answer, Host, Level, Message, StreamHost};
use split_token_core::flow::{self, Action, Stream, Worker};
use split_token_core::stats::Counter;
use split_token_core::store::map::MapStore;
use split_token_core::store::{HostStatus, SetError, SharedData};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
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
    /// What the main thread's worker loaded last, for the worker threads' workers.
    keys: SharedKeys,
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
    /// This worker thread's worker of each config.
    static WORKERS: RefCell<ById<ThreadWorker>> = RefCell::new(ById::default());
}

/// A map keyed by config id. The ids are this module's own counter (`NEXT_CONFIG`), never a
/// peer's input, so they need no keyed (SipHash) hash: the map is looked up on every stream.
type ById<T> = HashMap<u64, T, BuildHasherDefault<IdHasher>>;

/// Spreads a config id over the table (Fibonacci hashing).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A worker thread's worker of one config.
struct ThreadWorker {
    /// Held weakly: a replaced config's worker goes when the next one is made.
    config: Weak<FilterConfig>,
    worker: Worker,
    /// The load of the main thread's keys this worker took over last (see [`SharedKeys`]).
    adopted: u64,
}

/// The host of one call into the core: the config, and the stream's Envoy filter if any.
struct Native<'a> {
    config: &'a FilterConfig,
    filter: Option<FilterEnvoy>,
    /// Set once Envoy destroyed the stream's filter: no call reaches it after that.
    destroyed: Option<&'a Cell<bool>>,
    /// The messages the core resumed, resumed once its callback returned (see the module doc).
    resumed: RefCell<Vec<Message>>,
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
            destroyed: None,
            resumed: RefCell::new(Vec::new()),
            main,
            body_hook: None,
            answer: None,
            tick: Cell::new(None),
        }
    }

    fn stream(native: &'a NativeFilter, filter: FilterEnvoy, body_hook: Option<Half>) -> Self {
        Self {
            filter: Some(filter),
            destroyed: Some(&native.destroyed),
            body_hook,
            ..Self::worker(&native.config, false)
        }
    }

    /// The stream's Envoy filter, unless there is none or Envoy destroyed it.
    fn filter(&self) -> Option<FilterEnvoy> {
        if self.destroyed.is_some_and(Cell::get) {
            return None;
        }
        self.filter
    }

    /// Resumes what the core resumed, in order, while the filter lives.
    fn apply_resumes(&self) {
        let resumed = std::mem::take(&mut *self.resumed.borrow_mut());
        for message in resumed {
            let Some(filter) = self.filter() else {
                return;
            };
            match message {
                Message::Request => filter.continue_decoding(),
                Message::Response => filter.continue_encoding(),
            }
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
        // A config's counters are Envoy stats (thread-safe), so a stream whose filter is gone
        // still counts.
        match self.filter() {
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
        let id = match self.filter() {
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

    fn token_map(&self, prefix: &str, capacity: usize) -> Option<Arc<MapStore>> {
        Some(crate::store::token_map(prefix, capacity))
    }
}

impl StreamHost for Native<'_> {
    fn header(&self, message: Message, name: &str) -> Option<Vec<u8>> {
        self.filter()?.header(half(message), name)
    }

    fn request_header_values(&self, name: &str) -> Vec<Vec<u8>> {
        self.filter()
            .map(|f| f.header_values(Half::Request, name))
            .unwrap_or_default()
    }

    fn set_header(
        &self,
        message: Message,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), HostStatus> {
        let filter = self.filter().ok_or(UNAVAILABLE)?;
        if filter.set_header(half(message), name, value) {
            Ok(())
        } else {
            Err(REFUSED)
        }
    }

    fn body(&self, message: Message, size: usize) -> Vec<u8> {
        let Some(filter) = self.filter() else {
            return Vec::new();
        };
        let in_hook = self.body_hook == Some(half(message));
        let mut body = filter.body(half(message), in_hook);
        body.truncate(size);
        body
    }

    /// The core replaces the whole body it read (`size` is what it read).
    fn set_body(&self, message: Message, _size: usize, body: &[u8]) -> Result<(), HostStatus> {
        let filter = self.filter().ok_or(UNAVAILABLE)?;
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
        let filter = self.filter().ok_or(UNAVAILABLE)?;
        filter.send_response(status, &headers, body);
        Ok(())
    }

    fn reset(&self) {
        if let Some(filter) = self.filter() {
            filter.reset();
        }
    }

    /// Deferred until the core's callback returns (see [`Native::apply_resumes`]).
    fn resume(&self, message: Message) {
        self.resumed.borrow_mut().push(message);
    }

    fn clear_route_cache(&self) {
        if let Some(filter) = self.filter() {
            filter.clear_route_cache();
        }
    }

    fn response_code_details(&self) -> Option<Vec<u8>> {
        self.filter()?.response_code_details()
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
        keys: SharedKeys::default(),
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
        // Without the timer no revocation made on another replica would ever be applied here:
        // with etcd, refuse the config rather than run with that hole. (Without etcd the keys
        // are still fetched on demand by each worker.)
        if !start_ticker(&config, period) && worker.config().is_some_and(|c| c.etcd.is_some()) {
            return None;
        }
    }
    MAIN.with(|m| m.borrow_mut().insert(config.id, worker));
    Some(config)
}

/// The config crosses threads as a raw pointer, where the compiler cannot check it: check here.
const _: () = {
    const fn shared_by_threads<T: Send + Sync>() {}
    shared_by_threads::<FilterConfig>();
};

/// Starts the main thread's timer; `false` if it could not be started (logged).
fn start_ticker(config: &FilterConfig, period: Duration) -> bool {
    if abi::is_validation_mode() {
        return true;
    }
    let Some(scheduler) = config.envoy.scheduler() else {
        abi::log(
            abi::LOG_ERROR,
            "split-token: Envoy gave no scheduler: no periodic key refresh, no revocation poller",
        );
        return false;
    };
    let mut ticker = config.ticker.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = ticker.take() {
        old.stop();
    }
    *ticker = Ticker::start(scheduler, period);
    if ticker.is_none() {
        abi::log(
            abi::LOG_ERROR,
            "split-token: cannot start the timer thread: no periodic key refresh, no revocation poller",
        );
        return false;
    }
    true
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
                config.keys.publish_from(worker);
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
    /// Envoy destroyed this filter (possibly inside one of its hooks, which still holds it).
    destroyed: Cell<bool>,
    /// A hook of this stream panicked: its `Stream` may be half way through a step, so no later
    /// hook may act on it (each resets the stream instead).
    poisoned: Cell<bool>,
}

/// A new stream (worker thread): its `Stream` from this thread's worker of the config, which
/// first takes over keys the main thread's worker loaded since its last stream.
pub fn filter_new(config: Arc<FilterConfig>) -> NativeFilter {
    let stream = WORKERS.with(|w| {
        let mut workers = w.try_borrow_mut().ok()?;
        let take = |t: &mut ThreadWorker| {
            config.keys.adopt_into(&t.worker, &mut t.adopted);
            t.worker.stream()
        };
        // Every stream but a config's first on this thread: one lookup.
        if let Some(t) = workers.get_mut(&config.id) {
            return take(t);
        }
        workers.retain(|_, t| t.config.strong_count() > 0);
        let mut worker = Worker::default();
        // Parsed and accepted on the main thread already: this cannot fail but for the
        // store, and then the stream is refused.
        let _ = worker.configure(&Native::worker(&config, false), &config.bytes);
        let thread_worker = ThreadWorker {
            config: Arc::downgrade(&config),
            worker,
            adopted: 0,
        };
        take(workers.entry(config.id).or_insert(thread_worker))
    });
    NativeFilter {
        config,
        stream: RefCell::new(stream),
        deferred: RefCell::new(Vec::new()),
        destroyed: Cell::new(false),
        poisoned: Cell::new(false),
    }
}

/// Envoy destroyed the filter: a hook still running on it (the one whose local reply or reset
/// ended the stream) makes no further call to Envoy for it.
pub fn filter_destroy(filter: &NativeFilter) {
    filter.destroyed.set(true);
}

impl NativeFilter {
    /// Whether Envoy destroyed this filter.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.get()
    }

    /// After a panic in one of this stream's hooks.
    pub fn poison(&self) {
        self.poisoned.set(true);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get()
    }

    /// Runs one callback of the core with this stream's host. Not re-entrant: a callout's
    /// answer that comes while another callback runs is deferred to its end; a hook that comes
    /// back while messages are resumed finds the stream free.
    fn run(
        &self,
        envoy: FilterEnvoy,
        body_hook: Option<Half>,
        f: impl FnOnce(&mut Stream, &Native<'_>) -> Action,
    ) -> u32 {
        let host = Native::stream(self, envoy, body_hook);
        let action = {
            let Ok(mut stream) = self.stream.try_borrow_mut() else {
                return STOP;
            };
            match stream.as_mut() {
                Some(stream) => f(stream, &host),
                None => flow::refuse_unconfigured(&host),
            }
        };
        host.apply_resumes();
        self.deliver_deferred(envoy);
        status(action)
    }

    fn deliver_deferred(&self, envoy: FilterEnvoy) {
        let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
        for (callout, answer) in deferred {
            if self.is_destroyed() {
                return;
            }
            self.callout_done(envoy, callout, answer);
        }
    }

    pub fn request_headers(&self, envoy: FilterEnvoy, end_of_stream: bool) -> u32 {
        #[cfg(feature = "fault-injection")]
        fault(envoy);
        self.run(envoy, None, |s, h| s.on_request_headers(h, end_of_stream))
    }

    pub fn request_body(&self, envoy: FilterEnvoy, end_of_stream: bool) -> u32 {
        if self.unconfigured() {
            return STOP;
        }
        self.run(envoy, Some(Half::Request), |s, h| {
            s.on_request_body(h, body_size(s, envoy, Message::Request), end_of_stream)
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
        self.run(envoy, Some(Half::Response), |s, h| {
            s.on_response_body(h, body_size(s, envoy, Message::Response), end_of_stream)
        })
    }

    pub fn response_trailers(&self, envoy: FilterEnvoy) -> u32 {
        if self.unconfigured() {
            return CONTINUE;
        }
        self.run(envoy, None, |s, h| s.on_response_trailers(h))
    }

    pub fn callout_done(&self, envoy: FilterEnvoy, callout: u64, answer: CalloutAnswer) {
        if self.is_destroyed() {
            return;
        }
        let Ok(mut guard) = self.stream.try_borrow_mut() else {
            self.deferred.borrow_mut().push((callout, answer));
            return;
        };
        let (Some(stream), Ok(token)) = (guard.as_mut(), u32::try_from(callout)) else {
            return;
        };
        let host = Native {
            answer: Some(&answer),
            ..Native::stream(self, envoy, None)
        };
        stream.on_call_answer(&host, token, answer.sizes());
        drop(guard);
        host.apply_resumes();
        self.deliver_deferred(envoy);
    }

    fn unconfigured(&self) -> bool {
        matches!(self.stream.try_borrow().as_deref(), Ok(None))
    }
}

/// Test builds only (`just build-fault`): `x-split-token-fault: panic` panics inside the request
/// headers hook, so the e2e suite can show that the hook's guard fails that one request closed
/// while Envoy and every other stream go on.
/// The buffered body's size, for a body hook: a call into Envoy, made only when the flow reads
/// that body (0 otherwise, which the flow then ignores).
fn body_size(stream: &Stream, envoy: FilterEnvoy, message: Message) -> usize {
    if stream.reads_body(message) {
        envoy.body_size(half(message), true)
    } else {
        0
    }
}

#[cfg(feature = "fault-injection")]
fn fault(envoy: FilterEnvoy) {
    if envoy
        .header(Half::Request, "x-split-token-fault")
        .as_deref()
        == Some(b"panic")
    {
        #[allow(clippy::panic)] // the fault this build injects
        {
            panic!("injected fault"); // allow-panic: fault-injection builds only
        }
    }
}
