"""Normal traffic through the engine: round trips, keep-alive, framing, headers."""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .conftest import RawUpstream, ok_handler, parse_responses, raw_exchange, read_request


async def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "body_len": len(body),
                "body_head": body[:16].decode(errors="replace"),
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_get_and_post_round_trip(proxy, aiohttp_upstream) -> None:
    up = await aiohttp_upstream(await echo_app())
    p = await proxy({"app.test": up})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/a/b?x=1", headers={"Host": "app.test"}) as r:
            assert r.status == 200
            data = await r.json()
            assert data["method"] == "GET" and data["path"] == "/a/b?x=1"
        payload = b"hello " * 10000
        async with s.post(f"{p.url}/upload", data=payload, headers={"Host": "App.Test:80"}) as r:
            assert r.status == 200
            data = await r.json()
            assert data["method"] == "POST" and data["body_len"] == len(payload)
            assert data["headers"]["content-length"] == str(len(payload))


async def test_keep_alive_reuses_one_upstream_connection(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(p.url + "/") as r:
                assert await r.read() == b"ok"
    # New client connections, one after the other, reuse the parked upstream connection too.
    for _ in range(5):
        async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
            assert r.status == 200
    assert len(ok_upstream.requests) == 15
    assert ok_upstream.connections == 1
    assert p.server.upstream_connections == 1


async def test_concurrent_clients_share_the_pool(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as s:

        async def one() -> int:
            async with s.get(p.url + "/") as r:
                await r.read()
                return r.status

        for _ in range(3):
            assert await asyncio.gather(*(one() for _ in range(32))) == [200] * 32
    assert ok_upstream.connections <= 32
    assert len(ok_upstream.requests) == 96


async def test_chunked_request_and_response(proxy, aiohttp_upstream) -> None:
    received: dict[str, object] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        received["te"] = request.headers.get("Transfer-Encoding")
        received["body"] = await request.read()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/", handler)
    p = await proxy({"*": await aiohttp_upstream(app)})

    async def gen() -> AsyncIterator[bytes]:
        for i in range(4):
            yield b"chunk%d-" % i

    async with aiohttp.ClientSession() as s, s.post(p.url + "/", data=gen()) as r:
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert await r.read() == b"part0;part1;part2;part3;part4;"
    assert received["te"] == "chunked"
    assert received["body"] == b"chunk0-chunk1-chunk2-chunk3-"


async def test_chunked_framing_on_the_wire(proxy, raw_upstream) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        rest = await reader.readuntil(b"0\r\n\r\n")
        seen.append(head + rest)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(
        p.port,
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;name=v\r\nwxyz\r\n1\r\n!\r\n0\r\nX-Client-Trailer: 1\r\n\r\n",
    )
    # Re-framed as our own clean chunks: no extensions, no trailers, either way.
    assert seen[0].endswith(b"\r\n\r\n4\r\nwxyz\r\n1\r\n!\r\n0\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in seen[0]
    assert b"trailer" not in seen[0].lower()
    assert data.endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert b"x-trailer" not in data.lower()


async def test_close_delimited_response_is_rechunked(proxy, raw_upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-")
        await writer.drain()
        writer.write(b"close")
        await writer.drain()
        writer.close()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the client connection survives: the body was re-framed
            async with s.get(p.url + "/") as r:
                assert r.headers["Transfer-Encoding"] == "chunked"
                assert await r.read() == b"until-close"


async def test_head_and_no_body_statuses(proxy, raw_upstream) -> None:
    ref: list[RawUpstream] = []
    up = await raw_upstream(ok_handler(ref, body=b"x" * 10))
    ref.append(up)
    p = await proxy({"*": up.address})

    # The raw handler answers HEAD with a body too (a broken upstream): never forwarded.
    data = await raw_exchange(p.port, b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == b""
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert await r.read() == b"x" * 10


async def test_pipelined_requests_answered_in_order(proxy, aiohttp_upstream) -> None:
    p = await proxy({"*": await aiohttp_upstream(await echo_app())})
    reqs = (
        b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
        + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    responses = parse_responses(await raw_exchange(p.port, reqs))
    paths = [json.loads(body)["path"] for _, _, body in responses]
    assert paths == ["/0", "/1", "/2", "/3", "/4", "/last"]


async def test_forwarded_headers(proxy, aiohttp_upstream) -> None:
    p = await proxy({"*": await aiohttp_upstream(await echo_app())})
    async with aiohttp.ClientSession() as s:
        headers = {
            "Host": "Site.Example:8080",
            "X-Forwarded-For": "1.2.3.4",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
        }
        async with s.get(p.url + "/", headers=headers) as r:
            h = (await r.json())["headers"]
    assert h["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == "Site.Example:8080"
    assert h["host"] == "Site.Example:8080"


async def test_hop_by_hop_headers_never_cross(proxy, raw_upstream) -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Up-Secret\r\n"
            b"X-Up-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
            b"Trailer: X-T\r\nUpgrade: h2c\r\nX-End: 1\r\n\r\nok"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(
        p.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Client-Secret\r\n"
        b"X-Client-Secret: c\r\nKeep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Trailer: X-T\r\nUpgrade: websocket\r\nProxy-Authorization: Basic Zm9v\r\nX-Keep: 1\r\n\r\n",
    )
    sent = received[0].lower()
    for name in (b"x-client-secret", b"keep-alive", b"proxy-connection", b"\nte:", b"trailer",
                 b"upgrade", b"proxy-authorization", b"connection"):  # fmt: skip
        assert name not in sent, name
    assert b"x-keep: 1" in sent
    head = data.partition(b"\r\n\r\n")[0].lower()
    for name in (b"x-up-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert name not in head, name
    assert b"x-end: 1" in head
    assert b"connection: close" in head  # ours: the client asked to close


async def test_robots_tag_on_ephemeral_targets(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"pr-1.app.test": ok_upstream.address, "app.test": ok_upstream.address},
                    ephemeral_hosts=frozenset({"pr-1.app.test"}))  # fmt: skip
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/", headers={"Host": "pr-1.app.test"}) as r:
            assert r.headers["X-Robots-Tag"] == "noindex"
        async with s.get(p.url + "/", headers={"Host": "app.test"}) as r:
            assert "X-Robots-Tag" not in r.headers


async def test_health_endpoint_on_every_host(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"*": ok_upstream.address})
    async with aiohttp.ClientSession() as s:
        for host in ("a.test", "pr-9.b.test"):
            async with s.get(p.url + "/.well-known/miren/health", headers={"Host": host}) as r:
                assert r.status == 200
                assert await r.json() == {"status": "ok"}
                assert r.headers["Cache-Control"] == "no-store"
        async with s.get(p.url + "/.well-known/miren/admin") as r:
            assert r.status == 404
    assert ok_upstream.requests == []


async def test_expect_continue_is_forwarded(proxy, aiohttp_upstream) -> None:
    p = await proxy({"*": await aiohttp_upstream(await echo_app())})
    async with aiohttp.ClientSession() as s:
        async with s.post(p.url + "/", data=b"z" * 1000, expect100=True) as r:
            assert r.status == 200
            assert (await r.json())["body_len"] == 1000


async def test_http10_client_gets_close_delimited_body(proxy, raw_upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    data = await raw_exchange(p.port, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head
    assert body == b"hello"


async def test_pipelined_requests_with_bodies(proxy, aiohttp_upstream) -> None:
    p = await proxy({"*": await aiohttp_upstream(await echo_app())})
    reqs = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    responses = parse_responses(await raw_exchange(p.port, reqs))
    got = [(json.loads(b)["path"], json.loads(b)["body_head"]) for _, _, b in responses]
    assert got == [("/a", "abc"), ("/b", "de"), ("/c", "")]


async def test_date_is_added_where_a_response_has_none(proxy, raw_upstream) -> None:
    """RFC 9110 6.6.1: the proxy's own answers and an app's that lack Date get one; an app's own
    Date is left alone (one line, its value)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            if req.url == b"/chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
                             b"Content-Length: 2\r\n\r\nok")  # fmt: skip
            await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"a": up.address})
    data = await raw_exchange(
        p.port,
        b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\nGET /dated HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n",
    )
    chunked, dated, refused = parse_responses(data)
    assert email.utils.parsedate_to_datetime(chunked[1]["date"]).year >= 2026
    assert dated[1]["date"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    assert data.count(b"Date: Mon, 01 Jan 2024") == 1  # (the app's: the others are today's)
    assert refused[0] == 404 and email.utils.parsedate_to_datetime(refused[1]["date"])
