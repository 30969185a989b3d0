"""An app that answers before the request body is all sent (401, 413, an early 204): the
answer reaches the client, with `Connection: close`; the rest of the body is not forwarded;
the client connection is drained (a lingering close), never reset before the client has the
answer; and an app that resets its connection after answering does not turn the answer into
a 502."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.support.poll import eventually

from .conftest import RawUpstream, parse_responses

HEAD = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n"
ANSWER = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large"


def early_app(received: bytearray, *, reset: bool, answered: asyncio.Event | None = None):  # type: ignore[no-untyped-def]
    """Reads the head and a little body, answers 413 (once `answered` is set, if given), then
    closes: with a reset (SO_LINGER 0, as a server does that closes with unread bytes) or a
    plain close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while b"\r\n\r\n" not in received:
            received.extend(await reader.read(65536))
        if answered is not None:
            await answered.wait()
        writer.write(ANSWER)
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort() if reset else writer.close()

    return handler


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_an_early_answer_reaches_the_uploading_client(
    proxy, raw_upstream, reset: bool
) -> None:
    received = bytearray()
    up: RawUpstream = await raw_upstream(early_app(received, reset=reset))
    p = await proxy({"*": up.address}, request_buffer=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(HEAD + b"x" * 65536)
        head = await asyncio.wait_for(reader.readuntil(b"too large"), 5)
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"Connection: close" in head  # the client knows the connection ends here
        # The client goes on uploading a while (as curl does until it reads the answer): the
        # proxy drains it and never resets the connection under it.
        for _ in range(50):
            writer.write(b"y" * 65536)
            await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then a clean close
    finally:
        writer.close()
    assert b"y" not in received  # nothing after the answer was forwarded


async def test_a_lingering_close_ends_when_the_client_stops_sending(
    proxy, raw_upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from miren_ingress.proxy import inbound

    monkeypatch.setattr(inbound, "LINGER_IDLE", 0.2)
    received = bytearray()
    up = await raw_upstream(early_app(received, reset=False))
    p = await proxy({"*": up.address}, request_buffer=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(HEAD + b"x" * 1000)
        await asyncio.wait_for(reader.readuntil(b"too large"), 5)
        # The client neither sends nor closes: the proxy closes after LINGER_IDLE.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    await eventually(lambda: p.server.open_connections == 0)


async def test_an_answer_in_the_socket_when_a_body_write_meets_the_reset(
    proxy, raw_upstream
) -> None:
    """The race behind gunicorn's 502s, made certain: the app answers and resets while the
    proxy has not read the answer yet (its reading is paused here), and the proxy's next
    body write meets the reset. The answer still waiting in the socket is salvaged."""
    received = bytearray()
    answered = asyncio.Event()
    up = await raw_upstream(early_app(received, reset=True, answered=answered))
    p = await proxy({"*": up.address}, request_buffer=0)
    engine = p.server.engine
    assert engine is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(HEAD + b"x" * 1000)
        await eventually(lambda: len(received) > len(HEAD), what="the head upstream")
        (pool,) = engine.pools.values()
        (conn,) = [c for conn in engine.connections if (c := conn_of(conn)) is not None]
        conn.transport.pause_reading()  # the answer stays in the socket, unread
        answered.set()  # the app answers and resets
        await asyncio.sleep(0.05)  # (for the reset to arrive before the next write)
        for _ in range(20):  # body writes: one of them meets the reset
            writer.write(b"z" * 65536)
            await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    responses = parse_responses(data)
    assert [(s, b) for s, _, b in responses] == [(413, b"too large")], data[:200]
    assert pool.open == 0


def conn_of(inbound: object):  # type: ignore[no-untyped-def]
    ex = getattr(inbound, "_active", None)
    return None if ex is None else ex.conn


async def test_the_final_answer_to_expect_continue_closes_with_connection_close(
    proxy, raw_upstream
) -> None:
    """The client waits for 100 Continue; the app answers 417 instead: the client learns the
    connection ends (Connection: close), and never has to send its body."""
    received = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(
            b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 417 ") and b"Connection: close" in head
        writer.write_eof()  # (the body is never sent)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_the_rest_of_the_body_is_not_forwarded_after_the_answer(proxy, raw_upstream) -> None:
    """An app that answers early, slowly, and keeps reading: what the client sends after the
    answer began never reaches it (the upstream connection is not reused either)."""
    received = bytearray()
    done = asyncio.Event()
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def read_all() -> None:
            while data := await reader.read(65536):
                received.extend(data)
            done.set()

        while b"\r\n\r\n" not in received:
            received.extend(await reader.read(65536))
        writer.write(ANSWER[:-6])  # the head and "too"; the rest once the client sent more
        await writer.drain()
        reading = asyncio.ensure_future(read_all())
        await sent.wait()
        writer.write(ANSWER[-6:])
        await writer.drain()
        await reading

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, request_buffer=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(HEAD + b"x" * 1000)
        await asyncio.wait_for(reader.readuntil(b"too"), 5)
        for _ in range(10):
            writer.write(b"y" * 65536)
            await writer.drain()
        await asyncio.sleep(0.1)  # (time for the proxy to forward them, were it to)
        sent.set()
        assert (await asyncio.wait_for(reader.readuntil(b"large"), 5)).endswith(b" large")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        sent.set()
        writer.close()
    await asyncio.wait_for(done.wait(), 5)  # the proxy closed its upstream connection
    assert b"y" not in received
