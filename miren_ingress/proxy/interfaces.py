"""The narrow interface between the proxy engine and the routing / lease layer.

The engine never calls the store or the activator directly: it asks a `Router`, which answers
from memory (`resolve`, `cached_lease`) or, on a lease-cache miss only, awaits (`acquire`). The
one exception is deliberate: on the hit path it counts units of capacity on the running
sandboxes the router's `warm` map shows (see `Unit`), under rules the activator states.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sized
from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen(slots=True, cache_hash=True)
class Target:
    """Where a request goes. Built once per route/version by the router and cached by it: the
    engine receives the same object for every request to that version (never one per request)."""

    app: str  # app name: the `app` metric label (bounded by the number of apps)
    version: str  # version id: the scope of leases
    service: str = "web"
    ephemeral: bool = False  # responses get `X-Robots-Tag` (value from ProxyConfig.robots_tag)
    request_timeout: float = 60.0  # idle timeout on the upstream connection, seconds


@attrs.frozen(slots=True)
class Refusal:
    """A routing answer that is an error. `message` is public: it must carry no internal ids."""

    status: int  # 400 bad Host, 404 no route/version/label, 410 expired label, 503 not loaded
    message: str
    retry_after: int | None = None  # seconds; sent as Retry-After (with 503)


@attrs.define(slots=True, eq=False)
class Lease:
    """A reservation of capacity on one sandbox. Identity equality: two leases on one sandbox
    are two reservations. `token` is the router's own bookkeeping (opaque to the engine).

    The engine reads `addr`, the (host, port) tuple, on every request (its pools are keyed by
    it): a router's lease type may be any object with `addr`, `host` and `port`, ideally sharing
    one `addr` tuple between the leases on one sandbox."""

    host: str
    port: int
    key: Hashable  # identifies the sandbox
    token: object = None
    addr: tuple[str, int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.addr = (self.host, self.port)


class Queue(Protocol):
    @property
    def waiters(self) -> Sized: ...


class Unit(Protocol):
    """A running sandbox as a router's `warm` map shows it (version id -> the sandbox its
    `cached_lease` found last). The engine may count units of its capacity itself on the hit
    path (`cached_lease` and `release` written out, in Exchange.start and Exchange.finished):
    take one as `in_use += 1` while `in_use < capacity`, `not pool.waiters` and `service` is
    the target's; give one back as `in_use -= 1` while `in_use > 1` and `not pool.waiters`;
    anything else goes through `cached_lease` / `release`. A unit is a lease (it has `addr`,
    `host` and `port`). The activator states the same rules (miren_activator.activator.Held)."""

    @property
    def addr(self) -> tuple[str, int]: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def service(self) -> str: ...

    @property
    def capacity(self) -> int: ...

    @property
    def pool(self) -> Queue: ...

    in_use: int


NO_UNITS: Mapping[str, Unit] = {}  # the `warm` of a router whose leases are all Lease objects


@runtime_checkable
class Router(Protocol):
    """What the engine needs from routing and the lease cache.

    Contract:
    - `resolve` is pure, synchronous and in memory. It gets the raw `Host` header value (bytes;
      b"" when absent) and normalizes it itself (port, one trailing dot, case), and the caller's
      `time.monotonic()` when it has one (else it reads the clock itself if it needs it). It
      returns a Target or a Refusal and never raises.
    - `cached_lease` is synchronous: a cache hit counts one use on the lease and returns it; a
      miss returns None and the engine calls `acquire`.
    - `acquire` may await (cold start) and raises the typed errors of `errors.py`
      (BootFailed, ActivationTimeout, Overloaded, NotReady). It must be cancellation-safe: the
      engine cancels it when the client goes away.
    - Every lease the engine obtained is handed back exactly once: `release` when the request
      finished (whatever its outcome), or `discard` instead when connecting to its address was
      refused (drop it from the cache; the engine then calls `acquire` once more); a unit it
      took itself from `warm` goes back the same way, or by `in_use -= 1` where Unit allows.
    - `warm` maps version ids to `Unit`s the engine may count on itself (see Unit); a router
      without them has `NO_UNITS`. The map is the router's, kept current by it: the engine
      reads it on every request and never writes it.
    """

    warm: Mapping[str, Unit]

    def resolve(self, host: bytes | str, now: float | None = None) -> Target | Refusal: ...

    def cached_lease(self, target: Target) -> Lease | None: ...

    async def acquire(self, target: Target) -> Lease: ...

    def release(self, lease: Lease | Unit) -> None: ...

    def discard(self, lease: Lease | Unit) -> None: ...
