"""Malformed and ambiguous requests: 400, connection closed, nothing reaches the upstream."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.poll import eventually

from .conftest import RawUpstream, parse_responses, raw_exchange, read_request

H = b"Host: a.test\r\n"
CASES = {
    "cl_and_te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate_cl_same": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "duplicate_cl_differ": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl_list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl_sign": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "cl_not_digits": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello",
    "cl_overflow": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\nx",
    "te_gzip": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello",
    "te_gzip_chunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_gzip": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_twice": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nhello",
    "te_xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_on_http10": b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    "negative_chunk": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk_bare_lf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "chunk_data_overrun": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    "obs_fold_space": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n",
    "obs_fold_tab": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n\tc\r\n\r\n",
    "space_first_header": b"GET / HTTP/1.1\r\n Host: a.test\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n",
    "cr_in_value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n",
    "lf_in_value": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\nX-B: c\r\n\r\n",
    "bare_lf_lines": b"GET / HTTP/1.1\n" + b"Host: a.test\n\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
    "bad_header_name": b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n",
    "duplicate_host": b"GET / HTTP/1.1\r\n" + H + b"Host: b.test\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "invalid_method": b"G@T / HTTP/1.1\r\n" + H + b"\r\n",
    "unknown_method": b"FOO / HTTP/1.1\r\n" + H + b"\r\n",
    "lowercase_method": b"get / HTTP/1.1\r\n" + H + b"\r\n",
    "connect": b"CONNECT a.test:443 HTTP/1.1\r\n" + H + b"\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "http2_version": b"GET / HTTP/2.0\r\n" + H + b"\r\n",
    "absolute_form_ftp": b"GET ftp://other.test/ HTTP/1.1\r\n" + H + b"\r\n",
    "absolute_form_userinfo": b"GET http://u:p@other.test/ HTTP/1.1\r\n" + H + b"\r\n",
    "relative_target": b"GET x/y HTTP/1.1\r\n" + H + b"\r\n",
    "absolute_form_without_host": b"GET http://a.test/x HTTP/1.1\r\n\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "ctl_in_target": b"GET /a\x01 HTTP/1.1\r\n" + H + b"\r\n",
}  # fmt: skip
# Over a limit: 431 (header section, fields), 414 (target); closed, never forwarded.
OVER_LIMITS = {
    "huge_header_section": (431, b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)) + b"\r\n"),
    "huge_single_header": (431, b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n"),
    "huge_request_line": (414, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n"),
    "101_headers": (431, b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n"),
    "101_special_headers": (431, b"GET / HTTP/1.1\r\n" + H + b"X-Forwarded-For: 1\r\n" * 101 + b"\r\n"),
    "10000_headers": (431, b"GET / HTTP/1.1\r\n" + H + b"X: y\r\n" * 10_000 + b"\r\n"),
    "10000_headers_after_a_body": (431, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\n\r\nx" + b"GET / HTTP/1.1\r\n" + H + b"X: y\r\n" * 10_000 + b"\r\n"),
    "101_trailer_fields": (431, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 101 + b"\r\n"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
async def test_rejected_with_400_and_never_forwarded(proxy, ok_upstream: RawUpstream, name: str):
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(p.port, CASES[name])  # returns once the proxy closed
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 405 ")), data[:80]
    assert b"Connection: close" in data
    assert data.count(b"HTTP/1.1 ") == 1
    assert ok_upstream.connections == 0, "the request reached the upstream"
    assert ok_upstream.requests == []


@pytest.mark.parametrize("name", sorted(OVER_LIMITS))
async def test_over_a_limit_is_refused_and_never_forwarded(
    proxy, ok_upstream: RawUpstream, name: str
) -> None:
    status, request = OVER_LIMITS[name]
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(p.port, request)
    if name == "10000_headers_after_a_body":  # the valid POST is answered first
        assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1 ") == 2, data[:200]
        data = data[data.index(b"HTTP/1.1 ", 10) :]
        assert [r.method for r in ok_upstream.requests] == [b"POST"]
    else:
        assert ok_upstream.requests == []
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"Connection: close" in data


async def test_exactly_max_headers_pass(proxy, ok_upstream: RawUpstream) -> None:
    """Host, 96 fields, two X-Forwarded-For and Connection: 100 fields, the limit (inclusive,
    special fields included)."""
    p = await proxy({"*": ok_upstream.address})
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(96)) + b"X-Forwarded-For: 1\r\n" * 2
    data = await raw_exchange(
        p.port, b"GET / HTTP/1.1\r\n" + H + fields + b"Connection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 200 "), data[:80]
    assert len(ok_upstream.requests[0].headers) > 96


async def test_bad_chunk_after_forwarding_started_aborts_upstream(proxy, raw_upstream) -> None:
    """A body that turns malformed after earlier chunks went upstream: the upstream
    connection is aborted, so the upstream never sees a complete (or a second) request.
    (Request buffering off: with it, a body this short never reaches the upstream at all.)"""
    got = bytearray()
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            got.extend(data)
        closed.set()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, request_buffer=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await eventually(lambda: b"hello" in got, what="first chunk forwarded")
        writer.write(b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 400 ")
        await asyncio.wait_for(closed.wait(), 5)
        assert b"smuggled" not in got
        assert not got.endswith(b"0\r\n\r\n")
    finally:
        writer.close()


@pytest.mark.parametrize(
    "junk", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nX(: b\r\n\r\n", b"\x00\x01"]
)
async def test_valid_requests_then_junk_in_one_read(
    proxy, ok_upstream: RawUpstream, junk: bytes
) -> None:
    """The requests read whole before the junk are answered, in order; then 400 and close
    (nginx does the same). The junk never reaches the upstream."""
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi" + junk,
    )
    statuses = [s for s, _, _ in parse_responses(data)]
    assert statuses == [200, 200, 400], data
    assert data.endswith(b"\n") and data.count(b"Connection: close") == 1
    assert [r.url for r in ok_upstream.requests] == [b"/1", b"/2"]
    assert ok_upstream.requests[1].body == b"hi"


async def test_junk_after_a_request_whose_response_is_under_way(proxy, raw_upstream) -> None:
    """The junk arrives while the valid request's response streams: the response completes,
    then the 400 follows it (never interleaved), then the connection closes."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await writer.drain()
        await release.wait()
        writer.write(b"cd")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await reader.readuntil(b"ab")).startswith(b"HTTP/1.1 200 ")
        writer.write(b"NOT HTTP\r\n\r\n")
        await writer.drain()
        await eventually(lambda: up.connections == 1)
        release.set()
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest.startswith(b"cdHTTP/1.1 400 "), rest
    finally:
        writer.close()


@pytest.mark.parametrize("request_line", [b"GET /\r\n", b"GET /index.html\n"])
async def test_http09_request_is_closed_at_once(
    proxy, ok_upstream: RawUpstream, request_line: bytes
) -> None:
    p = await proxy({"*": ok_upstream.address}, header_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(request_line)
        # Closed without an answer (an HTTP/0.9 client could not read an HTTP/1.1 head), well
        # before header_timeout.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert ok_upstream.connections == 0


async def test_http09_after_a_valid_request(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address}, header_timeout=30)
    data = await asyncio.wait_for(
        raw_exchange(p.port, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2\r\n"), 5
    )
    assert [s for s, _, _ in parse_responses(data)] == [200]
    assert [r.url for r in ok_upstream.requests] == [b"/1"]


async def test_a_slow_request_line_is_not_taken_for_http09(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        for part in (b"GET /a HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)  # (deliberately separate segments)
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"http://b.test/x?y=1", b"/x?y=1"),
        (b"HTTP://b.test", b"/"),
        (b"https://b.test:8443?q", b"/?q"),
    ],
)
async def test_absolute_form_target_is_accepted_and_its_authority_wins(
    proxy, ok_upstream: RawUpstream, raw_upstream, target: bytes, forwarded: bytes
) -> None:
    """RFC 9112 3.2.2: the target's authority wins over Host, for routing and upstream."""
    other: list[RawUpstream] = []
    from .conftest import ok_handler

    wrong = await raw_upstream(ok_handler(other))
    other.append(wrong)
    p = await proxy({"b.test": ok_upstream.address, "*": wrong.address})
    data = await raw_exchange(
        p.port, b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 200 "), data[:80]
    assert wrong.requests == []
    (req,) = ok_upstream.requests
    assert req.url == forwarded
    assert req.header("Host") == [target.split(b"://")[1].split(b"/")[0].split(b"?")[0]]
    assert req.header("X-Forwarded-Host") == req.header("Host")


async def test_absolute_form_without_host_on_http10(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"b.test": ok_upstream.address})
    data = await raw_exchange(p.port, b"GET http://b.test/z HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 "), data[:80]
    assert ok_upstream.requests[0].header("Host") == [b"b.test"]


@pytest.mark.parametrize("name", [b"Host", b"host", b"Content-Length", b"Transfer-Encoding"])
async def test_connection_cannot_remove_host_or_framing(
    proxy, ok_upstream: RawUpstream, name: bytes
) -> None:
    p = await proxy({"a.test": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nConnection: close, " + name + b"\r\n"
        b"Content-Length: 2\r\n\r\nhi",
    )
    assert data.startswith(b"HTTP/1.1 200 "), data[:80]
    (req,) = ok_upstream.requests
    assert req.header("Host") == [b"a.test"] and req.body == b"hi"
    assert req.header("Content-Length") == [b"2"]


async def test_connection_cannot_remove_a_responses_framing(proxy, raw_upstream) -> None:
    """A hostile app naming Content-Length in its Connection field: the client still gets a
    framed response and its connection stays usable."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(
        p.port,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    responses = parse_responses(data)
    assert [(s, b) for s, _, b in responses] == [(200, b"ok"), (200, b"ok")]
    assert all(h["content-length"] == "2" for _, h, _ in responses)


@pytest.mark.parametrize(
    "name", [b"X_Forwarded_For", b"X_Real_IP", b"Content_Length", b"Host_", b"_X"]
)
async def test_header_names_with_underscores_are_dropped(
    proxy, ok_upstream: RawUpstream, name: bytes
) -> None:
    """As nginx does by default: an app that normalises `_` to `-` must not take a client's
    `X_Forwarded_For` for the proxy's X-Forwarded-For."""
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"GET / HTTP/1.1\r\nHost: a\r\n" + name + b": 6.6.6.6\r\nX-Ok: 1\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 200 ")
    (req,) = ok_upstream.requests
    assert b"6.6.6.6" not in b"".join(v for _, v in req.headers)
    assert req.header("X-Ok") == [b"1"]


async def test_slow_header_is_cut_off(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address}, header_timeout=0.3, keepalive_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        for _ in range(3):  # trickle bytes: progress does not extend the header deadline
            await asyncio.sleep(0.05)
            writer.write(b"x")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - start < 2.0
        assert ok_upstream.connections == 0
    finally:
        writer.close()


async def test_idle_keepalive_connection_is_closed(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address}, header_timeout=5, keepalive_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after keepalive_timeout
    finally:
        writer.close()
    await eventually(lambda: p.server.open_connections == 0)
