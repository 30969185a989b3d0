"""Read the server name and ALPN protocols a TLS client asks for, from its first bytes.

The HTTPS listener peeks at a new connection's ClientHello *before* the handshake starts, so it
can obtain a certificate for the name first (an on-demand ACME order is awaited, which a
synchronous SNI callback cannot do), then let the TLS layer read the same bytes from the socket.
Pure: bytes in, a verdict out (`Hello`, `NEED_MORE`, or `NotHello` with why).

Layout (RFC 8446 §4.1.2, §5.1; RFC 6066 §3 server_name; RFC 7301 ALPN): records of type 22
(handshake) carry a handshake message of type 1 (ClientHello) that may span records; after the
version, random, session id, cipher suites and compression methods come the extensions.
"""

from __future__ import annotations

import ipaddress

import attrs

MAX_HELLO = 16384 + 5  # one full record; a ClientHello longer than that is refused
MAX_RECORDS = 4  # a real ClientHello spans one record, rarely two: more is an attack
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16


@attrs.frozen
class Hello:
    server_name: str | None  # lowercase, no trailing dot; None when the client sent none
    alpn: tuple[str, ...]


@attrs.frozen
class NotHello:
    reason: str


NEED_MORE = object()  # the bytes so far are a valid prefix: read more


class _Short(Exception):
    pass


class _Bad(Exception):
    pass


def parse(data: bytes) -> Hello | NotHello | object:
    """The ClientHello in `data` (the connection's first bytes), `NEED_MORE`, or `NotHello`."""
    try:
        message = _handshake_message(data)
        return _client_hello(message)
    except _Short:
        if len(data) >= MAX_HELLO:
            return NotHello("ClientHello longer than one record")
        return NEED_MORE
    except _Bad as exc:
        return NotHello(str(exc))


def _handshake_message(data: bytes) -> bytes:
    """The first handshake message, joined from as many records as it spans."""
    parts: list[bytes] = []
    size = 0
    pos = 0
    need: int | None = None
    while need is None or size < need:
        if len(parts) >= MAX_RECORDS:
            raise _Bad("ClientHello spread over too many records")
        if len(data) < pos + 5:
            raise _Short
        if data[pos] != _HANDSHAKE:
            raise _Bad("not a TLS handshake record")
        if data[pos + 1] != 3:
            raise _Bad("not a TLS record version")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384:
            raise _Bad("bad TLS record length")
        if len(data) < pos + 5 + length:
            raise _Short
        parts.append(data[pos + 5 : pos + 5 + length])
        size += length
        pos += 5 + length
        if need is None and size >= 4:
            body = b"".join(parts)
            if body[0] != _CLIENT_HELLO:
                raise _Bad("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > MAX_HELLO:
                raise _Bad("ClientHello longer than one record")
    assert need is not None
    return b"".join(parts)[4:need]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Bad("truncated ClientHello")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    def done(self) -> bool:
        return self.pos >= len(self.data)


def _client_hello(message: bytes) -> Hello:
    r = _Reader(message)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    name: str | None = None
    alpn: tuple[str, ...] = ()
    if r.done():
        return Hello(None, ())
    extensions = _Reader(r.vector(2))
    while not extensions.done():
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind == _EXT_SERVER_NAME:
            name = _server_name(data)
        elif kind == _EXT_ALPN:
            alpn = _alpn(data)
    return Hello(name, alpn)


def _server_name(data: bytes) -> str | None:
    names = _Reader(_Reader(data).vector(2))
    while not names.done():
        kind = names.number(1)
        value = names.vector(2)
        if kind == 0:  # host_name
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                raise _Bad("server name is not ASCII") from None
            text = text.lower().rstrip(".")
            if not text or len(text) > 253:
                raise _Bad("bad server name")
            return text
    return None


def _alpn(data: bytes) -> tuple[str, ...]:
    protocols = _Reader(_Reader(data).vector(2))
    out: list[str] = []
    while not protocols.done():
        out.append(protocols.vector(1).decode("ascii", errors="replace"))
    return tuple(out)


def is_ip_literal(name: str) -> bool:
    """An address where a host name belongs (RFC 6066 forbids it in SNI; some clients send it)."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
