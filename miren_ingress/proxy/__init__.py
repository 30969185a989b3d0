"""The ingress hot path: an HTTP/1.1 reverse proxy on asyncio protocols and httptools.

See engine.py for the theory of operation. Public API:
- `ProxyServer`, `ProxyConfig`, `freeze_gc`
- the router interface: `Router`, `Target`, `Refusal`, `Lease` (`StaticLease`);
  `StaticRouter`
- typed errors in `errors`.
"""

from __future__ import annotations

# First: decides whether the hot modules load compiled or from their sources (see hotpath.py).
from .hotpath import HOT_PATH

# isort: split
from .config import ProxyConfig
from .engine import HealthCheck
from .errors import (
    ActivationTimeout,
    BadGateway,
    BadRequest,
    BootFailed,
    GatewayTimeout,
    NotReady,
    Overloaded,
    ProxyError,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from .interfaces import Lease, Refusal, Router, StaticLease, Target
from .server import ProxyServer, freeze_gc
from .static import StaticRouter, normalize_host

__all__ = [
    "HOT_PATH",
    "ActivationTimeout",
    "BadGateway",
    "BadRequest",
    "BootFailed",
    "GatewayTimeout",
    "HealthCheck",
    "Lease",
    "NotReady",
    "Overloaded",
    "ProxyConfig",
    "ProxyError",
    "ProxyServer",
    "Refusal",
    "Router",
    "ServiceUnavailable",
    "StaticLease",
    "StaticRouter",
    "Target",
    "UpstreamConnectError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTimeout",
    "freeze_gc",
    "normalize_host",
]
