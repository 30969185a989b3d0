"""Request bodies: buffering of short bodies, the body timeout (408), and a FIN mid-body (400).

A client that stalls its body must not hold sandbox capacity: a short body is read whole before
the upstream is chosen (no lease, no upstream connection meanwhile), a longer one streams, and a
body that stops arriving for body_timeout is answered 408 with its lease handed back and its
upstream connection aborted.
"""

from __future__ import annotations

import asyncio

from tests.support.poll import eventually

from .conftest import RawUpstream, parse_responses
from .test_failures import ScriptedRouter, lease_for
from .test_metrics_and_units import sample

SHORT_TIMEOUT = 0.3


def held_body_bytes(p) -> int:
    """Body bytes the proxy holds for exchanges that have no upstream connection yet."""
    return sum(
        c._parsing.pending_size for c in p.server.engine.connections if c._parsing is not None
    )


async def read_to_close(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


STALLED_POST = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello"  # 5 of 10


async def send_and_read(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection and read until the proxy closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_to_close(reader)
    finally:
        writer.close()


def recording_upstream_handler(got: bytearray, closed: asyncio.Event):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                got.extend(data)
        finally:
            closed.set()

    return handler


async def test_short_body_is_read_whole_before_the_upstream_is_chosen(
    proxy, ok_upstream: RawUpstream
) -> None:
    router = ScriptedRouter(lease_for(ok_upstream.port, "a"), lease_for(ok_upstream.port, "b"))
    p = await proxy(router=router)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        await eventually(lambda: held_body_bytes(p) == 5, what="first half of the body read")
        assert router.calls == [], "a lease was taken for a half-sent body"
        assert ok_upstream.connections == 0
        assert p.server.in_flight == 0
        writer.write(b"world")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert ok_upstream.requests[0].body == b"helloworld"
        await eventually(lambda: router.outstanding == set(), what="lease handed back")
    finally:
        writer.close()


async def test_body_longer_than_the_buffer_streams(proxy, raw_upstream) -> None:
    got = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request_streaming(reader, got)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(req))
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, request_buffer=1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        writer.write(b"x" * 2000)
        # Over request_buffer: forwarded before the rest of the body exists.
        await eventually(lambda: got.count(b"x") == 2000, what="the first 2000 bytes forwarded")
        writer.write(b"y" * 98000)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def read_request_streaming(reader: asyncio.StreamReader, got: bytearray) -> bytes:
    """Read a Content-Length request, recording the body as it arrives; returns the body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(got) < length:
        data = await reader.read(65536)
        if not data:
            break
        got.extend(data)
    return bytes(got)


async def test_expect_continue_is_not_buffered(proxy, raw_upstream) -> None:
    """The client waits for 100 Continue before sending its body: the request goes upstream at
    once and the upstream's 100 reaches the client."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"expect: 100-continue" in head.lower()
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(5) == b"hello"
    finally:
        writer.close()


async def test_stalled_buffered_body_is_408_without_touching_the_upstream(
    proxy, ok_upstream: RawUpstream
) -> None:
    router = ScriptedRouter(lease_for(ok_upstream.port, "a"), lease_for(ok_upstream.port, "b"))
    p = await proxy(router=router, body_timeout=SHORT_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: a\r\nAccept: application/json\r\nContent-Length: 10\r\n\r\nx"
        )
        data = await read_to_close(reader)
    finally:
        writer.close()
    [(status, headers, body)] = parse_responses(data)
    assert status == 408
    assert headers["connection"] == "close"
    assert headers["content-type"].startswith("application/json")
    assert b"not received in time" in body
    assert router.calls == []
    assert ok_upstream.connections == 0
    assert sample(p.registry, "miren_ingress_requests_total", app="unknown", code="408",
                  method="POST") == 1  # fmt: skip


async def test_stalled_streamed_body_is_408_and_frees_lease_and_upstream(
    proxy, raw_upstream
) -> None:
    got, closed = bytearray(), asyncio.Event()
    up = await raw_upstream(recording_upstream_handler(got, closed))
    router = ScriptedRouter(lease_for(up.port, "a"), lease_for(up.port, "b"))
    p = await proxy(router=router, body_timeout=SHORT_TIMEOUT, request_buffer=0)
    data = await send_and_read(p.port, STALLED_POST)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert got.endswith(b"hello"), "the body was streamed before the stall"
    await asyncio.wait_for(closed.wait(), 5)  # the upstream connection was aborted
    await eventually(lambda: router.outstanding == set(), what="lease handed back")
    assert p.server.in_flight == 0
    assert sample(p.registry, "miren_ingress_upstream_errors_total", reason="client_timeout") == 0


async def test_stall_after_the_response_started_closes_the_connection(proxy, raw_upstream) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        try:
            while await reader.read(65536):
                pass
        finally:
            closed.set()

    up = await raw_upstream(handler)
    router = ScriptedRouter(lease_for(up.port, "a"), lease_for(up.port, "b"))
    p = await proxy(router=router, body_timeout=SHORT_TIMEOUT, request_buffer=0)
    data = await send_and_read(p.port, STALLED_POST)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"part")  # cut short: closed
    await asyncio.wait_for(closed.wait(), 5)
    await eventually(lambda: router.outstanding == set(), what="lease handed back")


async def test_body_timeout_is_paused_while_the_upstream_applies_back_pressure(
    proxy, raw_upstream
) -> None:
    """Reading from the client pauses while the upstream does not read: that is not the
    client's stall, so no 408 however long it lasts."""
    size = 64 * 1024 * 1024
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await gate.wait()
        left = size
        while left:
            left -= len(await reader.read(min(left, 1 << 20)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, body_timeout=SHORT_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)

    async def upload() -> None:
        writer.write(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"z" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(upload())
    try:
        engine = p.server.engine
        await eventually(
            lambda: any(c.blocked for c in engine.connections), what="client reading paused"
        )
        # The pause itself is under test: it must outlast the body timeout several times.
        await asyncio.sleep(SHORT_TIMEOUT * 4)
        assert any(c.blocked for c in engine.connections)
        gate.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 200 ")
        await asyncio.wait_for(sender, 20)
    finally:
        gate.set()
        sender.cancel()
        writer.close()


async def test_fin_mid_buffered_body_is_400(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        writer.write_eof()
        data = await read_to_close(reader)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close\r\n" in data
    assert ok_upstream.connections == 0


async def test_fin_mid_chunked_streamed_body_is_400_and_aborts_upstream(
    proxy, raw_upstream
) -> None:
    got, closed = bytearray(), asyncio.Event()
    up = await raw_upstream(recording_upstream_handler(got, closed))
    router = ScriptedRouter(lease_for(up.port, "a"), lease_for(up.port, "b"))
    p = await proxy(router=router, request_buffer=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await eventually(lambda: b"hello" in got, what="first chunk forwarded")
        writer.write_eof()
        data = await read_to_close(reader)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    await asyncio.wait_for(closed.wait(), 5)
    assert not got.endswith(b"0\r\n\r\n"), "the upstream saw a complete request"
    await eventually(lambda: router.outstanding == set(), what="lease handed back")


async def test_fin_after_a_complete_request_still_ends_it(proxy, ok_upstream: RawUpstream) -> None:
    """A FIN after a whole request is not a malformed request: it is answered if it can be."""
    p = await proxy({"*": ok_upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        await eventually(lambda: len(ok_upstream.requests) == 1, what="request forwarded")
        writer.write_eof()
        data = await read_to_close(reader)
    finally:
        writer.close()
    assert not data.startswith(b"HTTP/1.1 400 ")


async def test_body_timeout_during_a_cold_start_cancels_the_acquire(
    proxy, ok_upstream: RawUpstream
) -> None:
    router = ScriptedRouter(None, lease_for(ok_upstream.port, "b"))
    router.acquire_gate = asyncio.Event()
    p = await proxy(router=router, body_timeout=SHORT_TIMEOUT, request_buffer=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        await asyncio.wait_for(router.acquire_started.wait(), 5)
        data = await read_to_close(reader)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    router.acquire_gate.set()
    await eventually(lambda: not p.server.engine.tasks, what="the acquire task ended")
    assert router.outstanding == set()
    assert ok_upstream.connections == 0
