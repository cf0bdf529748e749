"""Two workers, 200 clients at once: every client gets back exactly its own JWT."""

from concurrent.futures import ThreadPoolExecutor

import requests

from helpers import claims_of, forwarded_authorization

CLIENTS = 200


def test_parallel_clients_each_get_their_own_jwt(start_gateway):
    gw = start_gateway(concurrency=2)

    def client(i: int):
        with requests.Session() as s:
            token = gw.token_response(session=s, scope=f"client-{i}").json()["access_token"]
            forwarded = forwarded_authorization(gw.call(f"Bearer {token}", session=s))
        jwt_text = forwarded[len("Bearer "):]
        return i, token, jwt_text

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(client, range(CLIENTS)))

    assert len({token for _, token, _ in results}) == CLIENTS
    for i, token, jwt_text in results:
        assert jwt_text.rsplit(".", 1)[1] == token
        assert claims_of(jwt_text)["scope"] == f"client-{i}"
    assert gw.counter("tokens_split") == CLIENTS
    assert gw.counter("lookup_hit") == CLIENTS
