#!/usr/bin/env python3
"""The floor of a Python proxy on this machine: what uvloop + httptools cost with no features.

    python benchmarks/floor_proxy.py PORT [--upstream 127.0.0.1:18080]

Measured beside `miren serve` by `ingress_bench.py` (target `floor`), so the table shows how
much of the gap to nginx is the runtime itself and how much is the proxy's work. Per client
connection it opens one upstream connection (no pool, no routing, no leases, no metrics, no
timeouts) and forwards bytes both ways as they arrive, unchanged: no Host resolution, no
X-Forwarded-* lines, no hop-by-hop removal, no error pages. Both directions still go through
llhttp (callbacks only where they are needed to count messages), because a proxy that does not
parse cannot be correct; this is the least a parsing proxy does per request. Not a product:
it trusts both sides and stops on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any, cast

import uvloop
from httptools import HttpRequestParser, HttpResponseParser


class _Upstream(asyncio.Protocol):
    __slots__ = ("client", "parser", "transport")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.parser = HttpResponseParser(self)  # no callbacks: llhttp validates and frames only
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    __slots__ = ("connecting", "early", "parser", "transport", "upstream", "upstream_addr")

    def __init__(self, upstream_addr: tuple[str, int]) -> None:
        self.upstream_addr = upstream_addr
        self.parser = HttpRequestParser(self)
        self.upstream: _Upstream | None = None
        self.early: list[bytes] = []  # bytes that arrived before the upstream connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # (kept: the loop holds only a weak reference to a task)
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self), *self.upstream_addr)
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        if self.early and upstream.transport is not None:
            upstream.transport.write(b"".join(self.early))
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.early.append(data)
        else:
            upstream.transport.write(data)

    def on_url(self, url: bytes) -> None:  # (one callback: llhttp needs none, a proxy does)
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def _serve(port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("port", type=int)
    ap.add_argument("--upstream", default="127.0.0.1:18080", help="HOST:PORT")
    args: Any = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(_serve(args.port, (host, int(port))))


if __name__ == "__main__":
    main()
