"""The hot path's shortcuts, each next to the case it must not get wrong: responses spliced from
the upstream's raw bytes, response heads seen before (not parsed again), heads split across
reads, interim and HTTP/1.0 responses, the lazy head-size accounting, requests without
on_message_begin, and trailers between requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from miren_ingress.proxy.pool import UpstreamPool
from tests.support.poll import eventually

from .conftest import RawUpstream, parse_responses, raw_exchange, read_request

Respond = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def scripted(raw_upstream, *responses: bytes | Respond) -> RawUpstream:
    """An upstream answering its n-th request (over all connections) with responses[n]: raw
    bytes, or a coroutine function writing them itself."""
    script = list(responses)
    up: RawUpstream

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            up.requests.append(req)
            answer = script.pop(0)
            if isinstance(answer, bytes):
                writer.write(answer)
                await writer.drain()
            else:
                await answer(writer)

    up = await raw_upstream(handler)
    return up


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("ephemeral", [False, True])
async def test_bytes_after_a_spliced_response_are_never_forwarded(
    proxy, raw_upstream, ephemeral: bool
) -> None:
    up = await scripted(
        raw_upstream,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\n",  # a second (partial) response: out of sync
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes",
    )
    p = await proxy({"a": up.address}, ephemeral_hosts=frozenset({"a"} if ephemeral else ()))
    data = await raw_exchange(p.port, GET + GET_CLOSE)
    responses = parse_responses(data)
    assert [(s, b) for s, _, b in responses] == [(200, b"ok"), (200, b"yes")]
    assert all(("x-robots-tag" in h) == ephemeral for _, h, _ in responses)
    assert b"Smuggled" not in data
    assert up.connections == 2  # the out-of-sync connection was not reused


@pytest.mark.parametrize(
    "connection",
    [b"Connection: keep-alive\r\n", b"Connection:keep-alive\r\n", b"Connection:  keep-alive \r\n",
     b"connection: keep-alive\r\n", b"Connection: Keep-Alive\r\n", b""],
)  # fmt: skip
@pytest.mark.parametrize("ephemeral", [False, True])
@pytest.mark.parametrize("date", [b"", b"Date: Sun, 06 Dec 2026 21:00:00 GMT\r\n", b"date: x\r\n"])
async def test_response_heads_are_spliced_exactly(
    proxy, raw_upstream, connection: bytes, ephemeral: bool, date: bytes
) -> None:
    body = b"0123456789" * 100
    response = (
        b"HTTP/1.1 200 Fine\r\nServer: up\r\nContent-Length: 1000\r\n"
        + connection
        + date
        + b"ETag: \"x\"\r\n\r\n"
        + body
    )  # fmt: skip
    up = await scripted(raw_upstream, response, response)
    p = await proxy({"pr-1.a": up.address, "a": up.address}, ephemeral_hosts={"pr-1.a"})
    host = b"pr-1.a" if ephemeral else b"a"
    data = await raw_exchange(
        p.port,
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
    )
    first, second = data.split(b"HTTP/1.1 200 Fine\r\n")[1:]
    # `Connection` spelled so, value `keep-alive` (llhttp strips the whitespace before it only).
    same_option = (
        connection.startswith(b"Connection:") and connection[11:-2].lstrip() == b"keep-alive"
    )
    for i, part in enumerate((first, second)):
        head, _, rest = part.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert rest == body
        names = [line.split(b":")[0].lower() for line in lines]
        assert (b"x-robots-tag" in names) == ephemeral
        theirs = [
            line for line in lines if not line.lower().startswith((b"connection", b"x-robots"))
        ]
        if date:  # theirs, untouched
            mine = theirs
        else:  # ours, added (the second response parsed or known alike)
            mine = [line for line in theirs if not line.startswith(b"Date: ")]
            assert len(theirs) - len(mine) == 1
        assert mine == [b"Server: up", b"Content-Length: 1000", *([date[:-2]] if date else []),
                        b'ETag: "x"']  # in order  # fmt: skip
        connection_lines = [line for line in lines if line.lower().startswith(b"connection")]
        if i == 0:  # keep-alive: nginx's own spelling of our option stays (the fast path)
            assert connection_lines == ([connection[:-2]] if same_option else [])
        else:  # ours: `close` on the last response
            assert connection_lines == [b"Connection: close"]
    assert b"keep-alive" not in second.lower()
    assert up.connections == 1


async def test_head_split_across_reads(proxy, raw_upstream) -> None:
    async def in_pieces(writer: asyncio.StreamWriter) -> None:
        for piece in (b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 5\r\nConnection: keep-alive\r",
                      b"\n\r\nhel", b"lo"):  # fmt: skip
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)  # separate reads (most likely; correct either way)

    up = await scripted(raw_upstream, in_pieces, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    p = await proxy({"*": up.address})
    data = await raw_exchange(p.port, GET + GET_CLOSE)
    responses = parse_responses(data)
    assert [(s, b) for s, _, b in responses] == [(200, b"hello"), (200, b"ok")]
    assert "connection" not in responses[0][1]
    assert up.connections == 1


async def test_interim_responses_then_final_in_one_read(proxy, raw_upstream) -> None:
    up = await scripted(
        raw_upstream,
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nKeep-Alive: 5\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    )
    p = await proxy({"*": up.address})
    data = await raw_exchange(p.port, GET_CLOSE)
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    assert b"Keep-Alive" not in data
    assert [(s, b) for s, _, b in parse_responses(data)[-1:]] == [(200, b"ok")]


async def test_http10_upstream_response_is_answered_as_http11(proxy, raw_upstream) -> None:
    up = await scripted(
        raw_upstream,
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nyes",
    )
    p = await proxy({"*": up.address})
    data = await raw_exchange(p.port, GET + GET_CLOSE)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok"), (200, b"yes")]
    assert up.connections == 2  # HTTP/1.0 without keep-alive: not reused


async def test_large_heads_under_the_limit_pass(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address}, max_header_bytes=64 * 1024)
    big = b"X-Big: " + b"v" * 60000 + b"\r\n"
    data = await raw_exchange(
        p.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"Connection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 200 ")
    assert ok_upstream.requests[0].header("X-Big") == [b"v" * 60000]


async def test_head_over_the_limit_in_pieces_is_rejected(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address}, max_header_bytes=16 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
        for i in range(20):  # 20 x 1 KiB: over 16 KiB only taken together
            writer.write(b"X-%d: %s\r\n" % (i, b"v" * 1000))
            await writer.drain()
        writer.write(b"\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 431 ") and b"too large" in data
        assert ok_upstream.connections == 0
    finally:
        writer.close()


async def test_request_arriving_byte_by_byte(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        for byte in GET_CLOSE:
            writer.write(bytes([byte]))
            await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")]
    finally:
        writer.close()


async def test_request_target_split_across_reads(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    conns = p.server._engine.connections  # (white box: to know the first piece was parsed)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET /first/ha")
        await eventually(lambda: any(c._url_parts for c in conns), what="the first piece parsed")
        writer.write(b"lf?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")]
        assert ok_upstream.requests[0].url == b"/first/half?q=1"
    finally:
        writer.close()


async def test_trailers_do_not_leak_into_the_next_request(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nHost: evil\r\nX-T: " + b"t" * 4000 + b"\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert [s for s, _, _ in parse_responses(data)] == [200, 200]
    second = ok_upstream.requests[1]
    assert second.url == b"/b" and second.header("Host") == [b"a"]
    assert second.header("X-Forwarded-Host") == [b"a"] and second.header("X-T") == []


async def test_reserved_paths_and_lookalikes(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"GET /.well-known/miren/health HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /.well-known/other HTTP/1.1\r\nHost: a\r\n\r\n"
        b"HEAD /.well-known/miren/nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    statuses = [s for s, _, _ in parse_responses(data, head_request=True)]
    assert statuses[:2] == [200, 200] and data.count(b"HTTP/1.1 404 ") == 1
    assert [r.url for r in ok_upstream.requests] == [b"/.well-known/other"]


async def test_connection_line_is_cut_from_the_head_not_the_body(proxy, raw_upstream) -> None:
    """Closing the client connection cuts the upstream's `Connection: keep-alive` line: the one
    in the head, however it is spaced, never a look-alike in the body."""
    body = b"x\r\nConnection: keep-alive\r\ny"
    response = b"HTTP/1.1 200 OK\r\nConnection:keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    up = await scripted(raw_upstream, response)
    p = await proxy({"a": up.address})
    data = await raw_exchange(p.port, GET_CLOSE)
    [(status, headers, got)] = parse_responses(data)
    assert (status, got) == (200, body)
    assert headers["connection"] == "close"
    assert b"Connection:keep-alive" not in data


async def test_empty_robots_tag_means_no_header(proxy, ok_upstream) -> None:
    p = await proxy({"pr-1.a": ok_upstream.address}, ephemeral_hosts=frozenset({"pr-1.a"}),
                    robots_tag="")  # fmt: skip
    for request in (b"GET / HTTP/1.1\r\nHost: pr-1.a\r\n\r\n", b"GET / HTTP/1.1\r\nHost: pr-1.a"
                    b"\r\nConnection: close\r\n\r\n"):  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(2) == b"ok"
            assert b"x-robots-tag" not in head.lower()
        finally:
            writer.close()


@pytest.mark.parametrize("ephemeral", [False, True])
@pytest.mark.parametrize("tail", [b"GARBAGE", b"HTTP/1.1 2", b"\r\n\r\nXYZ"])
async def test_response_then_junk_in_one_read_is_trimmed(
    proxy, raw_upstream, ephemeral: bool, tail: bytes
) -> None:
    up = await scripted(
        raw_upstream,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok" + tail,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes",
    )
    p = await proxy({"a": up.address}, ephemeral_hosts=frozenset({"a"} if ephemeral else ()))
    data = await raw_exchange(p.port, GET + GET_CLOSE)
    assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok"), (200, b"yes")]
    assert data.count(b"HTTP/1.1 ") == 2 and b"GARBAGE" not in data and b"XYZ" not in data
    assert up.connections == 2  # the out-of-sync connection was not reused


@pytest.mark.parametrize(
    ("connection", "reused"),
    [
        (b"Connection: keep-alive\r\n", True),
        (b"Connection: keep-alive\r\nConnection: close\r\n", False),
        (b"Connection: close\r\n", False),
        (b"", True),
    ],
)
async def test_upstream_keep_alive_decides_reuse(
    proxy, raw_upstream, connection: bytes, reused: bool
) -> None:
    """The upstream's Connection field alone decides: this upstream never closes first."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + connection + b"\r\nok"
    up = await scripted(raw_upstream, response, response)
    p = await proxy({"a": up.address})
    for _ in range(2):
        data = await raw_exchange(p.port, GET_CLOSE)
        assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")]
    assert up.connections == (1 if reused else 2)


# --- a response head seen before (UpstreamPool.known): the parser is skipped ----------------
OK_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: up\r\nDate: Sun, 06 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\n"
)


def only_pool(p: Any) -> UpstreamPool:
    engine = p.server.engine
    assert engine is not None and len(engine.pools) == 1
    return next(iter(engine.pools.values()))  # type: ignore[no-any-return]


def parsed_since_known(pool: UpstreamPool) -> int:
    """Heads its (one, parked) connection parsed since the pool's known head last matched."""
    (conn,) = pool.idle
    return conn._novel


@pytest.mark.parametrize("ephemeral", [False, True])
async def test_a_head_seen_before_is_forwarded_as_when_parsed(
    proxy, raw_upstream, ephemeral: bool
) -> None:
    up = await scripted(raw_upstream, *[OK_HEAD + b"ok"] * 6)
    p = await proxy({"a": up.address}, ephemeral_hosts=frozenset({"a"} if ephemeral else ()))
    first = await raw_exchange(p.port, GET + GET + GET_CLOSE)  # parsed, then known twice
    pool = only_pool(p)
    assert pool.known is not None and pool.known[0] == OK_HEAD
    assert parsed_since_known(pool) == 0  # the last two were taken as known
    again = await raw_exchange(p.port, GET + GET + GET_CLOSE)  # known all three times
    assert again == first
    responses = parse_responses(first)
    assert [(s, b) for s, _, b in responses] == [(200, b"ok")] * 3
    assert all(("x-robots-tag" in h) == ephemeral for _, h, _ in responses)
    assert [h.get("connection") for _, h, _ in responses] == ["keep-alive"] * 2 + ["close"]
    assert first.count(b"Connection:") == 3  # the upstream's line was cut on the last one
    assert up.connections == 1


@pytest.mark.parametrize("tail", [b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\n", b"!"])
async def test_a_known_head_with_bytes_after_its_body_is_parsed(
    proxy, raw_upstream, tail: bytes
) -> None:
    up = await scripted(
        raw_upstream,
        OK_HEAD + b"ok",
        OK_HEAD + b"ok" + tail,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    )
    p = await proxy({"a": up.address})
    data = await raw_exchange(p.port, GET + GET + GET_CLOSE)
    assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")] * 2 + [(200, b"")]
    assert b"Smuggled" not in data and b"!" not in data
    assert up.connections == 2  # the out-of-sync connection was not reused


async def test_a_known_head_whose_body_comes_later_is_parsed(proxy, raw_upstream) -> None:
    # The second response's body is split: the proxy forwards the head and "o" (the client
    # sees them) before the upstream sends "k", so the two reads are certainly separate.
    forwarded = asyncio.Event()

    async def in_two(writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"o")
        await writer.drain()
        await forwarded.wait()
        writer.write(b"k")

    up = await scripted(raw_upstream, OK_HEAD + b"ok", in_two, OK_HEAD + b"ok")
    p = await proxy({"a": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        async with asyncio.timeout(5):
            writer.write(GET)
            first = await reader.readexactly(len(OK_HEAD) + 2)
            writer.write(GET)
            second = await reader.readexactly(len(OK_HEAD) + 1)
            forwarded.set()
            second += await reader.readexactly(1)
            writer.write(GET_CLOSE)
            third = await reader.read()
    finally:
        forwarded.set()
        writer.close()
    assert first == second == OK_HEAD + b"ok"
    assert [(s, b) for s, _, b in parse_responses(third)] == [(200, b"ok")]
    assert up.connections == 1


async def test_a_head_request_never_takes_a_known_head(proxy, raw_upstream) -> None:
    # The upstream wrongly sends a body with its answer to HEAD: the head alone is forwarded.
    up = await scripted(raw_upstream, *[OK_HEAD + b"ok"] * 3)
    p = await proxy({"a": up.address})
    assert parse_responses(await raw_exchange(p.port, GET_CLOSE))[0][2] == b"ok"
    head = await raw_exchange(p.port, b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert parse_responses(await raw_exchange(p.port, GET_CLOSE))[0][2] == b"ok"


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_bodiless_statuses_are_never_remembered(proxy, raw_upstream, status: bytes) -> None:
    # A 304 may announce the length of the body it does not send.
    response = b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\n"
    up = await scripted(raw_upstream, response, response, OK_HEAD + b"ok")
    p = await proxy({"a": up.address})
    data = await raw_exchange(p.port, GET + GET_CLOSE)
    assert [s for s, _, _ in parse_responses(data, head_request=True)] == [int(status[:3])] * 2
    assert data.endswith(b"\r\n\r\n")
    assert only_pool(p).known is None
    assert parse_responses(await raw_exchange(p.port, GET_CLOSE))[0][2] == b"ok"
    assert only_pool(p).known == (OK_HEAD, len(OK_HEAD) + 2, 200, True, True)


async def test_heads_that_never_repeat_are_sampled_then_a_repeating_one_is_learnt(
    proxy, raw_upstream
) -> None:
    unique = [OK_HEAD.replace(b"up", b"u%02d" % i) + b"ok" for i in range(40)]
    up = await scripted(raw_upstream, *unique, *[OK_HEAD + b"ok"] * 20)
    p = await proxy({"a": up.address})
    await raw_exchange(p.port, GET * 39 + GET_CLOSE)
    pool = only_pool(p)
    assert parsed_since_known(pool) == 40
    assert pool.known is not None and pool.known[0] == unique[31][:-2]  # the 32nd: sampled
    data = await raw_exchange(p.port, GET * 19 + GET_CLOSE)
    assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")] * 20
    assert pool.known[0] == OK_HEAD and parsed_since_known(pool) == 0  # learnt, then taken
