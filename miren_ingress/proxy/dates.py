"""The `Date` value the proxy adds where a response has none (RFC 9110 6.6.1: an origin with a
clock must send one; the proxy's own answers and an app that sends none get it here).
Formatted at most once a second, not per response."""

from __future__ import annotations

import time
from email.utils import formatdate

_cache: list[object] = [-1, b""]  # [whole second, its formatted `Date: ...` line]


def date_line() -> bytes:
    """`Date: <IMF-fixdate>\\r\\n` for the current second."""
    now = int(time.time())
    if _cache[0] != now:
        _cache[1] = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        _cache[0] = now
    line = _cache[1]
    assert isinstance(line, bytes)
    return line
