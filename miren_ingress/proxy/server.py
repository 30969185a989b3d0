"""`ProxyServer`: the listening socket, the engine and the metrics, with start and close."""

from __future__ import annotations

import asyncio
import gc
import socket

from prometheus_client import CollectorRegistry

from .config import ProxyConfig
from .engine import Engine, HealthCheck, default_health
from .inbound import InboundConnection
from .interfaces import Router
from .metrics import ProxyMetrics


class ProxyServer:
    """The ingress listener.

    `registry` receives the miren_ingress_* metrics (a private registry when None). `health`
    answers `/.well-known/miren/health` on every host: it returns (status, JSON-able mapping) and
    is called synchronously on the event loop, so it must not block.
    """

    def __init__(
        self,
        router: Router,
        *,
        config: ProxyConfig | None = None,
        registry: CollectorRegistry | None = None,
        health: HealthCheck = default_health,
    ) -> None:
        self.router = router
        self.config = config or ProxyConfig()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._health = health
        self._engine: Engine | None = None
        self._server: asyncio.Server | None = None
        self.metrics = ProxyMetrics(self.registry, self._in_flight, self._tunnels)

    def __repr__(self) -> str:
        return f"<ProxyServer {self.address} {self._engine!r}>"

    def _in_flight(self) -> float:
        return float(self._engine.in_flight) if self._engine is not None else 0.0

    def _tunnels(self) -> float:
        return float(self._engine.tunnels) if self._engine is not None else 0.0

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (port 0 picks a free one)."""
        if self._server is not None:
            raise RuntimeError("already started")
        loop = asyncio.get_running_loop()
        engine = self._engine = Engine(self.router, self.config, self.metrics, self._health, loop)
        self._server = await loop.create_server(
            lambda: InboundConnection(engine),
            host,
            port,
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=4096,
            reuse_address=True,
        )
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            return ("", 0)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return len(self._engine.connections) if self._engine is not None else 0

    @property
    def upstream_connections(self) -> int:
        """Upstream connections currently open (busy, tunnelled or parked)."""
        return self._engine.upstream_open if self._engine is not None else 0

    @property
    def in_flight(self) -> int:
        return self._engine.in_flight if self._engine is not None else 0

    @property
    def engine(self) -> Engine | None:
        return self._engine

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace` seconds, then close
        every connection. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._engine is not None:
            await self._engine.drain(grace)
        await server.wait_closed()


def freeze_gc() -> None:
    """Process tuning for a proxy process, to call once after start-up (not on import): move
    start-up objects out of the collector's way and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
