"""The ingress hot path engine: theory of operation.

Objects
- `InboundConnection` (inbound.py): one per client connection, an asyncio Protocol feeding an
  httptools request parser. It validates each request head (the request-smuggling defences live
  here and in llhttp), renders the head to send upstream, and runs `Exchange`s one at a time in
  arrival order (HTTP/1.1 pipelining is answered in order, never interleaved).
- `Exchange` (exchange.py): one request/response cycle. `start()` answers reserved paths itself,
  asks the `Router` for a Target, takes a cached lease and a parked upstream connection: on that
  hit path everything is synchronous, driven from protocol callbacks, with no Task, no await and
  no lock. A lease-cache miss or a pool without an idle connection runs `_connect()` in a Task.
- `UpstreamConnection` (upstream.py): an asyncio Protocol feeding an httptools response parser,
  re-framing the body for the client and forwarding it as it arrives.
- `UpstreamPool` (pool.py): parked keep-alive connections per upstream address.
- `Engine` (this module): what all of them share: router, config, metrics, pools, counters.

Data flow and back-pressure
  client --data_received--> parser callbacks --> exchange.pending --one write--> upstream
  upstream --data_received--> parser callbacks --> out list --one write--> client
Each side pauses reading the other when its own transport's write buffer passes the high-water
mark and resumes on drain, so memory stays flat whatever the body size. Bodies are never
buffered whole: Content-Length bodies pass through unchanged, chunked ones are re-framed chunk
by chunk, bodies delimited by the upstream's close are re-framed as chunked.

Timeouts
One timer per connection, lazily re-armed (see upstream.py and inbound.py): the upstream side
enforces the route's request_timeout as an idle timeout (504 before a response head, close
after) and the pool idle timeout; the client side enforces the header and keep-alive timeouts.
Upgraded (101) connections become raw byte tunnels with no timeout.

Failure rules
- Connect refused on a cached lease: `discard` it, `acquire` once more, retry once.
- A reused keep-alive connection that closes before any response byte, for a GET/HEAD/OPTIONS
  without body: resent once on a new connection (the stale keep-alive race).
- Anything else after request bytes were written: 502, never retried.
- Errors become responses in errorpage.py only; an error after the response head went out
  closes the client connection instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from .config import ProxyConfig
from .interfaces import Lease, Router
from .metrics import ProxyMetrics
from .pool import UpstreamPool

if TYPE_CHECKING:
    from .inbound import InboundConnection

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[int, Mapping[str, Any]]]


def default_health() -> tuple[int, Mapping[str, Any]]:
    return 200, {"status": "ok"}


class Engine:
    """State shared by every connection of one ProxyServer."""

    __slots__ = (
        "_drained",
        "closing",
        "config",
        "connections",
        "health",
        "in_flight",
        "loop",
        "metrics",
        "pools",
        "robots_line",
        "router",
        "tasks",
        "upstream_open",
    )

    def __init__(
        self,
        router: Router,
        config: ProxyConfig,
        metrics: ProxyMetrics,
        health: HealthCheck,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.health = health
        self.loop = loop
        self.pools: dict[tuple[str, int], UpstreamPool] = {}
        self.connections: set[InboundConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight = 0  # exchanges started and not finished
        self.upstream_open = 0  # upstream connections with an open transport
        self.closing = False
        self._drained: asyncio.Event | None = None
        self.robots_line = b"X-Robots-Tag: " + config.robots_tag.encode("latin-1") + b"\r\n"

    def __repr__(self) -> str:
        return (
            f"<Engine connections={len(self.connections)} in_flight={self.in_flight} "
            f"upstream_open={self.upstream_open} pools={len(self.pools)}>"
        )

    def pool_for(self, lease: Lease) -> UpstreamPool:
        key = (lease.host, lease.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = UpstreamPool(self, lease.host, lease.port)
        return pool

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def connection_opened(self, conn: InboundConnection) -> None:
        self.connections.add(conn)
        if self.closing:
            conn.close()

    def connection_closed(self, conn: InboundConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._drained is not None:
            self._drained.set()

    async def drain(self, grace: float) -> None:
        """Stop: close idle connections, let active exchanges finish up to `grace` seconds,
        then abort what is left and close the pools."""
        self.closing = True
        self._drained = asyncio.Event()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
            except TimeoutError:
                log.warning(
                    "closing %d connections still busy after %.1fs", len(self.connections), grace
                )
        for conn in list(self.connections):
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for pool in self.pools.values():
            pool.close()
