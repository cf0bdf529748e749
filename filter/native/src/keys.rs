//! The main thread's periodic key refresh, handed to the worker threads' workers.
//!
//! A proxy-wasm worker has a timer of its own and refreshes its own keys. A dynamic module has
//! none on its worker threads: only the main thread's worker is ticked (`module`). So that
//! worker's periodic refresh (`refresh_seconds`, the 5 s retry after a failure) is the only
//! one, and what it loads is published here; each worker thread's worker takes it over at its
//! next stream ([`SharedKeys::adopt_into`]: one atomic load per stream while nothing changed,
//! never a wait on another thread's fetch). A worker's on-demand fetches (an unknown `kid`, or a
//! signature no key verifies) stay its own, as in the Wasm build; the next periodic refresh
//! asked for after them replaces them (key sets are ordered by when they were requested,
//! counted: `split_token_core::issue::keys::next_request`). One fetch per process per refresh
//! instead of one per worker.

use split_token_core::flow::{LoadedKeys, Worker};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The keys the main thread's worker of one config loaded last.
#[derive(Default)]
pub struct SharedKeys {
    /// The load ([`LoadedKeys::load`]) of the keys in `keys`; 0 while none were published.
    published: AtomicU64,
    keys: Mutex<Option<Arc<LoadedKeys>>>,
}

impl SharedKeys {
    /// After one of the loading worker's calls: publishes its keys if it loaded new ones.
    /// Called by one thread only (the main thread, for its worker).
    pub fn publish_from(&self, worker: &Worker) {
        let loads = worker.keys_loads();
        if loads == self.published.load(Ordering::Acquire) {
            return;
        }
        let Some(keys) = worker.loaded_keys() else {
            return;
        };
        let load = keys.load();
        // A poisoned lock only means a thread panicked holding it (caught at the FFI edge); the
        // slot holds a whole value either way.
        let old = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Arc::new(keys));
        self.published.store(load, Ordering::Release);
        // Freed after the lock is released: a worker taking the keys never waits for it.
        drop(old);
    }

    /// On a worker thread, for each new stream: hands `worker` the published keys if they are
    /// newer than the load it took last (`adopted`, updated).
    pub fn adopt_into(&self, worker: &Worker, adopted: &mut u64) {
        if self.published.load(Ordering::Acquire) == *adopted {
            return;
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(keys) = keys {
            worker.adopt_keys(&keys);
            *adopted = keys.load();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ProcessStore;
    use split_token_core::flow::host::{Answer, Host, Level};
    use split_token_core::stats::Counter;
    use split_token_core::store::{HostStatus, SetError, SharedData};
    use std::cell::{Cell, RefCell};
    use std::time::Duration;

    /// An RSA key (RFC 7517, appendix A.1) as the JWKS of an IdP, under `kid`.
    fn jwks(kid: &str) -> Vec<u8> {
        format!(
            r#"{{"keys": [{{"kty": "RSA", "kid": "{kid}", "e": "AQAB", "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}}]}}"#
        )
        .into_bytes()
    }

    const CONFIG: &[u8] =
        br#"{"token_paths": ["/t"], "store_slots": 4, "verify": {"jwks_cluster": "idp", "jwks_path": "/jwks"}}"#;

    /// A host of one worker: a store of its own, a clock at a fixed time, the answer to its
    /// calls, and the calls it made.
    #[derive(Default)]
    struct TestHost {
        store: ProcessStore,
        now: Cell<u64>,
        answer: RefCell<Vec<u8>>,
        calls: Cell<u32>,
    }

    impl SharedData for TestHost {
        fn get(&self, key: &str) -> Result<(Vec<u8>, Option<u32>), HostStatus> {
            self.store.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            self.store.set(key, value, cas)
        }
    }

    impl Host for TestHost {
        fn now(&self) -> Duration {
            Duration::from_secs(self.now.get())
        }
        fn log(&self, _: Level, _: &str) {}
        fn count(&self, _: Counter, _: u32) {}
        fn define_counters(&self) {}
        fn set_tick_period(&self, _: Duration) {}
        fn dispatch(
            &self,
            _: &str,
            _: Vec<(&str, &str)>,
            _: Option<&[u8]>,
            _: Duration,
        ) -> Result<u32, HostStatus> {
            self.calls.set(self.calls.get() + 1);
            Ok(self.calls.get())
        }
        fn call_status(&self) -> Option<Vec<u8>> {
            Some(b"200".to_vec())
        }
        fn call_body(&self, size: usize) -> Vec<u8> {
            let body = self.answer.borrow();
            body.get(..size.min(body.len()))
                .unwrap_or_default()
                .to_vec()
        }
    }

    fn configured(host: &TestHost) -> Worker {
        let mut worker = Worker::default();
        assert!(worker.configure(host, CONFIG));
        worker
    }

    /// Runs the main worker's tick and answers its fetch with the JWKS of `kid`.
    fn refresh(main: &mut Worker, host: &TestHost, kid: &str) {
        main.on_tick(host);
        *host.answer.borrow_mut() = jwks(kid);
        let size = host.answer.borrow().len();
        let answer = Answer {
            headers: 1,
            body_size: size,
        };
        main.on_call_answer(host, host.calls.get(), answer);
    }

    #[test]
    fn a_refresh_on_the_main_thread_reaches_a_worker_thread_at_its_next_stream() {
        let shared = Arc::new(SharedKeys::default());
        let host = TestHost::default();
        host.now.set(1_000);
        let mut main = configured(&host);
        shared.publish_from(&main); // nothing loaded yet: nothing published
        assert_eq!(shared.published.load(Ordering::Acquire), 0);
        refresh(&mut main, &host, "k1");
        shared.publish_from(&main);
        assert_eq!(shared.published.load(Ordering::Acquire), 1);

        // A worker thread, with its own worker (the core's state is per thread).
        let (to_main, from_worker) = std::sync::mpsc::channel();
        let (to_worker, from_main) = std::sync::mpsc::channel::<()>();
        let on_thread = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            let host = TestHost::default();
            let worker = configured(&host);
            let mut adopted = 0;
            assert_eq!(worker.keys_loads(), 0);
            on_thread.adopt_into(&worker, &mut adopted);
            assert_eq!((adopted, worker.keys_loads()), (1, 1));
            // Nothing new: nothing taken.
            on_thread.adopt_into(&worker, &mut adopted);
            assert_eq!(worker.keys_loads(), 1);
            to_main.send(()).ok();
            from_main.recv().ok();
            // The keys rotated at the IdP and the main thread refreshed.
            on_thread.adopt_into(&worker, &mut adopted);
            assert_eq!((adopted, worker.keys_loads()), (2, 2));
            worker.loaded_keys().map(|k| k.load())
        });
        from_worker.recv().ok();
        host.now.set(1_000 + 301);
        refresh(&mut main, &host, "k2");
        shared.publish_from(&main);
        to_worker.send(()).ok();
        assert_eq!(thread.join().ok().flatten(), Some(2));
    }
}
