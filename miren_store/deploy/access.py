"""Access info: the concrete URLs a deploy answer lists. Pure functions.

For an ephemeral version with label L, each route of its app gives one hostname, resolved here on
the server so no client ever prefixes again (reference R-1):
- a plain host `h`       -> `L.h`   (the ingress strips the first label and finds route `h`);
- a wildcard `*.b`       -> `L.b`   (the ingress matches `*.b` with label L).
A route whose host is not a usable name (empty, a placeholder) gives nothing, whether or not it is
the default route: being the catch-all never produces a hostname. Only when no route gives a
hostname and a cluster hostname is configured is `L.<cluster hostname>` listed (one line, never in
addition to route hostnames: R-17). Hostnames are deduplicated and keep the routes' order.

For an active (normal) version the plain route hosts are listed as they are; wildcard routes
name no single host and give nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from miren_store.entities import HttpRoute

_NAME = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
MAX_HOST = 253


def route_hostname(route: HttpRoute, label: str | None) -> str | None:
    """The hostname `route` gives for `label` (None: the active version), or None."""
    host = route.host.lower()
    wildcard = host.startswith("*.")
    base = host[2:] if wildcard else host
    if not _NAME.fullmatch(base) or (wildcard and "." not in base):
        return None
    if label is None:
        return None if wildcard else host
    name = f"{label}.{base}"
    return name if len(name) <= MAX_HOST else None


def access_hostnames(
    routes: Iterable[HttpRoute], label: str | None, *, cluster_hostname: str | None = None
) -> list[str]:
    """The hostnames that reach the version (see the module docstring)."""
    out: list[str] = []
    for route in routes:
        name = route_hostname(route, label)
        if name is not None and name not in out:
            out.append(name)
    if not out and label is not None and cluster_hostname:
        fallback = f"{label}.{cluster_hostname.lower().rstrip('.')}"
        if _NAME.fullmatch(fallback) and len(fallback) <= MAX_HOST:
            out.append(fallback)
    return out


def access_urls(
    routes: Iterable[HttpRoute],
    label: str | None,
    *,
    cluster_hostname: str | None = None,
    scheme: str = "https",
    port: int | None = None,
) -> list[str]:
    """`access_hostnames` as URLs: `https://L.app.example.com` (`:port` only when given)."""
    suffix = f":{port}" if port is not None else ""
    return [
        f"{scheme}://{name}{suffix}"
        for name in access_hostnames(routes, label, cluster_hostname=cluster_hostname)
    ]
