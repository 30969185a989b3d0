"""Sockets-free pieces for testing (and measuring) the proxy engine, shipped with it.

- `FakeTransport`: what the protocols see of a socket: it records what is written, whether
  reading is paused, and how it was closed. Writing to an aborted one raises RuntimeError, as
  uvloop does for a lost connection.
- `Bench`: an Engine over a Router with its protocols on fake transports: `client()` opens a
  client connection, `park(lease)` an idle upstream connection for a lease's address. Bytes
  go in with the protocols' own `data_received`, and come out in the transports. Hit-path
  writes go out at once (`busy_gap` 0) unless a test sets it.
- `CheckedExchange` and `checked_exchanges()`: an Exchange whose every state store is checked
  against `states.EXCHANGE` (the hit path stores its moves directly: see states.py).

Nothing here opens a socket or runs the event loop: the engine only schedules timers on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from . import inbound as inbound_module
from .config import ProxyConfig
from .engine import Engine, default_health
from .exchange import Exchange
from .hotpath import HOT_PATH
from .inbound import InboundConnection
from .interfaces import Lease, Router
from .metrics import ProxyMetrics
from .states import EXCHANGE, Ex
from .upstream import UpstreamConnection


class FakeTransport:
    """A transport without a socket (see the module docstring)."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 5555), *, record: bool = True):
        self.peer = peer
        self.record = record  # keep the written bytes (a benchmark only counts them)
        self.chunks: list[bytes] = []
        self.writes = 0
        self.reading = True
        self.closed = False  # close() was called: what is written still goes out
        self.aborted = False  # abort() was called, or the peer is gone
        self.eof_written = False
        self.limits = (0, 0)

    @property
    def data(self) -> bytes:
        """Everything written so far."""
        return b"".join(self.chunks)

    def take(self) -> bytes:
        """Everything written since the last take."""
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def write(self, data: bytes) -> None:
        if self.aborted:
            raise RuntimeError("unable to perform operation on a closed transport")
        self.writes += 1
        if self.record:
            self.chunks.append(bytes(data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high or 0, low or 0)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class Bench:
    """An Engine over `router` whose connections run on fake transports."""

    def __init__(
        self,
        router: Router,
        config: ProxyConfig | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        loop = loop if loop is not None else asyncio.get_running_loop()
        self.metrics = ProxyMetrics(CollectorRegistry(), lambda: float(self.engine.in_flight))
        self.engine = Engine(router, config or ProxyConfig(), self.metrics, default_health, loop)
        self.engine.busy_gap = 0.0  # hit-path writes at once (see engine.py, "Writes")

    def client(
        self, peer: tuple[str, int] = ("127.0.0.1", 5555), *, record: bool = True
    ) -> tuple[InboundConnection, FakeTransport]:
        """A new client connection and its transport."""
        transport = FakeTransport(peer, record=record)
        conn = InboundConnection(self.engine)
        conn.connection_made(transport)  # type: ignore[arg-type]  # (a transport in all it uses)
        return conn, transport

    def park(
        self, lease: Lease, *, record: bool = True
    ) -> tuple[UpstreamConnection, FakeTransport]:
        """An open upstream connection to the lease's address, idle in its pool."""
        pool = self.engine.pool_for(lease)
        transport = FakeTransport((lease.host, lease.port), record=record)
        conn = UpstreamConnection(pool, self.engine)
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool.put(conn)
        return conn, transport


_SUCCESSORS: dict[Ex, frozenset[Ex]] = {
    state: frozenset(new for (old, _), new in EXCHANGE.items() if old is state) for state in Ex
}


class CheckedExchange(Exchange):
    """An Exchange whose state stores are checked against the table: a store is legal when
    some event of `states.EXCHANGE` makes that move (the first one must be WAITING)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            old = self.__dict__.get("state")
            if old is None:
                if value is not Ex.WAITING:
                    raise AssertionError(f"an exchange starts WAITING, not {value!r}")
            elif value not in _SUCCESSORS[old]:
                raise AssertionError(f"illegal exchange move {old.name} -> {value.name}")
        object.__setattr__(self, name, value)


@contextlib.contextmanager
def checked_exchanges() -> Iterator[None]:
    """Within it, client connections create CheckedExchanges; with the hot path compiled,
    nothing (compiled code builds its Exchange natively, and a Python class cannot derive
    from it): tests/test_hot_path.py runs the proxy tests on the sources too, checked."""
    if HOT_PATH.compiled:
        yield
        return
    names = vars(inbound_module)  # (the name InboundConnection creates exchanges by)
    original = names["Exchange"]
    names["Exchange"] = CheckedExchange
    try:
        yield
    finally:
        names["Exchange"] = original
