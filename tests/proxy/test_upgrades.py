"""Upgrades per RFC 9931: no client byte after an upgrade request goes upstream before a 101;
any other answer ends the upgrade and the connection goes on as HTTP/1.1, in order.

The attack these tests pin down: one write of an upgrade request followed by a second request.
When the app refuses the upgrade (any answer but 101) and the bytes after the head had already
gone upstream unparsed, the upstream connection went back to the pool holding a smuggled
request: the next client's request landed behind it and got the smuggled response, and a
smuggled `POST` with a long Content-Length captured the next client's headers.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.apps import StartApp, echo_argv
from tests.support.poll import eventually

from .conftest import parse_responses, raw_exchange, read_request

UPGRADE = (
    b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
SMUGGLED_GET = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
# A body long enough to swallow the next request on the same upstream connection.
SMUGGLED_POST = b"POST /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 200\r\n\r\n"
VICTIM = (
    b"GET /victim HTTP/1.1\r\nHost: a\r\nCookie: session=victim-secret\r\nConnection: close\r\n\r\n"
)


class Recorder:
    """A raw upstream that answers every request by path, recording per connection the raw
    bytes it read and when (relative order of reads and answers)."""

    def __init__(self, status_for_upgrade: bytes = b"404 Not Found") -> None:
        self.status = status_for_upgrade
        self.events: list[tuple[int, str, bytes]] = []  # (connection, "read"|"answer", data)
        self.conns = 0
        self.release = asyncio.Event()
        self.release.set()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        n = self.conns
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await reader.read(65536)
                if not data:
                    return
                self.events.append((n, "read", data))
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            await self.release.wait()
            if path == b"/smuggled":
                await asyncio.sleep(0.2)  # a smuggled request that takes a moment to answer
            status = self.status if path == b"/up" else b"200 OK"
            body = b"answer for " + path
            self.events.append((n, "answer", path))
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()

    def reads(self) -> bytes:
        return b"".join(d for _, kind, d in self.events if kind == "read")


@pytest.mark.parametrize("status", [b"200 OK", b"404 Not Found", b"426 Upgrade Required"])
async def test_refused_upgrade_then_pipelined_request_is_answered_in_order(
    proxy, raw_upstream, status: bytes
) -> None:
    rec = Recorder(status)
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(
        p.port, UPGRADE + b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    responses = parse_responses(data)
    assert [(s, b) for s, _, b in responses] == [
        (int(status[:3]), b"answer for /up"),
        (200, b"answer for /next"),
    ]
    assert "connection" not in responses[0][1]  # the refused upgrade keeps the connection
    # /next was parsed and sent as its own request, only after /up was answered.
    order = [(kind, d if kind == "answer" else b"") for _, kind, d in rec.events]
    assert order.index(("answer", b"/up")) < max(
        i for i, (_, kind, d) in enumerate(rec.events) if kind == "read" and b"/next" in d
    )


@pytest.mark.parametrize("smuggled", [SMUGGLED_GET, SMUGGLED_POST], ids=["get", "post"])
async def test_refused_upgrade_cannot_smuggle_into_another_clients_request(
    proxy, raw_upstream, smuggled: bytes
) -> None:
    """Client A's smuggled request never sits on a pooled upstream connection: client B, next
    on a fresh connection, gets its own answer, and its cookie is never inside A's request."""
    rec = Recorder()
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address}, body_timeout=0.5)
    a_reader, a_writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        a_writer.write(UPGRADE + smuggled)
        await a_writer.drain()
        head = await asyncio.wait_for(a_reader.readuntil(b"answer for /up"), 5)
        assert head.startswith(b"HTTP/1.1 404 ")
        victim = parse_responses(await raw_exchange(p.port, VICTIM))
        assert [(s, b) for s, _, b in victim] == [(200, b"answer for /victim")]
        # Every request the upstream read starts a message of its own: the victim's cookie
        # arrived in the victim's request, not as the body of A's smuggled POST.
        reads = rec.reads()
        victim_at = reads.index(b"GET /victim ")
        assert b"victim-secret" in reads[victim_at:]
        if smuggled is SMUGGLED_POST:
            # A's POST waits for its 200-byte body on A's own connection, then times out.
            tail = await asyncio.wait_for(a_reader.read(), 5)
            assert tail.startswith(b"HTTP/1.1 408 ")
            assert b"/smuggled" not in reads[:victim_at].split(b"\r\n\r\n", 1)[1]
    finally:
        a_writer.close()


async def test_bytes_sent_later_wait_for_the_answer(proxy, raw_upstream) -> None:
    """The smuggled request comes in a later segment, before the app answers: nothing of it
    reaches the upstream before the answer to the upgrade request was written."""
    rec = Recorder()
    rec.release.clear()
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(UPGRADE)
        await writer.drain()
        await eventually(lambda: b"/up" in rec.reads(), what="the upgrade request upstream")
        writer.write(SMUGGLED_GET)
        await writer.drain()
        await asyncio.sleep(0.1)  # (time for the bytes to be forwarded, were they)
        assert b"/smuggled" not in rec.reads()
        rec.release.set()
        data = await asyncio.wait_for(reader.readuntil(b"answer for /smuggled"), 5)
        assert [s for s, _, _ in parse_responses(data)] == [404, 200]
        first_answer = next(i for i, e in enumerate(rec.events) if e[1] == "answer")
        assert all(b"/smuggled" not in d for _, _, d in rec.events[:first_answer])
    finally:
        writer.close()


async def test_refused_upgrade_keeps_the_upstream_connection_reusable(proxy, raw_upstream) -> None:
    rec = Recorder()
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(UPGRADE)
        await asyncio.wait_for(reader.readuntil(b"answer for /up"), 5)
        writer.write(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"answer for /again"), 5)
    finally:
        writer.close()
    assert rec.conns == 1  # parked after the refusal (its response was whole, nothing unparsed)


async def test_refused_upgrade_with_connection_close_closes(proxy, raw_upstream) -> None:
    rec = Recorder()
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(
        p.port,
        UPGRADE.replace(b"Connection: Upgrade", b"Connection: Upgrade, close") + SMUGGLED_GET,
    )
    responses = parse_responses(data)
    assert [s for s, _, _ in responses] == [404]
    assert responses[0][1]["connection"] == "close"
    assert b"/smuggled" not in rec.reads()


async def test_accepted_upgrade_delivers_bytes_sent_with_the_head(proxy, raw_upstream) -> None:
    """Bytes the client sent right behind its upgrade request reach the app after the 101."""
    got = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        assert req is not None
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
        )
        await writer.drain()
        while data := await reader.read(65536):
            got.extend(data)
            writer.write(b"echo:" + data)
            await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(UPGRADE + b"early-bytes")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.readexactly(16), 5) == b"echo:early-bytes"
        writer.write(b"later")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"echo:later"
    finally:
        writer.close()
    assert bytes(got) == b"early-byteslater"


@pytest.mark.parametrize("upgrade", [b"h2c", b"H2C", b" h2c "], ids=["h2c", "upper", "spaces"])
async def test_h2c_upgrade_is_never_forwarded(proxy, raw_upstream, upgrade: bytes) -> None:
    """`Upgrade: h2c` and `HTTP2-Settings` are hop-by-hop: the request goes upstream as a plain
    one, and the connection stays alive for the next request (curl --http2 sends this)."""
    rec = Recorder()
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(
        p.port,
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: " + upgrade + b"\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert [(s, b) for s, _, b in parse_responses(data)] == [
        (200, b"answer for /h"),
        (200, b"answer for /next"),
    ]
    sent = rec.reads().lower()
    assert b"upgrade" not in sent and b"http2-settings" not in sent
    assert rec.conns == 1


async def test_h2c_is_dropped_from_a_list_of_protocols(proxy, raw_upstream) -> None:
    seen: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        assert req is not None
        seen.append(req.header("Upgrade"))
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    await raw_exchange(
        p.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: h2c, websocket\r\n\r\n",
    )
    assert seen == [[b"websocket"]]


async def test_many_refused_h2c_upgrades_in_one_read(proxy, raw_upstream) -> None:
    """Each refused upgrade restarts the parser: a read full of them is a loop, not a
    recursion (3,000 of them would overflow the stack)."""
    rec = Recorder()
    up = await raw_upstream(rec.handler)
    p = await proxy({"*": up.address})
    one = b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    data = await raw_exchange(
        p.port,
        one * 3000 + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        timeout=60,
    )
    responses = parse_responses(data)
    assert len(responses) == 3001 and responses[-1][2] == b"answer for /last"


async def test_echo_app_refused_upgrade_cannot_poison_the_pool(
    proxy, app_process: StartApp
) -> None:
    """The reported case, against the project's own echo app (a real subprocess): it answers
    200 to an upgrade request outside /ws. The smuggled request waits its turn and is
    answered to A; B gets its own answer, on its own path."""
    echo = await app_process(echo_argv())
    p = await proxy({"*": echo.address})
    a_reader, a_writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        a_writer.write(UPGRADE + SMUGGLED_GET)
        await a_writer.drain()
        data = b""
        while len(parse_responses(data)) < 2:
            data += await asyncio.wait_for(a_reader.read(65536), 5)
        paths = [b.split(b'"path": "')[1].split(b'"')[0] for _, _, b in parse_responses(data)]
        assert paths == [b"/up", b"/smuggled"]
        for _ in range(5):  # the pool's parked connection(s) serve B cleanly
            (victim,) = parse_responses(await raw_exchange(p.port, VICTIM))
            assert b'"path": "/victim"' in victim[2], victim
    finally:
        a_writer.close()


UPGRADE_POST = (
    b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Content-Length: 5\r\n\r\n"
)


class BodyFirst:
    """An upstream that reads a request's whole body (by Content-Length) before it answers, as
    most apps do, recording each request's path and body per connection."""

    def __init__(self, status_for_upgrade: bytes = b"404 Not Found") -> None:
        self.status = status_for_upgrade
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection, path, body)
        self.conns = 0

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        n = self.conns
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            url = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            self.requests.append((n, url, body))
            if url == b"/up" and self.status.startswith(b"101"):
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: websocket\r\n\r\n")  # fmt: skip
                await writer.drain()
                while data := await reader.read(65536):
                    writer.write(b"tunnel:" + data)
                    await writer.drain()
                return
            status = self.status if url == b"/up" else b"200 OK"
            answer = b"answer for " + url
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(answer), answer)
            )
            await writer.drain()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "body-later"])
async def test_an_upgrade_requests_body_is_forwarded_and_what_follows_waits(
    proxy, raw_upstream, split: bool
) -> None:
    """llhttp takes an upgrade request as complete at its head: its Content-Length body is
    counted by the proxy and forwarded as the body (an app that reads the body before it
    answers does not wait forever), and the bytes after it wait for the answer."""
    up = BodyFirst()
    upstream = await raw_upstream(up.handler)
    p = await proxy({"*": upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(UPGRADE_POST + (b"" if split else b"hello" + SMUGGLED_GET))
        await writer.drain()
        if split:
            await asyncio.sleep(0.05)  # (deliberately a later segment)
            writer.write(b"hel")
            await writer.drain()
            writer.write(b"lo" + SMUGGLED_GET)
        data = b""
        while len(parse_responses(data)) < 2:
            data += await asyncio.wait_for(reader.read(65536), 5)
        assert [(s, b) for s, _, b in parse_responses(data)] == [
            (404, b"answer for /up"),
            (200, b"answer for /smuggled"),
        ]
    finally:
        writer.close()
    assert [(u, b) for _, u, b in up.requests] == [(b"/up", b"hello"), (b"/smuggled", b"")]


async def test_an_upgrade_requests_body_then_a_101_then_the_tunnel(proxy, raw_upstream) -> None:
    up = BodyFirst(b"101 Switching Protocols")
    upstream = await raw_upstream(up.handler)
    p = await proxy({"*": upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(UPGRADE_POST + b"hello" + b"frame")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"tunnel:frame"
    finally:
        writer.close()
    assert up.requests == [(1, b"/up", b"hello")]


async def test_an_early_answer_before_an_upgrade_body_never_reuses_the_connection(
    proxy, raw_upstream
) -> None:
    """The app answers the upgrade request before its body arrived: that upstream connection
    would read the next client's bytes as the rest of the body, so it is never reused."""
    rec = Recorder()
    upstream = await raw_upstream(rec.handler)
    p = await proxy({"*": upstream.address}, body_timeout=0.5)
    a_reader, a_writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        a_writer.write(UPGRADE_POST)
        await asyncio.wait_for(a_reader.readuntil(b"answer for /up"), 5)
        (victim,) = parse_responses(await raw_exchange(p.port, VICTIM))
        assert victim[:1] == (200,) and victim[2] == b"answer for /victim"
        a_writer.write(b"hello")  # too late: A's connection closed after its answer
        assert await asyncio.wait_for(a_reader.read(), 5) == b""
    finally:
        a_writer.close()
    assert rec.conns == 2


async def test_a_chunked_upgrade_request_is_refused(proxy, ok_upstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED_GET,
    )
    assert [s for s, _, _ in parse_responses(data)] == [400]
    assert ok_upstream.requests == []


async def test_a_refused_h2c_upgrade_with_a_body(proxy, raw_upstream) -> None:
    """`curl --http2 -d x` sends `Upgrade: h2c` on a POST: the body is the request's, and
    the next request on the connection is parsed after it."""
    up = BodyFirst()
    upstream = await raw_upstream(up.handler)
    p = await proxy({"*": upstream.address})
    data = await raw_exchange(
        p.port,
        b"POST /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert [s for s, _, _ in parse_responses(data)] == [200, 200]
    assert [(u, b) for _, u, b in up.requests] == [(b"/h", b"hello"), (b"/next", b"")]


async def test_open_tunnels_are_a_gauge(proxy, raw_upstream) -> None:
    from prometheus_client import generate_latest

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
        )
        await writer.drain()
        while await reader.read(65536):
            pass

    def tunnels(p: object) -> str:
        text = generate_latest(p.registry).decode()  # type: ignore[attr-defined]
        return next(ln for ln in text.splitlines() if ln.startswith("miren_ingress_open_tunnels "))

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    assert tunnels(p) == "miren_ingress_open_tunnels 0.0"
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(UPGRADE)
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert tunnels(p) == "miren_ingress_open_tunnels 1.0"
    writer.close()
    await eventually(lambda: tunnels(p) == "miren_ingress_open_tunnels 0.0", what="closed")
