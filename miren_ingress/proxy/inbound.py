"""One client connection: parses requests with httptools and runs their exchanges in order.

Invariants:
- at most one exchange is active; later (pipelined) requests wait in `_queue` and reading from
  the client is paused while any wait, so at most one read's worth of them is buffered;
- request bytes reach the upstream only after the segment that carried them parsed cleanly:
  a malformed request is answered 400, the connection is closed, and no byte of that segment is
  forwarded (an upstream connection that got earlier parts of the request is aborted);
- reading from the client is paused while any reason in `_blocked` holds (upstream write buffer
  full, pipelined requests waiting, request bytes piling up with no upstream attached yet);
- the connection timer fires at most every min(header_timeout, keepalive_timeout) seconds and
  checks the deadline of the current state; state changes only store a deadline (a body deadline
  earlier than the armed timer re-arms it);
- a request body must keep arriving: while its bytes are read (not while reading is paused on
  our side) each read moves `_body_deadline` to body_timeout ahead; past it the request is
  answered 408 (or, with its response under way, the connection closes), its upstream connection
  is aborted and its lease handed back. A FIN before the body is complete is answered 400;
- request buffering: an exchange whose body is `buffered` is started (routed, given a lease and an
  upstream connection) only once its body is complete or request_buffer bytes of it are held, so a
  client that stalls a small body holds no sandbox capacity. Bodies longer than that stream, and a
  request with `Expect` is not buffered (its client waits for the upstream's 100 Continue);
- size limits (max_header_bytes, max_request_line) hold exactly without counting every header:
  a head lies within the read that completed it and the earlier reads of it (`_head_raw`), so
  when those are smaller than both limits it is within them, and only then is it measured
  (`_check_head`: forwarded lines from `_lines`, the others counted in `_head_bytes`);
- the common request (see on_headers_complete) needs no `_rare` field: those are reset lazily,
  after a message that set one;
- a request without a body is complete with its head (`request_complete` set then), so
  `_parsing` (the exchange whose body is being parsed) is only set for the others.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from . import headers as h
from .errors import (
    BadRequest,
    HeaderFieldsTooLarge,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
    UriTooLong,
)
from .exchange import (
    F_BODY,
    F_CHUNKED,
    F_HEAD,
    F_HTTP10,
    F_KEEP_ALIVE,
    F_UPGRADE,
    Exchange,
    special_flags,
)
from .states import INPUT, LIFE, Ex, Input, InputEvent, Life, LifeEvent, move
from .target import absolute_target

if TYPE_CHECKING:
    from .engine import Engine
    from .upstream import UpstreamConnection

# (Final: compiled, each is a C constant, not a lookup in the module's dict per use.)
_INF: Final = float("inf")
OPEN: Final = Life.OPEN
STOPPING: Final = Life.STOPPING
LINGERING: Final = Life.LINGERING
CLOSING: Final = Life.CLOSING
CLOSED: Final = Life.CLOSED
PARSE: Final = Input.PARSE
UPGRADE_BODY: Final = Input.UPGRADE_BODY
HOLD: Final = Input.HOLD
TUNNEL: Final = Input.TUNNEL
DISCARD: Final = Input.DISCARD
WAITING: Final = Ex.WAITING
ROUTING: Final = Ex.ROUTING
RESPONDING: Final = Ex.RESPONDING
EX_TUNNEL: Final = Ex.TUNNEL
# Reasons to pause reading from the client (bits of `_blocked`).
_BLOCK_UPSTREAM: Final = 1  # the upstream's write buffer is above its high-water mark
_BLOCK_PIPELINE: Final = 2  # a pipelined request waits for the active one
_BLOCK_BUFFER: Final = 4  # request bytes pile up while no upstream connection is attached
_BLOCK_CLOSED: Final = 8  # the connection is closing
_BLOCK_UPGRADE: Final = 16  # an upgrade request waits for its answer (RFC 9931: nothing forwarded)
_BLOCK_DONE: Final = 32  # a malformed request was seen: nothing more is read
_READ_SLACK: Final = 256 * 1024  # uvloop reads at most this much at once
LINGER_IDLE = 5.0  # seconds: a lingering close ends when the client sends nothing this long...
LINGER_MAX = 30.0  # ... or this long after it began
# A read longer than this, outside a request body, is parsed in slices of it, so a head with
# thousands of tiny header fields is refused after one slice, not after all its callbacks.
_SLICE: Final = 8 * 1024


_ORDINARY: Final = h.REQUEST_NAMES.ordinary  # spellings known to be ordinary (read directly: hot)
_HOST_NAME: Final = frozenset((b"host",))


class _Reject(Exception):
    """Raised inside a parser callback after `_reject_with` was set."""


def _is_http09_line(data: bytes) -> bool:
    """True when the last complete line of `data` is a request line without an HTTP version
    (`GET /`, an HTTP/0.9 request): llhttp would wait for a header section that never comes.
    (A header line has a colon; a request line of HTTP/1.x ends with its version.)"""
    end = data.rfind(b"\n")
    if end < 0:
        return False
    line = data[data.rfind(b"\n", 0, end) + 1 : end].rstrip(b"\r")
    method, sp, target = line.partition(b" ")
    return (
        bool(sp)
        and method.isalpha()
        and method.isupper()
        and b":" not in method
        and b" " not in target
        and bool(target)
    )


class InboundConnection(asyncio.Protocol):
    transport: asyncio.Transport  # set by connection_made, before any other callback

    __slots__ = (
        "_active",
        "_advancing",
        "_body_deadline",
        "_body_left",
        "_body_timeout",
        "_cl",
        "_conn_extra",
        "_expect",
        "_fwd",
        "_fwd_set",
        "_head_bytes",
        "_head_check",
        "_head_count",
        "_head_deadline",
        "_head_raw",
        "_held",
        "_hop",
        "_host",
        "_idle_deadline",
        "_keepalive",
        "_lines",
        "_linger_until",
        "_max_headers",
        "_parser",
        "_parsing",
        "_queue",
        "_rare",
        "_refused",
        "_reject_with",
        "_request_buffer",
        "_seg",
        "_te",
        "_tick",
        "_timer",
        "_timer_at",
        "_tunnel",
        "_upgrade_value",
        "_url_parts",
        "_xff",
        "admitted",
        "blocked",
        "engine",
        "input",
        "life",
        "on_url",
        "peer",
        "redirect",
        "tables",
        "transport",
        "write_paused",
    )

    secure = False  # a TLS connection (TlsInboundConnection)
    _proto_line = b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # What goes into response heads (HSTS over TLS), and whether every request but the
        # reserved ones is redirected to HTTPS (the plain listener under tls.redirect_http).
        self.tables = engine.secure if self.secure else engine.plain
        self.redirect = engine.redirect_port is not None and not self.secure
        # A protected host this connection proved itself for: (cookie key, host, until).
        self.admitted: tuple[bytes, bytes, float] | None = None
        self.peer = b""
        self._fwd = b""  # X-Forwarded-For/-Proto lines and the X-Forwarded-Host name, rendered
        # The request target's parts, as llhttp delivers them: `on_url` is this list's append
        # (a C call, no Python frame); non-empty while a head is being parsed.
        self._url_parts: list[bytes] = []
        self.on_url = self._url_parts.append
        self._parser = HttpRequestParser(self)
        self._active: Exchange | None = None
        self._advancing = False  # _start_queued is running (see there)
        self._refused = False  # an upgrade was refused: its held bytes wait for _start_queued
        self._parsing: Exchange | None = None  # the exchange whose body is being parsed
        self._queue: deque[Exchange] = deque()
        self.blocked = 0
        self.write_paused = False
        self.life = OPEN  # the connection's lifecycle (states.LIFE)
        self.input = PARSE  # what happens to the bytes read (states.INPUT)
        self._linger_until = _INF
        # Bytes after an upgrade request, held until its answer (RFC 9931): written to the
        # tunnel after a 101, parsed as the next requests after any other answer.
        self._held: list[bytes] | None = None
        self._body_left = 0  # body bytes of an upgrade request still to come (counted by us)
        self._tunnel: UpstreamConnection | None = None
        self._reject_with: ProxyError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._idle_deadline = _INF
        self._body_deadline = _INF  # meaningful while a body is read (see _reading_body)
        self._head_deadline = _INF  # meaningful while a head is parsed (set once it spans reads)
        self._head_raw = 0  # bytes of earlier reads of the head being parsed
        self._seg = 0  # length of the read being parsed
        config = engine.config
        self._keepalive = config.keepalive_timeout
        self._tick = min(config.header_timeout, config.keepalive_timeout)
        self._body_timeout = config.body_timeout
        # (Never more than buffer_limit: reading pauses there until an upstream is attached.)
        self._request_buffer = min(config.request_buffer, config.buffer_limit)
        self._max_headers = config.max_headers
        # A head within this many bytes is within every limit (see on_headers_complete): each
        # header field takes at least 4 bytes (`a:` CRLF).
        self._head_check = min(
            config.max_header_bytes, config.max_request_line, 4 * config.max_headers
        )
        # The head being parsed: request line placeholder, then forwarded header lines.
        self._lines: list[bytes] = [b"", b" ", b"", b" HTTP/1.1\r\n"]  # method, url at 0, 2
        self._host: bytes | None = None
        self._rare = True
        self._reset_rare()

    def __repr__(self) -> str:
        ex = self._active
        return (
            f"<InboundConnection {self.peer.decode()} {self.life.name} {self.input.name} "
            f"active={ex.state.name if ex is not None else '-'} queued={len(self._queue)}>"
        )

    def _reset_rare(self) -> None:
        """Fields that only requests with a special header set (`_rare` says whether any is)."""
        self._rare = False
        self._xff: bytes | None = None
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._conn_extra: frozenset[bytes] | None = None
        self._upgrade_value: bytes | None = None
        self._hop: bytes | None = None  # an X-Miren-Hop value (checked in _general_head)
        self._fwd_set: list[bytes] | None = None  # X-Forwarded-Proto/-Host lines as received
        self._expect = False
        self._head_bytes = 0  # bytes of the special (not forwarded as is) header lines
        self._head_count = 0  # ... and their number (or of a chunked trailer's fields)

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        self._fwd = b"X-Forwarded-For: " + self.peer + self._proto_line
        engine = self.engine
        config = engine.config
        transport.set_write_buffer_limits(config.write_high_water, config.write_low_water)
        engine.connection_opened(self)
        # A new connection must send a request head within header_timeout.
        now = monotonic()
        self._idle_deadline = now + config.header_timeout
        self._arm(now + self._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.life = move(LIFE, self.life, LifeEvent.LOST)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        ex = self._active
        self._active = None
        if ex is not None:
            if ex.state is WAITING:  # (a buffered body): counted from its head's arrival
                ex.started = ex.arrived or monotonic()
            ex.abort()
        self._tunnel = None
        self.engine.connection_closed(self)

    def eof_received(self) -> bool | None:
        if self.life is LINGERING:
            return None  # the client is done too: close
        if self._reading_body() is not None:
            # The body ends before its announced end: a malformed request (400), answered on
            # the half-open connection (the client may still read), which closes after it.
            self._reject(BadRequest("The request body is incomplete."))
            return True
        # Like nginx, a client's FIN otherwise ends its requests (499): a half-close cannot be
        # told apart from a client that went away, and a cold start must not wait for a gone
        # client. (A response already written goes out before our side closes.)
        self.engine.flush_writes()
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        conn = self._tunnel or (self._active.conn if self._active is not None else None)
        if conn is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        conn = self._tunnel or (self._active.conn if self._active is not None else None)
        if conn is not None:
            conn.resume_reading()
        elif self._active is None and self._waiting() and not self._advancing:
            self._start_queued()  # (they waited for the client to read: see _start_queued)

    def _waiting(self) -> bool:
        """Pipelined work waits to start: queued requests, or the bytes held behind a refused
        upgrade."""
        return bool(self._queue) or self._refused

    def data_received(self, data: bytes) -> None:
        if self.input:  # (not PARSE)
            self._raw_received(data)
            return
        self._seg = len(data)
        try:
            if len(data) > _SLICE and self._parsing is None:
                self._feed_sliced(data)
            else:
                self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._upgrade_point(data, upgrade.args[0])
        except HttpParserCallbackError:
            self._reject(self._reject_with or BadRequest())
        except HttpParserError:
            self._reject(BadRequest())
        if self._url_parts:
            self._head_in_progress(data)
        ex = self._active
        if ex is not None:
            # Not started: its head was parsed in this segment, or its body is buffered.
            if ex.state is WAITING and (
                ex.request_complete or not ex.buffered or ex.pending_size >= self._request_buffer
            ):
                ex.start()
            # (An exchange that finished meanwhile has no pending bytes; a next one started by
            # exchange_done was flushed there.)
            if ex.pending:
                if ex.conn is not None:
                    ex.flush()
                elif ex.pending_size > self.engine.config.buffer_limit:
                    self._block(_BLOCK_BUFFER)
        if self._parsing is not None and not self._parsing.request_complete:
            self._body_deadline = monotonic() + self._body_timeout

    def _feed_sliced(self, data: bytes) -> None:
        """Parse a long read outside a request body in slices: between two, a head in progress
        with too many header fields is refused (each field costs a parser callback)."""
        parser = self._parser
        start, end = 0, len(data)
        while start < end:
            try:
                parser.feed_data(data[start : start + _SLICE])
            except HttpParserUpgrade as upgrade:
                raise HttpParserUpgrade(start + upgrade.args[0]) from None
            start += _SLICE
            if self._url_parts and self._field_count() > self._max_headers:
                self._reject_with = HeaderFieldsTooLarge()
                raise HttpParserCallbackError("too many header fields")
            ex = self._parsing
            if ex is not None and not ex.request_complete and start < end:
                try:  # inside a body: the rest at once
                    parser.feed_data(data[start:])
                except HttpParserUpgrade as upgrade:
                    raise HttpParserUpgrade(start + upgrade.args[0]) from None
                return

    def _field_count(self) -> int:
        """Header fields of the head in progress (forwarded ones are 4 parts in `_lines`)."""
        return (len(self._lines) - 4) // 4 + self._head_count

    def _head_in_progress(self, data: bytes) -> None:
        """A head is still incomplete after this read (split across reads, or slow): it must
        be complete within header_timeout of its first read, and what httptools buffers for it
        is bounded (one huge header value is only counted once complete: the count may include
        the end of the previous message when both came in one read, hence the slack of one
        read). A request line without a version (HTTP/0.9) would wait for headers that never
        come: the connection is closed at once."""
        if self.input:  # (parsing stopped in this read)
            return
        config = self.engine.config
        if len(self._lines) == 4 and self._host is None and _is_http09_line(data):
            self._reject(None)
            return
        if not self._head_raw:
            self._head_deadline = monotonic() + config.header_timeout
        self._head_raw += len(data)
        if (
            self._head_raw > config.max_header_bytes + _READ_SLACK
            or self._field_count() > self._max_headers
        ):
            self._reject(HeaderFieldsTooLarge())

    def _upgrade_point(self, data: bytes, offset: int) -> None:
        """llhttp stopped after the head of a request with `Connection: upgrade` and
        `Upgrade` (it takes such a request as complete there, body or not); `data[offset:]` is
        what followed. See `_upgrade_head_done`. A refused upgrade parses on with a new parser:
        a loop, not a recursion (a read may hold thousands of them)."""
        while True:
            rest = self._upgrade_head_done(data[offset:])
            if rest is None:
                return
            try:
                self._parser.feed_data(rest)
                return
            except HttpParserUpgrade as upgrade:
                data, offset = rest, upgrade.args[0]
            except HttpParserCallbackError:
                self._reject(self._reject_with or BadRequest())
                return
            except HttpParserError:
                self._reject(BadRequest())
                return

    def _upgrade_head_done(self, rest: bytes) -> bytes | None:
        """An upgrade request's head was parsed. Its body (by Content-Length) is read here,
        counted, since llhttp does not; a chunked one is refused (llhttp would have parsed its
        chunks as the next request). Returns bytes to parse as the next requests, or None."""
        ex = self._parsing
        assert ex is not None  # (an upgrade request is a general head: see on_message_complete)
        if ex.chunked_in:
            ex.request_complete = False  # (so that _reject answers this request itself)
            self._reject(BadRequest("An upgrade request cannot have a chunked body."))
            return None
        if ex.body_length > 0:
            ex.request_complete = False
            self.input = move(INPUT, self.input, InputEvent.UPGRADE_BODY)
            self._body_left = ex.body_length
            return self._take_body(rest)
        self._parsing = None
        return self._upgrade_request_done(ex, rest)

    def _take_body(self, data: bytes) -> bytes | None:
        """Body bytes of an upgrade request (see _upgrade_head_done), then what follows it."""
        ex = self._parsing
        assert ex is not None
        n = self._body_left
        body, rest = data[:n], data[n:]
        if body:
            self._body_left -= len(body)
            ex.add_body(body)
            if ex.conn is not None and ex is self._active:
                ex.flush()
            elif ex.pending_size > self.engine.config.buffer_limit:
                self._block(_BLOCK_BUFFER)
            self._body_deadline = monotonic() + self._body_timeout
        if self._body_left:
            return None
        ex.request_complete = True
        self._parsing = None
        return self._upgrade_request_done(ex, rest)

    def _upgrade_request_done(self, ex: Exchange, rest: bytes) -> bytes | None:
        """The upgrade request was read whole. One the proxy forwards holds what follows (and
        stops reading) until its answer: RFC 9931, no client byte after an upgrade request goes
        upstream before a 101 (see exchange_done and become_tunnel). One it refuses itself (h2c:
        forwarded as a plain request) parses on at once: returns those bytes."""
        if ex.upgrade:
            self.input = move(INPUT, self.input, InputEvent.UPGRADE_WAIT)
            self._held = [rest] if rest else []
            self._block(_BLOCK_UPGRADE)
            return None
        self.input = move(INPUT, self.input, InputEvent.PARSE_ON)
        self._parser = HttpRequestParser(self)  # (llhttp cannot resume after an upgrade)
        return rest

    def _raw_received(self, data: bytes) -> None:
        """Bytes read while they are not parsed (see states.Input)."""
        mode = self.input
        if mode is TUNNEL:
            tunnel = self._tunnel
            assert tunnel is not None
            tunnel.write(data)
        elif mode is UPGRADE_BODY:
            rest = self._take_body(data)
            if rest:  # a refused upgrade's body is complete: the next requests
                self.data_received(rest)
        elif mode is HOLD:  # (reading is paused: at most what was already on its way)
            held = self._held
            assert held is not None
            held.append(data)
        elif self.life is LINGERING:  # (dropped; the client is still alive)
            self._body_deadline = monotonic() + LINGER_IDLE
        # else: nothing more is parsed (a malformed request): dropped

    # --- httptools callbacks (request parser) --------------------------------------------------
    # No on_message_begin (one callback less per request): a head is "in progress" from its
    # first URL bytes (`_url_parts` non-empty); a client that sends only some method bytes
    # counts as idle until then. `on_url` is `_url_parts.append` (see __init__): no frame.

    def on_header(self, name: bytes, value: bytes) -> None:
        # Forwarded lines are collected as parts (`name`, ": ", `value`, CRLF), joined once.
        if name in _ORDINARY and self._url_parts:
            self._lines += (name, b": ", value, b"\r\n")
        elif name == b"Host" and self._host is None and self._url_parts:
            self._host = value
            self._lines += (name, b": ", value, b"\r\n")
        else:
            self._header(name, value)

    def _header(self, name: bytes, value: bytes) -> None:
        """Any other header: a special one, another spelling, or a chunked trailer."""
        if not self._url_parts:  # a chunked trailer: never forwarded, bounded like a head
            self._rare = True
            self._head_bytes += len(name) + len(value) + 4
            self._head_count += 1
            if (
                self._head_bytes > self.engine.config.max_header_bytes
                or self._head_count > self._max_headers
            ):
                self._reject_with = HeaderFieldsTooLarge(
                    "The request trailer section is too large."
                )
                raise _Reject
            return
        kind = h.REQUEST_NAMES.kind(name)
        if kind == h.ORDINARY:
            self._lines += (name, b": ", value, b"\r\n")
            return
        if kind == h.HOST:
            if self._host is not None:
                self._reject_with = BadRequest("More than one Host header.")
                raise _Reject
            self._host = value
            self._lines += (name, b": ", value, b"\r\n")
            return
        if kind == h.EXPECT:  # forwarded; the request is not buffered (see the module doc)
            self._rare = True
            self._expect = True
            self._lines += (name, b": ", value, b"\r\n")
            return
        # Not forwarded as it is: counted here for the limits (forwarded lines are counted
        # from `_lines`, see _check_head).
        self._rare = True
        self._head_bytes += len(name) + len(value) + 4
        self._head_count += 1
        if kind == h.FORWARDED_FOR:
            self._xff = value if self._xff is None else self._xff + b", " + value
        elif kind == h.CONTENT_LENGTH:
            self._cl = value  # llhttp rejected duplicates, lists, signs and non-digits
        elif kind == h.TRANSFER_ENCODING:
            # llhttp accepts codings before a final chunked; we accept `chunked` alone.
            if self._te is not None or not h.is_chunked_only(value):
                self._reject_with = BadRequest("Unsupported Transfer-Encoding.")
                raise _Reject
            self._te = value
        elif kind == h.CONNECTION:
            extra, _ = h.connection_tokens(value)
            if extra:
                self._conn_extra = (self._conn_extra or frozenset()) | extra
        elif kind == h.UPGRADE:
            self._upgrade_value = value
        elif kind == h.FORWARDED_SET:
            # Dropped (the engine sets X-Forwarded-Proto/-Host itself), unless the request
            # turns out to be another node's internal hop: then they are that node's.
            line = name + b": " + value + b"\r\n"
            if self._fwd_set is None:
                self._fwd_set = [line]
            else:
                self._fwd_set.append(line)
        elif kind == h.INTERNAL_HOP:
            self._hop = value
        # HOP: dropped

    def on_headers_complete(self) -> None:
        parser = self._parser
        method = parser.get_method()
        parts = self._url_parts
        url = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()  # (the head is no longer in progress)
        host = self._host
        lines = self._lines
        self._lines = [b"", b" ", b"", b" HTTP/1.1\r\n"]
        self._host = None
        # The head lies within this read and the earlier reads of it: when those are small,
        # the head is within every size limit and needs no counting.
        if self._head_raw:
            self._head_raw = 0
            self._check_head(url, lines)
        elif self._seg > self._head_check:
            self._check_head(url, lines)
        if (
            not self._rare
            and host is not None
            and url[:1] == b"/"
            and method != b"CONNECT"
            and parser.should_keep_alive()
        ):
            # The common request, decided without asking httptools for the version (a costly
            # call): keep-alive without a Connection header means HTTP/1.1; no Content-Length,
            # Transfer-Encoding, Connection, Upgrade, X-Forwarded-* or hop-by-hop header, so
            # no body: the request is complete with its head.
            lines[0] = method
            lines[2] = url
            lines += (self._fwd, host, b"\r\n\r\n")
            ex = Exchange(self, method, host, b"".join(lines), True, method == b"HEAD")
            if url[1:2] == b"." or self.redirect:  # (a cheap test first)
                ex.reserved = special_flags(url, self.redirect)
        else:
            ex = self._parsing = self._general_head(method, url, host, lines)
            if ex.has_body:
                self._body_started(ex)
        if self._active is None:
            self._active = ex  # started after this segment parsed cleanly
        else:
            self._queue.append(ex)
            self._block(_BLOCK_PIPELINE)

    def _body_started(self, ex: Exchange) -> None:
        """A request with a body: buffer it or not, and watch that it keeps arriving."""
        now = monotonic()
        if self._request_buffer > 0 and not self._expect and not ex.stops_parser:
            ex.buffered = True
            ex.arrived = now
        deadline = self._body_deadline = now + self._body_timeout
        if deadline < self._timer_at and self._timer is not None:
            self._timer.cancel()
            self._arm(deadline)

    def _reading_body(self) -> Exchange | None:
        """The exchange whose body is being read, if the body is not complete yet."""
        ex = self._parsing
        if ex is None or ex.request_complete or ex.state >= EX_TUNNEL or self.life is CLOSED:
            return None
        return ex

    def _check_head(self, url: bytes, lines: list[bytes]) -> None:
        config = self.engine.config
        if len(url) > config.max_request_line:
            self._reject_with = UriTooLong()
            raise _Reject
        # Forwarded lines are `name: value\r\n`, 4 parts each (4 bytes over name and value, as
        # counted for the others in _head_bytes); lines[:4] is the request line.
        if (len(lines) - 4) // 4 + self._head_count > self._max_headers:
            self._reject_with = HeaderFieldsTooLarge()
            raise _Reject
        if self._head_bytes + sum(map(len, lines[4:])) > config.max_header_bytes:
            self._reject_with = HeaderFieldsTooLarge()
            raise _Reject

    def _general_head(
        self, method: bytes, url: bytes, host: bytes | None, lines: list[bytes]
    ) -> Exchange:
        """Any request head: validate the version, target and framing; render the head."""
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._reject_with = BadRequest("Unsupported HTTP version.")
            raise _Reject
        if method == b"CONNECT":
            self._reject_with = MethodNotAllowed()
            raise _Reject
        http10 = version == "1.0"
        if http10 and self._te is not None:
            # RFC 9112 6.1: HTTP/1.0 has no transfer codings; its framing is faulty (nginx: 400).
            self._reject_with = BadRequest("Transfer-Encoding is not HTTP/1.0.")
            raise _Reject
        if host is None and not http10:
            self._reject_with = BadRequest("The Host header is missing.")
            raise _Reject
        authority = None
        if url[:1] != b"/" and not (url == b"*" and method == b"OPTIONS"):
            # RFC 9112 3.2.2: an absolute-form target is accepted, and its authority wins over
            # Host: it is routed by and forwarded as Host, with the target in origin-form.
            absolute = absolute_target(url)
            if absolute is None:
                self._reject_with = BadRequest("The request target must be a path or a URL.")
                raise _Reject
            authority, url = absolute
            host = authority
        if host is None:
            host = b""
        upgrade = stops = parser.should_upgrade()  # (llhttp stops after this request)
        protocols = self._upgrade_value
        if upgrade and protocols is not None:
            protocols = h.upgrade_protocols(protocols)  # (never h2c: see there)
            upgrade = protocols is not None
        # Header lines from their parts (see on_header), after the request line.
        lines = [
            b"".join(lines[i : i + 4]) for i in range(4, len(lines), 4)
        ]  # fmt: skip
        if self._conn_extra:
            lines = h.drop_named(lines, self._conn_extra)
        if authority is not None:
            lines = h.drop_named(lines, _HOST_NAME)
            lines.append(b"Host: " + authority + b"\r\n")
        lines.insert(0, method + b" " + url + b" HTTP/1.1\r\n")
        chunked = self._te is not None
        cl = self._cl
        if chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif cl is not None:
            lines.append(b"Content-Length: " + cl + b"\r\n")
        if upgrade and protocols is not None:
            lines.append(b"Connection: Upgrade\r\nUpgrade: " + protocols + b"\r\n")
        hop = self._hop
        internal = hop is not None and self.engine.is_hop(
            hop, method + b" " + url + b" HTTP/1.1", host
        )
        if internal:
            # Another node of the cluster forwarded it (X-Miren-Hop signed for this request and
            # this node, Engine.is_hop): its X-Forwarded-* lines are the client's as that node
            # saw them.
            xff = self._xff if self._xff is not None else self.peer
            fwd = b"".join(self._fwd_set) if self._fwd_set else b""
            lines.append(b"X-Forwarded-For: " + xff + b"\r\n" + fwd + b"\r\n")
        else:
            xff = self.peer if self._xff is None else self._xff + b", " + self.peer
            lines.append(b"X-Forwarded-For: " + xff + self._proto_line + host + b"\r\n\r\n")
        flags = (
            (F_KEEP_ALIVE if parser.should_keep_alive() and not http10 else 0)
            | (F_HTTP10 if http10 else 0)
            | (F_UPGRADE if upgrade else 0)
            | (F_BODY if chunked or (cl is not None and cl.strip(b"0") != b"") else 0)
            | (F_CHUNKED if chunked else 0)
            | (F_HEAD if method == b"HEAD" else 0)
        )
        if url[1:2] == b"." or (self.redirect and not internal):
            flags |= special_flags(url, self.redirect and not internal)
        ex = Exchange(self, method, host, b"".join(lines), False, False)
        ex.set_flags(flags)
        if internal:
            ex.internal = True
        if stops:
            ex.stops_parser = True
            ex.body_length = int(cl) if cl is not None and not chunked else 0
        return ex

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None or ex.state >= EX_TUNNEL:  # (answered: the rest of the body is dropped)
            return
        if ex.chunked_in:
            ex.add_body(b"%x\r\n" % len(body) + body + b"\r\n")
        else:
            ex.add_body(body)

    def on_message_complete(self) -> None:
        if self._rare:  # (after any trailers: the next head starts clean)
            self._reset_rare()
        ex = self._parsing
        if ex is None:
            return  # (a request without body: complete with its head)
        if ex.chunked_in and ex.state < EX_TUNNEL:
            ex.add_body(b"0\r\n\r\n")
        ex.request_complete = True
        if not ex.stops_parser:  # (an upgrade request: see _upgrade_point, llhttp's next step)
            self._parsing = None

    # --- used by exchanges ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.life is not CLOSED:
            self.engine.flush_writes()  # (in order: see Engine.flush_writes)
            self.transport.write(data)

    def attached(self) -> None:
        self._unblock(_BLOCK_BUFFER)

    def pause_for_upstream(self) -> None:
        self._block(_BLOCK_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._unblock(_BLOCK_UPSTREAM)

    def become_tunnel(self, conn: UpstreamConnection) -> None:
        """The upgrade was accepted (101): what the client sent after its request goes now."""
        self._tunnel = conn
        self.input = move(INPUT, self.input, InputEvent.ACCEPTED)
        self._body_left = 0  # (the rest of the body, if any, goes on through the tunnel)
        self._parsing = None
        held, self._held = self._held, None
        if held:
            conn.write(b"".join(held))
        self._unblock(_BLOCK_UPGRADE)

    def exchange_done(self, ex: Exchange, now: float) -> None:
        """The active exchange finished (at monotonic `now`): start the next request, go idle,
        or close."""
        if self._active is not ex:
            return  # (also when the connection was lost: connection_lost clears _active)
        self._active = None
        if not ex.keep_alive or self.life is not OPEN:
            self.close()
            return
        if self.blocked:
            self._unblock(_BLOCK_UPSTREAM | _BLOCK_BUFFER)
        if self._held is not None and ex.upgrade:
            self._refused = True  # (its held bytes are parsed by the loop, never nested)
        elif not self._queue:
            self._idle_deadline = now + self._keepalive
            return
        if not self._advancing:  # (else the loop that started `ex` goes on)
            self._start_queued()

    def _start_queued(self) -> None:
        """Start the pipelined requests in order, in a loop: one the proxy answers itself (a
        404, a health check, a redirect) finishes inside its `start`, and its exchange_done
        leaves the next one to this loop. The same for the bytes held behind an upgrade
        request answered without a 101: they are parsed here (each may be one more refused
        upgrade). (A recursion would nest one level per request: a read of thousands of them
        overflowed Python's recursion limit, and the compiled hot path's C stack.) Nothing
        starts while the client's write buffer is above its high-water mark (a client that
        pipelines thousands of requests and reads no answer would otherwise have them all
        rendered into its buffer at once): resume_writing goes on."""
        self._advancing = True
        try:
            while self._active is None and self.life is OPEN and not self.write_paused:
                if self._refused:  # parse what followed a refused upgrade (may start requests)
                    self._refused = False
                    self._upgrade_refused(monotonic())
                    continue
                if not self._queue:
                    break
                nxt = self._active = self._queue.popleft()
                if not self._queue:
                    self._unblock(_BLOCK_PIPELINE)
                if not (
                    nxt.request_complete
                    or not nxt.buffered
                    or nxt.pending_size >= self._request_buffer
                ):
                    return  # (its body is buffered: data_received starts it)
                nxt.start()
                if self._is_active(nxt) and nxt.conn is not None and nxt.pending:
                    nxt.flush()
        finally:
            self._advancing = False

    def _is_active(self, ex: Exchange) -> bool:
        """Whether `ex` is still the active exchange. (A call, not an inline test, after a
        call that may have finished `ex`: there the type checker still takes `_active` for
        the exchange just stored, and the compiled code would check that it is one.)"""
        return self._active is ex

    def close(self) -> None:
        """Close after writing what is buffered; stop reading now. A client still sending a
        request body (the app answered before it was all read) gets a lingering close instead:
        closing with its bytes unread would reset the connection, and a reset can destroy the
        answer before the client reads it (see _linger)."""
        life = self.life
        if life >= LINGERING:  # (closing its way already)
            return
        parsing = self._parsing
        if (parsing is not None and not parsing.request_complete) or self._body_left:
            self._linger()
            return
        self.life = move(LIFE, life, LifeEvent.CLOSE)
        self._block(_BLOCK_CLOSED)
        self.engine.flush_writes()  # (a response written before the close goes first)
        self.transport.close()

    def _linger(self) -> None:
        """Half-close: send what is written and then a FIN, and go on reading (and dropping)
        what the client sends until it closes too, stops sending for LINGER_IDLE seconds, or
        LINGER_MAX seconds passed (as nginx's lingering close)."""
        self.life = move(LIFE, self.life, LifeEvent.LINGER)
        self.input = move(INPUT, self.input, InputEvent.LINGER)  # every byte is dropped
        self._parsing = None
        self._body_left = 0
        self._held = None
        self._queue.clear()
        self.engine.flush_writes()
        transport = self.transport
        if not transport.can_write_eof():
            self.life = move(LIFE, self.life, LifeEvent.LINGER_END)
            transport.close()
            return
        transport.write_eof()
        now = monotonic()
        self._linger_until = now + LINGER_MAX
        self._body_deadline = now + LINGER_IDLE  # (the idle bound, moved by each read)
        if self.blocked:
            self._unblock(self.blocked)
        if self._timer is not None:
            self._timer.cancel()
        self._arm(self._body_deadline)

    def stop_after_active(self) -> None:
        """Graceful shutdown: close now if idle, else once the active exchange is done (its
        response says `Connection: close`); pipelined requests behind it are not served."""
        ex = self._active
        if ex is None and self._tunnel is None:
            self.close()
            return
        self.life = move(LIFE, self.life, LifeEvent.STOP)
        if ex is not None:
            ex.keep_alive = False

    @property
    def tunneled(self) -> bool:
        """The connection was upgraded (101): a raw byte tunnel to the app."""
        return self._tunnel is not None

    @property
    def busy(self) -> bool:
        """An exchange was started and is not finished (tunnels count as finished)."""
        ex = self._active
        return ex is not None and ROUTING <= ex.state <= RESPONDING

    def abort(self) -> None:
        if self.life is not CLOSED:
            self.engine.flush_writes()  # (as if written at once: see Engine.flush_writes)
            self.transport.abort()

    # --- internals ------------------------------------------------------------------------------
    def _upgrade_refused(self, now: float) -> None:
        """The upgrade request was answered without a 101: the connection goes on as
        HTTP/1.1 (RFC 9931), and what the client sent after it is parsed as its next requests."""
        held = self._held or []
        self._held = None
        self.input = move(INPUT, self.input, InputEvent.REFUSED)
        self._parser = HttpRequestParser(self)
        self._idle_deadline = now + self._keepalive
        self._unblock(_BLOCK_UPGRADE)
        data = b"".join(held)
        if data:
            self.data_received(data)

    def _reject(self, err: ProxyError | None) -> None:
        """A malformed request: nothing more is parsed or read. The requests read whole
        before it are answered first, in order (as nginx does); then `err` (None: no answer,
        for an HTTP/0.9 request) and the connection closes. If the bytes were part of a body
        whose exchange was started, that exchange fails instead (400, or a close when its
        response is under way): none of its bytes past the good ones ever go upstream."""
        owner = self._reading_body()
        self.input = move(INPUT, self.input, InputEvent.MALFORMED)  # parse nothing more
        self._body_left = 0
        self._parsing = None
        self._url_parts.clear()
        self._block(_BLOCK_DONE)
        if owner is not None and owner.state is not WAITING:
            owner.fail(err or BadRequest(), upstream=False)
            return
        method = accept = b""  # (unknown: the head that failed to parse)
        if owner is not None:  # buffered or queued, not started: it is answered the error
            method, accept = owner.method, owner.accept
        bad = Exchange.rejection(self, err, method, accept)
        if owner is not None and owner is not self._active:
            self._queue[self._queue.index(owner)] = bad
        elif owner is not None or self._active is None:
            self._active = bad
            bad.start()
        else:
            self._queue.append(bad)

    def _block(self, reason: int) -> None:
        if not self.blocked and self.life is not CLOSED:
            self.transport.pause_reading()
        self.blocked |= reason

    def _unblock(self, reasons: int) -> None:
        was = self.blocked
        self.blocked = was & ~reasons
        if was and not self.blocked and self.life is not CLOSED:
            self.transport.resume_reading()
            if self._parsing is not None:  # the body timeout counts from now again
                self._body_deadline = monotonic() + self._body_timeout

    def _arm(self, when: float) -> None:
        self._timer = self.engine.loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        if self.life is CLOSED:
            return
        now = monotonic()
        if self.life is LINGERING:
            if now >= self._body_deadline or now >= self._linger_until:
                # (FIN sent long ago: the answer had its chance)
                self.life = move(LIFE, self.life, LifeEvent.LINGER_END)
                self.transport.close()
            else:
                self._arm(min(self._body_deadline, self._linger_until))
            return
        tick = now + self._tick
        if self._active is None and self._tunnel is None and not self._waiting():
            deadline = self._head_deadline if self._url_parts else self._idle_deadline
            if now >= deadline:
                self.abort()  # slow or idle client: nothing to answer
                return
            tick = min(tick, deadline)
        ex = self._reading_body()
        if ex is not None and not self.blocked:  # (paused by us: not the client's fault)
            if now >= self._body_deadline:
                self._body_timed_out(ex)
                return
            tick = min(tick, self._body_deadline)
        self._arm(tick)

    def _body_timed_out(self, ex: Exchange) -> None:
        """The client stopped sending the body of `ex`: 408 (or a close if its response is
        under way); a buffered one that was not started yet holds no lease and no upstream."""
        self._reject(RequestTimeout())


class TlsInboundConnection(InboundConnection):
    """A client connection of the HTTPS listener: `X-Forwarded-Proto: https`, HSTS when set."""

    __slots__ = ()
    secure = True
    _proto_line = b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: "
