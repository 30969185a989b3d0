"""Absolute-form request targets (RFC 9112 3.2.2): pure, no I/O.

`GET http://app.example.com/x?y HTTP/1.1` names its authority in the target; a server must
accept it, and the authority wins over `Host`. The proxy routes by that authority and forwards
the request in origin-form (`/x?y`) with `Host: app.example.com`, as a client would have sent it
to the origin. Only `http` and `https` targets are accepted (case-insensitively); an authority
with userinfo (`user@host`), an empty one, or characters outside a host and port is refused.
"""

from __future__ import annotations

import re

_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")


def absolute_target(url: bytes) -> tuple[bytes, bytes] | None:
    """(authority, origin-form target) of an absolute-form target, or None when it is not
    one this proxy accepts."""
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not authority or _AUTHORITY.fullmatch(authority) is None:
        return None
    if path.startswith(b"#"):
        path = b""
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path
