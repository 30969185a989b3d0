"""The internal hop on the engine's protocols (fake transports, no sockets): a request another
node forwarded carries `X-Miren-Hop` with the cluster's token; its X-Forwarded-* lines are kept
as that node wrote them, it is neither redirected nor asked to log in again, and the header never
reaches the app. A forged or stale token, or a node alone (no token), makes it an ordinary
request whose X-Forwarded-* are the proxy's own. The node that forwards adds the line only on
its connections to other nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from miren_ingress.proxy import StaticLease, StaticRouter
from miren_ingress.proxy.testing import Bench, checked_exchanges

UP = "10.0.0.9:8080"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: Sun, 06 Dec 2026 20:00:00 GMT\r\n\r\nok"
TOKEN = b"0123456789abcdef" * 4


class RemoteLease(StaticLease):
    remote = True  # (as the activator's lease on another node's pool)


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    with checked_exchanges():
        b = Bench(StaticRouter({"*": UP}))
        yield b


def forwarded_head(b: Bench, request: bytes, peer: str = "10.1.1.1") -> bytes:
    """What the upstream receives for `request` sent by a client at `peer`."""
    host, _, port = UP.rpartition(":")
    _, upstream = b.park(StaticLease(host=host, port=int(port), key=UP))
    client, ct = b.client((peer, 4000))
    client.data_received(request)
    head = upstream.take()
    assert head, ct.data
    return head.split(b"\r\n\r\n", 1)[0]


def fields(head: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        out.append((name.lower(), value))
    return out


HOP_REQUEST = (
    b"GET /x HTTP/1.1\r\nHost: pr-1.web.test\r\nX-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: pr-1.web.test\r\nX-Miren-Hop: %s\r\n\r\n"
)


async def test_a_hop_with_the_token_keeps_the_first_nodes_forwarded_lines(bench: Bench) -> None:
    bench.engine.set_hop_token(TOKEN)
    got = fields(forwarded_head(bench, HOP_REQUEST % TOKEN))
    assert (b"x-forwarded-for", b"203.0.113.7") in got  # not "..., 10.1.1.1": the node's own
    assert (b"x-forwarded-proto", b"https") in got
    assert (b"x-forwarded-host", b"pr-1.web.test") in got
    assert [n for n, _ in got].count(b"x-forwarded-for") == 1
    assert all(n != b"x-miren-hop" for n, _ in got)


@pytest.mark.parametrize("token", [b"forged", TOKEN[:-1], TOKEN + b"x", b""])
async def test_a_forged_hop_is_an_ordinary_request(bench: Bench, token: bytes) -> None:
    bench.engine.set_hop_token(TOKEN)
    got = fields(forwarded_head(bench, HOP_REQUEST % token))
    assert (b"x-forwarded-for", b"203.0.113.7, 10.1.1.1") in got
    assert (b"x-forwarded-proto", b"http") in got
    assert (b"x-forwarded-host", b"pr-1.web.test") in got
    assert [n for n, _ in got].count(b"x-forwarded-proto") == 1
    assert all(n != b"x-miren-hop" for n, _ in got)


async def test_a_node_alone_accepts_no_hop_at_all(bench: Bench) -> None:
    got = fields(forwarded_head(bench, HOP_REQUEST % b""))  # no token configured: b"" too
    assert (b"x-forwarded-for", b"203.0.113.7, 10.1.1.1") in got
    assert all(n != b"x-miren-hop" for n, _ in got)


async def test_a_hop_is_not_redirected_to_https(bench: Bench) -> None:
    bench.engine.set_hop_token(TOKEN)
    bench.engine.redirect_port = 8443  # (the plain listener redirects everyone else)
    plain, pt = bench.client(("10.1.1.1", 4001))
    plain.data_received(b"GET /x HTTP/1.1\r\nHost: pr-1.web.test\r\n\r\n")
    assert pt.data.startswith(b"HTTP/1.1 308 ")
    got = fields(forwarded_head(bench, HOP_REQUEST % TOKEN))
    assert (b"x-forwarded-proto", b"https") in got


async def test_the_forwarding_node_marks_only_its_requests_to_other_nodes(bench: Bench) -> None:
    bench.engine.set_hop_token(TOKEN)
    remote = RemoteLease(host="10.0.0.2", port=8080, key="node-b")
    assert bench.engine.pool_for(remote).hop == b"X-Miren-Hop: " + TOKEN + b"\r\n\r\n"
    sandbox = StaticLease(host="10.0.0.3", port=9000, key="sb")
    assert bench.engine.pool_for(sandbox).hop == b""
    bench.engine.set_hop_token(b"rotated")  # the cluster secret changed: pools follow
    assert bench.engine.pool_for(remote).hop == b"X-Miren-Hop: rotated\r\n\r\n"
    assert bench.engine.pool_for(sandbox).hop == b""
