"""The product as it is deployed (issue 13): a 3-member etcd cluster, three gateway Envoys (two
workers each) running split-token with every member in their `etcd` cluster, and a front Envoy
spreading 64 concurrent clients over them (tests/cluster.py has the parts and the settings we
recommend). Proven, each under load:

1. Thousands of clients, each with a token of its own, get their own full JWT upstream on every
   call, on every replica, the first call on a replica that never saw the token included.
2. A follower, then the leader, of etcd killed and restarted: no issuance fails, no valid token
   is refused, no revocation is lost, and the members converge again.
3. A rolling restart of the gateways, drained as we recommend: no client sees an error, and a
   restarted gateway serves every live token (from etcd) and refuses every revoked one.
4. A revocation reaches every worker of every replica within 2 s, and holds across a member
   kill and a gateway restart.
5. With the quorum lost, held tokens work, issuance and unseen tokens get 503 and nothing
   reaches the upstream unauthenticated; when the quorum returns everything works again without
   restarting Envoy.

The upstream is a `direct_response` on each gateway that echoes the Authorization (and
x-user-id) it would have forwarded, so every answer shows what reached it."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import re
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cluster  # noqa: E402
import conftest  # noqa: E402
import stack  # noqa: E402
from cluster import Answer, Connection, Load, Outcome, fresh, parallel  # noqa: E402
from helpers import claims_of, revocations, tampered_signature  # noqa: E402

PROPAGATION = 2.0  # seconds a revocation may take to reach every worker of every replica
WORKER_PROBES = 20  # fresh connections per replica: each lands on one of its 2 workers
CONCURRENCY = 64

# Tokens of this module: sub -> token still valid, and token -> sub of those revoked (200).
LIVE: dict[str, str] = {}
REVOKED: dict[str, str] = {}


# --- fixtures ----------------------------------------------------------------------------------

_shown: set[Path] = set()


def show_logs(process):
    """Prints the log of a process the deployment started when a test fails, as conftest does
    for its own (a restarted process appends to its predecessor's log: shown once)."""
    envoy = isinstance(process, stack.Envoy)
    log = process.process.log if envoy else process.log
    if log not in _shown:
        _shown.add(log)
        (conftest._started if envoy else conftest._procs).append(process)


@pytest.fixture(scope="module")
def deployment(run_dir, recording_idp):
    # timeout_ms 6 s, not the default 3 s: on the 2-core CI machine, starved by the suite itself,
    # an election after the leader's SIGKILL once took long enough that two of 33,000 requests
    # ran out of the 3 s budget (their 503 is the documented answer when etcd takes longer than
    # timeout_ms). Production sizes timeout_ms to its elections; so does this test.
    settings = {**cluster.SETTINGS, "etcd": {**cluster.SETTINGS["etcd"], "timeout_ms": 6000}}
    d = cluster.Deployment(run_dir / "cluster", recording_idp.port, on_start=show_logs,
                           settings=settings)
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture
def healthy(deployment) -> cluster.Deployment:
    """The deployment with every part in rotation, as a test starts."""
    deployment.wait_healthy()
    return deployment


@pytest.fixture(scope="module")
def jwks(recording_idp) -> jwt.PyJWKClient:
    return jwt.PyJWKClient(f"http://127.0.0.1:{recording_idp.port}/jwks")


# --- what a client sees --------------------------------------------------------------------------

def echo_problem(answer: Answer, sub: str, token: str) -> str | None:
    """Why this answer to an API call with `sub`'s `token` is wrong, if it is: it must be 200
    and the upstream must have received exactly `Bearer <header.payload.token>` whose claims are
    `sub`'s (and x-user-id: `sub`)."""
    if answer.status != 200 or not answer.upstream:
        return f"{answer.status} from {answer.server or 'the front'}"
    kind, _, jwt_text = answer.headers.get("x-echo-authorization", "").partition(" ")
    parts = jwt_text.split(".")
    if kind != "Bearer" or len(parts) != 3:
        return "upstream got no full JWT"
    if parts[2] != token:
        return "upstream got another token's signature"
    if claims_of(jwt_text).get("sub") != sub:
        return "upstream got another client's claims"
    if answer.headers.get("x-echo-user-id") != sub:
        return "upstream got another x-user-id"
    return None


def problem(o: Outcome) -> str | None:
    """Why a virtual client's request went wrong: an issuance must give a token, a call must
    reach the upstream with the client's own JWT."""
    if o.kind == "issue":
        a = o.answer
        return None if a.status == 200 else f"issue: {a.status} from {a.server or 'the front'}"
    trouble = echo_problem(o.answer, o.sub, o.token)
    return trouble and f"call: {trouble}"


def refused_problem(answer: Answer) -> str | None:
    """Why this is not the refusal of a revoked token: 401 invalid_token, nothing upstream."""
    if answer.upstream:
        return f"{answer.status}: reached the upstream"
    if answer.status != 401 or 'error="invalid_token"' not in answer.headers.get("www-authenticate", ""):
        return f"{answer.status} {answer.body[:120]!r}"
    return None


def unavailable_problem(answer: Answer) -> str | None:
    """Why this is not the filter's fail-closed 503 temporarily_unavailable, with no credential
    in it and nothing upstream."""
    if answer.upstream:
        return f"{answer.status}: reached the upstream"
    if answer.status != 503 or answer.server is None:
        return f"{answer.status} from {answer.server or 'the front'}"
    try:
        body = answer.json()
    except ValueError:
        return f"503 body not JSON: {answer.body[:120]!r}"
    if body.get("error") != "temporarily_unavailable" or "access_token" in body:
        return f"503 body {body}"
    if re.search(rb"[A-Za-z0-9_-]{40,}", answer.body):
        return "503 body holds a credential-like run"
    return None


def tally(outcomes: list[Outcome]) -> collections.Counter:
    return collections.Counter(problem(o) or f"{o.kind}: ok" for o in outcomes)


def describe(failures: list[Outcome], events: list[tuple[float, str]], start: float) -> str:
    """Failures by the event they followed, with the first few of each."""
    def phase(at: float) -> str:
        return next((name for t, name in reversed(events) if t <= at), "start")
    groups = collections.defaultdict(list)
    for o in sorted(failures, key=lambda o: o.at):
        groups[(phase(o.at), problem(o))].append(o)
    lines = [f"timeline (s): {[(round(t - start, 2), name) for t, name in events]}"]
    for (when, what), items in groups.items():
        span = f"{items[0].at - start:.2f}..{items[-1].at - start:.2f} s"
        examples = [f"{o.sub}: {o.answer.body[:100]!r}" for o in items[:2]]
        lines.append(f"after {when!r}: {len(items)} x {what}, at {span}; e.g. {examples}")
    return "\n".join(lines)


def hex_of(token: str) -> str:
    """What etcd keys a token by: SHA-256 of its signature."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def issue_via(port: int, sub: str) -> tuple[str, str]:
    """A token for `sub` through `port`, and the gateway that issued it."""
    answer = fresh(port, "POST", cluster.TOKEN_PATH, cluster.FORM_HEADERS, cluster.token_form(sub))
    assert answer.status == 200, f"issuing for {sub}: {answer}"
    LIVE[sub] = answer.json()["access_token"]
    return LIVE[sub], answer.server


def hold(deployment, tokens: dict[str, str], probes: int = 4):
    """Uses each token (sub -> token) on fresh connections to every replica, so each holds it in
    its store and, likely, in both workers' caches. Returns sub -> the full JWT upstream got."""
    def use(job):
        sub, token, gw = job
        answer = fresh(gw.port, "GET", cluster.PROTECTED, cluster.bearer(token))
        assert echo_problem(answer, sub, token) is None, f"{gw} with {sub}: {answer}"
        return sub, answer.headers["x-echo-authorization"].removeprefix("Bearer ")
    jobs = [(sub, token, gw) for sub, token in tokens.items() for gw in deployment.gateways
            for _ in range(probes)]
    return dict(parallel(use, jobs))


def revoke(conn: Connection, sub: str, token: str) -> Answer:
    """Revokes `sub`'s token. It is then neither live nor revoked for later tests unless the
    answer was 200: a revocation that failed may still have been written (a timeout)."""
    answer = conn.revoke(token)
    LIVE.pop(sub, None)
    if answer.status == 200:
        REVOKED[token] = sub
    return answer


def refused_everywhere(deployment, tokens: dict[str, str]) -> list[str]:
    """Every worker of every replica refuses each revoked token (token -> sub): WORKER_PROBES
    fresh connections each. Returns what went wrong."""
    def probe(job):
        token, gw = job
        trouble = refused_problem(fresh(gw.port, "GET", cluster.PROTECTED, cluster.bearer(token)))
        return trouble and f"{gw} served revoked {tokens[token]}: {trouble}"
    jobs = [(token, gw) for token in tokens for gw in deployment.gateways
            for _ in range(WORKER_PROBES)]
    return sorted(set(filter(None, parallel(probe, jobs))))


def served_everywhere(deployment, tokens: dict[str, str]) -> list[str]:
    """Every replica serves each live token (sub -> token) with its own JWT: one call each, on a
    keep-alive connection per thread and replica (the store is shared by the workers). Returns
    what went wrong."""
    local = threading.local()

    def serve(job):
        sub, token, gw = job
        conns = local.__dict__.setdefault("conns", {})
        conn = conns.setdefault(gw.name, Connection(gw.port))
        trouble = echo_problem(conn.call(token), sub, token)
        return trouble and f"{gw} with live {sub}: {trouble}"
    jobs = [(sub, token, gw) for sub, token in tokens.items() for gw in deployment.gateways]
    return [t for t in parallel(serve, jobs) if t]


def refused_within(deployment, token: str, since: float) -> dict[str, float | None]:
    """For the record (`refused_everywhere` decides): seconds from `since` until each replica
    first refused `token`, polled every 50 ms on fresh connections (None: not within 2 s)."""
    pending, seen = {gw.server: gw for gw in deployment.gateways}, {}
    while pending and time.monotonic() < since + PROPAGATION:
        for name, gw in list(pending.items()):
            if fresh(gw.port, "GET", cluster.PROTECTED, cluster.bearer(token)).status == 401:
                seen[name] = round(time.monotonic() - since, 3)
                del pending[name]
        time.sleep(0.05)
    return {gw.server: seen.get(gw.server) for gw in deployment.gateways}


def etcd_problems(deployment, revoked: dict[str, str]) -> list[str]:
    """On every member's own copy (a serializable read): no key of a revoked token (token ->
    sub), a revocation marker for each."""
    troubles = []
    for m in deployment.etcd.members:
        tokens = m.range_prefix(f"{cluster.KEY_PREFIX}t/", serializable=True)
        markers = {key.rsplit("/", 1)[1]
                   for key in m.range_prefix(f"{cluster.KEY_PREFIX}r/", serializable=True)}
        for token, sub in revoked.items():
            if f"{cluster.KEY_PREFIX}t/{hex_of(token)}" in tokens:
                troubles.append(f"{m}: revoked {sub} still has its token key")
            if hex_of(token) not in markers:
                troubles.append(f"{m}: no revocation marker for {sub}")
    return troubles


@contextlib.contextmanager
def running(load: Load):
    """A background load that stops however the block ends."""
    load.start()
    try:
        yield load
    finally:
        load.stop()


def stat_deltas(envoys, name: str, before: list[dict]) -> dict[str, int]:
    return {e.process.name: e.stats().get(name, 0) - b.get(name, 0) for e, b in zip(envoys, before)}


def remember_live(outcomes: list[Outcome]):
    for o in outcomes:
        if o.kind == "issue" and o.token:
            LIVE[o.sub] = o.token


# --- 1. load without mix-ups -------------------------------------------------------------------

def test_thousands_of_clients_each_get_their_own_jwt_on_every_replica(healthy, jwks):
    d = healthy
    gateway_envoys = [g.envoy for g in d.gateways]
    before = [e.stats() for e in gateway_envoys]
    front_before = d.front.stats()
    t0 = time.monotonic()
    outcomes = Load(d.front.port, "mixup", clients=2000, calls=10, concurrency=CONCURRENCY).run()
    elapsed = time.monotonic() - t0
    remember_live(outcomes)
    counts = tally(outcomes)
    print(f"{len(outcomes)} requests in {elapsed:.1f} s: {dict(counts)}")
    failures = [o for o in outcomes if problem(o)]
    assert not failures, describe(failures, [], t0)
    issued = [o for o in outcomes if o.kind == "issue"]
    calls = [o for o in outcomes if o.kind == "call"]
    assert len(issued) == 2000 and len(calls) == 20000, counts

    # Every replica served, and served tokens another replica had issued, at their first call.
    servers = {g.server for g in d.gateways}
    served = collections.Counter(o.answer.server for o in calls)
    assert set(served) == servers, served
    issuers = {o.sub: o.answer.server for o in issued}
    first_elsewhere = collections.Counter()
    seen = collections.defaultdict(set)
    for o in sorted(calls, key=lambda o: o.at):
        if o.answer.server != issuers[o.sub] and o.answer.server not in seen[o.sub]:
            first_elsewhere[o.answer.server] += 1
        seen[o.sub].add(o.answer.server)
    fetched = stat_deltas(gateway_envoys, stack.stat_name("etcd.fetched"), before)
    print(f"calls served: {dict(served)}; issued by: {dict(collections.Counter(issuers.values()))}; "
          f"first calls on a replica that never saw the token: {dict(first_elsewhere)}; "
          f"etcd.fetched: {fetched}")
    assert set(first_elsewhere) == servers, first_elsewhere
    for g in d.gateways:  # each such first call found the token in etcd
        assert fetched[g.envoy.process.name] >= first_elsewhere[g.server], (fetched, first_elsewhere)

    # The JWT upstream got is the IdP's, signed, and the same on every call of a client.
    jwts = collections.defaultdict(set)
    for o in calls:
        jwts[o.sub].add(o.answer.headers["x-echo-authorization"].removeprefix("Bearer "))
    assert all(len(v) == 1 for v in jwts.values()), [s for s, v in jwts.items() if len(v) > 1][:5]
    key = jwks.get_signing_key_from_jwt(next(iter(jwts["mixup-0"]))).key
    for sub, (jwt_text,) in jwts.items():
        claims = jwt.decode(jwt_text, key, algorithms=["RS256"], options={"verify_aud": False})
        assert claims["sub"] == sub, (sub, claims)

    # Steady state: no cluster ever routed in panic mode.
    panic = stat_deltas(gateway_envoys, "cluster.etcd.lb_healthy_panic", before)
    assert not any(panic.values()), f"etcd cluster in panic mode: {panic}"
    assert d.front.stats().get("cluster.gateways.lb_healthy_panic", 0) == \
        front_before.get("cluster.gateways.lb_healthy_panic", 0)


# --- 2. etcd members killed ----------------------------------------------------------------------

def test_etcd_member_kills_lose_no_issuance_token_or_revocation(healthy, recording_idp):
    d = healthy
    victims = {f"kill-victim-{i}": issue_via(d.front.port, f"kill-victim-{i}")[0] for i in range(20)}
    jwts = hold(d, victims)
    gateway_envoys = [g.envoy for g in d.gateways]
    before = [e.stats() for e in gateway_envoys]
    recorded_before = len(revocations(recording_idp))
    events: list[tuple[float, str]] = []
    revoking = Connection(d.front.port)
    pending = iter(victims.items())
    answers: list[tuple[str, str, Answer, str]] = []  # sub, token, answer, phase

    def event(name: str):
        events.append((time.monotonic(), name))

    def revoke_some(n: int):
        for sub, token in itertools.islice(pending, n):
            answers.append((sub, token, revoke(revoking, sub, token), events[-1][1]))

    t0 = time.monotonic()
    event("load")
    with running(Load(d.front.port, "kill", calls=10, concurrency=CONCURRENCY)) as load:
        time.sleep(1.5)
        revoke_some(4)
        follower = d.etcd.followers()[0]
        event(f"SIGKILL follower {follower.name}")
        d.etcd.kill(follower)
        revoke_some(4)
        time.sleep(3)
        follower_panic = stat_deltas(gateway_envoys, "cluster.etcd.lb_healthy_panic", before)
        event(f"restart {follower.name}")
        d.etcd.restart(follower)
        event(f"{follower.name} rejoined")
        revoke_some(4)
        time.sleep(1.5)
        leader = d.etcd.leader()
        assert leader is not None, d.etcd.statuses()
        event(f"SIGKILL leader {leader.name}")
        d.etcd.kill(leader)
        revoke_some(4)
        time.sleep(3)
        event(f"restart {leader.name}")
        d.etcd.restart(leader)
        event(f"{leader.name} rejoined")
        revoke_some(4)
        time.sleep(1.5)
        event("load stops")
    outcomes = load.outcomes
    remember_live(outcomes)
    try:  # the members agree again on leader, revision and raft index
        print(f"converged: {cluster.EtcdCluster.brief(d.etcd.wait_converged(timeout=30))}")
        diverged = []
    except TimeoutError as e:
        diverged = [str(e)]
    print(f"{len(outcomes)} requests in {time.monotonic() - t0:.1f} s: {dict(tally(outcomes))}")
    print(f"timeline: {[(round(t - t0, 2), name) for t, name in events]}")
    for name in (stack.stat_name("etcd.failures"), "cluster.etcd.upstream_rq_retry",
                 "cluster.etcd.upstream_rq_retry_overflow", "cluster.etcd.upstream_rq_per_try_timeout",
                 "cluster.etcd.upstream_rq_timeout", "cluster.etcd.lb_healthy_panic",
                 "cluster.etcd.outlier_detection.ejections_enforced_total"):
        print(f"{name}: {stat_deltas(gateway_envoys, name, before)}")

    failures = [o for o in outcomes if problem(o)]
    revoked = {token: sub for sub, token, a, _ in answers if a.status == 200}
    recorded = {r.get("token") for r in revocations(recording_idp)[recorded_before:]}
    verdicts = {  # all of them, so that one run says everything that went wrong
        "requests failed": [describe(failures, events, t0)] if failures else [],
        "revocations failed": [f"{sub} ({phase}): {a}" for sub, _, a, phase in answers
                               if a.status != 200],
        "revoked tokens still served": refused_everywhere(d, revoked),
        "etcd lost a revocation": etcd_problems(d, revoked),
        "revocations that never reached the IdP": [sub for token, sub in revoked.items()
                                                   if jwts[sub] not in recorded],
        "etcd cluster in panic mode with one member down":
            [f"{name}: {n}" for name, n in follower_panic.items() if n],
        "etcd members did not converge": diverged,
    }
    wrong = {what: items for what, items in verdicts.items() if items}
    assert not wrong, f"{len(failures)} of {len(outcomes)} requests failed; " + "\n".join(
        f"{what}: {items[:10]}" if what != "requests failed" else items[0]
        for what, items in wrong.items())


# --- 3. rolling restart of the gateways ----------------------------------------------------------

def test_rolling_restart_of_the_gateways_under_load(healthy):
    d = healthy
    gone = {f"roll-gone-{i}": issue_via(d.front.port, f"roll-gone-{i}")[0] for i in range(10)}
    hold(d, gone)
    conn = Connection(d.front.port)
    for sub, token in gone.items():
        assert revoke(conn, sub, token).status == 200
    time.sleep(PROPAGATION)
    front_before = d.front.stats()
    pids = {g.name: g.envoy.process.proc.pid for g in d.gateways}
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()
    events.append((t0, "load"))
    with running(Load(d.front.port, "roll", calls=10, concurrency=CONCURRENCY)) as load:
        time.sleep(1)
        for g in d.gateways:
            events.append((time.monotonic(), f"drain and restart {g}"))
            steps = d.restart_gateway(g)
            events.append((time.monotonic(), f"{g} back in rotation"))
            print(f"{g} restarted: {steps}")
            time.sleep(1)
        events.append((time.monotonic(), "load stops"))
    outcomes = load.outcomes
    remember_live(outcomes)
    front_after = d.front.stats()
    print(f"{len(outcomes)} requests in {time.monotonic() - t0:.1f} s: {dict(tally(outcomes))}")
    print(f"timeline: {[(round(t - t0, 2), name) for t, name in events]}")
    print("front: " + ", ".join(f"{k} {front_after.get(k, 0) - front_before.get(k, 0)}" for k in (
        "cluster.gateways.upstream_rq_retry", "cluster.gateways.upstream_rq_retry_success",
        "cluster.gateways.lb_healthy_panic", "cluster.gateways.upstream_cx_connect_fail")))
    assert all(g.envoy.process.proc.pid != pids[g.name] for g in d.gateways), \
        "not every gateway restarted"
    failures = [o for o in outcomes if problem(o)]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed:\n" + \
        describe(failures, events, t0)
    assert front_after.get("cluster.gateways.lb_healthy_panic", 0) == \
        front_before.get("cluster.gateways.lb_healthy_panic", 0)

    # Each restarted gateway serves every live token of this module, read from etcd, and
    # refuses every revoked one on every worker.
    t1 = time.monotonic()
    troubles = served_everywhere(d, dict(LIVE))
    print(f"{len(LIVE)} live tokens checked on every restarted gateway in "
          f"{time.monotonic() - t1:.1f} s")
    assert not troubles, f"{len(troubles)} failed: {troubles[:10]}"
    lost = refused_everywhere(d, dict(REVOKED))
    assert not lost, f"revoked tokens served after the restart: {lost[:10]}"


# --- 4. revocation under load ------------------------------------------------------------------

def test_revocations_under_load_reach_every_worker_within_2s_and_hold(healthy):
    d = healthy
    victims = {f"revoke-{i}": issue_via(d.front.port, f"revoke-{i}")[0] for i in range(8)}
    hold(d, victims)
    revoking = Connection(d.front.port)
    late: list[str] = []
    revoked: dict[str, str] = {}
    with running(Load(d.front.port, "revload", calls=10, concurrency=CONCURRENCY)) as load:
        time.sleep(1)
        for sub, token in victims.items():
            answer = revoke(revoking, sub, token)
            since = time.monotonic()
            assert answer.status == 200, f"revoking {sub}: {answer}"
            revoked[token] = sub
            print(f"{sub} refused after (s): {refused_within(d, token, since)}")
            time.sleep(max(0.0, since + PROPAGATION - time.monotonic()))
            late += refused_everywhere(d, {token: sub})
        # Still refused across a member kill (the leader: a new one must be elected) ...
        leader = d.etcd.leader()
        d.etcd.kill(leader)
        time.sleep(2)
        d.etcd.restart(leader)
        after_kill = refused_everywhere(d, revoked)
        # ... and by a gateway that starts from an empty store.
        d.restart_gateway(d.gateways[0])
        after_restart = refused_everywhere(d, revoked)
    remember_live(load.outcomes)
    print(f"load meanwhile: {dict(tally(load.outcomes))}")
    assert not late, f"not refused everywhere {PROPAGATION} s after the revocation: {late[:10]}"
    assert not after_kill, f"served again after an etcd member kill: {after_kill[:10]}"
    assert not after_restart, f"served after a gateway restart: {after_restart[:10]}"
    d.etcd.wait_converged(timeout=30)
    troubles = etcd_problems(d, revoked)
    assert not troubles, troubles


# --- 5. quorum lost ----------------------------------------------------------------------------

def test_without_quorum_held_tokens_work_and_the_rest_fails_closed_then_recovers(healthy):
    d = healthy
    held = {f"quorum-held-{i}": issue_via(d.front.port, f"quorum-held-{i}")[0] for i in range(64)}
    hold(d, held, probes=2)
    # Tokens only their issuing gateway has seen: sub -> (token, issuer).
    unseen = {}
    for g in d.gateways:
        for i in range(10):
            sub = f"quorum-unseen-{g.name}-{i}"
            answer = fresh(g.port, "POST", cluster.TOKEN_PATH, cluster.FORM_HEADERS,
                           cluster.token_form(sub))
            assert answer.status == 200, answer
            unseen[sub] = (answer.json()["access_token"], g)
            LIVE[sub] = unseen[sub][0]
    forged = [tampered_signature(token) for token in list(held.values())[:20]]
    pids = {g.name: g.envoy.process.proc.pid for g in d.gateways}

    leader = d.etcd.leader()
    down = [leader, d.etcd.followers()[0]]
    for m in down:
        d.etcd.kill(m)
    d.etcd.wait_no_leader()

    def call(port: int, token: str) -> Answer:
        return fresh(port, "GET", cluster.PROTECTED, cluster.bearer(token))

    def outage(job):
        kind, n = job
        if kind == "held":
            sub = f"quorum-held-{n % len(held)}"
            return kind, sub, echo_problem(call(d.front.port, held[sub]), sub, held[sub])
        if kind == "issue":
            return kind, n, unavailable_problem(fresh(
                d.front.port, "POST", cluster.TOKEN_PATH, cluster.FORM_HEADERS,
                cluster.token_form(f"quorum-new-{n}")))
        if kind == "unseen":  # on each gateway but the one that issued it
            sub, (token, issuer) = list(unseen.items())[n % len(unseen)]
            others = [g for g in d.gateways if g is not issuer]
            gw = others[n // len(unseen) % len(others)]
            return kind, sub, unavailable_problem(call(gw.port, token))
        answer = call(d.front.port, forged[n % len(forged)])
        trouble = "reached the upstream" if answer.upstream else (
            None if answer.status in (401, 503) else f"{answer.status}")
        return kind, n, trouble
    # Interleaved: the held tokens' calls run alongside the calls that wait for etcd.
    sizes = {"held": 1280, "issue": 128, "unseen": 120, "forged": 40}
    jobs = sorted(((kind, n) for kind, size in sizes.items() for n in range(size)),
                  key=lambda job: job[1])
    t0 = time.monotonic()
    results = parallel(outage, jobs, CONCURRENCY)
    print(f"{len(jobs)} requests without quorum in {time.monotonic() - t0:.1f} s")
    counts = collections.Counter((kind, trouble or "as expected") for kind, _, trouble in results)
    print(f"without quorum: {dict(counts)}")
    wrong = [(kind, who, trouble) for kind, who, trouble in results if trouble]
    assert not wrong, \
        f"{len(wrong)} of {len(jobs)} wrong without quorum: {dict(counts)}; e.g. {wrong[:5]}"

    # The quorum returns: everything works again, on the same Envoy processes.
    t1 = time.monotonic()
    for m in down:
        d.etcd.restart(m)
    d.etcd.wait_converged(timeout=30)
    d.wait_healthy()
    print(f"quorum back and every gateway routing to every member {time.monotonic() - t1:.1f} s "
          "after the restarts began")
    assert {g.name: g.envoy.process.proc.pid for g in d.gateways} == pids
    assert all(g.envoy.process.alive() for g in d.gateways)
    issued = Load(d.front.port, "quorum-back", clients=64, calls=3, concurrency=CONCURRENCY).run()
    remember_live(issued)
    failures = [o for o in issued if problem(o)]
    assert not failures, f"after the quorum returned: {dict(tally(issued))}"

    troubles = served_everywhere(d, {**held, **{sub: token for sub, (token, _) in unseen.items()}})
    assert not troubles, f"after the quorum returned: {troubles[:10]}"
    refused = [refused_problem(call(d.front.port, f)) for f in forged]
    assert not any(refused), f"forged signatures after the quorum returned: {refused}"
