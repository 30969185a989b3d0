"""Header classification for both directions.

Headers are kept as raw bytes (as httptools reports them). Each header name is classified once
per distinct spelling and the answer is cached, so the per-header cost on the hot path is one dict
lookup and no lower-casing.
"""

from __future__ import annotations

# Kinds of header. ORDINARY headers are forwarded verbatim; every other kind is handled by code.
# The hot paths compare kinds with literals (a module constant is a global lookup): keep the
# values of ORDINARY (0), HOST (2), CONNECTION (5) and CONTENT_LENGTH (6) as they are.
ORDINARY = 0
HOP = 1  # hop-by-hop: never forwarded
HOST = 2  # forwarded; also the routing key and X-Forwarded-Host
FORWARDED_SET = 3  # X-Forwarded-Proto / -Host: replaced by the engine's value
EXPECT = 4  # forwarded; a request with it is not buffered (its client waits for a 100)
CONNECTION = 5  # hop-by-hop, and names more hop-by-hop headers
CONTENT_LENGTH = 6  # framing: re-emitted by the engine
TRANSFER_ENCODING = 7  # framing: re-emitted by the engine
UPGRADE = 8  # hop-by-hop except on an upgrade request / 101 response
FORWARDED_FOR = 9  # appended to
DATE = 10  # (responses) forwarded; the proxy adds one where it is missing
INTERNAL_HOP = 11  # X-Miren-Hop: another node forwarded this request (never forwarded itself)


_COMMON = {
    b"connection": CONNECTION,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"trailers": HOP,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"proxy-authorization": HOP,
    b"proxy-authenticate": HOP,
    b"http2-settings": HOP,  # only meaningful with `Upgrade: h2c`, which is never forwarded
    b"content-length": CONTENT_LENGTH,
}
_REQUEST = {
    **_COMMON,
    b"host": HOST,
    b"x-forwarded-for": FORWARDED_FOR,
    b"x-forwarded-proto": FORWARDED_SET,
    b"x-forwarded-host": FORWARDED_SET,
    b"expect": EXPECT,
    b"x-miren-hop": INTERNAL_HOP,
}
_RESPONSE = {**_COMMON, b"date": DATE}

_CACHE_LIMIT = 4096  # distinct spellings remembered; beyond it names are classified uncached


class NameTable:
    """Raw header name -> kind, memoized per spelling (bounded). `ordinary` holds the memoized
    spellings of ORDINARY names: `name in table.ordinary` is the hot paths' cheapest test.

    With `drop_underscores`, a name containing `_` is HOP (dropped), as nginx does by default:
    an application that normalises names (`X_Forwarded_For` -> `X-Forwarded-For`, as CGI-style
    frameworks do) would otherwise take a client's value for one the proxy sets."""

    __slots__ = ("_table", "_underscores", "cache", "ordinary")

    def __init__(self, table: dict[bytes, int], *, drop_underscores: bool = False) -> None:
        self._table = table
        self._underscores = drop_underscores
        self.cache: dict[bytes, int] = {}
        self.ordinary: set[bytes] = set()

    def kind(self, name: bytes) -> int:
        kind = self.cache.get(name)
        if kind is None:
            if self._underscores and b"_" in name:
                kind = HOP
            else:
                kind = self._table.get(name.lower(), ORDINARY)
            if len(self.cache) < _CACHE_LIMIT:
                self.cache[name] = kind
                if kind == ORDINARY:
                    self.ordinary.add(name)
        return kind


REQUEST_NAMES = NameTable(_REQUEST, drop_underscores=True)
RESPONSE_NAMES = NameTable(_RESPONSE)

# Connection tokens that name nothing beyond what is dropped anyway.
_PLAIN_CONNECTION_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade", b""))
# Fields a Connection option can never remove: the routing key and the framing, which the engine
# decides and writes itself (`Connection: Host` would otherwise strip Host upstream, and
# `Connection: Content-Length` a response's framing towards the client).
PROTECTED = frozenset((b"host", b"content-length", b"transfer-encoding"))


_connection_cache: dict[bytes, tuple[frozenset[bytes], bool]] = {}


def connection_tokens(value: bytes) -> tuple[frozenset[bytes], bool]:
    """Parse a Connection value: (extra lowercased header names to drop, has 'upgrade').
    Memoized: clients and servers send the same few values over and over."""
    parsed = _connection_cache.get(value)
    if parsed is None:
        parsed = _parse_connection(value)
        if len(_connection_cache) < _CACHE_LIMIT:
            _connection_cache[value] = parsed
    return parsed


def _parse_connection(value: bytes) -> tuple[frozenset[bytes], bool]:
    extra: set[bytes] = set()
    upgrade = False
    for raw in value.split(b","):
        token = raw.strip().lower()
        if token == b"upgrade":
            upgrade = True
        elif token not in _PLAIN_CONNECTION_TOKENS and token not in PROTECTED:
            extra.add(token)
    return frozenset(extra), upgrade


def drop_named(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """Remove rendered header lines (`Name: value\\r\\n`) whose name is in `names` (lowercase)."""
    return [line for line in lines if line.split(b":", 1)[0].lower() not in names]


def accept_of(head: bytes) -> bytes:
    """The Accept value of a rendered request head (`Name: value\r\n` lines after the request
    line): several Accept lines are joined with ","; b"" when there is none."""
    low = head.lower()
    values = []
    pos = low.find(b"\r\naccept:")
    while pos >= 0:
        start = pos + 9
        end = head.find(b"\r\n", start)
        values.append(head[start:end].strip())
        pos = low.find(b"\r\naccept:", end)
    return b",".join(values)


def upgrade_protocols(value: bytes) -> bytes | None:
    """An `Upgrade` request value with `h2c` removed (None when nothing is left). The proxy
    never forwards an upgrade to cleartext HTTP/2: a 101 would hand the client an HTTP/2
    connection to the app that bypasses the proxy's per-request rules (h2c smuggling)."""
    kept = [p.strip() for p in value.split(b",") if p.strip() and p.strip().lower() != b"h2c"]
    return b", ".join(kept) if kept else None


def is_chunked_only(value: bytes) -> bool:
    """Transfer-Encoding accepted from clients: exactly one coding, `chunked`."""
    return value.strip().lower() == b"chunked"
