"""`StaticRouter`: fixed host -> upstream address routing, for tests, benchmarks and simple use."""

from __future__ import annotations

from collections.abc import Mapping

from .interfaces import Lease, Refusal, StaticLease, Target

_CACHE_LIMIT = 4096


def normalize_host(raw: bytes | str) -> str | None:
    """Lowercase, port and one trailing dot stripped; None when empty or malformed."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    text = text.strip().lower()
    if text.startswith("["):  # IPv6 literal
        end = text.find("]")
        return text[: end + 1] if end > 0 else None
    host = text.rsplit(":", 1)[0] if ":" in text else text
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253:
        return None
    for label in host.split("."):
        if not label or len(label) > 63 or not all(c.isalnum() or c in "-_*" for c in label):
            return None
    return host


class StaticRouter:
    """Routes each host to one fixed upstream address; every lookup is a lease-cache hit.

    `routes` maps a host name (as normalize_host returns it) or "*" (any other host) to
    "host:port". Counters `acquired`, `released` and `discarded` make tests able to check that
    every lease is handed back.
    """

    def __init__(
        self,
        routes: Mapping[str, str],
        *,
        request_timeout: float = 60.0,
        ephemeral_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self._targets: dict[str, Target] = {}
        self._leases: dict[Target, StaticLease] = {}
        for host, upstream in routes.items():
            addr, _, port = upstream.rpartition(":")
            target = Target(
                app=host if host != "*" else "default",
                version=f"{host}-static",
                ephemeral=host in ephemeral_hosts,
                request_timeout=request_timeout,
            )
            self._targets[host] = target
            self._leases[target] = StaticLease(host=addr, port=int(port), key=upstream)
        self._resolved: dict[bytes | str, Target | Refusal] = {}
        self.acquired = 0
        self.released = 0
        self.discarded = 0

    def __repr__(self) -> str:
        return f"<StaticRouter routes={len(self._targets)}>"

    def resolve(self, host: bytes | str, now: float | None = None) -> Target | Refusal:
        answer = self._resolved.get(host)
        if answer is None:
            answer = self._resolve(host)
            if len(self._resolved) < _CACHE_LIMIT:
                self._resolved[host] = answer
        return answer

    def _resolve(self, raw: bytes | str) -> Target | Refusal:
        host = normalize_host(raw)
        if host is None:
            return Refusal(400, "The Host header is missing or malformed.")
        target = self._targets.get(host) or self._targets.get("*")
        if target is None:
            return Refusal(404, "No application is served at this address.")
        return target

    def cached_lease(self, target: Target) -> Lease | None:
        self.acquired += 1
        return self._leases[target]

    async def acquire(self, target: Target, local: bool = False) -> Lease:
        self.acquired += 1
        return self._leases[target]

    def release(self, lease: Lease) -> None:
        self.released += 1

    def discard(self, lease: Lease) -> None:
        self.discarded += 1
