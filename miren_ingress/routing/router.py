"""`EdgeRouter`: the proxy engine's Router over the route table and the activator.

Per request on the warm path this is two dict lookups and a float compare:
- `resolve(raw Host, now)` answers from a cache keyed by the raw header value. An entry holds
  the Target (or Refusal) and the instant it stops being valid: the expiry of the preview it
  serves (an expired label must stop routing at its expiry instant), compared with the engine's
  monotonic `now`, else never (then nothing is compared). The whole cache is dropped when the route table changes (its `generation` moved), so no
  entry outlives the data it was computed from. The cache is bounded (random Host values cannot
  grow it without limit).
- `cached_lease(target)` is the activator's synchronous `hold` on the target's (version id,
  service): a unit of work on a running sandbox without a Lease object (the engine hands
  every lease back exactly once, so none is needed to make a second release harmless). Leases
  are scoped by version id, so a preview and the active version never share a sandbox. It,
  `release` and `discard` are the activator's own bound methods (no wrapper frame per
  request): the capacity rule is the activator's alone (miren_activator.capacity).
- `acquire` (a miss) awaits the activator, translating its errors into the engine's, in one
  place.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from miren_activator import errors as act_errors
from miren_activator.activator import Activator
from miren_ingress.proxy import errors as proxy_errors
from miren_ingress.proxy.interfaces import Guard, Lease, Refusal, Target
from miren_ingress.routing.hosts import BadHost, normalize_host
from miren_ingress.routing.routes import COOKIE_KEY, Refused, Resolved, RouteTable

BAD_HOST = Refusal(400, "The Host header is missing or invalid.")
_INF = math.inf
_REVALIDATE = 1.0  # seconds: an expiring entry is re-resolved at least this often
_REFUSALS: dict[Refused, Refusal] = {}


def _refusal(r: Refused) -> Refusal:
    found = _REFUSALS.get(r)
    if found is None:
        found = _REFUSALS[r] = Refusal(r.status, r.message, 1 if r.status == 503 else None)
    return found


class EdgeRouter:
    # The Router's `cached_lease`, `release` and `discard`: the activator's methods, bound once
    # (see __init__).
    cached_lease: Callable[[Target], Lease | None]
    release: Callable[[Lease], None]
    discard: Callable[[Lease], None]

    def __init__(
        self,
        table: RouteTable,
        activator: Activator,
        *,
        request_timeout: float = 60.0,
        max_cached_hosts: int = 100_000,
        loading_page: str = "previews",
    ) -> None:
        self.table = table
        self.loading_page = loading_page  # the server's; an app may set its own
        self.activator = activator
        self.request_timeout = request_timeout
        self.max_cached_hosts = max_cached_hosts
        self._generation = -1
        # Answers valid until the table changes, and the others with the instant they expire.
        self._hosts: dict[bytes | str, Target | Refusal] = {}
        self._expiring: dict[bytes | str, tuple[Target | Refusal, float]] = {}
        self._targets: dict[tuple[str, str, bool], Target] = {}
        if activator is not None:  # (None: resolution only, e.g. benchmarks/resolve_bench.py)
            # A Target is the activator's VersionRef (version id, service): no wrapper frame.
            # A hit is a Held (the sandbox), handed back once by the engine.
            self.cached_lease = activator.hold
            self.release = activator.release
            self.discard = activator.report_unreachable

    def __repr__(self) -> str:
        hosts = len(self._hosts) + len(self._expiring)
        return f"<EdgeRouter hosts={hosts} targets={len(self._targets)} {self.table!r}>"

    # -- resolution -----------------------------------------------------------------------------

    def resolve(self, host: bytes | str, now: float | None = None) -> Target | Refusal:
        if self.table.generation != self._generation:
            self._hosts.clear()
            self._expiring.clear()
            self._targets.clear()
            self._generation = self.table.generation
        answer = self._hosts.get(host)
        if answer is not None:
            return answer
        entry = self._expiring.get(host)
        if entry is not None and (time.monotonic() if now is None else now) < entry[1]:
            return entry[0]
        return self._resolve_miss(host)

    def _resolve_miss(self, host: bytes | str) -> Target | Refusal:
        mono = time.monotonic()  # read first: the deadline below errs early (a re-check)
        wall = time.time()
        answer, until = self._resolve(host, wall)
        if len(self._hosts) + len(self._expiring) >= self.max_cached_hosts:
            self._hosts.clear()
            self._expiring.clear()
        if until == _INF:
            self._expiring.pop(host, None)
            self._hosts[host] = answer
        else:
            # The expiry instant is wall time; the entry keeps it as a monotonic deadline (the
            # engine passes its monotonic `now`), at most _REVALIDATE ahead, so a step of the
            # wall clock is noticed within that.
            self._expiring[host] = (answer, mono + min(until - wall, _REVALIDATE))
        return answer

    def _resolve(self, raw: bytes | str, now: float) -> tuple[Target | Refusal, float]:
        try:
            host = normalize_host(raw or None)
        except BadHost:
            return BAD_HOST, math.inf
        found = self.table.resolve(host, datetime.fromtimestamp(now, UTC))
        if isinstance(found, Refused):
            return _refusal(found), math.inf
        return self._target(found), self._valid_until(found)

    def _guard(self, r: Resolved) -> Guard | None:
        """The protection a resolved host is under (None: an app without protection, the
        common case). A public host of a protected app gets an `open` guard: it lets everyone
        in but still removes the app's credentials from requests (a CI job that sends its
        bypass token everywhere must not hand it to the public version)."""
        p = self.table.protections.get(r.app.name)
        if p is None or p.mode == "none":
            return None
        secret = self.table.secrets.get(COOKIE_KEY)
        if secret is None:
            key = b""  # no key: nobody gets in
        else:
            # Bound to what lets people in: a new password, token or mode revokes every cookie.
            what = f"{p.app}|{p.mode}|{p.password_hash}|{p.bypass_hash}".encode()
            key = hmac.new(bytes.fromhex(secret.value), what, hashlib.sha256).digest()
        is_open = p.mode == "previews" and not r.ephemeral
        return Guard(r.app.name, key, p.password_hash, p.bypass_hash, is_open)

    def _target(self, r: Resolved) -> Target:
        key = (r.version.id, r.route.host, r.ephemeral)
        target = self._targets.get(key)
        if target is None:
            timeout = r.route.request_timeout
            mode = r.app.loading_page or self.loading_page
            target = self._targets[key] = Target(
                guard=self._guard(r),
                loading=mode == "all" or (mode == "previews" and r.ephemeral),
                app=r.app.name,
                version=r.version.id,
                service=r.route.service,
                ephemeral=r.ephemeral,
                request_timeout=(
                    timeout.total_seconds() if timeout is not None else self.request_timeout
                ),
            )
        return target

    @staticmethod
    def _valid_until(r: Resolved) -> float:
        expires = r.version.ephemeral_expires_at
        if r.ephemeral and expires is not None:
            return expires.timestamp()
        return math.inf

    # -- leases ---------------------------------------------------------------------------------

    async def acquire(self, target: Target, local: bool = False) -> Lease:
        version = self.table.versions.get(target.version)
        if version is None:
            raise proxy_errors.ServiceUnavailable("This version is no longer deployed.")
        try:
            lease: Any = await self.activator.acquire(version, target.service, local=local)
        except act_errors.ActivatorError as exc:
            raise _translate(exc) from exc
        return lease  # type: ignore[no-any-return]


def _translate(exc: act_errors.ActivatorError) -> proxy_errors.ProxyError:
    if isinstance(exc, act_errors.CrashBackoff):  # before BootFailed: it is a subclass
        return proxy_errors.BootFailed(
            "The application keeps crashing; retry later.",
            retry_after=max(1, math.ceil(exc.retry_after)),
        )
    if isinstance(exc, act_errors.Unreachable):  # before BootFailed: it is a subclass
        return proxy_errors.UpstreamConnectError("The application is not answering.")
    if isinstance(exc, act_errors.BootFailed):
        return proxy_errors.BootFailed("The application failed to start.")
    if isinstance(exc, act_errors.ActivationTimeout):
        return proxy_errors.ActivationTimeout("The application did not start in time.")
    if isinstance(exc, act_errors.NotOwner):  # before Overloaded: it is a subclass
        return proxy_errors.ServiceUnavailable(
            "This node cannot serve the application right now; retry.", retry_after=1
        )
    if isinstance(exc, act_errors.Overloaded):
        return proxy_errors.Overloaded("The application is starting; too many waiting requests.")
    if isinstance(exc, act_errors.VersionRemoved):
        return proxy_errors.ServiceUnavailable("This version is no longer deployed.")
    return proxy_errors.ServiceUnavailable()
