//! Fetching verification keys through an Envoy cluster, and the per-worker key state.
//!
//! Each worker's VM keeps its own [`KeyState`] (shared by its root and HTTP contexts): a refresh
//! is one small GET per worker per `refresh_seconds`, far cheaper than serializing key material
//! through shared data, and a worker never waits on another. A fetch is one or two steps:
//! `/.well-known/openid-configuration` (when no `jwks_path` is configured) to learn `jwks_uri`,
//! then the JWKS itself.

use crate::config::{KeySource, VerifyConfig};
use crate::token::verify::{JwksError, KeySet};
use serde::Deserialize;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// The OpenID discovery document's path.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Numbers every key request this process sends, in the order sent: which of two key sets is
/// newer, by a count no clock step can turn back. Process-wide, so the workers of a native
/// host (threads of one process) compare their sets by it.
static KEY_REQUESTS: AtomicU64 = AtomicU64::new(1);

/// The number of the key request about to be sent.
pub fn next_request() -> u64 {
    KEY_REQUESTS.fetch_add(1, Ordering::Relaxed)
}

/// One GET the fetcher wants made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequest {
    pub path: String,
    pub step: Step,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Discovery,
    Jwks,
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchError {
    /// No answer (timeout, reset, no healthy host).
    NoResponse,
    /// An HTTP status other than 200.
    Status { status: String, step: Step },
    /// The discovery document has no usable `jwks_uri`.
    Discovery { reason: String },
    /// The JWKS did not parse or has no usable key.
    Jwks(JwksError),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoResponse => f.write_str("key fetch got no response"),
            Self::Status { status, step } => write!(f, "key fetch ({step:?}) answered {status}"),
            Self::Discovery { reason } => write!(f, "discovery document: {reason}"),
            Self::Jwks(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for FetchError {}

/// What to do after a response.
#[derive(Debug)]
pub enum Outcome {
    /// The keys, and the JWKS path learned on the way (for the next refresh).
    Keys {
        keys: KeySet,
        jwks_path: String,
    },
    /// Fetch this next.
    Next(KeyRequest),
    Failed(FetchError),
}

/// The first request of a fetch, given a JWKS path discovered earlier.
pub fn first_request(source: &KeySource, discovered: Option<&str>) -> Option<KeyRequest> {
    let KeySource::Remote { path, .. } = source else {
        return None;
    };
    Some(match path.as_deref().or(discovered) {
        Some(p) => KeyRequest {
            path: p.to_owned(),
            step: Step::Jwks,
        },
        None => KeyRequest {
            path: DISCOVERY_PATH.to_owned(),
            step: Step::Discovery,
        },
    })
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// The path (and query) of an absolute `http(s)://authority/path` URI. The path becomes the
/// `:path` of the next request and is logged, so it is held to the rule a configured
/// `jwks_path` obeys: no space or control character (none is legal in a URI anyway).
fn path_of(uri: &str) -> Option<String> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))?;
    let path = rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/");
    let path = path.split('#').next().unwrap_or("/");
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return None;
    }
    Some(path.to_owned())
}

/// Interprets the answer to `request`. `status` is `None` when there was no response.
pub fn on_response(request: &KeyRequest, status: Option<&[u8]>, body: &[u8]) -> Outcome {
    match status {
        None => return Outcome::Failed(FetchError::NoResponse),
        Some(b"200") => {}
        Some(other) => {
            return Outcome::Failed(FetchError::Status {
                status: String::from_utf8_lossy(other).chars().take(8).collect(),
                step: request.step,
            })
        }
    }
    match request.step {
        Step::Discovery => {
            let doc: Discovery = match serde_json::from_slice(body) {
                Ok(doc) => doc,
                Err(e) => {
                    return Outcome::Failed(FetchError::Discovery {
                        reason: crate::token::describe(&e),
                    })
                }
            };
            match path_of(&doc.jwks_uri) {
                Some(path) => Outcome::Next(KeyRequest {
                    path,
                    step: Step::Jwks,
                }),
                None => Outcome::Failed(FetchError::Discovery {
                    reason: "jwks_uri is not an absolute http(s) URI".to_owned(),
                }),
            }
        }
        Step::Jwks => match KeySet::parse(body, false) {
            Ok(keys) => Outcome::Keys {
                keys,
                jwks_path: request.path.clone(),
            },
            Err(e) => Outcome::Failed(FetchError::Jwks(e)),
        },
    }
}

/// One worker's keys and fetch bookkeeping.
#[derive(Debug, Default)]
pub struct KeyState {
    pub keys: Option<KeySet>,
    pub jwks_path: Option<String>,
    /// When the keys were last replaced.
    pub loaded_at: u64,
    /// When the last on-demand fetch (unknown `kid`, failed signature) started. Periodic
    /// refreshes do not count, so a rotation right after a refresh is still picked up.
    pub on_demand_at: Option<u64>,
    /// A periodic fetch is under way.
    pub periodic_in_flight: bool,
    /// No periodic fetch before this time (backoff after a failure).
    pub next_attempt_at: u64,
    /// How many times the keys were replaced: a host that shares one worker's keys with others
    /// hands them on when this moves (see `flow::Worker::loaded_keys`).
    pub loads: u64,
    /// Which request loaded the keys ([`next_request`]): of two key sets, the one asked for
    /// later is the newer, whichever answer came back first.
    pub request: u64,
}

impl KeyState {
    /// Keys for an inline source are there from the start.
    pub fn new(config: &VerifyConfig) -> Self {
        let keys = match &config.source {
            KeySource::Inline(keys) => Some(keys.clone()),
            KeySource::Remote { .. } => None,
        };
        Self {
            keys,
            ..Self::default()
        }
    }

    /// Whether the periodic refresh should run now.
    pub fn refresh_due(&self, config: &VerifyConfig, now: u64) -> bool {
        matches!(config.source, KeySource::Remote { .. })
            && !self.periodic_in_flight
            && now >= self.next_attempt_at
            && (self.keys.is_none() || now >= self.loaded_at.saturating_add(config.refresh_seconds))
    }

    /// Whether an on-demand fetch (unknown `kid`) is allowed now: at most one per
    /// `min_refetch_seconds`, so tokens naming random kids cannot make the gateway hammer the IdP.
    pub fn refetch_allowed(&self, config: &VerifyConfig, now: u64) -> bool {
        matches!(config.source, KeySource::Remote { .. })
            && self
                .on_demand_at
                .is_none_or(|t| now >= t.saturating_add(config.min_refetch_seconds))
    }

    /// Seconds a failed periodic fetch waits before the next try.
    pub const RETRY_SECONDS: u64 = 5;

    /// Records a failed fetch: the periodic refresh backs off.
    pub fn failed(&mut self, now: u64) {
        self.next_attempt_at = now.saturating_add(Self::RETRY_SECONDS);
    }

    /// Takes keys loaded at `now` by JWKS request number `request` ([`next_request`]), unless
    /// the keys held came from a later request: an answer that comes back after a newer one
    /// must not bring back a key the IdP dropped in between. Whether it took them.
    pub fn loaded(&mut self, keys: KeySet, jwks_path: String, now: u64, request: u64) -> bool {
        if self.keys.is_some() && request < self.request {
            return false;
        }
        self.keys = Some(keys);
        self.jwks_path = Some(jwks_path);
        self.loaded_at = now;
        self.request = request;
        self.loads = self.loads.wrapping_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn verify_config(extra: &str) -> VerifyConfig {
        Config::from_json(
            format!(r#"{{"token_paths": ["/t"], "verify": {{"jwks_cluster": "idp"{extra}}}}}"#)
                .as_bytes(),
        )
        .unwrap()
        .verify
        .unwrap()
    }

    const JWKS: &str = r#"{"keys": [{"kty": "RSA", "kid": "k", "e": "AQAB", "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}]}"#;

    #[test]
    fn discovery_then_jwks() {
        let c = verify_config("");
        let first = first_request(&c.source, None).unwrap();
        assert_eq!(first.step, Step::Discovery);
        assert_eq!(first.path, DISCOVERY_PATH);
        let doc =
            br#"{"issuer": "http://localhost:1", "jwks_uri": "http://localhost:1/keys/jwks?v=2"}"#;
        let Outcome::Next(next) = on_response(&first, Some(b"200"), doc) else {
            panic!("expected a next step");
        };
        assert_eq!(
            next,
            KeyRequest {
                path: "/keys/jwks?v=2".into(),
                step: Step::Jwks
            }
        );
        let Outcome::Keys { keys, jwks_path } = on_response(&next, Some(b"200"), JWKS.as_bytes())
        else {
            panic!("expected keys");
        };
        assert!(keys.has_kid("k"));
        assert_eq!(jwks_path, "/keys/jwks?v=2");
        // Next time the discovered path is used directly.
        assert_eq!(
            first_request(&c.source, Some("/keys/jwks?v=2"))
                .unwrap()
                .step,
            Step::Jwks
        );
    }

    #[test]
    fn configured_path_skips_discovery() {
        let c = verify_config(r#", "jwks_path": "/jwks""#);
        assert_eq!(
            first_request(&c.source, None).unwrap(),
            KeyRequest {
                path: "/jwks".into(),
                step: Step::Jwks
            }
        );
    }

    #[test]
    fn failures_are_named() {
        let req = KeyRequest {
            path: "/jwks".into(),
            step: Step::Jwks,
        };
        assert!(matches!(
            on_response(&req, None, b""),
            Outcome::Failed(FetchError::NoResponse)
        ));
        assert!(matches!(
            on_response(&req, Some(b"503"), b""),
            Outcome::Failed(FetchError::Status { .. })
        ));
        assert!(matches!(
            on_response(&req, Some(b"200"), b"{}"),
            Outcome::Failed(FetchError::Jwks(_))
        ));
        let disc = KeyRequest {
            path: DISCOVERY_PATH.into(),
            step: Step::Discovery,
        };
        assert!(matches!(
            on_response(&disc, Some(b"200"), br#"{"jwks_uri": "/relative"}"#),
            Outcome::Failed(FetchError::Discovery { .. })
        ));
    }

    #[test]
    fn discovered_jwks_path_with_spaces_or_controls_is_refused() {
        // Found by fuzz target jwks: a jwks_uri path with spaces, CR or LF was used as the next
        // request's :path (and logged) as it was, unlike a configured jwks_path.
        let disc = KeyRequest {
            path: DISCOVERY_PATH.into(),
            step: Step::Discovery,
        };
        // Written with JSON escapes: the document is valid, the path it names is not.
        for uri in [
            "http://idp/keys ",
            "http://idp/a b",
            r"https://idp/k\r\nx-injected: 1",
            r"http://idp/\u0000",
            r"http://idp/k\u007f",
        ] {
            let doc = format!(r#"{{"jwks_uri": "{uri}"}}"#);
            assert!(
                matches!(
                    on_response(&disc, Some(b"200"), doc.as_bytes()),
                    Outcome::Failed(FetchError::Discovery { .. })
                ),
                "{uri}"
            );
        }
        let ok = br#"{"jwks_uri": "https://idp/realms/a%20b/certs?x=1#f"}"#;
        let Outcome::Next(next) = on_response(&disc, Some(b"200"), ok) else {
            panic!("expected a next step");
        };
        assert_eq!(next.path, "/realms/a%20b/certs?x=1");
    }

    #[test]
    fn refresh_and_refetch_are_rate_limited() {
        let c = verify_config(r#", "refresh_seconds": 100, "min_refetch_seconds": 10"#);
        let mut s = KeyState::new(&c);
        assert!(s.refresh_due(&c, 0));
        assert!(s.refetch_allowed(&c, 0));
        s.on_demand_at = Some(5);
        assert!(!s.refetch_allowed(&c, 14));
        assert!(s.refetch_allowed(&c, 15));
        let keys = KeySet::parse(JWKS.as_bytes(), false).unwrap();
        s.loaded(keys, "/jwks".into(), 20, next_request());
        assert!(!s.refresh_due(&c, 119));
        assert!(s.refresh_due(&c, 120));
        s.periodic_in_flight = true;
        assert!(!s.refresh_due(&c, 500));
        s.periodic_in_flight = false;
        s.failed(500);
        assert!(!s.refresh_due(&c, 504));
        assert!(s.refresh_due(&c, 505));
    }
}
