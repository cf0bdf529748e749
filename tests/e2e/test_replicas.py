"""Replicas sharing tokens through etcd (the filter's `etcd` tier): a token split on one Envoy is
in etcd before its client has it and works on every other Envoy; a revocation or logout on any
replica reaches all of them within 2 s, also after etcd is restored from a backup; a replica
started later knows both; with etcd down the filter answers 503 rather than issue a token the
others cannot see or accept one it cannot check. etcd holds `header.payload` only: no signature,
so a dump of it holds no usable credential."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import time
import uuid

import jwt
import pytest
import requests

import stack
from conftest import BASE_FILTER
from helpers import (Gateway, StatDelta, assert_split_refused, claims_of, forwarded_authorization,
                     revocations, revocations_since)

PREFIX = "split-token/"  # key_prefix's default
BUCKET = 60  # lease_bucket_seconds' default
PROPAGATION = 2.0  # seconds a revocation may take to reach every replica
VMS_CREATED = "wasm.envoy.wasm.runtime.v8.created"

REPLICATED = {
    **BASE_FILTER,
    "revocation_paths": ["/auth/revoke"],
    "logout_paths": ["/auth/logout"],
    "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}],
    "etcd": {"cluster": "etcd"},  # everything else at its default
}
# A route chosen by a client-sent identity header: the filter must make Envoy route again on the
# header it set, also when the request waited for etcd.
SPOOF_ROUTE = {"match": {"prefix": "/basic-protected-api/",
                         "headers": [{"name": "x-user-id", "string_match": {"exact": "spoofed"}}]},
               "direct_response": {"status": 418, "body": {"inline_string": "routed on a spoofed header"}}}
# A protected path Envoy answers itself: the answer is made inside the filter's resume.
LOCAL_PATH = "/basic-protected-api/local"
LOCAL_ROUTE = {"match": {"path": LOCAL_PATH},
               "direct_response": {"status": 200, "body": {"inline_string": "answered by Envoy"}}}

# Every signature a client of this module was given: none may ever be found in etcd.
ISSUED: list[str] = []
REPLICAS: list[Gateway] = []


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def etcd(start_etcd):
    proc = start_etcd()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def start_replicas(start_gateway, recording_idp):
    """Starts Envoys (two workers each, so a revocation must also reach the worker that did not
    see it) on one etcd, side by side."""

    def start(names: list[str], etcd, settings: dict = REPLICATED) -> list[Gateway]:
        gateways = [start_gateway(settings, concurrency=2, name=name, wait=False,
                                  idp_port=recording_idp.port,
                                  extra_routes=[SPOOF_ROUTE, LOCAL_ROUTE],
                                  extra_clusters=[stack.etcd_cluster(etcd.port)])
                    for name in names]
        for gw in gateways:
            gw.envoy.wait_ready()
            gw.vms_at_start = gw.envoy.stat(VMS_CREATED)
        REPLICAS.extend(gateways)
        return gateways

    return start


@pytest.fixture(scope="module")
def abc(start_replicas, etcd) -> list[Gateway]:
    return start_replicas(["replica-a", "replica-b", "replica-c"], etcd)


# --- helpers ---------------------------------------------------------------------------------------

def issue(gw: Gateway, **form) -> str:
    """A fresh token through `gw`: distinct subjects, as RS256 gives equal claims equal tokens."""
    token = gw.token(sub=f"replica-{uuid.uuid4().hex}", **form)
    ISSUED.append(token)
    return token


def hex_of(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def token_key(token: str, prefix: str = PREFIX) -> str:
    return f"{prefix}t/{hex_of(token)}"


def marker_keys(stored, token: str, prefix: str = PREFIX) -> list[str]:
    """The revocation markers of `token` among etcd keys: `<prefix>r/<written, Unix ms>/<hex>`."""
    pattern = re.compile(rf"{re.escape(prefix)}r/(\d{{13}})/{hex_of(token)}")
    return [key for key in stored if pattern.fullmatch(key)]


def etcd_keys(etcd, prefix: str = PREFIX) -> dict[str, tuple[bytes, str]]:
    """key -> (value, lease id) under `prefix`."""
    return {key: (value, lease) for key, value, lease in stack.etcd_range_prefix(etcd.port, prefix)}


def etcd_revision(etcd) -> int:
    return int(stack.etcd_call(etcd.port, "/v3/kv/range", {"key": "AA=="})["header"]["revision"])


def assert_no_signature_in(etcd):
    everything = stack.etcd_range_prefix(etcd.port, "")
    for key, value, _ in everything:
        for token in ISSUED:
            assert token not in key and token.encode() not in value, f"signature in etcd at {key}"


def full_jwt(gw: Gateway, token: str) -> str:
    return forwarded_authorization(gw.call(f"Bearer {token}")).removeprefix("Bearer ")


def verified_claims(gw: Gateway, jwt_text: str) -> dict:
    """The claims of the IdP's JWT, checked against its published keys."""
    key = gw.jwks_client().get_signing_key_from_jwt(jwt_text).key
    return jwt.decode(jwt_text, key, algorithms=["RS256"], options={"verify_aud": False})


def hold(token: str, *gateways: Gateway):
    """Uses `token` on fresh connections, spread over both workers, so each replica holds it in
    its store and in every worker's cache."""
    for gw in gateways:
        for _ in range(20):
            r = gw.call(f"Bearer {token}")
            assert r.status_code == 200, f"{gw.envoy.process.name}: {r.status_code} {r.text[:300]}"


def assert_refused(token: str, *gateways: Gateway):
    """Every worker of every gateway refuses `token` as unknown, and httpbin never hears of it."""
    for gw in gateways:
        with StatDelta(gw) as d:
            for _ in range(20):
                r = gw.call(f"Bearer {token}")
                assert r.status_code == 401, f"{gw.envoy.process.name}: {r.status_code} {r.text[:300]}"
                assert 'error="invalid_token"' in r.headers["www-authenticate"], r.headers
        assert d["cluster.httpbin.upstream_rq_total"] == 0, gw.envoy.process.name


def refused_within(token: str, since: float, **gateways: Gateway) -> dict[str, float | None]:
    """Polls every 50 ms until each gateway refuses `token`: seconds since `since` per gateway
    (None: not within PROPAGATION). For the record; `assert_refused` decides."""
    pending, seen = dict(gateways), {}
    while pending and time.monotonic() < since + PROPAGATION:
        for name, gw in list(pending.items()):
            if gw.call(f"Bearer {token}").status_code == 401:
                seen[name] = round(time.monotonic() - since, 3)
                del pending[name]
        time.sleep(0.05)
    return {name: seen.get(name) for name in gateways}


def after_propagation(since: float):
    time.sleep(max(0.0, since + PROPAGATION - time.monotonic()))


def revoke(gw: Gateway, token: str) -> requests.Response:
    return requests.post(gw.url + "/auth/revoke", data={"token": token}, auth=("e2e", "s"), timeout=10)


def assert_unavailable(r: requests.Response):
    """The filter's fail-closed answer: 503 temporarily_unavailable, no credential in it."""
    assert r.status_code == 503, f"{r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.json()["error"] == "temporarily_unavailable", r.text
    assert "eyJ" not in r.text and "access_token" not in r.json(), r.text
    # A signature is a long base64url run; nothing like one may leak.
    assert not re.search(r"[A-Za-z0-9_-]{40,}", r.text), r.text


def random_signature(size: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(size)).rstrip(b"=").decode()


# --- issuance and lookup ---------------------------------------------------------------------------

def test_issued_token_is_in_etcd_before_the_client_gets_it(abc, etcd):
    a, _, _ = abc
    with StatDelta(a) as d:
        token = issue(a)
    stored = etcd_keys(etcd)  # the client has its answer: the write must be done
    assert d.split_token("etcd.published") == 1
    assert token_key(token) in stored, f"{token_key(token)} not among {sorted(stored)}"
    value, lease = stored[token_key(token)]
    expires_at, sep, header_payload = value.decode().partition(":")
    jwt_text = full_jwt(a, token)
    assert sep and f"{header_payload}.{token}" == jwt_text, value
    assert int(expires_at) == claims_of(jwt_text)["exp"], value
    assert lease != "0", "the token key has no lease"
    ttl = stack.etcd_lease_ttl(etcd.port, lease)
    remaining = int(expires_at) - time.time()
    # The lease outlives the token by at most its expiry bucket (+ rounding and test time).
    assert remaining - 1 <= ttl <= remaining + BUCKET + 3, f"lease TTL {ttl}, token has {remaining:.0f} s"
    assert_no_signature_in(etcd)


def test_tokens_of_one_expiry_bucket_share_a_lease(abc, etcd):
    a, _, _ = abc
    with requests.Session() as session:  # one connection: one worker
        for _ in range(5):
            tokens = [a.token(session=session, sub=f"bucket-{uuid.uuid4().hex}") for _ in range(2)]
            ISSUED.extend(tokens)
            stored = etcd_keys(etcd)
            (v1, lease1), (v2, lease2) = (stored[token_key(t)] for t in tokens)
            if v1.split(b":")[0] == v2.split(b":")[0]:  # same expiry second, so same bucket
                break
    assert lease1 == lease2 != "0", (lease1, lease2)


def test_replica_fetches_a_token_it_never_saw_from_etcd(abc, etcd):
    a, b, _ = abc
    token = issue(a)
    header_payload = etcd_keys(etcd)[token_key(token)][0].decode().partition(":")[2]
    with StatDelta(b) as d:
        r = b.call(f"Bearer {token}")
    forwarded = forwarded_authorization(r)
    assert forwarded == f"Bearer {header_payload}.{token}"
    assert verified_claims(b, forwarded.removeprefix("Bearer "))["sub"].startswith("replica-")
    assert d.split_token("etcd.fetched") == 1
    # From now on B serves it itself, on either worker.
    with StatDelta(b) as d:
        hold(token, b)
    assert d.split_token("etcd.fetched") == 0


def test_expired_token_still_in_etcd_is_refused(abc, etcd):
    """A lease may outlive its token by up to a bucket: a replica reading an expired token from
    etcd must refuse it as any expired token."""
    a, b, _ = abc
    # The key's lease ends 1 s after the token's expiry bucket does: were the token to expire at
    # the end of a bucket (1 in 60), its key could be gone by the time B looks. Start where the
    # expiry is seconds before the bucket's end, at the start of a second (so the 2 s token has
    # nearly 2 s to be issued).
    while True:
        time.sleep(1 - time.time() % 1)
        if -(int(time.time()) + 2) % BUCKET >= 3:
            break
    token = issue(a, exp_in="2")
    expires_at = int(etcd_keys(etcd)[token_key(token)][0].partition(b":")[0])
    assert -expires_at % BUCKET >= 2, expires_at
    time.sleep(max(0.0, expires_at + 0.5 - time.time()))  # expired (expires_at <= now)
    assert token_key(token) in etcd_keys(etcd)  # so B does find it there
    with StatDelta(b) as d:
        r = b.call(f"Bearer {token}")
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers["www-authenticate"], r.headers
    assert d["cluster.httpbin.upstream_rq_total"] == 0


def test_a_request_with_a_body_waits_for_etcd(abc):
    """The first call on a replica waits for etcd with its body held: an unknown signature never
    reaches the upstream, body or not, and a known one arrives with its body intact."""
    a, b, _ = abc
    body = b"x" * 100_000
    for size in (43, 342):
        with StatDelta(b) as d:
            r = requests.post(b.url + "/basic-protected-api/anything", data=body, timeout=10,
                              headers={"Authorization": f"Bearer {random_signature(size * 3 // 4)}"})
        assert r.status_code == 401, f"{r.status_code} {r.text[:300]}"
        assert d.split_token("etcd.not_found") == 1
        assert d["cluster.httpbin.upstream_rq_total"] == 0
    token = issue(a)
    r = requests.post(b.url + "/basic-protected-api/anything", data=body, timeout=10,
                      headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"
    echoed = r.json()
    assert echoed["data"] == body.decode()
    assert echoed["headers"]["Authorization"] == f"Bearer {full_jwt(a, token)}"


def test_route_follows_the_identity_the_filter_set_after_an_etcd_lookup(abc):
    a, b, _ = abc
    token = issue(a)
    sub = claims_of(full_jwt(a, token))["sub"]
    r = b.call(f"Bearer {token}", headers={"x-user-id": "spoofed"})  # B reads etcd first
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"
    assert r.json()["headers"]["X-User-Id"] == sub


def test_a_call_that_waited_for_etcd_gets_the_answer_envoy_makes_itself(abc):
    """The filter lets the request go on once etcd answered; a route Envoy answers itself
    (direct_response, or a later filter's local reply) answers inside that resume, and the
    answer passes the filter's response hooks at once. The native build held it forever (its
    stream was still busy with the etcd answer): every such call timed out (issue 15)."""
    a, b, _ = abc
    token = issue(a)
    with StatDelta(b) as d:
        r = b.call(f"Bearer {token}", path=LOCAL_PATH)
    assert (r.status_code, r.text) == (200, "answered by Envoy")
    assert d.split_token("etcd.fetched") == 1
    # And an unknown one, refused by the filter itself after the lookup.
    r = b.call(f"Bearer {random_signature(256)}", path=LOCAL_PATH)
    assert r.status_code == 401, r.text


def test_unknown_signature_is_looked_up_and_refused(abc):
    _, b, _ = abc
    unknown = [random_signature(32), random_signature(256)]  # HS256- and RS256-sized
    assert [len(u) for u in unknown] == [43, 342]
    with StatDelta(b) as d:
        for token in unknown:
            r = b.call(f"Bearer {token}")
            assert r.status_code == 401, r.text
            assert 'error="invalid_token"' in r.headers["www-authenticate"], r.headers
    assert d.split_token("etcd.not_found") == 2
    assert d["cluster.httpbin.upstream_rq_total"] == 0


# --- revocation and logout -------------------------------------------------------------------------

def test_revocation_reaches_every_replica_within_2s(abc, etcd, recording_idp):
    a, b, c = abc
    token = issue(a)
    jwt_text = full_jwt(a, token)
    hold(token, a, b, c)
    before = len(revocations(recording_idp))
    with contextlib.ExitStack() as deltas:
        da, db, dc = (deltas.enter_context(StatDelta(gw)) for gw in abc)
        r = revoke(a, token)
        revoked_at = time.monotonic()
        assert r.status_code == 200, r.text
        assert_refused(token, a)  # at once where it was revoked
        stored = etcd_keys(etcd)
        assert token_key(token) not in stored
        markers = marker_keys(stored, token)
        assert len(markers) == 1, f"markers {markers} among {sorted(stored)}"
        marker = markers[0]
        written_ms = int(marker.split("/")[-2])
        assert abs(written_ms / 1000 - time.time()) < 5, marker
        print(f"marker: {marker} = {stored[marker]}")
        print(f"revocation reached (s): {refused_within(token, revoked_at, B=b, C=c)}")
        after_propagation(revoked_at)
        assert_refused(token, b, c)
    assert da.split_token("etcd.revocations_published") == 1
    assert db.split_token("etcd.revocations_applied") >= 1
    assert dc.split_token("etcd.revocations_applied") >= 1
    assert revocations_since(recording_idp, before, 1) == [{"token": jwt_text}]


def test_revocation_on_a_replica_that_never_saw_the_token(abc, recording_idp):
    a, b, c = abc
    token = issue(a)
    jwt_text = full_jwt(a, token)
    hold(token, a, b)
    before = len(revocations(recording_idp))
    with StatDelta(c) as d:
        r = revoke(c, token)
    revoked_at = time.monotonic()
    assert r.status_code == 200, r.text
    # C found it in etcd: the IdP got the full JWT, not the signature C was given.
    assert revocations_since(recording_idp, before, 1) == [{"token": jwt_text}]
    assert d.split_token("etcd.revocations_published") == 1
    assert_refused(token, c)
    print(f"revocation reached (s): {refused_within(token, revoked_at, A=a, B=b)}")
    after_propagation(revoked_at)
    assert_refused(token, a, b)


def test_logout_on_one_replica_ends_the_session_on_all(abc):
    a, b, c = abc
    token = issue(a)
    hold(token, a, c)
    with StatDelta(b) as d:
        r = requests.get(b.url + "/auth/logout?post_logout_redirect_uri=http://app.example/bye",
                         headers={"Authorization": f"Bearer {token}"}, allow_redirects=False, timeout=10)
    logged_out_at = time.monotonic()
    assert r.status_code == 302 and r.headers["location"] == "http://app.example/bye", r.text
    assert d["cluster.idp.upstream_rq_total"] == 1
    assert d.split_token("etcd.revocations_published") == 1
    assert_refused(token, b)
    print(f"logout reached (s): {refused_within(token, logged_out_at, A=a, C=c)}")
    after_propagation(logged_out_at)
    assert_refused(token, a, c)


def test_replica_started_later_knows_live_and_revoked_tokens(abc, etcd, start_replicas):
    a, _, _ = abc
    live = issue(a)
    live_jwt = full_jwt(a, live)
    gone = issue(a)
    hold(gone, a)
    assert revoke(a, gone).status_code == 200
    (d,) = start_replicas(["replica-d"], etcd)
    assert_refused(gone, d)
    assert forwarded_authorization(d.call(f"Bearer {live}")) == f"Bearer {live_jwt}"


# --- etcd down -------------------------------------------------------------------------------------

def test_with_etcd_down_the_filter_fails_closed(start_etcd, start_replicas):
    etcd = start_etcd()
    prefix = "down/"
    settings = {**REPLICATED, "etcd": {"cluster": "etcd", "key_prefix": prefix, "timeout_ms": 300}}
    a, b = start_replicas(["replica-down-a", "replica-down-b"], etcd, settings)
    held = issue(a)
    hold(held, a)
    assert token_key(held, prefix) in etcd_keys(etcd, prefix)

    def fails_closed(revoke_too: bool):
        with StatDelta(a) as da, StatDelta(b) as db:
            issued = a.token_exchange(sub=f"down-{uuid.uuid4().hex}")
            assert_split_refused(issued, "unreachable", status=503, error="temporarily_unavailable")
            assert not re.search(rb"[A-Za-z0-9_-]{40,}", issued.body), issued
            # What A holds it serves without etcd.
            assert a.call(f"Bearer {held}").status_code == 200
            # What B never saw it cannot check, so it lets nothing through.
            r = b.call(f"Bearer {held}")
            assert r.status_code == 503, f"{r.status_code} {r.text[:300]}"
            print(f"B's answer: {r.text}")
            if revoke_too:
                assert_unavailable(revoke(a, held))
                # Not written to etcd, so revoked nowhere: not on A alone either.
                assert a.call(f"Bearer {held}").status_code == 200
        assert da.split_token("etcd.failures") >= 1 and db.split_token("etcd.failures") >= 1
        assert da.split_token("etcd.published") == 0
        assert db["cluster.httpbin.upstream_rq_total"] == 0

    # Frozen: every call times out. (A write sent now may still land once etcd thaws, so the
    # revocation is tried only below, where nothing can land.)
    os.kill(etcd.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        fails_closed(revoke_too=False)
        print(f"frozen etcd: answered in {time.monotonic() - t0:.2f} s")
    finally:
        os.kill(etcd.proc.pid, signal.SIGCONT)
    # Stopped: every connection is refused.
    etcd.stop()
    fails_closed(revoke_too=True)

    etcd = start_etcd(etcd.port, data_dir=etcd.data_dir, peer_port=etcd.peer_port)
    fresh = issue(a)
    assert b.call(f"Bearer {fresh}").status_code == 200
    # Issued before the outage and never revoked: still known to every replica.
    assert b.call(f"Bearer {held}").status_code == 200
    # Polling has recovered too: revocations on A, the one refused earlier included, reach B.
    hold(fresh, b)
    assert revoke(a, fresh).status_code == 200
    assert revoke(a, held).status_code == 200
    revoked_at = time.monotonic()
    after_propagation(revoked_at)
    assert_refused(fresh, a, b)
    assert_refused(held, a, b)
    assert_no_signature_in(etcd)
    etcd.stop()


def test_revocation_reaches_every_replica_after_etcd_is_restored_from_a_backup(start_etcd,
                                                                                start_replicas):
    """A restored etcd counts revisions from the backup's again, below what the replicas' polls
    have seen: markers written from then on must still reach them."""
    etcd = start_etcd()
    a, b = start_replicas(["replica-restore-a", "replica-restore-b"], etcd)
    etcd.stop()
    backup = etcd.data_dir.with_name(etcd.data_dir.name + "-backup")
    shutil.copytree(etcd.data_dir, backup)
    etcd = start_etcd(etcd.port, data_dir=etcd.data_dir, peer_port=etcd.peer_port)
    # Life goes on after the backup (other users of etcd write too), and the replicas poll it.
    for i in range(100):
        stack.etcd_put(etcd.port, f"elsewhere/{i}", b"x")
    time.sleep(1.0)  # two polls at the default poll_ms
    seen = etcd_revision(etcd)
    etcd.stop()
    etcd = start_etcd(etcd.port, data_dir=backup, peer_port=etcd.peer_port)
    print(f"etcd revision: {seen} before the restore, {etcd_revision(etcd)} after")
    token = issue(a)
    hold(token, a, b)
    assert revoke(a, token).status_code == 200
    revoked_at = time.monotonic()
    assert len(marker_keys(etcd_keys(etcd), token)) == 1
    print(f"revocation reached (s): {refused_within(token, revoked_at, B=b)}")
    after_propagation(revoked_at)
    assert_refused(token, a, b)
    etcd.stop()


# --- afterwards ------------------------------------------------------------------------------------

BAD_LOG = re.compile(r"panic|\btrap\b|Function: proxy_on|Uncaught|Failed to", re.IGNORECASE)


def test_every_replica_is_up_and_never_failed(abc, etcd):
    assert REPLICAS
    for gw in REPLICAS:
        name = gw.envoy.process.name
        assert gw.envoy.process.alive(), f"{name} exited"
        assert gw.envoy.stat(VMS_CREATED) == gw.vms_at_start, f"{name}: a VM was replaced"
        bad = [line for line in gw.envoy.log().splitlines() if BAD_LOG.search(line)]
        assert not bad, f"{name}: {bad[:5]}"
    assert_no_signature_in(etcd)


def test_etcd_refuses_a_token_write_once_the_token_is_revoked(etcd):
    """The filter's token write is a transaction that puts the token only while its `x/` key
    (written by a revocation) is absent, and it reads success only from an explicit
    `succeeded: true`: etcd 3.4 leaves a false `succeeded` out of its answer."""
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    key = f"guard/{uuid.uuid4().hex}"

    def token_write() -> dict:
        return stack.etcd_call(etcd.port, "/v3/kv/txn", {
            "compare": [{"key": b64(f"{key}/x"), "target": "VERSION", "result": "EQUAL", "version": "0"}],
            "success": [{"request_put": {"key": b64(f"{key}/t"), "value": b64("1:hp")}}],
        })

    assert token_write().get("succeeded") is True
    stack.etcd_put(etcd.port, f"{key}/x", b"1")
    stack.etcd_call(etcd.port, "/v3/kv/deleterange", {"key": b64(f"{key}/t")})
    refused = token_write()
    assert "succeeded" not in refused or refused["succeeded"] is False, refused
    assert not stack.etcd_range_prefix(etcd.port, f"{key}/t")
