"""Malformed and ambiguous requests: 400, connection closed, nothing reaches the upstream."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import RawUpstream, eventually, raw_exchange

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
    "absolute_form": b"GET http://other.test/ HTTP/1.1\r\n" + H + b"\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "ctl_in_target": b"GET /a\x01 HTTP/1.1\r\n" + H + b"\r\n",
    "huge_header_section": b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)) + b"\r\n",
    "huge_single_header": b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n",
    "huge_request_line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
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


async def test_valid_pipelined_request_then_garbage(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(p.port, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 ")
    assert len(ok_upstream.requests) <= 1


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
