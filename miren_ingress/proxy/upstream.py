"""One keep-alive connection to an upstream: parses responses and streams them to the client.

At most one exchange uses a connection at a time (no upstream pipelining). During one
`data_received` everything meant for the client is collected in `out` and written with one
`transport.write` afterwards, so a small response goes out as one segment (head + body).

The connection's timer serves both the request idle timeout (while an exchange is attached)
and the pool idle timeout (while parked). It is re-armed lazily: reading data only moves
`deadline`; when the timer fires early it re-arms itself. Invariant: the timer is armed at or
before the current deadline, and at most `pool_idle_timeout` after it was last armed, so
attaching an exchange needs no timer call unless its request_timeout is shorter than that.
"""

from __future__ import annotations

import asyncio
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from . import headers as h
from .errors import UpstreamProtocolError, UpstreamReset, UpstreamTimeout

if TYPE_CHECKING:
    from .engine import Engine
    from .exchange import Exchange
    from .pool import UpstreamPool

_INF = float("inf")
_NO_BODY_STATUS = (204, 304)


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing the current segment."""


# Status lines by code. The upstream's reason phrase is not forwarded (it carries no meaning,
# RFC 9112 §4): the standard phrase is used, which spares a parser callback per response.
_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in HTTPStatus}
_RESPONSE_KINDS = h.RESPONSE_NAMES.cache  # memoized kinds by raw name (read directly: hot)


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


class UpstreamConnection(asyncio.Protocol):
    transport: asyncio.Transport  # set by connection_made, before any other callback

    __slots__ = (
        "_chunk_out",
        "_cl",
        "_conn_extra",
        "_done",
        "_eof_body",
        "_interim",
        "_lines",
        "_reading_paused",
        "_stop_reuse",
        "_te",
        "_timer",
        "_timer_at",
        "_upgrade_value",
        "deadline",
        "engine",
        "ex",
        "got_bytes",
        "lost",
        "out",
        "parser",
        "pool",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool, engine: Engine) -> None:
        self.pool = pool
        self.engine = engine
        self.parser = HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.deadline = _INF
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self.reused = False  # served an exchange before (keep-alive)
        self.got_bytes = False  # some response byte arrived for the current exchange
        self.tunnel = False  # switched to raw byte piping (101)
        self.lost = False
        self._stop_reuse = False  # this connection must not go back to the pool
        self._reading_paused = False
        self.out: list[bytes] = []
        self._reset_message()

    def __repr__(self) -> str:
        state = "tunnel" if self.tunnel else "busy" if self.ex is not None else "idle"
        return f"<UpstreamConnection {self.pool.host}:{self.pool.port} {state}>"

    def _reset_message(self) -> None:
        # [0] is the status line, set at headers complete; None once the head was sent
        self._lines: list[bytes] | None = [b""]
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._conn_extra: frozenset[bytes] | None = None
        self._upgrade_value: bytes | None = None
        self._chunk_out = False  # re-frame the body as chunked towards the client
        self._eof_body = False  # the body ends when the upstream closes
        self._interim = False
        self._done = False

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = self.engine.config
        transport.set_write_buffer_limits(config.write_high_water, config.write_low_water)
        self.pool.open += 1
        self.engine.upstream_open += 1
        self._arm(self.engine.loop.time() + config.pool_idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.open -= 1
        self.engine.upstream_open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ex = self.ex
        if ex is None:
            self.pool.forget(self)
            return
        if self.tunnel:
            ex.tunnel_closed()
        elif self._eof_body and self._lines is None:
            # An EOF-delimited body ended: this is the normal end of the response.
            if self._chunk_out:
                ex.inbound.write(b"0\r\n\r\n")
            self.ex = None
            ex.response_done(reusable=False)
        else:
            ex.upstream_lost(self, UpstreamReset())

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost does the bookkeeping

    def pause_writing(self) -> None:
        if self.ex is not None:
            self.ex.inbound.pause_for_upstream()

    def resume_writing(self) -> None:
        if self.ex is not None:
            self.ex.inbound.resume_for_upstream()

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes while parked: the stream is out of sync, never reuse it
            self.close()
            return
        if self.tunnel:
            ex.inbound.write(data)
            return
        self.deadline = self.engine.loop.time() + ex.timeout
        self.got_bytes = True
        out = self.out
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self._lines is not None or ex.target is None or not ex.upgrade:
                self._protocol_error(ex)
                return
            rest = data[upgrade.args[0] :]
            if rest:
                out.append(rest)
            self.tunnel = True
            self.deadline = _INF
        except HttpParserCallbackError:
            # A callback stopped the parser: a HEAD response (done) or bytes past the end of
            # the response (out of sync). Either way the connection is not reused.
            self._stop_reuse = True
            if not self._done:
                self._protocol_error(ex)
                return
        except HttpParserError:
            self._protocol_error(ex)
            return
        if out:
            # Invariant: an exchange whose client connection is lost is detached from its
            # upstream connection at once (Exchange.abort), so the client transport is open.
            ex.inbound.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            if self._lines is None:
                ex.head_sent = True  # from now on an error can only close the connection
        if self.tunnel:
            ex.switched()
        elif self._done:
            self.ex = None
            self._done = False
            ex.response_done(reusable=not self._stop_reuse)

    # --- httptools callbacks (response parser) ----------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:
            raise _Stop  # a second response in one read: out of sync

    def on_header(self, name: bytes, value: bytes) -> None:
        lines = self._lines
        if lines is None:
            return  # a trailer: dropped
        kind = _RESPONSE_KINDS.get(name)
        if kind is None:
            kind = h.RESPONSE_NAMES.kind(name)
        if kind == 0:  # h.ORDINARY: the common case first
            lines.append(name + b": " + value + b"\r\n")
        elif kind == h.CONTENT_LENGTH:
            self._cl = value
        elif kind == h.TRANSFER_ENCODING:
            self._te = value
        elif kind == h.CONNECTION:
            if value != b"keep-alive":  # the usual value names no other header
                extra, _ = h.connection_tokens(value)
                if extra:
                    self._conn_extra = (self._conn_extra or frozenset()) | extra
        elif kind == h.UPGRADE:
            self._upgrade_value = value
        # HOP: dropped

    def on_headers_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        lines = self._lines
        assert lines is not None
        status = self.parser.get_status_code()
        lines[0] = status_line(status)
        if self._conn_extra:
            lines = h.drop_named(lines, self._conn_extra)
        if status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): forwarded to HTTP/1.1 clients.
            if not ex.http10:
                lines.append(b"\r\n")
                self.out.append(b"".join(lines))
            self._lines = [b""]
            self._interim = True
            return
        ex.status = status
        te = self._te
        if te is not None and not h.is_chunked_only(te):
            raise _Stop  # a transfer coding we cannot re-frame
        if status == 101:
            lines.append(
                b"Connection: Upgrade\r\nUpgrade: " + (self._upgrade_value or b"") + b"\r\n"
            )
        elif self._cl is not None:  # also kept on HEAD, 204 and 304 answers
            lines.append(b"Content-Length: " + self._cl + b"\r\n")
        elif not ex.head_only and status not in _NO_BODY_STATUS:
            self._eof_body = te is None
            if ex.http10:
                ex.keep_alive = False  # no chunked for HTTP/1.0: the close ends the body
            else:
                self._chunk_out = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
        if ex.ephemeral:
            lines.append(self.engine.robots_line)
        if self.engine.closing:
            ex.keep_alive = False  # shutting down: this is the connection's last response
        if not ex.keep_alive and status != 101:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.out.append(b"".join(lines))
        self._lines = None  # head sent: later on_header calls are trailers
        if ex.head_only:
            self._done = True
            raise _Stop  # llhttp would wait for a HEAD response's announced body

    def on_body(self, body: bytes) -> None:
        if self._chunk_out:
            self.out.append(b"%x\r\n" % len(body) + body + b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._chunk_out:
            self.out.append(b"0\r\n\r\n")
        # llhttp forgets the keep-alive flags once the message is complete: ask now.
        if not self.parser.should_keep_alive():
            self._stop_reuse = True
        self._done = True

    # --- used by the exchange and the pool ---------------------------------------------------
    def begin(self, ex: Exchange) -> None:
        """Attach an exchange (the connection is open and idle)."""
        self.ex = ex
        self.got_bytes = False
        self._stop_reuse = False
        self._reset_message()
        deadline = self.deadline = self.engine.loop.time() + ex.timeout
        if deadline < self._timer_at:
            self._arm(deadline)
        if ex.inbound.write_paused:
            self.pause_reading()

    def park(self) -> None:
        """Going idle in the pool: the deadline becomes the pool idle timeout."""
        self.reused = True
        self.ex = None
        if self._reading_paused:
            self.resume_reading()  # must see the upstream's close while parked
        self.deadline = self.engine.loop.time() + self.engine.config.pool_idle_timeout

    def write(self, data: bytes) -> None:
        """Write request bytes; activity re-arms the idle timeout too."""
        self.transport.write(data)
        ex = self.ex
        if ex is not None and not self.tunnel:
            self.deadline = self.engine.loop.time() + ex.timeout

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.ex = None
        self.transport.close()

    def abort(self) -> None:
        self.ex = None
        self.transport.abort()

    def _protocol_error(self, ex: Exchange) -> None:
        self.out.clear()
        ex.upstream_lost(self, UpstreamProtocolError())

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.engine.loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        if self.lost:
            return
        now = self.engine.loop.time()
        tick = now + self.engine.config.pool_idle_timeout
        ex = self.ex
        if ex is None:  # parked
            if now >= self.deadline:
                self.pool.forget(self)
                self.close()
                return
        elif self.tunnel:
            pass  # upgraded connections have no timeout
        elif now >= self.deadline:
            ex.upstream_lost(self, UpstreamTimeout())
            return
        self._arm(min(self.deadline, tick))
