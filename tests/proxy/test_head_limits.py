"""The header-count limit bounds the work a hostile head costs, not only what is forwarded: a
long read outside a body is parsed in slices, and the count is checked between them. Driven
without sockets (a fake transport), counting the parser's header callbacks."""

from __future__ import annotations

import asyncio
from typing import Any

from httptools import HttpRequestParser
from prometheus_client import CollectorRegistry

from miren_ingress.proxy import ProxyConfig, StaticRouter
from miren_ingress.proxy.engine import Engine, default_health
from miren_ingress.proxy.inbound import InboundConnection
from miren_ingress.proxy.metrics import ProxyMetrics


class Transport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed


class Feeds:
    """The parser, with its feed_data calls counted."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.calls = 0

    def feed_data(self, data: bytes) -> None:
        self.calls += 1
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


class Counting:
    """A connection's parser callbacks with its header fields counted, and its parser's
    feeds (a wrapper, not a subclass: the hot path may be compiled)."""

    def __init__(self, conn: InboundConnection) -> None:
        self.conn = conn
        self.headers_seen = 0
        self.on_url = conn.on_url
        self.on_headers_complete = conn.on_headers_complete
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete
        self.feeds = Feeds(HttpRequestParser(self))
        conn._parser = self.feeds

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers_seen += 1
        self.conn.on_header(name, value)


async def feed(data: bytes) -> tuple[Counting, Transport]:
    loop = asyncio.get_running_loop()
    router = StaticRouter({"*": "127.0.0.1:9"})
    engine = Engine(
        router, ProxyConfig(), ProxyMetrics(CollectorRegistry(), lambda: 0.0), default_health, loop
    )
    conn = InboundConnection(engine)
    counting = Counting(conn)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(data)
    conn.connection_lost(None)
    return counting, transport


async def test_ten_thousand_fields_cost_one_slice() -> None:
    conn, transport = await feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 10_000 + b"\r\n")
    assert transport.data.startswith(b"HTTP/1.1 431 ")
    assert conn.headers_seen < 8 * 1024 // 6 + 2  # one 8 KiB slice of 6-byte fields, not 10,000
    assert conn.feeds.calls == 1


async def test_a_body_in_a_long_read_is_fed_whole_after_its_head() -> None:
    """Slicing stops inside a body: a 200 KiB body costs one more feed, not 25."""
    body = b"x" * 200_000
    conn, _ = await feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    assert conn.headers_seen == 2
    assert conn.feeds.calls == 2
