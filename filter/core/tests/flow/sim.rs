//! A simulated host: shared data with CAS, counters, a log, a settable clock, outgoing calls
//! answered by the test, and one HTTP exchange's headers and bodies. Like Envoy without
//! `allow_on_headers_stop_iteration`, a message's headers are no longer lent once they went on:
//! a read or write of them then is recorded as a violation (the proxy-wasm SDK would panic).

use split_token_core::flow::host::{Answer, Host, Level, Message, StreamHost};
use split_token_core::flow::{Action, Stream, Worker};
use split_token_core::stats::Counter;
use split_token_core::store::map::MapStore;
use split_token_core::store::{HostStatus, SetError, SharedData};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// The start of every test's clock, Unix seconds.
pub const T0: u64 = 1_700_000_000;

/// One call the flow started.
#[derive(Debug, Clone)]
pub struct Sent {
    pub token: u32,
    pub cluster: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Sent {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What every context of one simulated proxy shares: one Envoy process's worker.
#[derive(Default)]
pub struct World {
    pub data: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
    pub counters: RefCell<BTreeMap<&'static str, u64>>,
    pub logs: RefCell<Vec<(Level, String)>>,
    pub calls: RefCell<Vec<Sent>>,
    next_token: Cell<u32>,
    /// The answer being delivered: `:status` and body.
    answer: RefCell<(Option<Vec<u8>>, Vec<u8>)>,
    pub now: Cell<Duration>,
    pub tick: Cell<Option<Duration>>,
    /// Host calls made so far.
    pub hostcalls: Cell<u32>,
    /// Makes every dispatch fail (a cluster Envoy does not know).
    pub refuse_dispatch: Cell<bool>,
    /// Tokens live in a process-wide map per prefix, as in the native build, rather than in
    /// slots of the shared data: `SPLIT_TOKEN_SIM_STORE=map` (`just unit` runs both).
    pub maps: Option<RefCell<BTreeMap<String, Arc<MapStore>>>>,
}

impl World {
    pub fn new() -> Rc<Self> {
        let world = Self {
            #[cfg(feature = "host-map")]
            maps: (std::env::var("SPLIT_TOKEN_SIM_STORE").as_deref() == Ok("map"))
                .then(RefCell::default),
            ..Self::default()
        };
        world.now.set(Duration::from_secs(T0));
        Rc::new(world)
    }

    fn call(&self) {
        self.hostcalls.set(self.hostcalls.get() + 1);
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .borrow()
            .get(counter.name())
            .copied()
            .unwrap_or(0)
    }

    /// The calls started since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<Sent> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    pub fn advance(&self, by: Duration) {
        self.now.set(self.now.get() + by);
    }

    pub fn logged(&self, text: &str) -> bool {
        self.logs
            .borrow()
            .iter()
            .any(|(_, line)| line.contains(text))
    }
}

impl SharedData for World {
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
        self.call();
        Ok(match self.data.borrow().get(key) {
            Some((value, cas)) => (value.clone(), Some(*cas)),
            None => (Vec::new(), None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        self.call();
        let mut data = self.data.borrow_mut();
        let current = data.get(key).map(|(_, c)| *c);
        if cas.is_some() && cas != current {
            return Err(SetError::CasMismatch);
        }
        data.insert(key.to_owned(), (value.to_vec(), current.unwrap_or(0) + 1));
        Ok(())
    }
}

impl Host for World {
    fn now(&self) -> Duration {
        self.call();
        self.now.get()
    }

    fn log(&self, level: Level, message: &str) {
        self.call();
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn count(&self, counter: Counter, n: u32) {
        self.call();
        assert!(n > 0, "a counter increment must be above zero");
        *self
            .counters
            .borrow_mut()
            .entry(counter.name())
            .or_default() += u64::from(n);
    }

    fn define_counters(&self) {}

    fn set_tick_period(&self, period: Duration) {
        self.call();
        self.tick.set(Some(period));
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        _timeout: Duration,
    ) -> Result<u32, HostStatus> {
        self.call();
        if self.refuse_dispatch.get() {
            return Err(HostStatus(2));
        }
        let token = self.next_token.get() + 1;
        self.next_token.set(token);
        let path = headers
            .iter()
            .find(|(n, _)| *n == ":path")
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_default();
        self.calls.borrow_mut().push(Sent {
            token,
            cluster: cluster.to_owned(),
            path,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.unwrap_or_default().to_vec(),
        });
        Ok(token)
    }

    fn call_status(&self) -> Option<Vec<u8>> {
        self.call();
        self.answer.borrow().0.clone()
    }

    fn call_body(&self, size: usize) -> Vec<u8> {
        self.call();
        let body = &self.answer.borrow().1;
        body[..size.min(body.len())].to_vec()
    }

    #[cfg(feature = "host-map")]
    fn token_map(&self, prefix: &str, capacity: usize) -> Option<Arc<MapStore>> {
        let mut maps = self.maps.as_ref()?.borrow_mut();
        let map = maps
            .entry(prefix.to_owned())
            .or_insert_with(|| Arc::new(MapStore::new(capacity)));
        map.set_capacity(capacity);
        Some(Arc::clone(map))
    }
}

/// The worker's own context.
pub struct Proxy {
    pub world: Rc<World>,
    pub worker: Worker,
}

impl Proxy {
    pub fn new(config: &serde_json::Value) -> Self {
        Self::in_world(World::new(), config)
    }

    /// Another worker (or replica's worker) of the same shared data.
    pub fn in_world(world: Rc<World>, config: &serde_json::Value) -> Self {
        let mut worker = Worker::default();
        assert!(
            worker.configure(&*world, config.to_string().as_bytes()),
            "configuration refused: {:?}",
            world.logs.borrow()
        );
        Self { world, worker }
    }

    /// Envoy's (and the filter's) `allow_on_headers_stop_iteration`.
    pub fn allow_hold(&self) -> bool {
        self.worker
            .config()
            .is_some_and(|c| c.allow_on_headers_stop_iteration)
    }

    pub fn exchange(&self) -> Exchange {
        Exchange {
            host: Ex {
                world: Rc::clone(&self.world),
                ..Ex::default()
            },
            stream: self.worker.stream(),
        }
    }

    pub fn tick(&mut self) {
        self.worker.on_tick(&*self.world);
    }

    /// Answers one of the worker's own calls.
    pub fn answer(&mut self, token: u32, status: Option<&str>, body: &str) {
        let answer = set_answer(&self.world, status, body);
        self.worker.on_call_answer(&*self.world, token, answer);
    }
}

fn set_answer(world: &World, status: Option<&str>, body: &str) -> Answer {
    *world.answer.borrow_mut() = (
        status.map(|s| s.as_bytes().to_vec()),
        body.as_bytes().to_vec(),
    );
    Answer {
        headers: usize::from(status.is_some()),
        body_size: body.len(),
    }
}

/// What the filter answered itself.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One exchange's host: its messages as the proxy holds them.
#[derive(Default)]
pub struct Ex {
    pub world: Rc<World>,
    pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_body: RefCell<Vec<u8>>,
    pub reply: RefCell<Option<Reply>>,
    pub reset: Cell<bool>,
    pub resumed: RefCell<Vec<Message>>,
    pub route_cleared: Cell<u32>,
    /// The message's headers went on: the proxy no longer lends them.
    pub gone: RefCell<Vec<Message>>,
    pub violations: RefCell<Vec<String>>,
}

impl Ex {
    fn headers(&self, message: Message) -> &RefCell<Vec<(String, Vec<u8>)>> {
        match message {
            Message::Request => &self.request_headers,
            Message::Response => &self.response_headers,
        }
    }

    fn check_lent(&self, message: Message, what: &str) -> bool {
        if self.gone.borrow().contains(&message) {
            self.violations
                .borrow_mut()
                .push(format!("{what} of {message:?} headers after they went on"));
            return false;
        }
        true
    }

    /// Every value of a request header, matched case-insensitively as Envoy does.
    pub fn request_values(&self, name: &str) -> Vec<String> {
        self.request_headers
            .borrow()
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    pub fn request_header_text(&self, name: &str) -> Option<String> {
        self.request_headers
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn response_header_text(&self, name: &str) -> Option<String> {
        self.response_headers
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

impl SharedData for Ex {
    fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
        self.world.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        self.world.set(key, value, cas)
    }
}

impl Host for Ex {
    fn now(&self) -> Duration {
        self.world.now()
    }
    fn log(&self, level: Level, message: &str) {
        self.world.log(level, message)
    }
    fn count(&self, counter: Counter, n: u32) {
        self.world.count(counter, n)
    }
    fn define_counters(&self) {}
    fn set_tick_period(&self, period: Duration) {
        self.world.set_tick_period(period)
    }
    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus> {
        self.world.dispatch(cluster, headers, body, timeout)
    }
    fn call_status(&self) -> Option<Vec<u8>> {
        self.world.call_status()
    }
    fn call_body(&self, size: usize) -> Vec<u8> {
        self.world.call_body(size)
    }
    fn token_map(&self, prefix: &str, capacity: usize) -> Option<Arc<MapStore>> {
        self.world.token_map(prefix, capacity)
    }
}

impl StreamHost for Ex {
    fn header(&self, message: Message, name: &str) -> Option<Vec<u8>> {
        self.world.call();
        if !self.check_lent(message, "read") {
            return None;
        }
        self.headers(message)
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn request_header_values(&self, name: &str) -> Vec<Vec<u8>> {
        self.world.call();
        if !self.check_lent(Message::Request, "read") {
            return Vec::new();
        }
        self.request_headers
            .borrow()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn set_header(
        &self,
        message: Message,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), HostStatus> {
        self.world.call();
        if !self.check_lent(message, "write") {
            return Err(HostStatus(1));
        }
        let mut headers = self.headers(message).borrow_mut();
        // Envoy's header map keys are lower case; a write replaces every value of the name.
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if let Some(value) = value {
            headers.push((name.to_owned(), value.as_bytes().to_vec()));
        }
        Ok(())
    }

    fn body(&self, message: Message, size: usize) -> Vec<u8> {
        self.world.call();
        let body = match message {
            Message::Request => self.request_body.borrow(),
            Message::Response => self.response_body.borrow(),
        };
        body[..size.min(body.len())].to_vec()
    }

    fn set_body(&self, message: Message, size: usize, new: &[u8]) -> Result<(), HostStatus> {
        self.world.call();
        let mut body = match message {
            Message::Request => self.request_body.borrow_mut(),
            Message::Response => self.response_body.borrow_mut(),
        };
        let size = size.min(body.len());
        body.splice(..size, new.iter().copied());
        Ok(())
    }

    fn send_response(
        &self,
        status: u32,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), HostStatus> {
        self.world.call();
        *self.reply.borrow_mut() = Some(Reply {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        Ok(())
    }

    fn reset(&self) {
        self.world.call();
        self.reset.set(true);
    }

    fn resume(&self, message: Message) {
        self.world.call();
        self.resumed.borrow_mut().push(message);
        self.gone.borrow_mut().push(message);
    }

    fn clear_route_cache(&self) {
        self.world.call();
        self.route_cleared.set(self.route_cleared.get() + 1);
    }

    fn response_code_details(&self) -> Option<Vec<u8>> {
        self.world.call();
        Some(b"via_upstream".to_vec())
    }
}

/// One HTTP exchange driven through the flow, callback by callback, as Envoy would.
pub struct Exchange {
    pub host: Ex,
    pub stream: Option<Stream>,
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
        .collect()
}

impl Exchange {
    /// Request headers in; a `Continue` lets them go on.
    pub fn request_headers(&mut self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        *self.host.request_headers.borrow_mut() = owned(headers);
        let host = &self.host;
        let action = self
            .stream
            .as_mut()
            .expect("a configured worker")
            .on_request_headers(host, end_of_stream);
        if action == Action::Continue {
            self.host.gone.borrow_mut().push(Message::Request);
        }
        action
    }

    /// The whole request body in one callback.
    pub fn request_body(&mut self, body: &str) -> Action {
        self.request_body_part(body, true)
    }

    /// Another part of the request body (Envoy hands the filter all it buffered so far).
    pub fn request_body_part(&mut self, part: &str, end_of_stream: bool) -> Action {
        self.host
            .request_body
            .borrow_mut()
            .extend_from_slice(part.as_bytes());
        let size = self.host.request_body.borrow().len();
        let host = &self.host;
        self.stream
            .as_mut()
            .expect("a configured worker")
            .on_request_body(host, size, end_of_stream)
    }

    pub fn response_headers(&mut self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        *self.host.response_headers.borrow_mut() = owned(headers);
        let host = &self.host;
        let action = self
            .stream
            .as_mut()
            .expect("a configured worker")
            .on_response_headers(host, end_of_stream);
        if action == Action::Continue {
            self.host.gone.borrow_mut().push(Message::Response);
        }
        action
    }

    pub fn response_body(&mut self, body: &str) -> Action {
        *self.host.response_body.borrow_mut() = body.as_bytes().to_vec();
        let host = &self.host;
        self.stream
            .as_mut()
            .expect("a configured worker")
            .on_response_body(host, body.len(), true)
    }

    /// Delivers a call's answer (`status` `None`: no answer came, a timeout).
    pub fn answer(&mut self, token: u32, status: Option<&str>, body: &str) {
        let answer = set_answer(&self.host.world, status, body);
        let host = &self.host;
        self.stream
            .as_mut()
            .expect("a configured worker")
            .on_call_answer(host, token, answer);
    }

    pub fn reply(&self) -> Option<Reply> {
        self.host.reply.borrow().clone()
    }

    pub fn resumed(&self) -> Vec<Message> {
        self.host.resumed.borrow().clone()
    }

    /// No header map was touched after it went on.
    pub fn assert_clean(&self) {
        let violations = self.host.violations.borrow();
        assert!(violations.is_empty(), "host misuse: {violations:?}");
    }

    /// The request is gone (the client went away): its state is dropped.
    pub fn drop_stream(&mut self) {
        self.stream = None;
    }
}
