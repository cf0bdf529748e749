//! The per-worker duties: configuration, key refresh, the revocation poller and its lease.
//!
//! One [`Worker`] per worker (proxy-wasm's root context). It owns what the worker's exchanges
//! share ([`Shared`]: the configuration, the keys, the local cache, the etcd leases, the count of
//! lookups under way) and hands each exchange a [`Stream`] holding one reference to it.

use super::host::{Answer, Host, HostExt, Level};
use super::stream::Stream;
use crate::config::{EtcdConfig, KeySource, VerifyConfig};
use crate::issue::keys::{first_request, next_request, on_response, KeyRequest, KeyState, Outcome};
use crate::replicas::etcd::{self, EtcdError, Leases, PollerLease, RecentRevocations};
use crate::stats::Counter;
use crate::store::cache::LocalCache;
use crate::store::map::MapStore;
use crate::store::{HostStatus, Store, Tokens};
use crate::token::verify::KeySet;
use crate::Config;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// What a worker's exchanges share, behind one `Rc` per exchange.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// This worker's verification keys.
    pub(crate) keys: RefCell<KeyState>,
    /// This worker's rebuilt requests for repeat hits.
    pub(crate) cache: RefCell<LocalCache>,
    /// This worker's etcd leases.
    pub(crate) leases: RefCell<Leases>,
    /// etcd lookups under way on this worker (kept across configurations: the lookups of an
    /// older one still count until they end).
    pub(crate) lookups: Rc<Cell<u32>>,
    /// The host's process-wide token map, when it has one ([`Host::token_map`]); otherwise the
    /// tokens live in the slot store over shared data.
    pub(crate) map: Option<Arc<MapStore>>,
}

/// Verification keys a worker loaded, as another worker of the same configuration takes them
/// over ([`Worker::adopt_keys`]).
///
/// proxy-wasm gives every worker a timer, so each refreshes its own keys. Envoy's dynamic
/// modules have no per-worker timer: only the main thread's worker is ticked, and the native
/// adapter hands what its periodic refresh loaded to the workers of the worker threads. A
/// worker's on-demand fetches (an unknown `kid`) stay its own, as in the Wasm build.
#[derive(Clone, Debug)]
pub struct LoadedKeys {
    keys: KeySet,
    jwks_path: String,
    loaded_at: u64,
    /// Which request loaded them ([`KeyState::request`]).
    request: u64,
    /// The loading worker's [`KeyState::loads`] when these were loaded.
    load: u64,
}

impl LoadedKeys {
    /// Which load of the worker that loaded them these are (see [`Worker::keys_loads`]).
    pub fn load(&self) -> u64 {
        self.load
    }
}

/// One worker: its configuration and its own calls (key refreshes, revocation polls).
#[derive(Default)]
pub struct Worker {
    shared: Option<Rc<Shared>>,
    lookups: Rc<Cell<u32>>,
    /// The periodic key fetch under way: its call token, request and number ([`next_request`]).
    periodic: Option<(u32, KeyRequest, u64)>,
    /// This worker's number in the process, which names it as the revocation poller.
    worker: u64,
    /// Whether this worker held the poller's lease at its last tick.
    polling: bool,
    /// The revocation poll: the call under way, where sweeps stand, when the last poll began.
    poll: Option<u32>,
    sweeps: etcd::Sweeps,
    last_poll: Duration,
    poll_failing: bool,
}

/// Starts one GET of a key fetch through the configured cluster: its call token, and the
/// request's number ([`next_request`]), which orders the key sets answers bring.
pub(crate) fn dispatch_key_request<H: Host>(
    host: &H,
    verify: &VerifyConfig,
    request: &KeyRequest,
) -> Result<(u32, u64), HostStatus> {
    let KeySource::Remote {
        cluster, authority, ..
    } = &verify.source
    else {
        return Err(HostStatus(2));
    };
    let number = next_request();
    host.dispatch(
        cluster,
        vec![
            (":method", "GET"),
            (":path", &request.path),
            (":authority", authority),
            ("accept", "application/json"),
        ],
        None,
        Duration::from_millis(verify.fetch_timeout_ms),
    )
    .map(|token| (token, number))
}

/// Reads a finished key fetch's answer and interprets it.
pub(crate) fn key_response<H: Host>(host: &H, request: &KeyRequest, answer: Answer) -> Outcome {
    let (status, body) = host.answer(answer);
    on_response(request, status.as_deref(), &body)
}

/// Starts one call to etcd's JSON gateway. A call that cannot start counts as unanswered.
pub(crate) fn dispatch_etcd<H: Host>(
    host: &H,
    config: &EtcdConfig,
    call: &etcd::Call,
) -> Result<u32, EtcdError> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", call.path),
        (":authority", config.authority.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend(config.retry_headers.iter().map(|(n, v)| (*n, v.as_str())));
    host.dispatch(
        &config.cluster,
        headers,
        Some(&call.body),
        Duration::from_millis(config.timeout_ms),
    )
    .map_err(|status| EtcdError::NotDispatched {
        call: call.path,
        status: status.0,
    })
}

/// The slot store of a configuration, in the host's shared data.
fn slots<'a, H: Host>(host: &'a H, config: &'a Config) -> Store<'a, H> {
    Store::new(
        host,
        &config.store_prefix,
        config.store_slots,
        config.slot_capacity,
    )
    .with_epoch_key(&config.epoch_key)
}

/// Where this worker's tokens live: the host's map, or slots in its shared data.
pub(crate) fn tokens<'a, H: Host>(host: &'a H, shared: &'a Shared) -> Tokens<'a, H> {
    match &shared.map {
        Some(map) => Tokens::Map(map),
        None => Tokens::Slots(slots(host, &shared.config)),
    }
}

impl Worker {
    /// The configuration in force, if one was accepted.
    pub fn config(&self) -> Option<&Config> {
        self.shared.as_deref().map(|s| &s.config)
    }

    /// How many times this worker's keys were replaced since its configuration (0: never; keys
    /// given inline in the configuration do not count). Cheap: a host compares it after each of
    /// the worker's calls to see whether [`Self::loaded_keys`] has something new.
    pub fn keys_loads(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.keys.borrow().loads)
    }

    /// The keys this worker loaded last, if it loaded any (a copy: key sets are small).
    pub fn loaded_keys(&self) -> Option<LoadedKeys> {
        let shared = self.shared.as_ref()?;
        let keys = shared.keys.borrow();
        if keys.loads == 0 {
            return None;
        }
        Some(LoadedKeys {
            keys: keys.keys.clone()?,
            jwks_path: keys.jwks_path.clone()?,
            loaded_at: keys.loaded_at,
            request: keys.request,
            load: keys.loads,
        })
    }

    /// Takes over keys another worker of the same configuration loaded, as if this worker had
    /// fetched them itself at that time. `false` (nothing changed) when this worker verifies
    /// against no remote JWKS, so keys of another configuration can never replace inline ones,
    /// and when its own keys were asked for later (an on-demand fetch sent after the other
    /// worker's: it may be the only one that saw the IdP drop a key).
    pub fn adopt_keys(&self, keys: &LoadedKeys) -> bool {
        let Some(shared) = self.shared.as_ref() else {
            return false;
        };
        let remote = shared
            .config
            .verify
            .as_ref()
            .is_some_and(|v| matches!(v.source, KeySource::Remote { .. }));
        remote
            && shared.keys.borrow_mut().loaded(
                keys.keys.clone(),
                keys.jwks_path.clone(),
                keys.loaded_at,
                keys.request,
            )
    }

    /// The state of a new HTTP exchange; `None` while no configuration was accepted (the
    /// exchange is then refused, see [`super::refuse_unconfigured`]).
    pub fn stream(&self) -> Option<Stream> {
        self.shared.as_ref().map(|s| Stream::new(Rc::clone(s)))
    }

    /// Parses and applies a configuration: creates the store's slots, seeds the epoch, sets up
    /// the etcd tier's shared data and the tick. `false` refuses it (and logs why).
    pub fn configure<H: Host>(&mut self, host: &H, bytes: &[u8]) -> bool {
        let config = match Config::from_json(bytes) {
            Ok(config) => config,
            Err(e) => {
                host.log(Level::Error, &format!("invalid configuration: {e}"));
                return false;
            }
        };
        host.define_counters();
        let cache = LocalCache::new(config.local_cache_entries);
        let map = host.token_map(
            &config.store_prefix,
            (config.store_slots as usize).saturating_mul(usize::from(config.slot_capacity)),
        );
        // Create every slot now, so that no token is ever written to a missing key (Envoy's CAS
        // cannot guard key creation). Idempotent across VMs and reloads. The revocation epoch
        // needs nothing: a missing key is epoch 0, and its first bump creates it. A host's map
        // needs neither.
        if map.is_none() {
            match slots(host, &config).initialize() {
                Ok(0) => {}
                Ok(created) => host.log(Level::Info, &format!("created {created} store slots")),
                Err(e) => {
                    host.log(Level::Error, &format!("cannot initialize the store: {e}"));
                    return false;
                }
            }
        }
        let mut tick = None;
        let mut keys = KeyState::default();
        if let Some(verify) = &config.verify {
            keys = KeyState::new(verify);
            self.periodic = None;
            if matches!(verify.source, KeySource::Remote { .. }) {
                // The first tick fetches the keys; later ticks refresh them when due.
                tick = Some(Duration::from_secs(1));
            }
        }
        let mut leases = Leases::default();
        if let Some(etcd_config) = &config.etcd {
            leases = Leases::new(etcd_config.lease_bucket_seconds);
            let recent = RecentRevocations::new(host, &etcd_config.recent_prefix);
            let workers = format!("{}etcd-workers", config.store_prefix);
            match recent
                .initialize()
                .and_then(|_| etcd::worker_number(host, &workers, host.now().as_nanos() as u64))
            {
                Ok(worker) => self.worker = worker,
                Err(e) => {
                    host.log(
                        Level::Error,
                        &format!("cannot initialize the etcd tier's shared data: {e}"),
                    );
                    return false;
                }
            }
            // Whichever worker holds the poller's lease at a tick sweeps from where the store's
            // last sweep ended (see `on_tick`).
            self.poll = None;
            self.polling = false;
            self.last_poll = Duration::ZERO;
            let poll = Duration::from_millis(etcd_config.poll_ms);
            tick = Some(tick.map_or(poll, |t: Duration| t.min(poll)));
        }
        if let Some(period) = tick {
            host.set_tick_period(period);
        }
        let shared = config
            .etcd
            .as_ref()
            .map(|e| format!(", shared through etcd cluster {}", e.cluster))
            .unwrap_or_default();
        host.log(
            Level::Info,
            &format!(
                "configured {} token path(s), {} public prefix(es), {} store slots{shared}",
                config.token_paths.len(),
                config.public_prefixes.len(),
                config.store_slots
            ),
        );
        self.shared = Some(Rc::new(Shared {
            config,
            keys: RefCell::new(keys),
            cache: RefCell::new(cache),
            leases: RefCell::new(leases),
            lookups: Rc::clone(&self.lookups),
            map,
        }));
        true
    }

    /// The worker's timer: refreshes keys when due; with etcd, the revocation poller's turn.
    pub fn on_tick<H: Host>(&mut self, host: &H) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if let Some(etcd_config) = &shared.config.etcd {
            self.tick_poller(host, &shared.config, etcd_config);
        }
        let Some(verify) = shared.config.verify.as_ref() else {
            return;
        };
        let request = {
            let keys = shared.keys.borrow();
            if !keys.refresh_due(verify, host.now_s()) {
                return;
            }
            first_request(&verify.source, keys.jwks_path.as_deref())
        };
        if let Some(request) = request {
            self.start_periodic_fetch(host, &shared, request);
        }
    }

    /// The answer to one of the worker's own calls.
    pub fn on_call_answer<H: Host>(&mut self, host: &H, token: u32, answer: Answer) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if self.poll == Some(token) {
            self.poll = None;
            self.on_poll_answer(host, &shared, answer);
            return;
        }
        let Some((periodic, request, number)) = self.periodic.take() else {
            return;
        };
        if periodic != token {
            self.periodic = Some((periodic, request, number));
            return;
        }
        shared.keys.borrow_mut().periodic_in_flight = false;
        let now = host.now_s();
        match key_response(host, &request, answer) {
            Outcome::Next(next) => self.start_periodic_fetch(host, &shared, next),
            Outcome::Keys { keys, jwks_path } => {
                host.bump(Counter::KeysFetched);
                let line = format!(
                    "loaded {} verification key(s) from {jwks_path}",
                    keys.keys.len()
                );
                if shared
                    .keys
                    .borrow_mut()
                    .loaded(keys, jwks_path, now, number)
                {
                    host.log(Level::Info, &line);
                } else {
                    host.log(
                        Level::Info,
                        "key refresh answered after a newer fetch: its keys are not taken",
                    );
                }
            }
            Outcome::Failed(e) => {
                host.bump(Counter::KeyFetchFailures);
                host.log(Level::Warn, &format!("key refresh failed: {e}"));
                shared.keys.borrow_mut().failed(now);
            }
        }
    }

    fn start_periodic_fetch<H: Host>(&mut self, host: &H, shared: &Shared, request: KeyRequest) {
        let Some(verify) = shared.config.verify.as_ref() else {
            return;
        };
        let now = host.now_s();
        match dispatch_key_request(host, verify, &request) {
            Ok((token, number)) => {
                shared.keys.borrow_mut().periodic_in_flight = true;
                self.periodic = Some((token, request, number));
            }
            Err(status) => {
                host.log(Level::Warn, &format!("cannot start key fetch: {status}"));
                host.bump(Counter::KeyFetchFailures);
                shared.keys.borrow_mut().failed(now);
            }
        }
    }

    /// One poller per process: the worker holding the lease polls; the others rely on it.
    fn tick_poller<H: Host>(&mut self, host: &H, config: &Config, etcd_config: &EtcdConfig) {
        let now_ms = host.now_ms();
        // Held for three polls (at least 1.5 s): a late tick or two do not hand it over.
        let until = now_ms.saturating_add(etcd_config.poll_ms.saturating_mul(3).max(1_500));
        let holds =
            PollerLease::new(&etcd_config.poller_key).acquire(host, self.worker, now_ms, until);
        if holds && !self.polling {
            // Taken over (or first taken): sweep from where the store's last sweep ended (a new
            // store reads every live marker).
            let since =
                etcd::Watermark::new(&config.store_prefix, &etcd_config.key_prefix).load(host);
            self.sweeps = etcd::Sweeps::new(etcd::sweep_slack_ms(etcd_config.timeout_ms), since);
        }
        self.polling = holds;
        // Ticks come every `poll_ms` (or sooner) with some jitter: a quarter of slack keeps a
        // late poll from waiting a whole extra tick.
        let due = host.now().saturating_sub(self.last_poll)
            >= Duration::from_millis(etcd_config.poll_ms * 3 / 4);
        if holds && self.poll.is_none() && due {
            self.start_poll(host, etcd_config);
        }
    }

    /// Asks etcd for the next page of revocation markers (see `etcd::Sweeps`).
    fn start_poll<H: Host>(&mut self, host: &H, etcd_config: &EtcdConfig) {
        self.last_poll = host.now();
        let call = self
            .sweeps
            .next_call(&etcd_config.key_prefix, host.now_ms());
        match dispatch_etcd(host, etcd_config, &call) {
            Ok(token) => self.poll = Some(token),
            Err(e) => self.poll_failed(host, &e),
        }
    }

    fn poll_failed<H: Host>(&mut self, host: &H, e: &EtcdError) {
        self.sweeps.abandon();
        host.bump(Counter::EtcdFailures);
        if !self.poll_failing {
            // Once per outage: the poller polls every `poll_ms`.
            host.log(Level::Warn, &format!("revocation poll failed: {e}"));
        }
        self.poll_failing = true;
    }

    /// Applies polled revocations here; polls again at once when etcd has more.
    fn on_poll_answer<H: Host>(&mut self, host: &H, shared: &Shared, answer: Answer) {
        let config = &shared.config;
        let Some(etcd_config) = config.etcd.as_ref() else {
            return;
        };
        let (status, body) = host.answer(answer);
        let markers = match etcd::parse_poll(&etcd_config.key_prefix, status.as_deref(), &body) {
            Ok(markers) => markers,
            Err(e) => return self.poll_failed(host, &e),
        };
        if self.poll_failing {
            host.log(Level::Info, "revocation poll works again");
            self.poll_failing = false;
        }
        let store = tokens(host, shared);
        let recent = RecentRevocations::new(host, &etcd_config.recent_prefix);
        match etcd::apply_markers(&store, &markers.keys, &recent, host.now_s()) {
            Ok(removed) => {
                host.add(Counter::EtcdRevocationsApplied, removed);
                if self.sweeps.advance(&markers) {
                    self.start_poll(host, etcd_config);
                } else {
                    etcd::Watermark::new(&config.store_prefix, &etcd_config.key_prefix)
                        .save(host, self.sweeps.since_ms());
                }
            }
            // The next sweep starts from the same point and brings these markers again.
            Err(e) => {
                self.sweeps.abandon();
                host.log(Level::Error, &format!("cannot apply revocations: {e}"));
            }
        }
    }
}
