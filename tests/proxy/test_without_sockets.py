"""The engine's protocols on fake transports (miren_ingress.proxy.testing): no socket, no
waiting. Each test feeds bytes to a client connection and to an upstream connection and reads
what each side got, and the states the objects are in (states.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from miren_ingress.proxy import StaticLease, StaticRouter
from miren_ingress.proxy.inbound import InboundConnection
from miren_ingress.proxy.states import Ex, Input, Life, Up
from miren_ingress.proxy.testing import Bench, FakeTransport, checked_exchanges
from miren_ingress.proxy.upstream import UpstreamConnection

UP = "10.0.0.9:8080"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: Sun, 06 Dec 2026 20:00:00 GMT\r\n\r\nok"


@pytest.fixture(autouse=True)
def _checked() -> Iterator[None]:
    with checked_exchanges():
        yield


class World:
    """A Bench with one client connection and one parked upstream connection."""

    def __init__(self, **routes: str) -> None:
        self.router = StaticRouter(routes or {"*": UP})
        self.bench = Bench(self.router)
        self.client, self.ct = self.bench.client()
        host, _, port = UP.rpartition(":")
        self.upstream, self.ut = self.bench.park(StaticLease(host=host, port=int(port), key=UP))

    @property
    def active(self) -> Ex | None:
        ex = self.client._active
        return None if ex is None else ex.state


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    yield w
    _close(w.client, w.upstream)


def _close(client: InboundConnection, upstream: UpstreamConnection) -> None:
    if client.life is not Life.CLOSED:
        client.connection_lost(None)
    if upstream.state is not Up.CLOSED:
        upstream.connection_lost(None)


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


async def test_the_hit_path_end_to_end(world: World) -> None:
    world.client.data_received(b"GET /x?y HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n")
    assert world.active is Ex.SENDING  # a warm lease and a parked connection: attached at once
    sent = world.ut.take()
    assert sent == (
        b"GET /x?y HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nX-Forwarded-For: 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a.test\r\n\r\n"
    )
    world.upstream.data_received(OK)
    assert world.ct.take() == OK  # spliced: the upstream's bytes as they are
    assert world.active is None  # done: the connection is idle again
    assert world.router.released == world.router.acquired == 1
    assert world.upstream.ex is None and world.upstream.state is Up.OPEN  # parked
    assert world.client.life is Life.OPEN and world.client.input is Input.PARSE


async def test_pipelined_requests_are_answered_in_order(world: World) -> None:
    world.client.data_received(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert world.ut.take().startswith(b"GET /1 ")  # only the first: one exchange at a time
    assert not world.ct.reading  # reading paused while a request waits
    world.upstream.data_received(OK)
    assert world.ut.take().startswith(b"GET /2 ")  # the second, on the same connection
    world.upstream.data_received(OK.replace(b"ok", b"OK"))
    assert world.ct.take() == OK + OK.replace(b"ok", b"OK")
    assert world.ct.reading


async def test_a_refused_upgrade_parses_what_followed_as_the_next_request(world: World) -> None:
    """RFC 9931: nothing after an upgrade request's head goes upstream before its answer;
    any answer but 101 turns the held bytes back into requests."""
    world.client.data_received(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    first = world.ut.take()
    assert first.startswith(b"GET /ws ") and b"/next" not in first
    assert world.client.input is Input.HOLD and not world.ct.reading
    world.upstream.data_received(OK)  # not a 101
    assert world.client.input is Input.PARSE
    assert world.ut.take().startswith(b"GET /next ")  # parsed, routed, reused: in order
    world.upstream.data_received(OK)
    assert world.ct.take().count(b"HTTP/1.1 200 OK") == 2


async def test_an_accepted_upgrade_becomes_a_tunnel(world: World) -> None:
    world.client.data_received(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"early frame"
    )
    world.ut.take()
    world.upstream.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"hello"
    )
    assert world.client.input is Input.TUNNEL and world.upstream.state is Up.TUNNEL
    assert world.active is Ex.TUNNEL and world.client.tunneled
    assert world.ut.take() == b"early frame"  # held until the 101, then sent
    assert world.ct.take().endswith(b"\r\n\r\nhello")
    world.client.data_received(b"\x81\x00")
    assert world.ut.take() == b"\x81\x00"
    assert world.router.released == 0  # a tunnel keeps its unit of work
    world.upstream.connection_lost(None)  # the app closed it
    assert world.ct.closed and world.router.released == 1


async def test_an_app_that_closes_its_tunnel_closes_the_clients_side_at_once(
    world: World,
) -> None:
    """As a transport reports it: the FIN (eof_received), then connection_lost. The WebSocket
    close handshake of uvicorn ends so; the client (the `websockets` library) otherwise waited
    its whole close timeout, 10 s, for the TCP close."""
    world.client.data_received(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    world.upstream.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert world.upstream.state is Up.TUNNEL
    world.upstream.data_received(b"\x88\x02\x03\xe8")  # the app's Close frame
    assert world.upstream.eof_received() is None  # ... then its FIN
    world.upstream.connection_lost(None)
    assert world.ct.take().endswith(b"\x88\x02\x03\xe8")
    assert world.ct.closed and world.client.life is Life.CLOSING  # (CLOSED when it is lost)
    assert world.router.released == 1


async def test_junk_after_a_valid_request(world: World) -> None:
    world.client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x00\x01junk\r\n\r\n")
    assert world.client.input is Input.DISCARD
    assert world.ut.take().startswith(b"GET / ")  # the valid one is answered
    world.upstream.data_received(OK)
    out = world.ct.take()
    assert out.startswith(OK) and b"HTTP/1.1 400 Bad Request" in out[len(OK) :]
    assert world.client.life is Life.CLOSING and world.ct.closed
    world.client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # dropped
    assert world.ut.take() == b""


async def test_an_early_answer_lingers_and_drops_the_rest_of_the_body(world: World) -> None:
    world.client.data_received(
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 20000
    )
    assert world.ut.take().startswith(b"POST /up ")
    world.upstream.data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    answer = world.ct.take()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
    assert world.client.life is Life.LINGERING and world.client.input is Input.DISCARD
    assert world.ct.eof_written and not world.ct.closed  # half-closed: the client reads it
    world.client.data_received(b"x" * 50000)  # the rest of the upload: dropped
    assert world.ut.take() == b""
    assert world.upstream.state is Up.CLOSED  # its stream is unusable: not parked


async def test_a_graceful_stop_answers_the_active_request_then_closes(world: World) -> None:
    world.client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    world.client.stop_after_active()
    assert world.client.life is Life.STOPPING
    world.upstream.data_received(OK)
    out = world.ct.take()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out
    assert world.client.life is Life.CLOSING and world.ct.closed


async def test_a_client_gone_mid_response_aborts_the_upstream(world: World) -> None:
    world.client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    ex = world.client._active
    world.upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    assert ex is not None and ex.state is Ex.RESPONDING
    world.client.connection_lost(None)
    assert ex.state is Ex.DONE and ex.status == 200  # recorded as answered, not 499
    assert world.ut.aborted and world.upstream.state is Up.CLOSED
    assert world.router.released == 1
    assert world.client.life is Life.CLOSED


async def test_a_reused_connection_closed_before_any_byte_is_replayed_once(
    world: World,
) -> None:
    world.client.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    world.upstream.data_received(OK)
    world.ct.take()
    # The upstream closes the parked connection just as the next request takes it.
    world.client.data_received(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    ex = world.client._active
    assert ex is not None and ex.state is Ex.SENDING
    world.upstream.connection_lost(ConnectionResetError())
    assert ex.state is Ex.ROUTING and ex.replayed  # a task connects again (the same lease)
    assert ex.task is not None
    ex.task.cancel()


def test_a_fake_transport_refuses_writes_once_aborted() -> None:
    t = FakeTransport()
    t.write(b"a")
    t.abort()
    with pytest.raises(RuntimeError):
        t.write(b"b")
    assert t.data == b"a" and t.is_closing()
