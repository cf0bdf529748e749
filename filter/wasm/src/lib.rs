//! proxy-wasm glue for split-token: read headers and bodies, call the core, apply its plan.
//!
//! Everything that decides lives in `split_token_core`; this file only talks to the host. It
//! uses `proxy_wasm::hostcalls` with their `Result`s (the `Context` helpers unwrap), reads
//! client-controlled headers as bytes (the `String` getters unwrap on invalid UTF-8), and never
//! logs token material.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use split_token_core::cache::LocalCache;
use split_token_core::config::{EtcdConfig, KeySource, VerifyConfig};
use split_token_core::etcd::{self, EtcdError, Leases, PollerLease, RecentRevocations};
use split_token_core::introspect::{authenticate, introspect, Introspection};
use split_token_core::keys::{
    first_request, on_response, FetchError, KeyRequest, KeyState, Outcome,
};
use split_token_core::reply::{
    introspection_reply, issue_failure, revocation_done, revocation_failure,
    shared_store_unavailable, IssueFailure, LocalReply,
};
use split_token_core::request::{authorize, presented_key, Rejection, Verdict};
use split_token_core::response::{classify, split, ResponseAction, SplitError, SplitPlan};
use split_token_core::revoke::{self, Failure, RevocationError, RevocationPlan};
use split_token_core::stats::Counter;
use split_token_core::store::{HostStatus, PutReport, SetError, SharedData, Store, StoreError};
use split_token_core::token::StoreKey;
use split_token_core::verify::{verify, VerifyError};
use split_token_core::{Config, Route};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SplitTokenRoot::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Time since the Unix epoch by the host's clock (zero if it cannot be read).
fn clock() -> Duration {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default()
}

fn now() -> u64 {
    clock().as_secs()
}

fn now_ms() -> u64 {
    u64::try_from(clock().as_millis()).unwrap_or(u64::MAX)
}

/// Starts one GET of a key fetch through the configured cluster.
fn dispatch_key_request(verify: &VerifyConfig, request: &KeyRequest) -> Result<u32, Status> {
    let KeySource::Remote {
        cluster, authority, ..
    } = &verify.source
    else {
        return Err(Status::BadArgument);
    };
    hostcalls::dispatch_http_call(
        cluster,
        vec![
            (":method", "GET"),
            (":path", &request.path),
            (":authority", authority),
            ("accept", "application/json"),
        ],
        None,
        vec![],
        Duration::from_millis(verify.fetch_timeout_ms),
    )
}

/// A finished call's `:status` (`None` when no answer came) and body.
fn call_answer(num_headers: usize, body_size: usize) -> (Option<Vec<u8>>, Vec<u8>) {
    let status = if num_headers == 0 {
        None
    } else {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
    };
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    (status, body)
}

/// Reads a finished key fetch's answer and interprets it.
fn key_response(request: &KeyRequest, num_headers: usize, body_size: usize) -> Outcome {
    let (status, body) = call_answer(num_headers, body_size);
    on_response(request, status.as_deref(), &body)
}

/// Starts one call to etcd's JSON gateway. A call that cannot start counts as unanswered.
fn dispatch_etcd(config: &EtcdConfig, call: &etcd::Call) -> Result<u32, EtcdError> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", call.path),
        (":authority", config.authority.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend(config.retry_headers.iter().map(|(n, v)| (*n, v.as_str())));
    hostcalls::dispatch_http_call(
        &config.cluster,
        headers,
        Some(&call.body),
        vec![],
        Duration::from_millis(config.timeout_ms),
    )
    .map_err(|status| EtcdError::NotDispatched {
        call: call.path,
        status: status as u32,
    })
}

/// Sets a rewritten message's `content-length`, unless its headers went on before its body was
/// read: then they went without one (the body goes out chunked), and Envoy no longer lends them.
fn set_length(headers: MapType, headers_gone: bool, length: usize) -> Result<(), Status> {
    if headers_gone {
        return Ok(());
    }
    hostcalls::set_map_value(headers, "content-length", Some(&length.to_string()))
}

/// Whether the response under way is an error Envoy made itself (a local reply with status
/// 400 or above: no healthy upstream, a direct_response 404...), as opposed to an upstream's
/// answer or anything the filter cannot tell (unknown details count as the upstream's).
fn envoy_error(status: &[u8]) -> bool {
    let local = matches!(
        hostcalls::get_property(vec!["response", "code_details"]),
        Ok(Some(details)) if !details.is_empty() && details != b"via_upstream"
    );
    local && status.len() == 3 && matches!(status.first(), Some(b'4' | b'5'))
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

    /// The counters of one store write.
    fn record_put(&self, report: &PutReport) {
        self.add(Counter::StoreEvictions, report.evicted);
        self.add(Counter::StoreExpiredDropped, report.expired);
        self.add(Counter::StoreCasRetries, report.retries);
        self.add(Counter::StoreCorruptSlots, u32::from(report.corrupt));
    }

    fn bump(&self, counter: Counter) {
        self.add(counter, 1);
    }
}

#[derive(Default)]
struct SplitTokenRoot {
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    /// This worker's verification keys, shared with its HTTP contexts.
    keys: Rc<RefCell<KeyState>>,
    /// This worker's rebuilt requests for repeat hits, shared with its HTTP contexts.
    cache: Rc<RefCell<LocalCache>>,
    /// The periodic key fetch under way: its call token and request.
    periodic: Option<(u32, KeyRequest)>,
    /// This worker's etcd leases, shared with its HTTP contexts.
    leases: Rc<RefCell<Leases>>,
    /// This worker's number in the process, which names it as the revocation poller.
    worker: u64,
    /// Whether this worker held the poller's lease at its last tick.
    polling: bool,
    /// etcd lookups under way on this worker, counted by its HTTP contexts.
    lookups: Rc<Cell<u32>>,
    /// The revocation poll: the call under way, where sweeps stand, when the last poll began.
    poll: Option<u32>,
    sweeps: etcd::Sweeps,
    last_poll: Duration,
    poll_failing: bool,
}

impl SplitTokenRoot {
    fn verify_config(&self) -> Option<&VerifyConfig> {
        self.config.as_deref().and_then(|c| c.verify.as_ref())
    }

    fn start_periodic_fetch(&mut self, request: KeyRequest) {
        let Some(verify) = self.verify_config() else {
            return;
        };
        let now = now();
        match dispatch_key_request(verify, &request) {
            Ok(token) => {
                self.keys.borrow_mut().periodic_in_flight = true;
                self.periodic = Some((token, request));
            }
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!("cannot start key fetch: {status:?}"),
                );
                self.metrics.bump(Counter::KeyFetchFailures);
                self.keys.borrow_mut().failed(now);
            }
        }
    }
}

impl SplitTokenRoot {
    /// One poller per process: the worker holding the lease polls; the others rely on it.
    fn tick_poller(&mut self, config: &Config, etcd_config: &EtcdConfig) {
        let now_ms = now_ms();
        // Held for three polls (at least 1.5 s): a late tick or two do not hand it over.
        let until = now_ms.saturating_add(etcd_config.poll_ms.saturating_mul(3).max(1_500));
        let holds = PollerLease::new(&etcd_config.poller_key).acquire(
            &EnvoySharedData,
            self.worker,
            now_ms,
            until,
        );
        if holds && !self.polling {
            // Taken over (or first taken): sweep from where the store's last sweep ended (a new
            // store reads every live marker).
            let since = etcd::Watermark::new(&config.store_prefix, &etcd_config.key_prefix)
                .load(&EnvoySharedData);
            self.sweeps = etcd::Sweeps::new(etcd::sweep_slack_ms(etcd_config.timeout_ms), since);
        }
        self.polling = holds;
        // Ticks come every `poll_ms` (or sooner) with some jitter: a quarter of slack keeps a
        // late poll from waiting a whole extra tick.
        let due = clock().saturating_sub(self.last_poll)
            >= Duration::from_millis(etcd_config.poll_ms * 3 / 4);
        if holds && self.poll.is_none() && due {
            self.start_poll();
        }
    }

    /// Asks etcd for the next page of revocation markers (see `etcd::Sweeps`).
    fn start_poll(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(etcd_config) = config.etcd.as_ref() else {
            return;
        };
        self.last_poll = clock();
        let call = self.sweeps.next_call(&etcd_config.key_prefix, now_ms());
        match dispatch_etcd(etcd_config, &call) {
            Ok(token) => self.poll = Some(token),
            Err(e) => self.poll_failed(&e),
        }
    }

    fn poll_failed(&mut self, e: &EtcdError) {
        self.sweeps.abandon();
        self.metrics.bump(Counter::EtcdFailures);
        if !self.poll_failing {
            // Once per outage: the poller polls every `poll_ms`.
            log(LogLevel::Warn, &format!("revocation poll failed: {e}"));
        }
        self.poll_failing = true;
    }

    /// Applies polled revocations here; polls again at once when etcd has more.
    fn on_poll_answer(&mut self, num_headers: usize, body_size: usize) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(etcd_config) = config.etcd.as_ref() else {
            return;
        };
        let (status, body) = call_answer(num_headers, body_size);
        let markers = match etcd::parse_poll(&etcd_config.key_prefix, status.as_deref(), &body) {
            Ok(markers) => markers,
            Err(e) => return self.poll_failed(&e),
        };
        if self.poll_failing {
            log(LogLevel::Info, "revocation poll works again");
            self.poll_failing = false;
        }
        let store = Store::new(
            &EnvoySharedData,
            &config.store_prefix,
            config.store_slots,
            config.slot_capacity,
        );
        let recent = RecentRevocations::new(&EnvoySharedData, &etcd_config.recent_prefix);
        let applied = etcd::apply_markers(&store, &markers.keys, &recent, now());
        match applied {
            Ok(removed) => {
                self.metrics.add(Counter::EtcdRevocationsApplied, removed);
                if self.sweeps.advance(&markers) {
                    self.start_poll();
                } else {
                    etcd::Watermark::new(&config.store_prefix, &etcd_config.key_prefix)
                        .save(&EnvoySharedData, self.sweeps.since_ms());
                }
            }
            // The next sweep starts from the same point and brings these markers again.
            Err(e) => {
                self.sweeps.abandon();
                log(LogLevel::Error, &format!("cannot apply revocations: {e}"));
            }
        }
    }
}

impl Context for SplitTokenRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.poll == Some(token_id) {
            self.poll = None;
            self.on_poll_answer(num_headers, body_size);
            return;
        }
        let Some((token, request)) = self.periodic.take() else {
            return;
        };
        if token != token_id {
            self.periodic = Some((token, request));
            return;
        }
        self.keys.borrow_mut().periodic_in_flight = false;
        let now = now();
        match key_response(&request, num_headers, body_size) {
            Outcome::Next(next) => self.start_periodic_fetch(next),
            Outcome::Keys { keys, jwks_path } => {
                self.metrics.bump(Counter::KeysFetched);
                log(
                    LogLevel::Info,
                    &format!(
                        "loaded {} verification key(s) from {jwks_path}",
                        keys.keys.len()
                    ),
                );
                self.keys.borrow_mut().loaded(keys, jwks_path, now);
            }
            Outcome::Failed(e) => {
                self.metrics.bump(Counter::KeyFetchFailures);
                log(LogLevel::Warn, &format!("key refresh failed: {e}"));
                self.keys.borrow_mut().failed(now);
            }
        }
    }
}

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
                self.cache = Rc::new(RefCell::new(LocalCache::new(config.local_cache_entries)));
                // Create every slot now, so that no token is ever written to a missing key
                // (Envoy's CAS cannot guard key creation). Idempotent across VMs and reloads.
                let store = Store::new(
                    &EnvoySharedData,
                    &config.store_prefix,
                    config.store_slots,
                    config.slot_capacity,
                );
                match store.initialize().and_then(|created| {
                    store.seed_epoch(clock().as_nanos() as u64)?;
                    Ok(created)
                }) {
                    Ok(0) => {}
                    Ok(created) => log(LogLevel::Info, &format!("created {created} store slots")),
                    Err(e) => {
                        log(
                            LogLevel::Error,
                            &format!("cannot initialize the store: {e}"),
                        );
                        return false;
                    }
                }
                let mut tick = None;
                if let Some(verify) = &config.verify {
                    self.keys = Rc::new(RefCell::new(KeyState::new(verify)));
                    self.periodic = None;
                    if matches!(verify.source, KeySource::Remote { .. }) {
                        // The first tick fetches the keys; later ticks refresh them when due.
                        tick = Some(Duration::from_secs(1));
                    }
                }
                if let Some(etcd_config) = &config.etcd {
                    self.leases =
                        Rc::new(RefCell::new(Leases::new(etcd_config.lease_bucket_seconds)));
                    let recent =
                        RecentRevocations::new(&EnvoySharedData, &etcd_config.recent_prefix);
                    let workers = format!("{}etcd-workers", config.store_prefix);
                    match recent.initialize().and_then(|_| {
                        etcd::worker_number(&EnvoySharedData, &workers, clock().as_nanos() as u64)
                    }) {
                        Ok(worker) => self.worker = worker,
                        Err(e) => {
                            log(
                                LogLevel::Error,
                                &format!("cannot initialize the etcd tier's shared data: {e}"),
                            );
                            return false;
                        }
                    }
                    // Whichever worker holds the poller's lease at a tick sweeps from where the
                    // store's last sweep ended (see `on_tick`).
                    self.poll = None;
                    self.polling = false;
                    self.last_poll = Duration::ZERO;
                    let poll = Duration::from_millis(etcd_config.poll_ms);
                    tick = Some(tick.map_or(poll, |t: Duration| t.min(poll)));
                }
                if let Some(period) = tick {
                    let _ = hostcalls::set_tick_period(period);
                }
                let shared = config
                    .etcd
                    .as_ref()
                    .map(|e| format!(", shared through etcd cluster {}", e.cluster))
                    .unwrap_or_default();
                log(
                    LogLevel::Info,
                    &format!(
                        "configured {} token path(s), {} public prefix(es), {} store slots{shared}",
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

    fn on_tick(&mut self) {
        if let Some(config) = self.config.clone() {
            if let Some(etcd_config) = &config.etcd {
                self.tick_poller(&config, etcd_config);
            }
        }
        let Some(verify) = self.verify_config() else {
            return;
        };
        let request = {
            let keys = self.keys.borrow();
            if !keys.refresh_due(verify, now()) {
                return;
            }
            first_request(&verify.source, keys.jwks_path.as_deref())
        };
        if let Some(request) = request {
            self.start_periodic_fetch(request);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let Some(config) = self.config.clone() else {
            // The SDK panics on None; a VM without a valid configuration refuses requests.
            return Some(Box::new(Unconfigured));
        };
        Some(Box::new(SplitTokenHttp {
            config,
            metrics: Rc::clone(&self.metrics),
            keys: Rc::clone(&self.keys),
            cache: Rc::clone(&self.cache),
            leases: Rc::clone(&self.leases),
            lookups: Rc::clone(&self.lookups),
            state: State::Request,
            body_size: 0,
            pending: None,
            refetched: false,
            fetched: false,
            request_headers_gone: false,
            response_headers_gone: false,
            introspection_authorization: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// How an introspection answer for an unknown, expired or revoked token starts.
const INACTIVE: &str = r#"{"active":false"#;

/// The HTTP context of a VM whose configuration was refused: it fails closed.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = hostcalls::send_http_response(
            503,
            LocalReply::HEADERS.to_vec(),
            Some(br#"{"error":"temporarily_unavailable","error_description":"the split-token filter is not configured"}"#),
        );
        Action::Pause
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet.
    Request,
    /// A token endpoint request: its response headers are next.
    TokenEndpoint,
    /// A revocation request: headers held, body buffering.
    Revocation,
    /// An introspection request: headers held, body buffering; always answered here.
    Introspection,
    /// A 200 token response, headers held back, body buffering.
    Buffering,
    /// Held while a call (keys or etcd) is under way: its token; `pending` says what for.
    Waiting(u32),
    /// A request whose headers went on undecided and that was answered before the filter read
    /// its body: the body never goes on, and call answers are ignored.
    Abandoned,
    /// Decided; let everything else through.
    Done,
}

struct SplitTokenHttp {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    keys: Rc<RefCell<KeyState>>,
    cache: Rc<RefCell<LocalCache>>,
    leases: Rc<RefCell<Leases>>,
    /// etcd lookups under way on this worker.
    lookups: Rc<Cell<u32>>,
    state: State,
    body_size: usize,
    /// What the call under way (`State::Waiting`) is for.
    pending: Option<Pending>,
    /// Keys were already fetched for this token: do not fetch again.
    refetched: bool,
    /// The token was already looked for in etcd: do not look again.
    fetched: bool,
    /// The request's headers went on before its body was read (Envoy does not allow
    /// `allow_on_headers_stop_iteration`): Envoy no longer lends them, and a read or write would
    /// fail (and the SDK would panic).
    request_headers_gone: bool,
    /// The same for a token response's headers: the client has them, so a failure can only
    /// reset the stream.
    response_headers_gone: bool,
    /// An introspection request's `Authorization`, read in its headers callback (they may go on
    /// before the body is read).
    introspection_authorization: Option<Vec<u8>>,
}

/// What a held request or response waits for.
enum Pending {
    /// Keys to verify a split token.
    Keys(SplitPlan, KeyRequest),
    /// The split token's write to etcd, before the client gets it.
    Publish { plan: SplitPlan, step: LeaseStep },
    /// A signature this replica does not hold, looked for in etcd; the slot counts it as under
    /// way until the answer is handled or the request goes away.
    Fetch {
        key: StoreKey,
        then: AfterFetch,
        _slot: InFlight,
    },
    /// A revocation's write to etcd (token deleted, marker written), before the request goes on.
    Retract {
        key: StoreKey,
        expires_at: u64,
        step: LeaseStep,
        then: AfterRetract,
    },
}

/// One etcd lookup under way on this worker: counted while it lives. It lives in the request's
/// `Pending`, so it is released when the answer is handled and also when the request goes away
/// before the answer (its context is dropped).
struct InFlight(Rc<Cell<u32>>);

impl InFlight {
    fn take(count: &Rc<Cell<u32>>, limit: u32) -> Option<Self> {
        (count.get() < limit).then(|| {
            count.set(count.get() + 1);
            Self(Rc::clone(count))
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Where a leased etcd write is: granting the bucket's lease, or writing under it.
#[derive(Clone, Copy)]
enum LeaseStep {
    Granting { bucket: u64, retried: bool },
    Writing { bucket: u64, retried: bool },
}

/// What a request does once etcd answered about its token.
#[derive(Clone, Copy)]
enum AfterFetch {
    /// Authorize it again (an API call, or a logout).
    Authorize { logout: bool },
    /// Decide the revocation again, with the request body of this size.
    Revoke { body_size: usize },
    /// Answer the introspection request, with the request body of this size.
    Introspect { body_size: usize },
}

/// What a request does once its revocation is in etcd.
enum AfterRetract {
    /// Go on as it is (a logout, its headers already rebuilt).
    Resume,
    /// Go on with this body (the full JWT for the IdP) in place of the first `body_size` bytes.
    ForwardBody { body: Vec<u8>, body_size: usize },
}

/// How a leased write went on.
enum Leased {
    /// Another call is under way.
    Wait(u32, LeaseStep),
    Written,
    Failed(EtcdError),
}

/// What verification at issuance decided.
enum Check {
    Verified,
    /// Keys are being fetched; the response stays paused.
    Wait(u32, KeyRequest),
    Failed(VerifyError),
    NoKeys(FetchError),
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
        if reply.body.is_empty() {
            headers.retain(|(name, _)| *name != "content-type");
        }
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
            IssueFailure::Verify(e) => {
                self.metrics.bump(Counter::VerifyFailed);
                log(LogLevel::Warn, &format!("token not issued: {e}"));
            }
            IssueFailure::Keys(e) => {
                self.metrics.bump(Counter::VerifyFailed);
                log(LogLevel::Warn, &format!("token not issued, no keys: {e}"));
            }
            IssueFailure::Etcd(e) => {
                log(LogLevel::Warn, &format!("token not issued: {e}"));
            }
        }
        self.metrics.bump(Counter::SplitFailures);
        self.state = State::Done;
        if self.response_headers_gone {
            // The client has the IdP's 200 headers but no byte of its body: reset, so the
            // answer ends there, unfinished. (Envoy defers the reset and always reports Ok.)
            self.metrics.bump(Counter::SplitResets);
            log(
                LogLevel::Warn,
                "token response reset: its headers had gone out (allow_on_headers_stop_iteration is off)",
            );
            let _ = hostcalls::reset_http_response();
            return Action::Pause;
        }
        self.send(&issue_failure(failure));
        Action::Pause
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    /// The `DPoP` request header. Envoy's single-value read returns only the first of several
    /// (this header is not joined with commas), so all are read: several come back joined
    /// with a comma, which no single proof contains and the core refuses.
    fn dpop_header(&self) -> Option<Vec<u8>> {
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()?;
        let mut proofs = headers.into_iter().filter(|(name, _)| name == "dpop");
        let mut value = proofs.next()?.1;
        for (_, more) in proofs {
            value.push(b',');
            value.extend_from_slice(&more);
        }
        Some(value)
    }

    /// Envoy picked the route before this filter ran, possibly on a client-sent identity
    /// header: have it recompute the route on the headers as the filter left them.
    fn recompute_route(&self) {
        if self.config.recompute_route && !self.config.claims_to_headers.is_empty() {
            let _ = hostcalls::call_foreign_function("clear_route_cache", None);
        }
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn route_request(&mut self, path: &[u8]) -> Action {
        match self.config.route(path) {
            Route::TokenEndpoint => {
                // Ask the IdP for an identity-encoded body: the filter cannot split gzip.
                let _ =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, "accept-encoding", None);
                self.state = State::TokenEndpoint;
                Action::Continue
            }
            Route::Revocation => self.hold_body(State::Revocation),
            Route::Introspection => self.hold_body(State::Introspection),
            Route::Public => {
                self.state = State::Done;
                Action::Continue
            }
            Route::Protected => self.on_protected_request(false),
            Route::Logout => self.on_protected_request(true),
        }
    }

    /// Holds a revocation or introspection request until its body says which token (a
    /// revocation body may be rewritten). RFC 7009 and 7662 endpoints take POST only.
    fn hold_body(&mut self, state: State) -> Action {
        if self.request_header(":method").as_deref() != Some(b"POST") {
            self.state = State::Done;
            self.metrics.bump(if state == State::Introspection {
                Counter::IntrospectionsRefused
            } else {
                Counter::RevocationsInvalid
            });
            let not_post = Failure::Request(RevocationError::NotPost);
            self.send(&revocation_failure(&not_post));
            return Action::Pause;
        }
        self.state = state;
        if state == State::Introspection {
            // Read now: the headers may go on before the body decides.
            self.introspection_authorization = self.request_header("authorization");
        }
        if self.config.allow_on_headers_stop_iteration {
            return Action::Pause;
        }
        // Envoy would stop everything on a pause here, the body included: let the headers go on
        // and hold the body instead. Its length may change (a revocation carries the full JWT
        // on), so it goes on without one; an introspection's credentials stay here.
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "content-length", None);
        if state == State::Introspection {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", None);
        }
        self.request_headers_gone = true;
        Action::Continue
    }

    fn request_body(&self, body_size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// A whole revocation body (or none): decide, revoke, and forward or answer.
    fn finish_revocation(&mut self, body_size: usize) -> Action {
        self.state = State::Done;
        let body = self.request_body(body_size);
        // With etcd the token is revoked here once etcd has it (`after_retract`).
        let decide = if self.config.etcd.is_some() {
            revoke::decide
        } else {
            revoke::revoke
        };
        let plan = match decide(&self.store(), &body, now()) {
            Ok(plan) => plan,
            Err(failure) => {
                if let Failure::Store(e) = &failure {
                    log(LogLevel::Error, &format!("revocation: {e}"));
                }
                self.metrics.bump(Counter::RevocationsInvalid);
                self.send(&revocation_failure(&failure));
                return Action::Pause;
            }
        };
        let unknown_here = matches!(
            plan,
            RevocationPlan::ForwardUnchanged | RevocationPlan::AnswerLocally
        );
        if unknown_here && !self.fetched && self.config.etcd.is_some() {
            if let Some(key) = revoke::remote_candidate(&body) {
                // Maybe issued through another replica: ask etcd, then decide again.
                return self.fetch(key, AfterFetch::Revoke { body_size });
            }
        }
        match plan {
            RevocationPlan::Revoked {
                body,
                key,
                expires_at,
            } if self.config.etcd.is_some() => {
                let then = AfterRetract::ForwardBody { body, body_size };
                self.retract(key, expires_at, then)
            }
            RevocationPlan::Revoked { body, .. } => {
                // Revoked here already (`revoke::revoke`).
                self.metrics.bump(Counter::Revoked);
                self.forward_body(&body, body_size)
            }
            RevocationPlan::ForwardUnchanged => {
                self.metrics.bump(Counter::RevocationsForwarded);
                Action::Continue
            }
            RevocationPlan::AnswerLocally => {
                self.metrics.bump(Counter::RevocationsUnknown);
                self.send(&revocation_done());
                Action::Pause
            }
        }
    }

    /// Forwards a revocation with the full JWT in place of the signature.
    fn forward_body(&mut self, body: &[u8], body_size: usize) -> Action {
        let applied = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, body)
            .and_then(|()| {
                set_length(
                    MapType::HttpRequestHeaders,
                    self.request_headers_gone,
                    body.len(),
                )
            });
        if applied.is_err() {
            // Revoked here already; the IdP just does not hear of it. Never forward the
            // signature in place of the token.
            log(
                LogLevel::Error,
                "revocation: cannot rewrite the request body",
            );
            self.send(&revocation_done());
            return Action::Pause;
        }
        Action::Continue
    }

    /// A whole introspection body (or none): answered here, never forwarded.
    fn finish_introspection(&mut self, body_size: usize) -> Action {
        self.state = State::Done;
        let Some(clients) = self.config.introspection.as_ref() else {
            return Action::Continue;
        };
        let authorization = self.introspection_authorization.as_deref();
        let outcome = if authenticate(clients, authorization) {
            let body = self.request_body(body_size);
            match introspect(&self.store(), &body, now()) {
                Ok(outcome) => {
                    let inactive =
                        matches!(&outcome, Introspection::Answer(a) if a.starts_with(INACTIVE));
                    if inactive && !self.fetched && self.config.etcd.is_some() {
                        if let Some(key) = revoke::remote_candidate(&body) {
                            // Maybe issued through another replica: ask etcd, then answer.
                            return self.fetch(key, AfterFetch::Introspect { body_size });
                        }
                    }
                    outcome
                }
                Err(e) => {
                    log(LogLevel::Error, &format!("introspection: {e}"));
                    self.metrics.bump(Counter::RejectedStoreUnavailable);
                    self.send(&Rejection::StoreUnavailable.reply(&self.config));
                    return Action::Pause;
                }
            }
        } else {
            Introspection::Unauthorized
        };
        self.metrics.bump(match &outcome {
            Introspection::Answer(a) if a.starts_with(INACTIVE) => Counter::IntrospectionsInactive,
            Introspection::Answer(_) => Counter::IntrospectionsActive,
            Introspection::Unauthorized | Introspection::Invalid(_) => {
                Counter::IntrospectionsRefused
            }
        });
        self.send(&introspection_reply(&self.config, &outcome));
        Action::Pause
    }

    /// Ends a buffered request body: revocation or introspection.
    fn finish_request_body(&mut self, body_size: usize) -> Action {
        if self.state == State::Introspection {
            self.finish_introspection(body_size)
        } else {
            self.finish_revocation(body_size)
        }
    }

    fn on_protected_request(&mut self, logout: bool) -> Action {
        let authorization = self.request_header("authorization");
        // With etcd a logout revokes here only once etcd has it (`after_retract`): a failed
        // write must leave the token as it was on every replica, not revoked on this one only.
        let revoke_here = logout && self.config.etcd.is_none();
        let decide = if revoke_here {
            revoke::logout
        } else {
            authorize
        };
        let verdict = decide(
            &self.config,
            &self.store(),
            &mut self.cache.borrow_mut(),
            authorization.as_deref(),
            || self.dpop_header(),
            now(),
        );
        self.state = State::Done;
        let verdict = match verdict {
            Ok(v) => v,
            Err((rejection, e)) => {
                log(LogLevel::Error, &format!("{e}"));
                Verdict::Reject(rejection)
            }
        };
        if !self.fetched {
            if let Some(key) = etcd::miss_key(&self.config, &verdict, authorization.as_deref()) {
                // Maybe issued through another replica: ask etcd once.
                return self.fetch(key, AfterFetch::Authorize { logout });
            }
        }
        if revoke_here && matches!(verdict, Verdict::Forward(_)) {
            self.metrics.bump(Counter::Revoked);
        }
        self.metrics.bump(verdict.counter());
        match verdict {
            Verdict::Forward(forward) => {
                self.metrics
                    .add(Counter::ClaimsUnsafeDropped, forward.unsafe_claims);
                let headers = MapType::HttpRequestHeaders;
                let mappings = &self.config.claims_to_headers;
                let applied = hostcalls::set_map_value(
                    headers,
                    "authorization",
                    forward.authorization.as_deref(),
                )
                .and_then(|()| {
                    forward
                        .claim_headers
                        .iter()
                        .try_for_each(|(i, value)| match mappings.get(*i) {
                            Some(m) => hostcalls::set_map_value(headers, &m.header, Some(value)),
                            None => Ok(()),
                        })
                });
                if let Err(status) = applied {
                    // Fail closed: without the rebuilt headers the upstream must not be called.
                    log(
                        LogLevel::Error,
                        &format!("cannot rebuild the request: {status:?}"),
                    );
                    self.send(&Rejection::StoreUnavailable.reply(&self.config));
                    return Action::Pause;
                }
                if logout && !revoke_here {
                    // Every replica hears of it through etcd before the IdP does. (Hashed
                    // again only here: API calls, the hot path, never need the key.)
                    if let Some(key) = presented_key(authorization.as_deref()) {
                        return self.retract(key, forward.expires_at, AfterRetract::Resume);
                    }
                }
                Action::Continue
            }
            Verdict::PassThrough => Action::Continue,
            Verdict::Reject(rejection) => {
                self.send(&rejection.reply(&self.config));
                Action::Pause
            }
        }
    }

    /// Holds the request while etcd is asked for `key`.
    fn fetch(&mut self, key: StoreKey, then: AfterFetch) -> Action {
        self.fetched = true;
        let Some(etcd_config) = self.config.etcd.as_ref() else {
            return self.fetch_failed(&EtcdError::NoAnswer { call: "range" }, then);
        };
        // Made-up signatures cost an etcd read each: bound what one worker has under way, so a
        // flood can neither pile up calls nor crowd out the revocation polls.
        let Some(slot) = InFlight::take(&self.lookups, etcd_config.max_pending_lookups) else {
            self.state = State::Done;
            return self.unavailable(then);
        };
        let call = etcd::get_token(&etcd_config.key_prefix, &key);
        match dispatch_etcd(etcd_config, &call) {
            Ok(token) => {
                self.pending = Some(Pending::Fetch {
                    key,
                    then,
                    _slot: slot,
                });
                self.state = State::Waiting(token);
                Action::Pause
            }
            Err(e) => self.fetch_failed(&e, then),
        }
    }

    fn fetch_failed(&mut self, e: &EtcdError, then: AfterFetch) -> Action {
        self.metrics.bump(Counter::EtcdFailures);
        log(LogLevel::Warn, &format!("token lookup in etcd failed: {e}"));
        self.state = State::Done;
        self.unavailable(then)
    }

    /// The 503 of a request whose token could not be looked for in etcd.
    fn unavailable(&mut self, then: AfterFetch) -> Action {
        match then {
            AfterFetch::Authorize { .. } => {
                self.metrics.bump(Counter::RejectedStoreUnavailable);
                self.send(&Rejection::StoreUnavailable.reply(&self.config));
            }
            AfterFetch::Introspect { .. } => {
                self.metrics.bump(Counter::RejectedStoreUnavailable);
                self.send(&shared_store_unavailable())
            }
            // Counted in etcd.failures: a revocation etcd could not take revokes nothing.
            AfterFetch::Revoke { .. } => self.send(&shared_store_unavailable()),
        }
        Action::Pause
    }

    /// etcd answered about a token this replica did not hold: keep it here if it is there,
    /// then decide the request again.
    fn on_fetched(
        &mut self,
        key: StoreKey,
        then: AfterFetch,
        answer: (Option<Vec<u8>>, Vec<u8>),
    ) -> Action {
        let fetched = match etcd::parse_get(answer.0.as_deref(), &answer.1) {
            Ok(fetched) => fetched,
            Err(e) => return self.fetch_failed(&e, then),
        };
        let adopted = match &fetched {
            Some(f) => match &self.config.etcd {
                Some(etcd_config) => {
                    let recent =
                        RecentRevocations::new(&EnvoySharedData, &etcd_config.recent_prefix);
                    etcd::adopt(&self.store(), key, f, &recent, now())
                }
                None => Ok(None),
            },
            None => Ok(None),
        };
        match adopted {
            Ok(Some(report)) => {
                self.metrics.record_put(&report);
                self.metrics.bump(Counter::EtcdFetched);
            }
            Ok(None) => self.metrics.bump(Counter::EtcdNotFound),
            Err(e) => {
                // A valid token that cannot be kept here: 503, not an "unknown token" 401.
                log(
                    LogLevel::Error,
                    &format!("cannot keep a token read from etcd: {e}"),
                );
                self.metrics.bump(Counter::StoreWriteFailures);
                self.state = State::Done;
                return self.unavailable(then);
            }
        }
        match then {
            AfterFetch::Authorize { logout } => self.on_protected_request(logout),
            AfterFetch::Revoke { body_size } => self.finish_revocation(body_size),
            AfterFetch::Introspect { body_size } => self.finish_introspection(body_size),
        }
    }

    /// Holds the request while its revocation is written to etcd; then it is revoked here.
    fn retract(&mut self, key: StoreKey, expires_at: u64, then: AfterRetract) -> Action {
        let Some(etcd_config) = self.config.etcd.as_ref() else {
            // Callers revoke here themselves without etcd; never let the request through.
            return self.retract_failed(&EtcdError::NoAnswer { call: "txn" });
        };
        let prefix = etcd_config.key_prefix.clone();
        let now_ms = now_ms();
        let write = move |lease| etcd::revoke(&prefix, &key, expires_at, lease, now_ms);
        let step = self.start_leased(expires_at, false, &write);
        self.on_retract_step(key, expires_at, then, step)
    }

    fn on_retract_step(
        &mut self,
        key: StoreKey,
        expires_at: u64,
        then: AfterRetract,
        step: Leased,
    ) -> Action {
        match step {
            Leased::Wait(token, step) => {
                self.pending = Some(Pending::Retract {
                    key,
                    expires_at,
                    step,
                    then,
                });
                self.state = State::Waiting(token);
                Action::Pause
            }
            Leased::Written => {
                if self.config.etcd.is_some() {
                    self.metrics.bump(Counter::EtcdRevocationsPublished);
                }
                self.after_retract(key, then)
            }
            Leased::Failed(e) => self.retract_failed(&e),
        }
    }

    fn retract_failed(&mut self, e: &EtcdError) -> Action {
        // Nothing is revoked, here or anywhere: the client's retry starts over.
        self.metrics.bump(Counter::EtcdFailures);
        log(
            LogLevel::Warn,
            &format!("revocation not written to etcd: {e}"),
        );
        self.state = State::Done;
        self.send(&shared_store_unavailable());
        Action::Pause
    }

    /// etcd has the revocation (or there is no etcd): revoke here, then let the request go on.
    fn after_retract(&mut self, key: StoreKey, then: AfterRetract) -> Action {
        self.state = State::Done;
        if let Some(etcd_config) = &self.config.etcd {
            // Remembered before the removal, as the poller does: a read of this token from etcd
            // on another worker, racing this revocation, is not kept.
            let recent = RecentRevocations::new(&EnvoySharedData, &etcd_config.recent_prefix);
            if let Err(e) = recent.remember(key, now()) {
                log(LogLevel::Error, &format!("revocation: {e}"));
            }
        }
        if let Err(failure) = revoke::forget(&self.store(), &key) {
            // etcd has it, and this replica's next sweep applies it; the client may retry.
            if let Failure::Store(e) = &failure {
                log(LogLevel::Error, &format!("revocation: {e}"));
            }
            self.metrics.bump(Counter::RevocationsInvalid);
            self.send(&revocation_failure(&failure));
            return Action::Pause;
        }
        self.metrics.bump(Counter::Revoked);
        match then {
            AfterRetract::Resume => Action::Continue,
            AfterRetract::ForwardBody { body, body_size } => self.forward_body(&body, body_size),
        }
    }

    /// Starts a write under the lease of `expires_at`'s bucket, granting the lease first when
    /// this worker has none.
    fn start_leased(
        &self,
        expires_at: u64,
        retried: bool,
        write: &dyn Fn(i64) -> etcd::Call,
    ) -> Leased {
        let Some(etcd_config) = self.config.etcd.as_ref() else {
            return Leased::Written;
        };
        let now = now();
        let mut leases = self.leases.borrow_mut();
        let bucket = leases.bucket(expires_at);
        let (call, step) = match leases.get(bucket, now) {
            Some(lease) => (write(lease), LeaseStep::Writing { bucket, retried }),
            None => (
                etcd::grant(Leases::ttl(bucket, now)),
                LeaseStep::Granting { bucket, retried },
            ),
        };
        match dispatch_etcd(etcd_config, &call) {
            Ok(token) => Leased::Wait(token, step),
            Err(e) => Leased::Failed(e),
        }
    }

    /// Takes a leased write one step on from etcd's answer.
    fn advance_leased(
        &self,
        step: LeaseStep,
        answer: (Option<Vec<u8>>, Vec<u8>),
        expires_at: u64,
        (name, write): (&'static str, &dyn Fn(i64) -> etcd::Call),
    ) -> Leased {
        let Some(etcd_config) = self.config.etcd.as_ref() else {
            return Leased::Written;
        };
        let (status, body) = answer;
        match step {
            LeaseStep::Granting { bucket, retried } => {
                match etcd::parse_grant(status.as_deref(), &body) {
                    Ok(lease) => {
                        self.leases.borrow_mut().insert(bucket, lease);
                        let call = write(lease);
                        match dispatch_etcd(etcd_config, &call) {
                            Ok(token) => {
                                Leased::Wait(token, LeaseStep::Writing { bucket, retried })
                            }
                            Err(e) => Leased::Failed(e),
                        }
                    }
                    Err(e) => Leased::Failed(e),
                }
            }
            LeaseStep::Writing { bucket, retried } => {
                match etcd::parse_write(name, status.as_deref(), &body) {
                    Ok(()) => Leased::Written,
                    Err(e) if e.lease_not_found() && !retried => {
                        // The lease expired early or etcd lost it: grant a new one, once.
                        self.leases.borrow_mut().forget(bucket);
                        self.start_leased(expires_at, true, write)
                    }
                    Err(e) => Leased::Failed(e),
                }
            }
        }
    }

    /// The whole token response is buffered: split it, verify it, store it, replace the body.
    fn finish_split(&mut self) -> Action {
        let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, self.body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let plan = match split(&self.config, &body, now()) {
            Ok(plan) => plan,
            Err(e) => return self.fail_closed(IssueFailure::Split(&e)),
        };
        self.verify_then_issue(plan)
    }

    fn verify_then_issue(&mut self, plan: SplitPlan) -> Action {
        match self.check(&plan) {
            Check::Verified => self.publish_then_issue(plan),
            Check::Wait(token, request) => {
                self.pending = Some(Pending::Keys(plan, request));
                self.state = State::Waiting(token);
                Action::Pause
            }
            Check::Failed(e) => self.fail_closed(IssueFailure::Verify(&e)),
            Check::NoKeys(e) => self.fail_closed(IssueFailure::Keys(&e)),
        }
    }

    /// Verifies the token when `verify` is configured, fetching keys when there are none yet or
    /// the token names a `kid` the worker does not know (once per token, rate-limited).
    fn check(&mut self, plan: &SplitPlan) -> Check {
        let Some(verify_config) = self.config.verify.as_ref() else {
            return Check::Verified;
        };
        let now = now();
        let result = {
            let keys = self.keys.borrow();
            keys.keys
                .as_ref()
                .map(|k| verify(&plan.jwt(), k, &verify_config.policy, now))
        };
        let may_fetch = !self.refetched && self.keys.borrow().refetch_allowed(verify_config, now);
        match result {
            Some(Ok(())) => Check::Verified,
            // A new kid, or no kid and no key that verifies: the IdP may have rotated its keys.
            Some(Err(VerifyError::UnknownKid { .. } | VerifyError::BadSignature)) if may_fetch => {
                self.fetch_keys(now)
            }
            Some(Err(e)) => Check::Failed(e),
            None if !self.refetched => self.fetch_keys(now),
            None => Check::NoKeys(FetchError::NoResponse),
        }
    }

    fn fetch_keys(&mut self, now: u64) -> Check {
        let Some(verify_config) = self.config.verify.as_ref() else {
            return Check::Verified;
        };
        self.refetched = true;
        let request = {
            let keys = self.keys.borrow();
            first_request(&verify_config.source, keys.jwks_path.as_deref())
        };
        let Some(request) = request else {
            return Check::NoKeys(FetchError::NoResponse);
        };
        self.keys.borrow_mut().on_demand_at = Some(now);
        match dispatch_key_request(verify_config, &request) {
            Ok(token) => Check::Wait(token, request),
            Err(_) => Check::NoKeys(FetchError::NoResponse),
        }
    }

    /// With etcd, writes the token there first: a client never holds a token that another
    /// replica could not find.
    fn publish_then_issue(&mut self, plan: SplitPlan) -> Action {
        let Some(etcd_config) = self.config.etcd.as_ref() else {
            return self.issue(&plan);
        };
        let prefix = etcd_config.key_prefix.clone();
        let step = {
            let write = |lease| etcd::put_token(&prefix, &plan.entry(), lease);
            self.start_leased(plan.expires_at, false, &write)
        };
        self.on_publish_step(plan, step)
    }

    fn on_publish_step(&mut self, plan: SplitPlan, step: Leased) -> Action {
        match step {
            Leased::Wait(token, step) => {
                self.pending = Some(Pending::Publish { plan, step });
                self.state = State::Waiting(token);
                Action::Pause
            }
            Leased::Written => {
                if self.config.etcd.is_some() {
                    self.metrics.bump(Counter::EtcdPublished);
                }
                self.issue(&plan)
            }
            Leased::Failed(e) => {
                self.metrics.bump(Counter::EtcdFailures);
                self.fail_closed(IssueFailure::Etcd(&e))
            }
        }
    }

    /// Stores the entry, then replaces the body: the client can use its token at once.
    fn issue(&mut self, plan: &SplitPlan) -> Action {
        let now = now();
        let report = match self.store().put(&plan.entry(), now) {
            Ok(report) => report,
            Err(e) => return self.fail_closed(IssueFailure::Store(&e)),
        };
        self.metrics.record_put(&report);

        let applied =
            hostcalls::set_buffer(BufferType::HttpResponseBody, 0, self.body_size, &plan.body)
                .and_then(|()| {
                    let gone = self.response_headers_gone;
                    set_length(MapType::HttpResponseHeaders, gone, plan.body.len())
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

impl SplitTokenHttp {
    /// Keys for a held token response arrived (or did not).
    fn on_keys(
        &mut self,
        plan: SplitPlan,
        request: KeyRequest,
        num_headers: usize,
        body_size: usize,
    ) -> Action {
        let now = now();
        match key_response(&request, num_headers, body_size) {
            Outcome::Next(next) => match self
                .config
                .verify
                .as_ref()
                .map(|v| dispatch_key_request(v, &next))
            {
                Some(Ok(token)) => {
                    self.pending = Some(Pending::Keys(plan, next));
                    self.state = State::Waiting(token);
                    Action::Pause
                }
                _ => self.fail_closed(IssueFailure::Keys(&FetchError::NoResponse)),
            },
            Outcome::Keys { keys, jwks_path } => {
                self.metrics.bump(Counter::KeysFetched);
                self.keys.borrow_mut().loaded(keys, jwks_path, now);
                self.verify_then_issue(plan)
            }
            Outcome::Failed(e) => {
                self.metrics.bump(Counter::KeyFetchFailures);
                log(LogLevel::Warn, &format!("key fetch failed: {e}"));
                // Older keys, if any, still decide; without keys the token cannot be issued.
                if self.keys.borrow().keys.is_some() {
                    self.verify_then_issue(plan)
                } else {
                    self.fail_closed(IssueFailure::Keys(&e))
                }
            }
        }
    }
}

impl Context for SplitTokenHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.state != State::Waiting(token_id) {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        self.state = State::Done;
        let prefix = self
            .config
            .etcd
            .as_ref()
            .map(|e| e.key_prefix.clone())
            .unwrap_or_default();
        // Token responses are held in the response path, lifecycle calls in the request path.
        let (action, response) = match pending {
            Pending::Keys(plan, request) => {
                (self.on_keys(plan, request, num_headers, body_size), true)
            }
            Pending::Publish { plan, step } => {
                let answer = call_answer(num_headers, body_size);
                let next = {
                    let write = |lease| etcd::put_token(&prefix, &plan.entry(), lease);
                    self.advance_leased(step, answer, plan.expires_at, ("put", &write))
                };
                (self.on_publish_step(plan, next), true)
            }
            Pending::Fetch { key, then, .. } => {
                let answer = call_answer(num_headers, body_size);
                (self.on_fetched(key, then, answer), false)
            }
            Pending::Retract {
                key,
                expires_at,
                step,
                then,
            } => {
                let answer = call_answer(num_headers, body_size);
                let next = {
                    let now_ms = now_ms();
                    let write = |lease| etcd::revoke(&prefix, &key, expires_at, lease, now_ms);
                    self.advance_leased(step, answer, expires_at, ("txn", &write))
                };
                (self.on_retract_step(key, expires_at, then, next), false)
            }
        };
        if action == Action::Continue {
            let _ = if response {
                hostcalls::resume_http_response()
            } else {
                // The identity headers were set after the headers callback: route on them
                // (unless the headers went on already, routed).
                if !self.request_headers_gone {
                    self.recompute_route();
                }
                hostcalls::resume_http_request()
            };
        }
    }
}

impl HttpContext for SplitTokenHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(all(feature = "fault-injection", target_arch = "wasm32"))]
        if self.request_header("x-split-token-fault").as_deref() == Some(b"trap") {
            core::arch::wasm32::unreachable();
        }
        // Identity headers come from verified claims only: whatever a client sent under those
        // names is removed first, on every path and in every outcome. Envoy matches header names
        // case-insensitively and removes every instance.
        for mapping in &self.config.claims_to_headers {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &mapping.header, None);
        }
        let path = self.request_header(":path").unwrap_or_default();
        let mut action = self.route_request(&path);
        if matches!(self.state, State::Revocation | State::Introspection) && end_of_stream {
            action = self.finish_request_body(0);
        }
        let held = matches!(self.state, State::Revocation | State::Introspection);
        if action == Action::Continue || held {
            self.recompute_route();
        }
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.request_headers_gone && self.state != State::Done {
            // An answer to a request the filter has not decided yet (`hold_body`): Envoy will
            // not hand the filter the rest of that request, so it can never decide it, and
            // holding the answer would stall the client. Whatever happens, the body stays.
            self.state = State::Abandoned;
            self.metrics.bump(Counter::EarlyAnswers);
            let status = self.response_header(":status").unwrap_or_default();
            if envoy_error(&status) {
                // Envoy failed the request itself (no healthy upstream, a direct_response
                // error): that answer carries no token and says the request failed.
                return Action::Continue;
            }
            // The upstream answered without the body the filter decides on, or Envoy answered
            // with a success: neither can stand for the filter's answer (a revocation it never
            // made, an introspection of a bare signature). Fail closed: reset.
            log(
                LogLevel::Warn,
                "request reset: it was answered before the filter read its body (route it to an upstream that reads the request first)",
            );
            let _ = hostcalls::reset_http_response();
            return Action::Pause;
        }
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
                // known. With `allow_on_headers_stop_iteration` the headers are held back, so a
                // failure can still become a 502 instead of the IdP's 200. Without it a pause here
                // would stop the body too: the headers go on (the body then goes out chunked) and
                // the body is held until it is split, so a failure resets the stream before any
                // byte of it left.
                for stale in [
                    "content-length",
                    "etag",
                    "content-md5",
                    "digest",
                    "content-digest",
                    "repr-digest",
                ] {
                    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, stale, None);
                }
                self.state = State::Buffering;
                if self.config.allow_on_headers_stop_iteration {
                    return Action::Pause;
                }
                self.response_headers_gone = true;
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let State::Waiting(_) | State::Abandoned = self.state {
            // Held until etcd answers: a body going on would take the headers with it.
            return Action::Pause;
        }
        if !matches!(self.state, State::Revocation | State::Introspection) {
            return Action::Continue;
        }
        if body_size > revoke::MAX_REVOCATION_BODY {
            let too_large = RevocationError::TooLarge {
                limit: revoke::MAX_REVOCATION_BODY,
            };
            if self.state == State::Introspection {
                self.metrics.bump(Counter::IntrospectionsRefused);
                self.send(&introspection_reply(
                    &self.config,
                    &Introspection::Invalid(too_large),
                ));
            } else {
                self.metrics.bump(Counter::RevocationsInvalid);
                self.send(&revocation_failure(&Failure::Request(too_large)));
            }
            self.state = State::Done;
            return Action::Pause;
        }
        if !end_of_stream {
            self.body_size = body_size;
            return Action::Pause;
        }
        self.finish_request_body(body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if let State::Waiting(_) | State::Abandoned = self.state {
            return Action::Pause;
        }
        if !matches!(self.state, State::Revocation | State::Introspection) {
            return Action::Continue;
        }
        self.finish_request_body(self.body_size)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let State::Waiting(_) = self.state {
            return Action::Pause;
        }
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
        if let State::Waiting(_) = self.state {
            return Action::Pause;
        }
        if self.state != State::Buffering {
            return Action::Continue;
        }
        self.finish_split()
    }
}
