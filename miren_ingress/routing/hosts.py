"""Host header normalisation: pure, no I/O.

A Host value becomes a lowercase name without port and without one trailing dot, or is refused:
empty, non-ASCII, characters outside letters/digits/`-`/`.`, an empty label, a label over 63
characters or over 253 characters in all. IPv4 literals pass as names; IPv6 literals keep their
brackets (`[::1]`) and never match a route with a dot-separated lookup.
"""

from __future__ import annotations

import re

_NAME = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_IPV6 = re.compile(r"\[[0-9a-f:.]{2,45}(?:%25[0-9a-z._~-]+)?\]")
_PORT = re.compile(r"[0-9]{1,5}")

MAX_HOST = 253


def _valid_port(text: str) -> bool:
    return _PORT.fullmatch(text) is not None and int(text) <= 65535


class BadHost(ValueError):
    """The Host header cannot name anything we serve (answered with 400)."""


def normalize_host(raw: str | bytes | None) -> str:
    """`FEAT-X.App.example.com.:8080` -> `feat-x.app.example.com`; raises BadHost."""
    if raw is None:
        raise BadHost("missing Host header")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise BadHost("Host header is not ASCII") from None
    else:
        text = raw
        if not text.isascii():
            raise BadHost("Host header is not ASCII")
    text = text.strip(" \t").lower()
    if not text:
        raise BadHost("empty Host header")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadHost("malformed IPv6 literal in Host header")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not (rest[0] == ":" and (rest == ":" or _valid_port(rest[1:]))):
            raise BadHost("malformed port in Host header")
        if not _IPV6.fullmatch(host):
            raise BadHost("malformed IPv6 literal in Host header")
        return host
    host, sep, port = text.rpartition(":")
    if sep:
        # RFC 3986 allows an empty port ("host:"); a given one must be a real port number.
        if port and not _valid_port(port):
            raise BadHost("malformed port in Host header")
    else:
        host = text
    if host.endswith("."):
        host = host[:-1]
    if len(host) > MAX_HOST:
        raise BadHost(f"Host name longer than {MAX_HOST} characters")
    if not _NAME.fullmatch(host):
        raise BadHost("Host header is not a valid host name")
    return host


def split_first_label(host: str) -> tuple[str, str] | None:
    """`a.b.c` -> (`a`, `b.c`); None when there is no dot (or the host is an IPv6 literal)."""
    i = host.find(".")
    if i <= 0 or host.startswith("["):
        return None
    return host[:i], host[i + 1 :]


def wildcard_for(host: str) -> str | None:
    """The wildcard route key that would cover `host`: `a.b.c` -> `*.b.c` (base needs a dot)."""
    parts = split_first_label(host)
    if parts is None or "." not in parts[1]:
        return None
    return "*." + parts[1]


def validate_route_host(raw: str) -> str:
    """A route's host: lowercase, exact (`app.example.com`) or `*.<base>` where base has a dot.

    Returns the stored form; raises BadHost with a message naming the input.
    """
    if not isinstance(raw, str) or not raw:
        raise BadHost("route host must be a non-empty string")
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    base = host[2:] if host.startswith("*.") else host
    if "*" in base:
        raise BadHost(f"route host {raw!r}: '*' is only allowed as the whole first label ('*.')")
    if host.startswith("*.") and "." not in base:
        raise BadHost(
            f"route host {raw!r}: a wildcard needs a base with a dot (like *.example.com)"
        )
    if len(host) > MAX_HOST or not base.isascii() or not _NAME.fullmatch(base):
        raise BadHost(f"route host {raw!r} is not a valid host name (no port, no scheme)")
    return host
