"""The internal hop on the engine's protocols (fake transports, no sockets).

A request another node forwards carries `X-Miren-Hop: <time>.<HMAC>`, signed with the cluster
key over the time, the request line and the Host value. With a valid signature its X-Forwarded-*
lines are kept as that node wrote them, it is not redirected to HTTPS, and the header never
reaches the app. A forged, stale, replayed-elsewhere signature, or a node alone (no key), makes
it an ordinary request whose X-Forwarded-* are the proxy's own. The forwarding node signs only
its requests to other nodes, and what it writes is accepted by a node with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator

import pytest

from miren_ingress.proxy import StaticLease, StaticRouter
from miren_ingress.proxy.engine import HOP_WINDOW
from miren_ingress.proxy.errors import ServiceUnavailable
from miren_ingress.proxy.testing import Bench, checked_exchanges
from tests.support.poll import eventually

UP = "10.0.0.9:8080"
KEY = b"k" * 32
HOST = b"pr-1.web.test"
LINE = b"GET /x HTTP/1.1"


class RemoteLease(StaticLease):
    remote = True  # (as the activator's lease on another node's pool)
    peer = "owner"  # ... of the node named so


class ForwardingRouter(StaticRouter):
    """Every host is another node's pool (the lease is remote)."""

    def __init__(self, node: str) -> None:
        super().__init__({"*": node})
        host, _, port = node.rpartition(":")
        self.remote = RemoteLease(host=host, port=int(port), key=node)

    def cached_lease(self, target: object) -> RemoteLease:  # type: ignore[override]
        self.acquired += 1
        return self.remote


OWNER = b"owner"  # the name of the node the hops in these tests are for


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    with checked_exchanges():
        b = Bench(StaticRouter({"*": UP}))
    b.engine.node_name = OWNER
    yield b


def received(b: Bench, request: bytes, peer: str = "10.1.1.1") -> list[tuple[bytes, bytes]]:
    """The header fields the app receives for `request` from a client at `peer`."""
    host, _, port = UP.rpartition(":")
    _, upstream = b.park(StaticLease(host=host, port=int(port), key=UP))
    client, ct = b.client((peer, 4000))
    client.data_received(request)
    head = upstream.take()
    assert head, ct.data
    out = []
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        out.append((name.lower(), value))
    return out


def hop_request(value: bytes, path: bytes = b"/x", host: bytes = HOST) -> bytes:
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: " + host + b"\r\n"
        b"X-Miren-Hop: " + value + b"\r\n\r\n"
    )


def signed(b: Bench, line: bytes = LINE, host: bytes = HOST, node: bytes = OWNER) -> bytes:
    head = b.engine.sign_hop(line + b"\r\nHost: " + host + b"\r\n\r\n", host, node)
    return head.split(b"X-Miren-Hop: ", 1)[1].split(b"\r\n", 1)[0]


async def test_a_signed_hop_keeps_the_first_nodes_forwarded_lines(bench: Bench) -> None:
    bench.engine.hop_key = KEY
    got = received(bench, hop_request(signed(bench)))
    assert bench.metrics.hops_refused == 0
    assert (b"x-forwarded-for", b"203.0.113.7") in got  # not "..., 10.1.1.1": the node's own
    assert (b"x-forwarded-proto", b"https") in got
    assert (b"x-forwarded-host", HOST) in got
    assert [n for n, _ in got].count(b"x-forwarded-for") == 1
    assert all(n != b"x-miren-hop" for n, _ in got)


def stale(b: Bench) -> bytes:
    stamp, _, _ = signed(b).partition(b".")
    old = b"%d" % (int(stamp) - HOP_WINDOW - 5)
    mac = hmac.new(KEY, old + b"\n" + LINE + b"\n" + HOST + b"\n" + OWNER, hashlib.sha256)
    return old + b"." + mac.hexdigest().encode()


@pytest.mark.parametrize(
    "forge",
    [
        lambda b: b"forged",
        lambda b: b"",
        lambda b: signed(b)[:-1] + (b"0" if signed(b)[-1:] != b"0" else b"1"),  # one digit off
        lambda b: signed(b, line=b"GET /other HTTP/1.1"),  # captured for another request
        lambda b: signed(b, host=b"pr-2.web.test"),  # ... for another host
        lambda b: signed(b, node=b"other"),  # ... for another node
        stale,  # older than the window
        lambda b: b"%d.%s" % (int(time.time()), b"0" * 64),
    ],
    ids=[
        "junk",
        "empty",
        "bad-mac",
        "other-path",
        "other-host",
        "other-node",
        "stale",
        "zero-mac",
    ],
)
async def test_a_forged_or_replayed_hop_is_an_ordinary_request(bench: Bench, forge: object) -> None:
    bench.engine.hop_key = KEY
    value = forge(bench)  # type: ignore[operator]
    got = received(bench, hop_request(value))
    assert bench.metrics.hops_refused == 1  # counted (and logged at most once a minute)
    assert (b"x-forwarded-for", b"203.0.113.7, 10.1.1.1") in got
    assert (b"x-forwarded-proto", b"http") in got
    assert [n for n, _ in got].count(b"x-forwarded-proto") == 1
    assert all(n != b"x-miren-hop" for n, _ in got)


async def test_a_node_alone_accepts_no_hop_at_all(bench: Bench) -> None:
    bench.engine.hop_key = KEY
    value = signed(bench)
    bench.engine.hop_key = b""  # (a node alone has no key)
    got = received(bench, hop_request(value))
    assert (b"x-forwarded-for", b"203.0.113.7, 10.1.1.1") in got
    assert bench.metrics.hops_refused == 0  # (a client's header, dropped: nothing to report)


async def test_a_hop_is_not_redirected_to_https(bench: Bench) -> None:
    bench.engine.hop_key = KEY
    bench.engine.redirect_port = 8443  # (the plain listener redirects everyone else)
    plain, pt = bench.client(("10.1.1.1", 4001))
    plain.data_received(b"GET /x HTTP/1.1\r\nHost: pr-1.web.test\r\n\r\n")
    assert pt.data.startswith(b"HTTP/1.1 308 ")
    got = received(bench, hop_request(signed(bench)))
    assert (b"x-forwarded-proto", b"https") in got


async def test_what_a_node_forwards_is_signed_and_accepted_by_the_owner() -> None:
    router = ForwardingRouter("10.0.0.2:8080")
    with checked_exchanges():
        forwarder = Bench(router)
        owner = Bench(StaticRouter({"*": UP}))
    forwarder.engine.hop_key = owner.engine.hop_key = KEY
    owner.engine.node_name = OWNER
    _, to_owner = forwarder.park(router.remote)
    client, _ = forwarder.client(("198.51.100.4", 5000))
    client.data_received(b"GET /page?q=1 HTTP/1.1\r\nHost: pr-1.web.test\r\nAccept: */*\r\n\r\n")
    wire = to_owner.take()
    assert b"\r\nX-Miren-Hop: " in wire
    got = received(owner, wire, peer="10.0.0.1")  # the forwarding node's address
    assert (b"x-forwarded-for", b"198.51.100.4") in got  # the client's, not the node's
    assert (b"x-forwarded-host", b"pr-1.web.test") in got
    assert all(n != b"x-miren-hop" for n, _ in got)
    # ... and only requests to other nodes are signed.
    sandbox = StaticLease(host="10.0.0.3", port=9000, key="sb")
    assert forwarder.engine.pool_for(sandbox).peer == b""
    assert forwarder.engine.pool_for(router.remote).peer == OWNER


class OtherNodesRouter(ForwardingRouter):
    """Every pool is another node's; asked for a lease of its own (`local`), it has none."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.asked_local: list[bool] = []

    async def acquire(self, target: object, local: bool = False) -> RemoteLease:  # type: ignore[override]
        self.asked_local.append(local)
        if local:
            raise ServiceUnavailable("This node cannot serve the application right now; retry.")
        return self.remote


async def test_a_hop_is_never_forwarded_again() -> None:
    """A signed request reaches a node whose view says another node owns the pool (views
    differ for a moment around a takeover): it hands the remote lease back, asks for a local
    one, and answers 503 + Retry-After when it has none; nothing goes to the other node."""
    router = OtherNodesRouter("10.0.0.3:8080")
    with checked_exchanges():
        node = Bench(router)
    node.engine.hop_key = KEY
    node.engine.node_name = OWNER
    _, to_other = node.park(router.remote)
    client, ct = node.client(("10.0.0.1", 4000))
    client.data_received(hop_request(signed(node)))
    await eventually(lambda: bool(ct.data), 5, "an answer")
    assert ct.data.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in ct.data
    assert router.asked_local == [True] and router.released == 1
    assert to_other.take() == b""
