"""Durations in Go syntax (`300ms`, `1h30m`, `1.5h`, `-2m`), plus `d` for days.

Pure functions, used by the entity codec (durations travel as strings), TTL rules and config.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# ASCII digits only: `\d` would accept any Unicode digit ("٣h"), which Go rejects.
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d)")


class DurationError(ValueError):
    """The text is not a duration; the message names the input."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration string, extended with `d` (24h). A bare `0` is zero.

    Raises DurationError naming the input for anything else (empty, a bare number, an unknown unit).
    """
    if not isinstance(text, str):
        raise DurationError(f"invalid duration {text!r}: not a string")
    s = text.strip()
    orig = text
    if not s:
        raise DurationError(f'invalid duration "{orig}": empty')
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return timedelta(0)
    if not s:
        raise DurationError(f'invalid duration "{orig}"')
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            rest = s[pos:].replace(".", "", 1)
            if rest.isascii() and rest.isdigit():
                raise DurationError(f'invalid duration "{orig}": missing unit (use s, m, h or d)')
            raise DurationError(f'invalid duration "{orig}": unknown unit or syntax at "{s[pos:]}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return timedelta(seconds=sign * total)


def format_duration(value: timedelta) -> str:
    """The shortest exact Go-style string for a duration: `90s` -> `1m30s`, 0 -> `0s`."""
    us = round(value.total_seconds() * 1_000_000)
    if us == 0:
        return "0s"
    sign = "-" if us < 0 else ""
    us = abs(us)
    out = []
    for unit, size in (("h", 3_600_000_000), ("m", 60_000_000)):
        n, us = divmod(us, size)
        if n:
            out.append(f"{n}{unit}")
    if us:
        if us % 1_000_000 == 0:
            out.append(f"{us // 1_000_000}s")
        elif us % 1000 == 0 and us < 1_000_000:
            out.append(f"{us // 1000}ms")
        else:
            out.append(f"{us / 1_000_000:.6f}".rstrip("0").rstrip(".") + "s")
    return sign + "".join(out)
