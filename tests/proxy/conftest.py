"""Fixtures for the proxy engine tests: real loopback sockets everywhere.

- `raw_upstream(handler)`: an asyncio-streams server running `handler(reader, writer)` per
  connection; it records connections and the raw requests read with `read_request`.
- `proxy(routes, **config)`: a ProxyServer with a StaticRouter (or a router given), on a free port.
Everything started here is closed at teardown, also when the test fails.
Every exchange of every test here checks its state moves against states.EXCHANGE
(`checked_exchanges`, autouse): the hit path stores its moves directly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httptools
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from miren_ingress.proxy import ProxyConfig, ProxyServer, Router, StaticRouter
from miren_ingress.proxy.testing import checked_exchanges

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Request:
    """A request as an upstream received it."""

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.complete = False

    def header(self, name: str) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower().encode()]

    def names(self) -> set[str]:
        return {n.decode().lower() for n, _ in self.headers}


class _Collector:
    def __init__(self, req: Request) -> None:
        self.req = req

    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.req.body += body

    def on_message_complete(self) -> None:
        self.req.complete = True


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one whole request. None at EOF before any byte."""
    req = Request()
    parser = httptools.HttpRequestParser(_Collector(req))
    seen = False
    while not req.complete:
        data = await reader.read(65536)
        if not data:
            return None if not seen else req
        seen = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            break
        req.method = parser.get_method()
    return req


class RawUpstream:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[Request] = []
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.server.wait_closed()


def ok_handler(upstream_ref: list[RawUpstream], body: bytes = b"ok", extra: bytes = b"") -> Handler:
    """Keep-alive handler: answers every request with 200 and `body`, recording requests."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(reader)
            if req is None:
                return
            upstream_ref[0].requests.append(req)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
            )
            await writer.drain()

    return handler


@pytest.fixture(autouse=True)
def _checked_exchange_states() -> Iterator[None]:
    with checked_exchanges():
        yield


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def make(handler: Handler) -> RawUpstream:
        up = RawUpstream(handler)
        started.append(up)
        return await up.start()

    yield make
    for up in started:
        await up.close()


@pytest.fixture
async def ok_upstream(
    raw_upstream: Callable[[Handler], Awaitable[RawUpstream]],
) -> RawUpstream:
    ref: list[RawUpstream] = []
    up = await raw_upstream(ok_handler(ref))
    ref.append(up)
    return up


@pytest.fixture
async def aiohttp_upstream() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def make(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"127.0.0.1:{port}"

    yield make
    for runner in runners:
        await runner.cleanup()


class ProxyHandle:
    def __init__(self, server: ProxyServer, router: Any) -> None:
        self.server = server
        self.router = router
        self.port = server.address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def registry(self) -> CollectorRegistry:
        return self.server.registry


@pytest.fixture(params=["default", "deferred"], ids=["writes-default", "writes-deferred"])
async def proxy(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    """Start ProxyServers on free ports. Each test runs twice: with the engine's default write
    mode (at the pace of a test, the hit path's writes go out at once) and with every
    hit-path write deferred to the end of the loop iteration (`busy_gap` inf, as under load:
    engine.py, "Writes"), so what a test checks holds in both."""
    servers: list[ProxyServer] = []

    async def make(
        routes: dict[str, str] | None = None,
        *,
        router: Router | None = None,
        request_timeout: float = 5.0,
        ephemeral_hosts: frozenset[str] = frozenset(),
        **config: Any,
    ) -> ProxyHandle:
        if router is None:
            router = StaticRouter(
                routes or {}, request_timeout=request_timeout, ephemeral_hosts=ephemeral_hosts
            )
        server = ProxyServer(router, config=ProxyConfig(**config), registry=CollectorRegistry())
        servers.append(server)
        await server.start("127.0.0.1", 0)
        if request.param == "deferred":
            assert server.engine is not None
            server.engine.busy_gap = math.inf
        return ProxyHandle(server, router)

    yield make
    for server in servers:
        await server.close(1.0)


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes the connection; returns all bytes read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def parse_responses(
    data: bytes, head_request: bool = False
) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse one or more HTTP/1.1 responses from raw bytes."""
    out: list[tuple[int, dict[str, str], bytes]] = []

    class C:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = bytearray()

        def on_header(self, n: bytes, v: bytes) -> None:
            self.headers[n.decode().lower()] = v.decode()

        def on_body(self, b: bytes) -> None:
            self.body += b

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), dict(self.headers), bytes(self.body)))
            self.headers = {}
            self.body = bytearray()

    parser = httptools.HttpResponseParser(C())
    parser.feed_data(data)
    return out
