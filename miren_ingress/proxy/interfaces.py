"""The narrow interface between the proxy engine and the routing / lease layer.

The engine never calls the store or the activator directly: it asks a `Router`, which answers
from memory (`resolve`, `cached_lease`) or, on a lease-cache miss only, awaits (`acquire`). How
work is counted on a sandbox (the capacity rule) is the router's, that is the activator's, alone:
the engine takes every lease through `cached_lease` / `acquire` and gives it back through
`release` / `discard`.
"""

from __future__ import annotations

from collections.abc import Hashable
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
    guard: Guard | None = None  # protected (see guard.py): None, the common case, costs nothing
    loading: bool = False  # a browser navigation waiting on a cold start gets the loading page


@attrs.frozen(slots=True)
class Guard:
    """What a protected target checks: a cookie signed with `key`, the bypass token's SHA-256,
    the password's scrypt hash (for the login form)."""

    app: str
    key: bytes = attrs.field(repr=False)
    password_hash: str = attrs.field(repr=False)
    bypass_hash: str = attrs.field(repr=False)
    open: bool = False  # everyone may pass: only the credentials are removed


UNROUTED = Target(app="unknown", version="")  # an exchange's target before it is routed


@attrs.frozen(slots=True)
class Refusal:
    """A routing answer that is an error. `message` is public: it must carry no internal ids."""

    status: int  # 400 bad Host, 404 no route/version/label, 410 expired label, 503 not loaded
    message: str
    retry_after: int | None = None  # seconds; sent as Retry-After (with 503)


class Lease(Protocol):
    """A reservation of work on one sandbox: where to send one request. The engine reads
    `addr`, the (host, port) tuple, on every request (its pools are keyed by it): a router's
    lease may be any object with `addr`, `host` and `port`, ideally sharing one `addr` tuple
    between the leases on one sandbox. Identity matters: two leases on one sandbox are two
    reservations."""

    @property
    def addr(self) -> tuple[str, int]: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


@attrs.define(slots=True, eq=False)
class StaticLease:
    """A Lease on a fixed address (StaticRouter, tests). `key` identifies the upstream."""

    host: str
    port: int
    key: Hashable
    addr: tuple[str, int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.addr = (self.host, self.port)


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
    - `acquire(target, local=True)`: the request came from another node of the cluster (an
      internal hop); the lease must be on this node (never forwarded twice).
    - Every lease the engine obtained is handed back exactly once: `release` when the request
      finished (whatever its outcome, a tunnel when it closed), or `discard` instead when
      connecting to its address failed (the engine then calls `acquire` once more).
    """

    def resolve(self, host: bytes | str, now: float | None = None) -> Target | Refusal: ...

    def cached_lease(self, target: Target) -> Lease | None: ...

    async def acquire(self, target: Target, local: bool = False) -> Lease: ...

    def release(self, lease: Lease) -> None: ...

    def discard(self, lease: Lease) -> None: ...
