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
  checks the deadline of the current state; state changes only store a deadline.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from . import headers as h
from .errorpage import render_response
from .errors import BadRequest, MethodNotAllowed, ProxyError
from .exchange import (
    F_BODY,
    F_CHUNKED,
    F_HTTP10,
    F_KEEP_ALIVE,
    F_UPGRADE,
    RESERVED_PREFIX,
    Exchange,
    reserved_flags,
)

if TYPE_CHECKING:
    from .engine import Engine
    from .upstream import UpstreamConnection

_INF = float("inf")
# Reasons to pause reading from the client (bits of `_blocked`).
_BLOCK_UPSTREAM = 1  # the upstream's write buffer is above its high-water mark
_BLOCK_PIPELINE = 2  # a pipelined request waits for the active one
_BLOCK_BUFFER = 4  # request bytes pile up while no upstream connection is attached
_BLOCK_CLOSED = 8  # the connection is closing
_READ_SLACK = 256 * 1024  # uvloop reads at most this much at once


_REQUEST_KINDS = h.REQUEST_NAMES.cache  # memoized kinds by raw name (read directly: hot)


class _Reject(Exception):
    """Raised inside a parser callback after `_reject_with` was set."""


class InboundConnection(asyncio.Protocol):
    transport: asyncio.Transport  # set by connection_made, before any other callback

    __slots__ = (
        "_accept",
        "_active",
        "_cl",
        "_closed",
        "_conn_extra",
        "_head_bytes",
        "_head_deadline",
        "_head_raw",
        "_host",
        "_idle_deadline",
        "_in_head",
        "_lines",
        "_parser",
        "_parsing",
        "_queue",
        "_rare",
        "_raw",
        "_reject_with",
        "_stop_after",
        "_te",
        "_timer",
        "_tunnel",
        "_upgrade_value",
        "_url",
        "_xff",
        "blocked",
        "engine",
        "peer",
        "transport",
        "write_paused",
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.peer = b""
        self._parser = HttpRequestParser(self)
        self._active: Exchange | None = None
        self._parsing: Exchange | None = None  # the exchange whose body is being parsed
        self._queue: deque[Exchange] = deque()
        self.blocked = 0
        self.write_paused = False
        self._closed = False
        self._stop_after = False  # close once the active exchange is done
        self._raw = False  # the parser is done (upgrade): bytes go to the exchange unparsed
        self._tunnel: UpstreamConnection | None = None
        self._reject_with: ProxyError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle_deadline = _INF
        self._head_deadline = _INF
        self._in_head = False
        self._head_raw = 0
        self._rare = True
        self._reset_head()

    def __repr__(self) -> str:
        state = (
            "tunnel" if self._tunnel is not None
            else "busy" if self._active is not None
            else "reading" if self._in_head
            else "idle"
        )  # fmt: skip
        return f"<InboundConnection {self.peer.decode()} {state} queued={len(self._queue)}>"

    def _reset_head(self) -> None:
        self._url = b""
        self._lines: list[bytes] = [b""]  # [0] is the request line, set at headers complete
        self._host: bytes | None = None
        self._accept = b""
        self._head_bytes = 0
        if self._rare:  # fields that most requests never set
            self._rare = False
            self._xff: bytes | None = None
            self._cl: bytes | None = None
            self._te: bytes | None = None
            self._conn_extra: frozenset[bytes] | None = None
            self._upgrade_value: bytes | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        engine = self.engine
        config = engine.config
        transport.set_write_buffer_limits(config.write_high_water, config.write_low_water)
        engine.connection_opened(self)
        # A new connection must send a request head within header_timeout.
        now = engine.loop.time()
        self._idle_deadline = now + config.header_timeout
        self._arm(now + min(config.header_timeout, config.keepalive_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        ex = self._active
        self._active = None
        if ex is not None:
            ex.abort()
        self._tunnel = None
        self.engine.connection_closed(self)

    def eof_received(self) -> bool | None:
        # Like nginx, a client's FIN ends its requests (499): a half-close cannot be told apart
        # from a client that went away, and a cold start must not wait for a gone client.
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

    def data_received(self, data: bytes) -> None:
        if self._raw:
            self._raw_received(data)
            return
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._raw = True
            rest = data[upgrade.args[0] :]
            if rest:
                self._raw_received(rest)
        except HttpParserCallbackError:
            self._reject(self._reject_with or BadRequest())
            return
        except HttpParserError:
            self._reject(BadRequest())
            return
        if self._in_head:
            # A head still incomplete: bound what httptools buffers for it (one huge header
            # value is only counted once complete). The count may include the end of the
            # previous message when both came in one read, hence the slack of one read.
            self._head_raw += len(data)
            if self._head_raw > self.engine.config.max_header_bytes + _READ_SLACK:
                self._reject(BadRequest("The request header section is too large."))
                return
        ex = self._active
        if ex is not None:
            if not ex.started:  # its head was parsed in this segment
                ex.start()
            ex = self._active
            if ex is not None and ex.pending:
                if ex.conn is not None:
                    ex.flush()
                elif ex.pending_size > self.engine.config.buffer_limit:
                    self._block(_BLOCK_BUFFER)

    def _raw_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.write(data)
            return
        ex = self._parsing
        if ex is None or ex.done:
            return  # the upgrade was refused: the connection closes after the response
        ex.pending.append(data)
        ex.pending_size += len(data)
        if ex.conn is not None and ex is self._active:
            ex.flush()
        elif ex.pending_size > self.engine.config.buffer_limit:
            self._block(_BLOCK_BUFFER)

    # --- httptools callbacks (request parser) --------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_raw = 0
        self._head_deadline = self.engine.loop.time() + self.engine.config.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.engine.config.max_request_line:
            self._reject_with = BadRequest("The request target is too long.")
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_bytes += size + 4
        if self._head_bytes > self.engine.config.max_header_bytes:
            self._reject_with = BadRequest("The request header section is too large.")
            raise _Reject
        if not self._in_head:
            return  # a chunked trailer: never forwarded
        kind = _REQUEST_KINDS.get(name)
        if kind is None:
            kind = h.REQUEST_NAMES.kind(name)
        if kind == 0:  # h.ORDINARY: the common case first
            self._lines.append(name + b": " + value + b"\r\n")
            return
        if kind > h.ACCEPT:
            self._rare = True
        if kind == h.HOST:
            if self._host is not None:
                self._reject_with = BadRequest("More than one Host header.")
                raise _Reject
            self._host = value
            self._lines.append(name + b": " + value + b"\r\n")
        elif kind == h.ACCEPT:
            self._accept = value if not self._accept else self._accept + b"," + value
            self._lines.append(name + b": " + value + b"\r\n")
        elif kind == h.FORWARDED_FOR:
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
        # HOP and FORWARDED_SET: dropped (the engine sets X-Forwarded-Proto/-Host itself)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self._head_raw = 0
        method = parser.get_method()
        url = self._url
        host = self._host
        if (
            not self._rare
            and host is not None
            and url[:1] == b"/"
            and method != b"CONNECT"
            and parser.should_keep_alive()
        ):
            # The common request, decided without asking httptools for the version (a costly
            # call): keep-alive without a Connection header means HTTP/1.1; no Content-Length,
            # Transfer-Encoding, Connection, Upgrade or X-Forwarded-For header was seen.
            lines = self._lines
            lines[0] = method + b" " + url + b" HTTP/1.1\r\n"
            lines.append(
                b"X-Forwarded-For: " + self.peer + b"\r\nX-Forwarded-Proto: http\r\n"
                b"X-Forwarded-Host: " + host + b"\r\n\r\n"
            )  # fmt: skip
            ex = Exchange(
                self,
                method,
                host,
                b"".join(lines),
                reserved_flags(url) | F_KEEP_ALIVE
                if url.startswith(RESERVED_PREFIX)
                else F_KEEP_ALIVE,
            )
        else:
            ex = self._general_head(method, url, host)
        if self._accept:
            ex.accept = self._accept
        self._reset_head()
        self._parsing = ex
        if self._active is None:
            self._active = ex  # started after this segment parsed cleanly
        else:
            self._queue.append(ex)
            self._block(_BLOCK_PIPELINE)

    def _general_head(self, method: bytes, url: bytes, host: bytes | None) -> Exchange:
        """Any request head: validate the version, target and framing; render the head."""
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._reject_with = BadRequest("Unsupported HTTP version.")
            raise _Reject
        if method == b"CONNECT":
            self._reject_with = MethodNotAllowed()
            raise _Reject
        if url[:1] != b"/" and not (url == b"*" and method == b"OPTIONS"):
            self._reject_with = BadRequest("The request target must be a path.")
            raise _Reject
        http10 = version == "1.0"
        if host is None:
            if not http10:
                self._reject_with = BadRequest("The Host header is missing.")
                raise _Reject
            host = b""
        upgrade = parser.should_upgrade()
        lines = self._lines
        if self._conn_extra:
            lines = h.drop_named(lines, self._conn_extra)
        lines[0] = method + b" " + url + b" HTTP/1.1\r\n"
        chunked = self._te is not None
        cl = self._cl
        if chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif cl is not None:
            lines.append(b"Content-Length: " + cl + b"\r\n")
        if upgrade and self._upgrade_value is not None:
            lines.append(b"Connection: Upgrade\r\nUpgrade: " + self._upgrade_value + b"\r\n")
        xff = self.peer if self._xff is None else self._xff + b", " + self.peer
        lines.append(
            b"X-Forwarded-For: " + xff + b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
            + host + b"\r\n\r\n"
        )  # fmt: skip
        flags = (
            (F_KEEP_ALIVE if parser.should_keep_alive() and not http10 and not upgrade else 0)
            | (F_HTTP10 if http10 else 0)
            | (F_UPGRADE if upgrade else 0)
            | (F_BODY if chunked or (cl is not None and cl.strip(b"0") != b"") else 0)
            | (F_CHUNKED if chunked else 0)
        )
        if url.startswith(RESERVED_PREFIX):
            flags |= reserved_flags(url)
        return Exchange(self, method, host, b"".join(lines), flags)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None or ex.local or ex.done:
            return
        if ex.chunked_in:
            ex.pending.append(b"%x\r\n" % len(body) + body + b"\r\n")
        else:
            ex.pending.append(body)
        ex.pending_size += len(body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        if ex is None:
            return
        if ex.chunked_in and not ex.local and not ex.done:
            ex.pending.append(b"0\r\n\r\n")
        ex.request_complete = True
        if not ex.upgrade:
            self._parsing = None

    # --- used by exchanges ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)

    def attached(self) -> None:
        self._unblock(_BLOCK_BUFFER)

    def pause_for_upstream(self) -> None:
        self._block(_BLOCK_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._unblock(_BLOCK_UPSTREAM)

    def become_tunnel(self, conn: UpstreamConnection) -> None:
        self._tunnel = conn

    def exchange_done(self, ex: Exchange) -> None:
        """The active exchange finished: start the next request, go idle, or close."""
        if self._active is not ex:
            return
        self._active = None
        if self._closed:
            return
        if not ex.keep_alive or self._stop_after or self.engine.closing:
            self.close()
            return
        if self.blocked:
            self._unblock(_BLOCK_UPSTREAM | _BLOCK_BUFFER)
        if self._queue:
            nxt = self._active = self._queue.popleft()
            if not self._queue:
                self._unblock(_BLOCK_PIPELINE)
            nxt.start()
            if self._active is nxt and nxt.conn is not None and nxt.pending:
                nxt.flush()
            return
        self._idle_deadline = self.engine.loop.time() + self.engine.config.keepalive_timeout

    def close(self) -> None:
        """Close after writing what is buffered; stop reading now."""
        if not self._closed:
            self._block(_BLOCK_CLOSED)
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Graceful shutdown: close now unless a request is in progress."""
        if self._active is None and self._tunnel is None:
            self.close()
            return True
        return False

    def abort(self) -> None:
        if not self._closed:
            self.transport.abort()

    # --- internals ------------------------------------------------------------------------------
    def _reject(self, err: ProxyError) -> None:
        """A malformed request: answer 400 (if the response channel is free) and close."""
        self._raw = True  # parse nothing more
        self._parsing = None
        self._queue.clear()
        ex = self._active
        if ex is not None and not ex.started:
            self._active = ex = None  # a head parsed in this segment: never started
        if ex is not None and not ex.done:
            ex.keep_alive = False
            if ex.head_sent or ex.request_complete:
                # Its response is under way; the bad bytes belong to a later request.
                self.engine.metrics.request_done("unknown", err.status, b"", 0.0)
                self._stop_after = True
                return
            ex.fail(err, upstream=False)  # its own body was malformed
            return
        self.engine.metrics.request_done("unknown", err.status, b"", 0.0)
        self.write(render_response(err.status, err.public_message, b"", keep_alive=False))
        self.close()

    def _block(self, reason: int) -> None:
        if not self.blocked and not self._closed:
            self.transport.pause_reading()
        self.blocked |= reason

    def _unblock(self, reasons: int) -> None:
        was = self.blocked
        self.blocked = was & ~reasons
        if was and not self.blocked and not self._closed:
            self.transport.resume_reading()

    def _arm(self, when: float) -> None:
        self._timer = self.engine.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        engine = self.engine
        now = engine.loop.time()
        tick = now + min(engine.config.header_timeout, engine.config.keepalive_timeout)
        if self._active is None and self._tunnel is None:
            deadline = self._head_deadline if self._in_head else self._idle_deadline
            if now >= deadline:
                self.abort()  # slow or idle client: nothing to answer
                return
            tick = min(tick, deadline)
        self._arm(tick)
