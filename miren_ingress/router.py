"""`EdgeRouter`: the proxy engine's Router over the route table and the activator.

Per request on the warm path this is two dict lookups and a float compare:
- `resolve(raw Host)` answers from a cache keyed by the raw header value. An entry holds the
  Target (or Refusal) and the instant it stops being valid: the expiry of the preview it serves
  (an expired label must stop routing at its expiry instant), else never. The whole cache is
  dropped when the route table changes (its `generation` moved), so no entry outlives the data it
  was computed from. The cache is bounded (random Host values cannot grow it without limit).
- `cached_lease(target)` is the activator's synchronous `try_acquire` on (version id, service):
  leases are scoped by version id, so a preview and the active version never share a sandbox.
- `acquire` (a miss) awaits the activator, translating its errors into the engine's, in one
  place.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from miren_activator import errors as act_errors
from miren_activator.activator import Activator
from miren_ingress.hosts import BadHost, normalize_host
from miren_ingress.proxy import errors as proxy_errors
from miren_ingress.proxy.interfaces import Lease, Refusal, Target
from miren_ingress.routes import Refused, Resolved, RouteTable

BAD_HOST = Refusal(400, "The Host header is missing or invalid.")
_REFUSALS: dict[Refused, Refusal] = {}


def _refusal(r: Refused) -> Refusal:
    found = _REFUSALS.get(r)
    if found is None:
        found = _REFUSALS[r] = Refusal(r.status, r.message, 1 if r.status == 503 else None)
    return found


class EdgeRouter:
    def __init__(
        self,
        table: RouteTable,
        activator: Activator,
        *,
        request_timeout: float = 60.0,
        max_cached_hosts: int = 100_000,
    ) -> None:
        self.table = table
        self.activator = activator
        self.request_timeout = request_timeout
        self.max_cached_hosts = max_cached_hosts
        self._generation = -1
        self._hosts: dict[bytes | str, tuple[Target | Refusal, float]] = {}
        self._targets: dict[tuple[str, str, bool], Target] = {}

    def __repr__(self) -> str:
        return f"<EdgeRouter hosts={len(self._hosts)} targets={len(self._targets)} {self.table!r}>"

    # -- resolution -----------------------------------------------------------------------------

    def resolve(self, host: bytes | str) -> Target | Refusal:
        if self.table.generation != self._generation:
            self._hosts.clear()
            self._targets.clear()
            self._generation = self.table.generation
        entry = self._hosts.get(host)
        now = time.time()
        if entry is not None and now < entry[1]:
            return entry[0]
        answer, until = self._resolve(host, now)
        if len(self._hosts) >= self.max_cached_hosts:
            self._hosts.clear()
        self._hosts[host] = (answer, until)
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

    def _target(self, r: Resolved) -> Target:
        key = (r.version.id, r.route.host, r.ephemeral)
        target = self._targets.get(key)
        if target is None:
            timeout = r.route.request_timeout
            target = self._targets[key] = Target(
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

    def cached_lease(self, target: Target) -> Lease | None:
        lease: Any = self.activator.try_acquire(target.version, target.service)
        return lease  # type: ignore[no-any-return]

    async def acquire(self, target: Target) -> Lease:
        version = self.table.versions.get(target.version)
        if version is None:
            raise proxy_errors.ServiceUnavailable("This version is no longer deployed.")
        try:
            lease: Any = await self.activator.acquire(version, target.service)
        except act_errors.ActivatorError as exc:
            raise _translate(exc) from exc
        return lease  # type: ignore[no-any-return]

    def release(self, lease: Lease) -> None:
        self.activator.release(lease)  # type: ignore[arg-type]

    def discard(self, lease: Lease) -> None:
        self.activator.report_unreachable(lease)  # type: ignore[arg-type]


def _translate(exc: act_errors.ActivatorError) -> proxy_errors.ProxyError:
    if isinstance(exc, act_errors.BootFailed):
        return proxy_errors.BootFailed("The application failed to start.")
    if isinstance(exc, act_errors.ActivationTimeout):
        return proxy_errors.ActivationTimeout("The application did not start in time.")
    if isinstance(exc, act_errors.Overloaded):
        return proxy_errors.Overloaded("The application is starting; too many waiting requests.")
    if isinstance(exc, act_errors.VersionRemoved):
        return proxy_errors.ServiceUnavailable("This version is no longer deployed.")
    return proxy_errors.ServiceUnavailable()
