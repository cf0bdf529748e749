//! The per-request state machine: one [`Stream`] per HTTP exchange.
//!
//! The adapter hands each callback of the exchange in (request headers, body, trailers; the
//! same for the response; a call's answer) with the host, and returns the [`Action`] it gets
//! back. Between callbacks a `Stream` remembers what it waits for ([`Pending`]): keys to verify
//! a split token, the token's write to etcd, a signature looked for in etcd, a revocation's
//! write to etcd.

use super::host::{Answer, HostExt, Level, Message, StreamHost};
use super::worker::{dispatch_etcd, dispatch_key_request, key_response, tokens, Shared};
use super::Action;
use crate::issue::keys::{first_request, FetchError, KeyRequest, Outcome};
use crate::issue::response::{classify, split, ResponseAction, SplitError, SplitPlan};
use crate::lifecycle::introspect::{authenticate, introspect, Introspection};
use crate::lifecycle::revoke::{self, Failure, RevocationError, RevocationPlan};
use crate::replicas::etcd::{self, EtcdError, RecentRevocations};
use crate::reply::{
    introspection_reply, issue_failure, revocation_done, revocation_failure,
    shared_store_unavailable, IssueFailure, LocalReply,
};
use crate::request::{authorize, presented_key, Rejection, Verdict};
use crate::stats::Counter;
use crate::store::{StoreError, TokenStore};
use crate::token::verify::{verify, VerifyError};
use crate::token::StoreKey;
use crate::{Config, Route};
use std::cell::Cell;
use std::rc::Rc;

/// How an introspection answer for an unknown, expired or revoked token starts.
const INACTIVE: &str = r#"{"active":false"#;

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

/// One HTTP exchange's place in the flow.
pub struct Stream {
    shared: Rc<Shared>,
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
    /// Waiting for keys: the token, the request and its number (see `dispatch_key_request`).
    Keys(SplitPlan, KeyRequest, u64),
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
/// before the answer (its `Stream` is dropped).
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
    Wait(u32, KeyRequest, u64),
    Failed(VerifyError),
    NoKeys(FetchError),
}

/// Sends a local reply, its headers as every local reply carries them.
pub(crate) fn send<H: StreamHost>(host: &H, reply: &LocalReply<'_>) {
    let mut headers: Vec<(&str, &str)> = LocalReply::HEADERS.to_vec();
    if reply.body.is_empty() {
        headers.retain(|(name, _)| *name != "content-type");
    }
    if let Some(challenge) = reply.www_authenticate {
        headers.push(("www-authenticate", challenge));
    }
    if let Err(status) = host.send_response(reply.status, headers, reply.body.as_bytes()) {
        host.log(
            Level::Error,
            &format!("local reply failed with host status {status}"),
        );
    }
}

/// Sets a rewritten message's `content-length`, unless its headers went on before its body was
/// read: then they went without one (the body goes out chunked), and Envoy no longer lends them.
fn set_length<H: StreamHost>(
    host: &H,
    message: Message,
    headers_gone: bool,
    length: usize,
) -> Result<(), crate::store::HostStatus> {
    if headers_gone {
        return Ok(());
    }
    host.set_header(message, "content-length", Some(&length.to_string()))
}

/// Answers an API call here, after removing the identity headers the client sent: the request
/// reaches no upstream, but Envoy's access log and traces still see its headers, and must not
/// record a spoofed user. (Not after a failed header write: the headers are then out of reach.)
fn refuse<H: StreamHost>(h: &H, config: &Config, reply: &LocalReply<'_>) {
    let _ = write_identity(h, config, &[]);
    send(h, reply);
}

/// Writes every configured identity header of an API call that goes on, once each: the
/// verified claim's value where the token has one (`values`: index into `claims_to_headers`,
/// value), else no header. Envoy's replace drops every value sent under the name before it sets
/// its own (`setCopy`, since Envoy 1.15.1: CVE-2020-25017), so one call per header is both the
/// removal of what the client sent and the write of what the token says.
fn write_identity<H: StreamHost>(
    h: &H,
    config: &Config,
    values: &[(usize, String)],
) -> Result<(), crate::store::HostStatus> {
    for (i, mapping) in config.claims_to_headers.iter().enumerate() {
        let value = values
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, value)| value.as_str());
        h.set_header(Message::Request, &mapping.header, value)?;
    }
    Ok(())
}

/// Whether the response under way is an error Envoy made itself (a local reply with status
/// 400 or above: no healthy upstream, a direct_response 404...), as opposed to an upstream's
/// answer or anything the filter cannot tell (unknown details count as the upstream's).
fn envoy_error<H: StreamHost>(host: &H, status: &[u8]) -> bool {
    let local = matches!(
        host.response_code_details(),
        Some(details) if !details.is_empty() && details != b"via_upstream"
    );
    local && status.len() == 3 && matches!(status.first(), Some(b'4' | b'5'))
}

impl Stream {
    pub(crate) fn new(shared: Rc<Shared>) -> Self {
        Self {
            shared,
            state: State::Request,
            body_size: 0,
            pending: None,
            refetched: false,
            fetched: false,
            request_headers_gone: false,
            response_headers_gone: false,
            introspection_authorization: None,
        }
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Answers a token request with a 502 instead of the token.
    fn fail_closed<H: StreamHost>(&mut self, h: &H, failure: IssueFailure<'_>) -> Action {
        match &failure {
            IssueFailure::Split(e) => h.log(Level::Warn, &format!("{e}")),
            IssueFailure::Store(e) => {
                h.bump(Counter::StoreWriteFailures);
                h.log(Level::Warn, &format!("token not stored: {e}"));
            }
            IssueFailure::Verify(e) => {
                h.bump(Counter::VerifyFailed);
                h.log(Level::Warn, &format!("token not issued: {e}"));
            }
            IssueFailure::Keys(e) => {
                h.bump(Counter::VerifyFailed);
                h.log(Level::Warn, &format!("token not issued, no keys: {e}"));
            }
            IssueFailure::Etcd(e) => {
                h.log(Level::Warn, &format!("token not issued: {e}"));
            }
        }
        h.bump(Counter::SplitFailures);
        self.state = State::Done;
        if self.response_headers_gone {
            // The client has the IdP's 200 headers but no byte of its body: reset, so the
            // answer ends there, unfinished. (Envoy defers the reset and always reports Ok.)
            h.bump(Counter::SplitResets);
            h.log(
                Level::Warn,
                "token response reset: its headers had gone out (allow_on_headers_stop_iteration is off)",
            );
            h.reset();
            return Action::Pause;
        }
        send(h, &issue_failure(failure));
        Action::Pause
    }

    /// The `DPoP` request header. Envoy's single-value read returns only the first of several
    /// (this header is not joined with commas), so all are read: several come back joined
    /// with a comma, which no single proof contains and the core refuses.
    fn dpop_header<H: StreamHost>(h: &H) -> Option<Vec<u8>> {
        let mut proofs = h.request_header_values("dpop").into_iter();
        let mut value = proofs.next()?;
        for more in proofs {
            value.push(b',');
            value.extend_from_slice(&more);
        }
        Some(value)
    }

    /// Envoy picked the route before this filter ran, possibly on a client-sent identity
    /// header: have it recompute the route on the headers as the filter left them.
    fn recompute_route<H: StreamHost>(&self, h: &H) {
        if self.config().recompute_route && !self.config().claims_to_headers.is_empty() {
            h.clear_route_cache();
        }
    }

    fn route_request<H: StreamHost>(&mut self, h: &H, route: Route) -> Action {
        match route {
            Route::TokenEndpoint => {
                // Ask the IdP for an identity-encoded body: the filter cannot split gzip.
                let _ = h.set_header(Message::Request, "accept-encoding", None);
                self.state = State::TokenEndpoint;
                Action::Continue
            }
            Route::Revocation => self.hold_body(h, State::Revocation),
            Route::Introspection => self.hold_body(h, State::Introspection),
            Route::Public => {
                self.state = State::Done;
                Action::Continue
            }
            Route::Protected => self.on_protected_request(h, false),
            Route::Logout => self.on_protected_request(h, true),
        }
    }

    /// Holds a revocation or introspection request until its body says which token (a
    /// revocation body may be rewritten). RFC 7009 and 7662 endpoints take POST only.
    fn hold_body<H: StreamHost>(&mut self, h: &H, state: State) -> Action {
        if h.header(Message::Request, ":method").as_deref() != Some(b"POST") {
            self.state = State::Done;
            h.bump(if state == State::Introspection {
                Counter::IntrospectionsRefused
            } else {
                Counter::RevocationsInvalid
            });
            let not_post = Failure::Request(RevocationError::NotPost);
            send(h, &revocation_failure(&not_post));
            return Action::Pause;
        }
        self.state = state;
        if state == State::Introspection {
            // Read now: the headers may go on before the body decides.
            self.introspection_authorization = h.header(Message::Request, "authorization");
        }
        if self.config().allow_on_headers_stop_iteration {
            return Action::Pause;
        }
        // Envoy would stop everything on a pause here, the body included: let the headers go on
        // and hold the body instead. Its length may change (a revocation carries the full JWT
        // on), so it goes on without one; an introspection's credentials stay here.
        let _ = h.set_header(Message::Request, "content-length", None);
        if state == State::Introspection {
            let _ = h.set_header(Message::Request, "authorization", None);
        }
        self.request_headers_gone = true;
        Action::Continue
    }

    /// A whole revocation body (or none): decide, revoke, and forward or answer.
    fn finish_revocation<H: StreamHost>(&mut self, h: &H, body_size: usize) -> Action {
        self.state = State::Done;
        let body = h.body(Message::Request, body_size);
        let etcd_on = self.config().etcd.is_some();
        // With etcd the token is revoked here once etcd has it (`after_retract`).
        let decide = if etcd_on {
            revoke::decide
        } else {
            revoke::revoke
        };
        let plan = match decide(&tokens(h, &self.shared), &body, h.now_s()) {
            Ok(plan) => plan,
            Err(failure) => {
                if let Failure::Store(e) = &failure {
                    h.log(Level::Error, &format!("revocation: {e}"));
                }
                h.bump(Counter::RevocationsInvalid);
                send(h, &revocation_failure(&failure));
                return Action::Pause;
            }
        };
        let unknown_here = matches!(
            plan,
            RevocationPlan::ForwardUnchanged | RevocationPlan::AnswerLocally
        );
        if unknown_here && !self.fetched && etcd_on {
            if let Some(key) = revoke::remote_candidate(&body) {
                // Maybe issued through another replica: ask etcd, then decide again.
                return self.fetch(h, key, AfterFetch::Revoke { body_size });
            }
        }
        match plan {
            RevocationPlan::Revoked {
                body,
                key,
                expires_at,
            } if etcd_on => {
                let then = AfterRetract::ForwardBody { body, body_size };
                self.retract(h, key, expires_at, then)
            }
            RevocationPlan::Revoked { body, .. } => {
                // Revoked here already (`revoke::revoke`).
                h.bump(Counter::Revoked);
                self.forward_body(h, &body, body_size)
            }
            RevocationPlan::ForwardUnchanged => {
                h.bump(Counter::RevocationsForwarded);
                Action::Continue
            }
            RevocationPlan::AnswerLocally => {
                h.bump(Counter::RevocationsUnknown);
                send(h, &revocation_done());
                Action::Pause
            }
        }
    }

    /// Forwards a revocation with the full JWT in place of the signature.
    fn forward_body<H: StreamHost>(&mut self, h: &H, body: &[u8], body_size: usize) -> Action {
        let applied = h
            .set_body(Message::Request, body_size, body)
            .and_then(|()| set_length(h, Message::Request, self.request_headers_gone, body.len()));
        if applied.is_err() {
            // Revoked here already; the IdP just does not hear of it. Never forward the
            // signature in place of the token.
            h.log(Level::Error, "revocation: cannot rewrite the request body");
            send(h, &revocation_done());
            return Action::Pause;
        }
        Action::Continue
    }

    /// A whole introspection body (or none): answered here, never forwarded.
    fn finish_introspection<H: StreamHost>(&mut self, h: &H, body_size: usize) -> Action {
        self.state = State::Done;
        let Some(clients) = self.config().introspection.as_ref() else {
            return Action::Continue;
        };
        let authorization = self.introspection_authorization.as_deref();
        let outcome = if authenticate(clients, authorization) {
            let body = h.body(Message::Request, body_size);
            match introspect(&tokens(h, &self.shared), &body, h.now_s()) {
                Ok(outcome) => {
                    let inactive =
                        matches!(&outcome, Introspection::Answer(a) if a.starts_with(INACTIVE));
                    if inactive && !self.fetched && self.config().etcd.is_some() {
                        if let Some(key) = revoke::remote_candidate(&body) {
                            // Maybe issued through another replica: ask etcd, then answer.
                            return self.fetch(h, key, AfterFetch::Introspect { body_size });
                        }
                    }
                    outcome
                }
                Err(e) => {
                    h.log(Level::Error, &format!("introspection: {e}"));
                    h.bump(Counter::RejectedStoreUnavailable);
                    send(h, &Rejection::StoreUnavailable.reply(self.config()));
                    return Action::Pause;
                }
            }
        } else {
            Introspection::Unauthorized
        };
        h.bump(match &outcome {
            Introspection::Answer(a) if a.starts_with(INACTIVE) => Counter::IntrospectionsInactive,
            Introspection::Answer(_) => Counter::IntrospectionsActive,
            Introspection::Unauthorized | Introspection::Invalid(_) => {
                Counter::IntrospectionsRefused
            }
        });
        send(h, &introspection_reply(self.config(), &outcome));
        Action::Pause
    }

    /// Ends a buffered request body: revocation or introspection.
    fn finish_request_body<H: StreamHost>(&mut self, h: &H, body_size: usize) -> Action {
        if self.state == State::Introspection {
            self.finish_introspection(h, body_size)
        } else {
            self.finish_revocation(h, body_size)
        }
    }

    fn on_protected_request<H: StreamHost>(&mut self, h: &H, logout: bool) -> Action {
        let authorization = h.header(Message::Request, "authorization");
        let shared = Rc::clone(&self.shared);
        let config = &shared.config;
        // With etcd a logout revokes here only once etcd has it (`after_retract`): a failed
        // write must leave the token as it was on every replica, not revoked on this one only.
        let revoke_here = logout && config.etcd.is_none();
        let decide = if revoke_here {
            revoke::logout
        } else {
            authorize
        };
        let verdict = decide(
            config,
            &tokens(h, &shared),
            &mut shared.cache.borrow_mut(),
            authorization.as_deref(),
            || Self::dpop_header(h),
            h.now_s(),
        );
        self.state = State::Done;
        let verdict = match verdict {
            Ok(v) => v,
            Err((rejection, e)) => {
                h.log(Level::Error, &format!("{e}"));
                Verdict::Reject(rejection)
            }
        };
        if !self.fetched {
            if let Some(key) = etcd::miss_key(config, &verdict, authorization.as_deref()) {
                // Maybe issued through another replica: ask etcd once.
                return self.fetch(h, key, AfterFetch::Authorize { logout });
            }
        }
        if revoke_here && matches!(verdict, Verdict::Forward(_)) {
            h.bump(Counter::Revoked);
        }
        h.bump(verdict.counter());
        match verdict {
            Verdict::Forward(forward) => {
                h.add(Counter::ClaimsUnsafeDropped, forward.unsafe_claims);
                let applied = h
                    .set_header(
                        Message::Request,
                        "authorization",
                        forward.authorization.as_deref(),
                    )
                    .and_then(|()| write_identity(h, config, &forward.claim_headers));
                if let Err(status) = applied {
                    // Fail closed: without the rebuilt headers the upstream must not be called.
                    h.log(
                        Level::Error,
                        &format!("cannot rebuild the request: {status}"),
                    );
                    send(h, &Rejection::StoreUnavailable.reply(config));
                    return Action::Pause;
                }
                if logout && !revoke_here {
                    // Every replica hears of it through etcd before the IdP does. (Hashed
                    // again only here: API calls, the hot path, never need the key.)
                    if let Some(key) = presented_key(authorization.as_deref()) {
                        return self.retract(h, key, forward.expires_at, AfterRetract::Resume);
                    }
                }
                Action::Continue
            }
            Verdict::PassThrough => {
                // A full JWT goes on as the client sent it, without any identity header.
                if let Err(status) = write_identity(h, config, &[]) {
                    h.log(
                        Level::Error,
                        &format!("cannot rebuild the request: {status}"),
                    );
                    send(h, &Rejection::StoreUnavailable.reply(config));
                    return Action::Pause;
                }
                Action::Continue
            }
            Verdict::Reject(rejection) => {
                refuse(h, config, &rejection.reply(config));
                Action::Pause
            }
        }
    }

    /// Holds the request while etcd is asked for `key`.
    fn fetch<H: StreamHost>(&mut self, h: &H, key: StoreKey, then: AfterFetch) -> Action {
        self.fetched = true;
        let shared = Rc::clone(&self.shared);
        let Some(etcd_config) = shared.config.etcd.as_ref() else {
            return self.fetch_failed(h, &EtcdError::NoAnswer { call: "range" }, then);
        };
        // Made-up signatures cost an etcd read each: bound what one worker has under way, so a
        // flood can neither pile up calls nor crowd out the revocation polls.
        let Some(slot) = InFlight::take(&shared.lookups, etcd_config.max_pending_lookups) else {
            self.state = State::Done;
            return self.unavailable(h, then);
        };
        let call = etcd::get_token(&etcd_config.key_prefix, &key);
        match dispatch_etcd(h, etcd_config, &call) {
            Ok(token) => {
                self.pending = Some(Pending::Fetch {
                    key,
                    then,
                    _slot: slot,
                });
                self.state = State::Waiting(token);
                Action::Pause
            }
            Err(e) => self.fetch_failed(h, &e, then),
        }
    }

    fn fetch_failed<H: StreamHost>(&mut self, h: &H, e: &EtcdError, then: AfterFetch) -> Action {
        h.bump(Counter::EtcdFailures);
        h.log(Level::Warn, &format!("token lookup in etcd failed: {e}"));
        self.state = State::Done;
        self.unavailable(h, then)
    }

    /// The 503 of a request whose token could not be looked for in etcd.
    fn unavailable<H: StreamHost>(&mut self, h: &H, then: AfterFetch) -> Action {
        match then {
            AfterFetch::Authorize { .. } => {
                h.bump(Counter::RejectedStoreUnavailable);
                let config = self.config();
                refuse(h, config, &Rejection::StoreUnavailable.reply(config));
            }
            AfterFetch::Introspect { .. } => {
                h.bump(Counter::RejectedStoreUnavailable);
                send(h, &shared_store_unavailable())
            }
            // Counted in etcd.failures: a revocation etcd could not take revokes nothing.
            AfterFetch::Revoke { .. } => send(h, &shared_store_unavailable()),
        }
        Action::Pause
    }

    /// etcd answered about a token this replica did not hold: keep it here if it is there,
    /// then decide the request again.
    fn on_fetched<H: StreamHost>(
        &mut self,
        h: &H,
        key: StoreKey,
        then: AfterFetch,
        answer: (Option<Vec<u8>>, Vec<u8>),
    ) -> Action {
        let fetched = match etcd::parse_get(answer.0.as_deref(), &answer.1) {
            Ok(fetched) => fetched,
            Err(e) => return self.fetch_failed(h, &e, then),
        };
        let adopted = match &fetched {
            Some(f) => match &self.config().etcd {
                Some(etcd_config) => {
                    let recent = RecentRevocations::new(h, &etcd_config.recent_prefix);
                    etcd::adopt(&tokens(h, &self.shared), key, f, &recent, h.now_s())
                }
                None => Ok(None),
            },
            None => Ok(None),
        };
        match adopted {
            Ok(Some(report)) => {
                h.record_put(&report);
                h.bump(Counter::EtcdFetched);
            }
            Ok(None) => h.bump(Counter::EtcdNotFound),
            Err(e) => {
                // A valid token that cannot be kept here: 503, not an "unknown token" 401.
                h.log(
                    Level::Error,
                    &format!("cannot keep a token read from etcd: {e}"),
                );
                h.bump(Counter::StoreWriteFailures);
                self.state = State::Done;
                return self.unavailable(h, then);
            }
        }
        match then {
            AfterFetch::Authorize { logout } => self.on_protected_request(h, logout),
            AfterFetch::Revoke { body_size } => self.finish_revocation(h, body_size),
            AfterFetch::Introspect { body_size } => self.finish_introspection(h, body_size),
        }
    }

    /// Holds the request while its revocation is written to etcd; then it is revoked here.
    fn retract<H: StreamHost>(
        &mut self,
        h: &H,
        key: StoreKey,
        expires_at: u64,
        then: AfterRetract,
    ) -> Action {
        let shared = Rc::clone(&self.shared);
        let Some(etcd_config) = shared.config.etcd.as_ref() else {
            // Callers revoke here themselves without etcd; never let the request through.
            return self.retract_failed(h, &EtcdError::NoAnswer { call: "txn" });
        };
        let prefix = &etcd_config.key_prefix;
        let now_ms = h.now_ms();
        let write = move |lease| etcd::revoke(prefix, &key, expires_at, lease, now_ms);
        let step = self.start_leased(h, expires_at, false, &write);
        self.on_retract_step(h, key, expires_at, then, step)
    }

    fn on_retract_step<H: StreamHost>(
        &mut self,
        h: &H,
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
                if self.config().etcd.is_some() {
                    h.bump(Counter::EtcdRevocationsPublished);
                }
                self.after_retract(h, key, then)
            }
            Leased::Failed(e) => self.retract_failed(h, &e),
        }
    }

    fn retract_failed<H: StreamHost>(&mut self, h: &H, e: &EtcdError) -> Action {
        // Nothing is revoked, here or anywhere: the client's retry starts over.
        h.bump(Counter::EtcdFailures);
        h.log(Level::Warn, &format!("revocation not written to etcd: {e}"));
        self.state = State::Done;
        send(h, &shared_store_unavailable());
        Action::Pause
    }

    /// etcd has the revocation (or there is no etcd): revoke here, then let the request go on.
    fn after_retract<H: StreamHost>(&mut self, h: &H, key: StoreKey, then: AfterRetract) -> Action {
        self.state = State::Done;
        if let Some(etcd_config) = &self.config().etcd {
            // Remembered before the removal, as the poller does: a read of this token from etcd
            // on another worker, racing this revocation, is not kept.
            let recent = RecentRevocations::new(h, &etcd_config.recent_prefix);
            if let Err(e) = recent.remember(key, h.now_s()) {
                h.log(Level::Error, &format!("revocation: {e}"));
            }
        }
        if let Err(failure) = revoke::forget(&tokens(h, &self.shared), &key) {
            // etcd has it, and this replica's next sweep applies it; the client may retry.
            if let Failure::Store(e) = &failure {
                h.log(Level::Error, &format!("revocation: {e}"));
            }
            h.bump(Counter::RevocationsInvalid);
            send(h, &revocation_failure(&failure));
            return Action::Pause;
        }
        h.bump(Counter::Revoked);
        match then {
            AfterRetract::Resume => Action::Continue,
            AfterRetract::ForwardBody { body, body_size } => self.forward_body(h, &body, body_size),
        }
    }

    /// Starts a write under the lease of `expires_at`'s bucket, granting the lease first when
    /// this worker has none.
    fn start_leased<H: StreamHost>(
        &self,
        h: &H,
        expires_at: u64,
        retried: bool,
        write: &dyn Fn(i64) -> etcd::Call,
    ) -> Leased {
        let Some(etcd_config) = self.config().etcd.as_ref() else {
            return Leased::Written;
        };
        let now = h.now_s();
        let (call, step) = {
            let mut leases = self.shared.leases.borrow_mut();
            let bucket = leases.bucket(expires_at);
            match leases.get(bucket, now) {
                Some(lease) => (write(lease), LeaseStep::Writing { bucket, retried }),
                None => (
                    etcd::grant(crate::replicas::etcd::Leases::ttl(bucket, now)),
                    LeaseStep::Granting { bucket, retried },
                ),
            }
        };
        match dispatch_etcd(h, etcd_config, &call) {
            Ok(token) => Leased::Wait(token, step),
            Err(e) => Leased::Failed(e),
        }
    }

    /// Takes a leased write one step on from etcd's answer.
    fn advance_leased<H: StreamHost>(
        &self,
        h: &H,
        step: LeaseStep,
        answer: (Option<Vec<u8>>, Vec<u8>),
        expires_at: u64,
        (name, write): (&'static str, &dyn Fn(i64) -> etcd::Call),
    ) -> Leased {
        let Some(etcd_config) = self.config().etcd.as_ref() else {
            return Leased::Written;
        };
        let (status, body) = answer;
        match step {
            LeaseStep::Granting { bucket, retried } => {
                match etcd::parse_grant(status.as_deref(), &body) {
                    Ok(lease) => {
                        self.shared.leases.borrow_mut().insert(bucket, lease);
                        let call = write(lease);
                        match dispatch_etcd(h, etcd_config, &call) {
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
                        self.shared.leases.borrow_mut().forget(bucket);
                        self.start_leased(h, expires_at, true, write)
                    }
                    Err(e) => Leased::Failed(e),
                }
            }
        }
    }

    /// The whole token response is buffered: split it, verify it, store it, replace the body.
    fn finish_split<H: StreamHost>(&mut self, h: &H) -> Action {
        let body = h.body(Message::Response, self.body_size);
        let plan = match split(self.config(), &body, h.now_s()) {
            Ok(plan) => plan,
            Err(e) => return self.fail_closed(h, IssueFailure::Split(&e)),
        };
        self.verify_then_issue(h, plan)
    }

    fn verify_then_issue<H: StreamHost>(&mut self, h: &H, plan: SplitPlan) -> Action {
        match self.check(h, &plan) {
            Check::Verified => self.publish_then_issue(h, plan),
            Check::Wait(token, request, number) => {
                self.pending = Some(Pending::Keys(plan, request, number));
                self.state = State::Waiting(token);
                Action::Pause
            }
            Check::Failed(e) => self.fail_closed(h, IssueFailure::Verify(&e)),
            Check::NoKeys(e) => self.fail_closed(h, IssueFailure::Keys(&e)),
        }
    }

    /// Verifies the token when `verify` is configured, fetching keys when there are none yet or
    /// the token names a `kid` the worker does not know (once per token, rate-limited).
    fn check<H: StreamHost>(&mut self, h: &H, plan: &SplitPlan) -> Check {
        let shared = Rc::clone(&self.shared);
        let Some(verify_config) = shared.config.verify.as_ref() else {
            return Check::Verified;
        };
        let now = h.now_s();
        let result = {
            let keys = shared.keys.borrow();
            keys.keys
                .as_ref()
                .map(|k| verify(&plan.jwt(), k, &verify_config.policy, now))
        };
        let may_fetch = !self.refetched && shared.keys.borrow().refetch_allowed(verify_config, now);
        match result {
            Some(Ok(())) => Check::Verified,
            // A new kid, or no kid and no key that verifies: the IdP may have rotated its keys.
            Some(Err(VerifyError::UnknownKid { .. } | VerifyError::BadSignature)) if may_fetch => {
                self.fetch_keys(h, now)
            }
            Some(Err(e)) => Check::Failed(e),
            None if !self.refetched => self.fetch_keys(h, now),
            None => Check::NoKeys(FetchError::NoResponse),
        }
    }

    fn fetch_keys<H: StreamHost>(&mut self, h: &H, now: u64) -> Check {
        let Some(verify_config) = self.shared.config.verify.as_ref() else {
            return Check::Verified;
        };
        self.refetched = true;
        let request = {
            let keys = self.shared.keys.borrow();
            first_request(&verify_config.source, keys.jwks_path.as_deref())
        };
        let Some(request) = request else {
            return Check::NoKeys(FetchError::NoResponse);
        };
        self.shared.keys.borrow_mut().on_demand_at = Some(now);
        match dispatch_key_request(h, verify_config, &request) {
            Ok((token, number)) => Check::Wait(token, request, number),
            Err(_) => Check::NoKeys(FetchError::NoResponse),
        }
    }

    /// With etcd, writes the token there first: a client never holds a token that another
    /// replica could not find.
    fn publish_then_issue<H: StreamHost>(&mut self, h: &H, plan: SplitPlan) -> Action {
        let shared = Rc::clone(&self.shared);
        let Some(etcd_config) = shared.config.etcd.as_ref() else {
            return self.issue(h, &plan);
        };
        let prefix = &etcd_config.key_prefix;
        let step = {
            let write = |lease| etcd::put_token(prefix, &plan.entry(), lease);
            self.start_leased(h, plan.expires_at, false, &write)
        };
        self.on_publish_step(h, plan, step)
    }

    fn on_publish_step<H: StreamHost>(&mut self, h: &H, plan: SplitPlan, step: Leased) -> Action {
        match step {
            Leased::Wait(token, step) => {
                self.pending = Some(Pending::Publish { plan, step });
                self.state = State::Waiting(token);
                Action::Pause
            }
            Leased::Written => {
                if self.config().etcd.is_some() {
                    h.bump(Counter::EtcdPublished);
                }
                self.issue(h, &plan)
            }
            Leased::Failed(e) => {
                h.bump(Counter::EtcdFailures);
                self.fail_closed(h, IssueFailure::Etcd(&e))
            }
        }
    }

    /// Stores the entry, then replaces the body: the client can use its token at once.
    fn issue<H: StreamHost>(&mut self, h: &H, plan: &SplitPlan) -> Action {
        let now = h.now_s();
        let report = match tokens(h, &self.shared).put(&plan.entry(), now) {
            Ok(report) => report,
            Err(e) => return self.fail_closed(h, IssueFailure::Store(&e)),
        };
        h.record_put(&report);

        let applied = h
            .set_body(Message::Response, self.body_size, &plan.body)
            .and_then(|()| {
                let gone = self.response_headers_gone;
                set_length(h, Message::Response, gone, plan.body.len())
            });
        if let Err(status) = applied {
            let e = StoreError::Host {
                operation: "replace body",
                status: status.0,
            };
            return self.fail_closed(h, IssueFailure::Store(&e));
        }
        h.bump(Counter::TokensSplit);
        self.state = State::Done;
        Action::Continue
    }

    /// Keys for a held token response arrived (or did not).
    fn on_keys<H: StreamHost>(
        &mut self,
        h: &H,
        plan: SplitPlan,
        request: KeyRequest,
        number: u64,
        answer: Answer,
    ) -> Action {
        let now = h.now_s();
        match key_response(h, &request, answer) {
            // The discovery document named the JWKS: that request is the one that counts.
            Outcome::Next(next) => match self
                .config()
                .verify
                .as_ref()
                .map(|v| dispatch_key_request(h, v, &next))
            {
                Some(Ok((token, number))) => {
                    self.pending = Some(Pending::Keys(plan, next, number));
                    self.state = State::Waiting(token);
                    Action::Pause
                }
                _ => self.fail_closed(h, IssueFailure::Keys(&FetchError::NoResponse)),
            },
            Outcome::Keys { keys, jwks_path } => {
                h.bump(Counter::KeysFetched);
                self.shared
                    .keys
                    .borrow_mut()
                    .loaded(keys, jwks_path, now, number);
                self.verify_then_issue(h, plan)
            }
            Outcome::Failed(e) => {
                h.bump(Counter::KeyFetchFailures);
                h.log(Level::Warn, &format!("key fetch failed: {e}"));
                // Older keys, if any, still decide; without keys the token cannot be issued.
                if self.shared.keys.borrow().keys.is_some() {
                    self.verify_then_issue(h, plan)
                } else {
                    self.fail_closed(h, IssueFailure::Keys(&e))
                }
            }
        }
    }
}

/// The callbacks of an exchange, in the order a proxy calls them.
impl Stream {
    /// The answer to a call this exchange started.
    pub fn on_call_answer<H: StreamHost>(&mut self, h: &H, token: u32, answer: Answer) {
        if self.state != State::Waiting(token) {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        self.state = State::Done;
        let shared = Rc::clone(&self.shared);
        let prefix = shared
            .config
            .etcd
            .as_ref()
            .map(|e| e.key_prefix.as_str())
            .unwrap_or_default();
        // Token responses are held in the response path, lifecycle calls in the request path.
        let (action, response) = match pending {
            Pending::Keys(plan, request, number) => {
                (self.on_keys(h, plan, request, number, answer), true)
            }
            Pending::Publish { plan, step } => {
                let answer = h.answer(answer);
                let next = {
                    let write = |lease| etcd::put_token(prefix, &plan.entry(), lease);
                    self.advance_leased(h, step, answer, plan.expires_at, ("put", &write))
                };
                (self.on_publish_step(h, plan, next), true)
            }
            Pending::Fetch { key, then, .. } => {
                let answer = h.answer(answer);
                (self.on_fetched(h, key, then, answer), false)
            }
            Pending::Retract {
                key,
                expires_at,
                step,
                then,
            } => {
                let answer = h.answer(answer);
                let next = {
                    let now_ms = h.now_ms();
                    let write = |lease| etcd::revoke(prefix, &key, expires_at, lease, now_ms);
                    self.advance_leased(h, step, answer, expires_at, ("txn", &write))
                };
                (self.on_retract_step(h, key, expires_at, then, next), false)
            }
        };
        if action == Action::Continue {
            if response {
                h.resume(Message::Response);
            } else {
                // The identity headers were set after the headers callback: route on them
                // (unless the headers went on already, routed).
                if !self.request_headers_gone {
                    self.recompute_route(h);
                }
                h.resume(Message::Request);
            }
        }
    }

    pub fn on_request_headers<H: StreamHost>(&mut self, h: &H, end_of_stream: bool) -> Action {
        let path = h.header(Message::Request, ":path").unwrap_or_default();
        let route = self.config().route(&path);
        // Identity headers come from verified claims only: whatever a client sent under those
        // names never reaches an upstream. An API call writes each of them once it is decided
        // (`write_identity`); every other request has them removed here, first. Envoy matches
        // header names case-insensitively and removes every instance.
        if !matches!(route, Route::Protected | Route::Logout) {
            for mapping in &self.shared.config.claims_to_headers {
                let _ = h.set_header(Message::Request, &mapping.header, None);
            }
        }
        let mut action = self.route_request(h, route);
        if matches!(self.state, State::Revocation | State::Introspection) && end_of_stream {
            action = self.finish_request_body(h, 0);
        }
        let held = matches!(self.state, State::Revocation | State::Introspection);
        if action == Action::Continue || held {
            self.recompute_route(h);
        }
        action
    }

    pub fn on_response_headers<H: StreamHost>(&mut self, h: &H, end_of_stream: bool) -> Action {
        if self.request_headers_gone && self.state != State::Done {
            // An answer to a request the filter has not decided yet (`hold_body`): Envoy will
            // not hand the filter the rest of that request, so it can never decide it, and
            // holding the answer would stall the client. Whatever happens, the body stays.
            self.state = State::Abandoned;
            h.bump(Counter::EarlyAnswers);
            let status = h.header(Message::Response, ":status").unwrap_or_default();
            if envoy_error(h, &status) {
                // Envoy failed the request itself (no healthy upstream, a direct_response
                // error): that answer carries no token and says the request failed.
                return Action::Continue;
            }
            // The upstream answered without the body the filter decides on, or Envoy answered
            // with a success: neither can stand for the filter's answer (a revocation it never
            // made, an introspection of a bare signature). Fail closed: reset.
            h.log(
                Level::Warn,
                "request reset: it was answered before the filter read its body (route it to an upstream that reads the request first)",
            );
            h.reset();
            return Action::Pause;
        }
        if self.state != State::TokenEndpoint {
            return Action::Continue;
        }
        let status = h.header(Message::Response, ":status").unwrap_or_default();
        let encoding = h.header(Message::Response, "content-encoding");
        match classify(&status, encoding.as_deref(), end_of_stream) {
            ResponseAction::PassThrough => {
                h.bump(Counter::TokenErrorsPassedThrough);
                self.state = State::Done;
                Action::Continue
            }
            ResponseAction::Fail(e) => self.fail_closed(h, IssueFailure::Split(&e)),
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
                    let _ = h.set_header(Message::Response, stale, None);
                }
                self.state = State::Buffering;
                if self.config().allow_on_headers_stop_iteration {
                    return Action::Pause;
                }
                self.response_headers_gone = true;
                Action::Continue
            }
        }
    }

    /// Whether the flow reads the body of `message` in this exchange's state (a token response
    /// being split, a revocation or introspection request): the body and trailer callbacks let
    /// every other body go by, so a host may skip measuring it (the size is then ignored).
    pub fn reads_body(&self, message: Message) -> bool {
        match message {
            Message::Request => matches!(self.state, State::Revocation | State::Introspection),
            Message::Response => self.state == State::Buffering,
        }
    }

    pub fn on_request_body<H: StreamHost>(
        &mut self,
        h: &H,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if let State::Waiting(_) | State::Abandoned = self.state {
            // Held until etcd answers: a body going on would take the headers with it.
            return Action::Pause;
        }
        if !self.reads_body(Message::Request) {
            return Action::Continue;
        }
        if body_size > revoke::MAX_REVOCATION_BODY {
            let too_large = RevocationError::TooLarge {
                limit: revoke::MAX_REVOCATION_BODY,
            };
            if self.state == State::Introspection {
                h.bump(Counter::IntrospectionsRefused);
                send(
                    h,
                    &introspection_reply(self.config(), &Introspection::Invalid(too_large)),
                );
            } else {
                h.bump(Counter::RevocationsInvalid);
                send(h, &revocation_failure(&Failure::Request(too_large)));
            }
            self.state = State::Done;
            return Action::Pause;
        }
        if !end_of_stream {
            self.body_size = body_size;
            return Action::Pause;
        }
        self.finish_request_body(h, body_size)
    }

    pub fn on_request_trailers<H: StreamHost>(&mut self, h: &H) -> Action {
        if let State::Waiting(_) | State::Abandoned = self.state {
            return Action::Pause;
        }
        if !self.reads_body(Message::Request) {
            return Action::Continue;
        }
        self.finish_request_body(h, self.body_size)
    }

    pub fn on_response_body<H: StreamHost>(
        &mut self,
        h: &H,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if let State::Waiting(_) = self.state {
            return Action::Pause;
        }
        if !self.reads_body(Message::Response) {
            return Action::Continue;
        }
        self.body_size = body_size;
        if body_size > self.config().max_token_response_bytes {
            let e = SplitError::TooLarge {
                limit: self.config().max_token_response_bytes,
            };
            return self.fail_closed(h, IssueFailure::Split(&e));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.finish_split(h)
    }

    pub fn on_response_trailers<H: StreamHost>(&mut self, h: &H) -> Action {
        if let State::Waiting(_) = self.state {
            return Action::Pause;
        }
        if !self.reads_body(Message::Response) {
            return Action::Continue;
        }
        self.finish_split(h)
    }
}
