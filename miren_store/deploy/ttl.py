"""Ephemeral TTLs: Go duration syntax plus `d` (days). Pure functions.

A TTL must be greater than 0 and at most the configured maximum (default 30 days). An absent TTL
(None) means the default (24 h); an empty string is an error, as is a bare number (`7`) or an
unknown unit (`1x`). `expires_at` is always the server's clock plus the TTL, never the client's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from miren_store.deploy.errors import InvalidTTL
from miren_store.durations import DurationError, format_duration, parse_duration

DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=30)


def parse_ttl(text: str, *, maximum: timedelta = MAX_TTL) -> timedelta:
    """`"90s"`, `"1h30m"`, `"1.5h"`, `"7d"` -> timedelta; InvalidTTL naming the input otherwise."""
    try:
        value = parse_duration(text)
    except DurationError as exc:
        raise InvalidTTL(f"invalid ttl {text!r}: {_reason(exc)}") from None
    except OverflowError:
        raise InvalidTTL(f"invalid ttl {text!r}: must be at most {describe_ttl(maximum)}") from None
    if value <= timedelta(0):
        raise InvalidTTL(f"invalid ttl {text!r}: must be greater than 0")
    if value > maximum:
        raise InvalidTTL(f"invalid ttl {text!r}: must be at most {describe_ttl(maximum)}")
    return value


def resolve_ttl(
    text: str | None, *, default: timedelta = DEFAULT_TTL, maximum: timedelta = MAX_TTL
) -> tuple[timedelta, str]:
    """The TTL of a request and the string to store in `ephemeral_ttl` (None: the default)."""
    if text is None:
        return default, describe_ttl(default)
    return parse_ttl(text, maximum=maximum), text.strip()


def describe_ttl(value: timedelta) -> str:
    """A duration as its user would write it: 2 days or more in whole days as `30d`, else Go
    style (`24h`, `1h30m`)."""
    if value >= timedelta(days=2) and value % timedelta(days=1) == timedelta(0):
        return f"{value // timedelta(days=1)}d"
    return format_duration(value)


def _reason(exc: DurationError) -> str:
    # DurationError's text is `invalid duration "<input>": <reason>`; keep only the reason,
    # the caller names the input already.
    text = str(exc)
    _, sep, reason = text.partition('": ')
    return reason if sep else "not a duration (use e.g. 90s, 1h30m or 7d)"


def expiry(start: datetime, ttl: timedelta) -> datetime:
    """When a preview made at `start` with `ttl` expires: rounded up to a whole second, so the
    time the API and the CLI show (whole seconds) is the instant it expires, never after it."""
    end = start + ttl
    if end.microsecond:
        end = end.replace(microsecond=0) + timedelta(seconds=1)
    return end
