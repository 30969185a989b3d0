"""Keep-alive pools of upstream connections, one per upstream address.

Invariants:
- a connection is in `idle` only while no exchange uses it, its last response was read to the
  end, the upstream did not ask to close, and it was not closed (its state is CLOSED after a
  close, an abort, the upstream's FIN or a loss, so `take` needs no transport call);
- `idle` is a LIFO stack (hot connections are reused first, surplus ones idle out), at most
  `max_idle` long; a connection returned to a full pool is closed;
- `take()` never awaits: it pops an idle connection or returns None, and only then does the
  caller `await connect()` (off the hit path).
"""

from __future__ import annotations

import asyncio
import contextlib
from time import monotonic
from typing import TYPE_CHECKING, Final

from .states import Up
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .engine import Engine


OPEN: Final = Up.OPEN  # (Final: compiled, a C constant)


class UpstreamPool:
    __slots__ = (
        "_engine",
        "closed",
        "host",
        "idle",
        "idle_timeout",
        "known",
        "max_idle",
        "open",
        "peer",
        "port",
    )

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self._engine = engine
        self.host = host
        self.port = port
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connections of this pool with an open transport (idle or busy)
        self.closed = False
        # Another node's proxy (its name): each request is signed as an internal hop for it
        # (Engine.sign_hop). b"": a sandbox or an upstream.
        self.peer = b""
        self.max_idle = engine.config.pool_max_idle
        self.idle_timeout = engine.config.pool_idle_timeout
        # The last response head of this upstream that llhttp parsed and the fast path took
        # (see upstream.py): (its bytes through the blank line, the response's whole length,
        # status, has a `Connection: keep-alive` line, has a Date line).
        self.known: tuple[bytes, int, int, bool, bool] | None = None

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.host}:{self.port} open={self.open} idle={len(self.idle)}>"

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.state is OPEN:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a new connection (raises OSError / TimeoutError on failure)."""
        engine = self._engine
        async with asyncio.timeout(engine.config.connect_timeout):
            _, conn = await engine.loop.create_connection(
                lambda: UpstreamConnection(self, engine), self.host, self.port
            )
        return conn

    def put(self, conn: UpstreamConnection, now: float | None = None) -> None:
        """Return a connection whose exchange finished cleanly (`now`: monotonic time, read
        when not given); it is closed instead when the pool is closed or full."""
        conn.park(monotonic() if now is None else now)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection was lost; drop it from the idle stack if it is there."""
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        self.closed = True
        self.max_idle = 0  # a connection coming back now is closed (see UpstreamConnection.park)
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
