"""One keep-alive connection to an upstream: parses responses and streams them to the client.

At most one exchange uses a connection at a time (no upstream pipelining). During one
`data_received` everything meant for the client is collected (in `_spliced` on the fast path,
else in `out`) and written with one `transport.write` afterwards, so a small response goes out
as one segment (head + body).

The response head is forwarded by splicing the upstream's raw bytes, not rebuilt header by
header. llhttp has already validated the head when `on_headers_complete` runs: every line ends
in CRLF, no value holds CR or LF, no name is followed by whitespace (all checked strictly), so
the first empty line ends the head and `CRLF + name + ":"` finds exactly the lines of that name.
`on_header` only classifies names: ordinary headers stay where they are, Content-Length too
(llhttp rejected duplicates, lists and signs). The common response (HTTP/1.1 status line at the
start of one segment, Content-Length framing, at most a `Connection: keep-alive` line, as nginx
sends) takes the fast path of `on_headers_complete`: to a keep-alive client the segment goes
as it is, or with our lines after the status line (one `bytes.replace`); when the client
connection closes, the Connection line is cut and ours added. Anything else (other hop-by-hop
headers, chunked or close-delimited bodies, HEAD, 1xx, 101, a head split across segments)
takes `_general_head`, which splits the head into lines. The upstream's reason phrase is
forwarded as sent.

A head the fast path took is remembered per upstream address (`UpstreamPool.known`: its bytes
through the blank line, and the response's whole length from its Content-Length). A later read
that is exactly that head followed by exactly that many body bytes is the same message to
llhttp, byte for byte, so it is forwarded without feeding the parser at all (which stays
between messages): an upstream that answers alike (nginx's Date moves once a second) costs no
parser callbacks. Never for HEAD requests, 204 or 304 (their length is not their framing), nor
for a head that took any other path; an upstream whose heads never repeat (a request id, a
cookie) has only every 16th remembered, so it costs a length compare per response.

Any byte after a complete response in the same read (on_message_begin stops the parser there,
or llhttp finds it is not HTTP) leaves the connection out of sync: the response is forwarded,
trimmed to its end, and the connection is not reused.

The connection's timer serves both the request idle timeout (while an exchange is attached)
and the pool idle timeout (while parked). It is re-armed lazily: activity only moves `deadline`;
when the timer fires early it re-arms itself. Invariant: the timer is armed at or before the
current deadline, and at most `pool_idle_timeout` after it was last armed, so attaching an
exchange needs no timer call unless its request_timeout is shorter than that. Deadlines are
`time.monotonic()` values: the event loop's clock is the same CLOCK_MONOTONIC (asyncio reads it
directly, uvloop truncates it to milliseconds), so they are valid `call_at` instants. A response
that completes within one read costs no clock read here at all: the exchange's end time, read
once, parks the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from . import headers as h
from .dates import date_line
from .errors import UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from .states import UPSTREAM, Ex, Up, UpEvent, move

if TYPE_CHECKING:
    from .engine import Engine
    from .exchange import Exchange
    from .pool import UpstreamPool

log = logging.getLogger(__name__)

# (Final: compiled, each is a C constant, not a lookup in the module's dict per use.)
_INF: Final = float("inf")
_NO_BODY_STATUS: Final = (204, 304)
_ORDINARY: Final = h.RESPONSE_NAMES.ordinary  # spellings known to be ordinary (read directly)
_KNOWN_HEAD_MAX: Final = 2048  # longer response heads are never remembered (UpstreamPool.known)
_NOVEL: Final = 16  # heads in a row that never repeated, after which every 16th is remembered
_KEPT: Final = (h.ORDINARY, h.CONTENT_LENGTH, h.DATE)  # forwarded as they are (_ordinary_lines)
_TIMER_SLACK: Final = 0.001  # re-arm at least this far ahead (uvloop's timers: 1 ms resolution)
OPEN: Final = Up.OPEN
TUNNEL: Final = Up.TUNNEL
CLOSED: Final = Up.CLOSED
SENDING: Final = Ex.SENDING
RESPONDING: Final = Ex.RESPONDING


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing the current segment."""


class UpstreamConnection(asyncio.Protocol):
    transport: asyncio.Transport  # set by connection_made, before any other callback

    __slots__ = (
        "_chunk_out",
        "_cl",
        "_conn_cut",
        "_conn_extra",
        "_data",
        "_date",
        "_done",
        "_eof_body",
        "_head_done",
        "_interim",
        "_novel",
        "_pos",
        "_pre",
        "_rare",
        "_reading_paused",
        "_spare_fd",
        "_spliced",
        "_stop_reuse",
        "_te",
        "_timer",
        "_timer_at",
        "_upgrade_value",
        "deadline",
        "engine",
        "ex",
        "out",
        "parser",
        "pool",
        "reused",
        "state",
        "transport",
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
        self.state = OPEN  # (see states.UPSTREAM; idle or busy: `ex`)
        self._stop_reuse = False  # never to go back to the pool (so never reset)
        self._spare_fd = -1  # a dup of the socket's fd while a body streams (see _salvage)
        self._reading_paused = False
        self.out: list[bytes] = []
        self._data: bytes | None = None  # the segment being parsed (only during feed_data)
        # Per response, reset by `begin`:
        self._head_done = False  # the final head went to `out`: later headers are trailers
        self._cl: bytes | None = None  # the Content-Length value
        # The fast path's output for this segment (head and body, spliced), else None:
        self._spliced: bytes | None = None
        self._conn_cut = False  # a `Connection: keep-alive` line: cut out if we close
        self._date = False  # the response has a Date field (else the proxy adds one)
        self._done = False  # the response was read to its end (reset when handled)
        self._novel = 0  # heads this connection parsed on the fast path since one was known
        # Per response, only touched off the fast path; `_rare` says whether to reset them.
        self._rare = True
        self._reset_rare()

    def __repr__(self) -> str:
        state = self.state.name if self.state is not OPEN else "BUSY" if self.ex else "IDLE"
        return f"<UpstreamConnection {self.pool.host}:{self.pool.port} {state}>"

    @property
    def answered(self) -> bool:
        """The final response head arrived (an interim 100 Continue does not count)."""
        return self._head_done

    @property
    def got_bytes(self) -> bool:
        """Some byte of a response arrived for the current exchange (kept in `_pre` until its
        head is complete)."""
        return self._head_done or self._pre is not None

    def _reset_rare(self) -> None:
        self._rare = False
        self._pre: list[bytes] | None = None  # earlier segments of a head not complete yet
        self._pos = 0  # where the next head starts in b"".join(_pre) + segment
        self._te: bytes | None = None
        self._conn_extra: frozenset[bytes] | None = None
        self._upgrade_value: bytes | None = None
        self._chunk_out = False  # re-frame the body as chunked towards the client
        self._eof_body = False  # the body ends when the upstream closes
        self._interim = False  # the message being parsed is a 1xx interim response

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
        self._arm(monotonic() + self.pool.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = move(UPSTREAM, was, UpEvent.CLOSE)
        self.pool.open -= 1
        self.engine.upstream_open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ex = self.ex
        if self._spare_fd >= 0:
            if exc is not None and ex is not None and was is not TUNNEL and not self._done:
                rest = self._salvage()
                if rest:
                    self._stop_reuse = True
                    self.data_received(rest)
                    ex = self.ex  # (None when that completed the response)
            self._drop_spare_fd()
        if ex is None:
            self.pool.forget(self)
            return
        if was is TUNNEL:
            ex.tunnel_closed()
        elif self._eof_body and self._head_done:
            # An EOF-delimited body ended: this is the normal end of the response.
            if self._chunk_out:
                ex.inbound.write(b"0\r\n\r\n")
            self.ex = None
            ex.finished(monotonic())
        else:
            ex.upstream_lost(self, UpstreamReset())

    def eof_received(self) -> bool | None:
        # Closing: a parked connection must not be taken any more. A tunnel stays TUNNEL until
        # connection_lost, which closes the client's side too (the app ended a WebSocket: its
        # client must see the close at once, not after its own close timeout).
        if self.state is not TUNNEL:
            self.state = move(UPSTREAM, self.state, UpEvent.CLOSE)
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
        if self.state is TUNNEL:
            ex.inbound.write(data)
            return
        out = self.out
        known = self.pool.known
        if (
            known is not None
            and len(data) == known[1]
            and data.startswith(known[0])
            and not self._rare
            and not self._head_done
            and not ex.head_only
        ):
            # The head llhttp parsed last time, byte for byte, then the whole body and nothing
            # after it: the parser, between messages, need not see it.
            self._novel = 0
            ex.status = known[2]
            self._conn_cut = known[3]
            self._splice(ex, data, known[4])  # (as in on_headers_complete)
            self._done = True
        else:
            self._data = data
            try:
                self.parser.feed_data(data)
            except HttpParserUpgrade as upgrade:
                self._data = None
                if not self._head_done or not ex.upgrade:
                    self._protocol_error(ex)
                    return
                rest = data[upgrade.args[0] :]
                if rest:
                    out.append(rest)
                self.state = move(UPSTREAM, self.state, UpEvent.UPGRADED)
                self.deadline = _INF
            except (HttpParserCallbackError, HttpParserError):
                # A callback stopped the parser (a HEAD response, done; or a second message after
                # the response: out of sync), or bytes after the response are not HTTP. Either way
                # the connection is not reused; a response read whole is still forwarded.
                self._data = None
                self._stop_reuse = True
                if not self._done:
                    self._protocol_error(ex)
                    return
                if self._spliced is not None:
                    self._trim_spliced(data, ex.status)
        self._data = None  # never keep a segment alive past its parse
        now = monotonic()
        spliced = self._spliced
        if spliced is not None:  # (then `out` is empty: see on_headers_complete)
            self._spliced = None
            # Invariant: an exchange whose client connection is lost is detached from its
            # upstream connection at once (Exchange.abort), so the client transport is open.
            self.engine.write_hit(ex.inbound.transport, spliced, now)
            ex.state = RESPONDING  # (HEAD_SENT: an error can only close the connection now)
        elif out:
            self.engine.flush_writes()  # (in order: see Engine.flush_writes)
            ex.inbound.transport.write(b"".join(out))  # (one part: joined without a copy)
            out.clear()
            if self._head_done and ex.state is SENDING:
                ex.state = RESPONDING  # (HEAD_SENT)
        if self.state is TUNNEL:  # (llhttp also completes the 101 message: test this first)
            ex.switched()
        elif self._done:
            self._done = False
            self.park(now)
            try:
                ex.finished(now)
            except Exception:  # (free in 3.11 until raised)
                # A defect in the bookkeeping after a forwarded response: the connection is
                # parked, so nothing else would ever move the client's connection on (its next
                # request would wait forever). Close it instead.
                log.exception("finishing an exchange failed; closing its client connection")
                ex.inbound.abort()
        else:
            if not self._head_done:  # keep what we have of the head for on_headers_complete
                self._rare = True
                if self._pre is None:
                    self._pre = [data]
                else:
                    self._pre.append(data)
            self.deadline = now + ex.timeout

    # --- httptools callbacks (response parser) ----------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if name in _ORDINARY:  # stays in place
            return
        if name == b"Content-Length":  # stays in place
            self._cl = value
        elif name == b"Connection" and value == b"keep-alive" and not self._conn_cut:
            self._conn_cut = True  # nginx sends it on every response (see on_headers_complete)
        elif name in {b"Date", b"date"}:  # stays in place (uvicorn: lowercase)
            self._date = True
        else:
            self._header(name, value)

    def _header(self, name: bytes, value: bytes) -> None:
        kind = h.RESPONSE_NAMES.kind(name)
        if kind == h.ORDINARY:
            return
        if kind == h.CONTENT_LENGTH:  # (another spelling)
            self._cl = value
            return
        if kind == h.DATE:  # (another spelling)
            self._date = True
            return
        if self._head_done:
            return  # a trailer: dropped
        self._rare = True
        if kind == h.TRANSFER_ENCODING:
            self._te = value
        elif kind == h.CONNECTION:
            extra, _ = h.connection_tokens(value)
            if extra:
                self._conn_extra = (self._conn_extra or frozenset()) | extra
        elif kind == h.UPGRADE:
            self._upgrade_value = value
        # HOP: dropped by _general_head

    def on_message_begin(self) -> None:
        if self._done:
            raise _Stop  # a second response in one read: out of sync

    def on_headers_complete(self) -> None:
        ex: Exchange = self.ex  # type: ignore[assignment]  # (attached: a response is read)
        status = self.parser.get_status_code()
        if status < 200:
            if status != 101:
                self._interim_head(ex)
                return
            self._rare = True
        ex.status = status
        data: bytes = self._data  # type: ignore[assignment]  # (set around feed_data)
        if self._rare or self._cl is None or ex.head_only or not data.startswith(b"HTTP/1.1 "):
            self._general_head(ex, status)
            return
        # The fast path: the whole head is at the start of `data`, framed by Content-Length,
        # so the rest of `data` is body (a second message would have stopped the parser, see
        # _trim_spliced): `_spliced` gets `data` itself, plus our lines after the status line
        # (`out` is empty: an interim response before, or earlier bytes of the head, would
        # have set `_rare`; the body goes with the head, so on_body adds nothing). A
        # `Connection: keep-alive` line stays when the client connection stays open: it is then
        # our own option for that connection too (RFC 9110 7.6.1 lets an intermediary replace
        # the field with its own options: here the same bytes); it is cut when we close.
        self._splice(ex, data, self._date)
        # Remembered for the next response (see data_received); of an upstream whose heads
        # never repeat (a request id, a cookie) only every _NOVEL-th head is.
        novel = self._novel = self._novel + 1
        if novel <= _NOVEL or not novel % _NOVEL:
            self._remember(data, status)

    def _splice(self, ex: Exchange, data: bytes, dated: bool) -> None:
        """The fast path's output: `data` (head and body) with our lines added: after the
        status line to a keep-alive client, or in place of the Connection line when the client
        connection closes (see on_headers_complete); a Date line when `dated` is false."""
        if ex.keep_alive and ex.request_complete:
            insert = ex.inbound.tables.head_inserts[ex.target.ephemeral]
            if ex.set_cookie:
                insert = (insert or b"\r\n") + ex.set_cookie
            if not dated:
                insert = (insert or b"\r\n") + date_line()
            self._spliced = data.replace(b"\r\n", insert, 1) if insert else data
        else:  # (an answer before the whole body came: the client connection closes after it)
            ex.keep_alive = False
            self._splice_closing(ex, data, dated)
        self._head_done = True

    def _splice_closing(self, ex: Exchange, data: bytes, dated: bool) -> None:
        """The fast path's output when the client connection closes after this response."""
        add = ex.inbound.tables.close_lines[ex.target.ephemeral]
        if ex.set_cookie:
            add += b"\r\n" + ex.set_cookie[:-2]
        if not dated:
            add += b"\r\n" + date_line()[:-2]
        if self._conn_cut:
            # Its name is spelled exactly so (see on_header): the first match is in the head.
            cut = data.find(b"\r\nConnection:")  # the CRLF before that line
            after = data.find(b"\r\n", cut + 2)  # the CRLF ending it
        else:
            cut = after = data.find(b"\r\n")  # after the status line
        self._spliced = b"".join((data[:cut], add, data[after:]))

    def _remember(self, data: bytes, status: int) -> None:
        """The head at the start of `data` took the fast path: it becomes the pool's known
        head, unless its status says its Content-Length does not frame a body."""
        end = data.find(b"\r\n\r\n") + 4
        if status not in _NO_BODY_STATUS and end <= _KNOWN_HEAD_MAX:
            cl = int(self._cl)  # type: ignore[arg-type]  # (the fast path: Content-Length)
            self.pool.known = (data[:end], end + cl, status, self._conn_cut, self._date)

    def _trim_spliced(self, data: bytes, status: int) -> None:
        """The parser stopped at a second message after a spliced response: drop its bytes."""
        end = data.find(b"\r\n\r\n") + 4
        if status not in _NO_BODY_STATUS:
            end += int(self._cl or b"0")
        # `_spliced` ends with the segment's tail (our lines went in before, within the head).
        extra = len(data) - end
        if extra > 0:
            self._spliced = self._spliced[:-extra]  # type: ignore[index]  # (set: see caller)

    def _head_lines(self) -> list[bytes]:
        """The head being completed, split into lines (status line first), from the raw bytes
        of this segment and any earlier ones; moves `_pos` past it."""
        data = self._data
        assert data is not None
        pre = self._pre
        buf = data if pre is None else b"".join(pre) + data
        start = self._pos
        while buf.startswith(b"\r\n", start):
            start += 2  # llhttp accepts empty lines before a message
        end = buf.find(b"\r\n\r\n", start)
        self._pos = end + 4
        return buf[start:end].split(b"\r\n")

    @staticmethod
    def _ordinary_lines(lines: list[bytes], drop: frozenset[bytes] | None) -> list[bytes]:
        """Status line, then the header lines that are forwarded as they are."""
        kept = [lines[0] if lines[0].startswith(b"HTTP/1.1 ") else b"HTTP/1.1" + lines[0][8:]]
        kind_of = h.RESPONSE_NAMES.kind
        for line in lines[1:]:
            name = line[: line.index(b":")]
            kind = kind_of(name)
            if kind in _KEPT and not (drop and name.lower() in drop):
                kept.append(line)
        return kept

    def _interim_head(self, ex: Exchange) -> None:
        # Interim response (100 Continue, 103 Early Hints): forwarded to HTTP/1.1 clients.
        self._rare = True
        lines = self._head_lines()
        if not ex.http10:
            kept = self._ordinary_lines(lines, self._conn_extra)
            kept.append(b"\r\n")
            self.out.append(b"\r\n".join(kept))
        self._interim = True
        self._cl = None
        self._conn_cut = False
        self._te = None
        self._conn_extra = None
        self._upgrade_value = None

    def _general_head(self, ex: Exchange, status: int) -> None:
        lines = self._ordinary_lines(self._head_lines(), self._conn_extra)
        self._pre = None
        self._rare = True
        te = self._te
        if te is not None and not h.is_chunked_only(te):
            raise _Stop  # a transfer coding we cannot re-frame
        if status == 101:
            lines = [line for line in lines if line[:15].lower() != b"content-length:"]
            lines.append(b"Connection: Upgrade\r\nUpgrade: " + (self._upgrade_value or b""))
        elif self._cl is None and not ex.head_only and status not in _NO_BODY_STATUS:
            self._eof_body = te is None
            if ex.http10:
                ex.keep_alive = False  # no chunked for HTTP/1.0: the close ends the body
            else:
                self._chunk_out = True
                lines.append(b"Transfer-Encoding: chunked")
        if not self._date:
            lines.append(date_line()[:-2])
        if status != 101 and not ex.request_complete:
            ex.keep_alive = False  # an answer before the whole body came: close after it
        tails = ex.inbound.tables.head_tails[ex.target.ephemeral]
        tail = tails[True] if status == 101 else tails[ex.keep_alive]
        if ex.set_cookie:
            tail = ex.set_cookie + tail
        lines.append(tail)
        self.out.append(b"\r\n".join(lines))
        self._head_done = True
        if ex.head_only:
            self._done = True
            raise _Stop  # llhttp would wait for a HEAD response's announced body

    def on_body(self, body: bytes) -> None:
        if self._spliced is not None:
            return  # (the fast path: the body went with the head)
        if self._chunk_out:
            self.out.append(b"%x\r\n" % len(body) + body + b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self._rare:
            if self._interim:
                self._interim = False
                return
            if self._chunk_out:
                self.out.append(b"0\r\n\r\n")
            # llhttp forgets the keep-alive flags once the message is complete: ask now. (Not
            # needed on the fast path: HTTP/1.1, Content-Length, no Connection field but
            # `keep-alive`, so always kept alive; any other response set `_rare`.)
            if not self.parser.should_keep_alive():
                self._stop_reuse = True
        self._done = True

    # --- used by the exchange and the pool ---------------------------------------------------
    def begin(self, ex: Exchange, now: float) -> None:
        """Attach an exchange (the connection is open and idle; `now` is a monotonic time) and
        write its request head, with any body bytes collected meanwhile. The head alone is the
        hit path's write: deferred while the loop is busy (Engine.write_hit)."""
        self.ex = ex
        self._head_done = False
        self._cl = None
        self._conn_cut = False
        self._date = False
        if self._rare:
            self._reset_rare()
        deadline = self.deadline = now + ex.timeout
        if deadline < self._timer_at:
            self._arm(deadline)
        pending = ex.pending
        head = ex.head
        peer = self.pool.peer
        if peer:  # to another node's proxy: a signed internal hop
            head = self.engine.sign_hop(head, ex.host, peer)
        if ex.inbound.write_paused:
            self.pause_reading()
        elif pending is None:
            self.engine.write_hit(self.transport, head, now)
            return
        self.engine.flush_writes()  # (in order: see Engine.flush_writes)
        if pending is None:
            self.transport.write(head)
        else:
            ex.pending = None
            ex.pending_size = 0
            pending.insert(0, head)
            self.transport.write(b"".join(pending))

    def park(self, now: float) -> None:
        """The response was read to its end (at monotonic `now`): go idle in the pool, where
        the deadline becomes the pool idle timeout. Closed instead when it cannot be reused: the
        upstream asked to close or the stream is out of sync (`_stop_reuse`), the request body
        was not sent whole, or the pool is full (or closed: then it holds none)."""
        pool = self.pool
        idle = pool.idle
        ex = self.ex
        if (
            self._stop_reuse
            or (ex is not None and not ex.request_complete)
            or len(idle) >= pool.max_idle
        ):
            self.close()
            return
        self.reused = True
        self.ex = None
        if self._reading_paused:
            self.resume_reading()  # must see the upstream's close while parked
        self.deadline = now + pool.idle_timeout
        idle.append(self)

    def write(self, data: bytes) -> None:
        """Write request bytes (a body streamed after its head, or tunnel bytes); activity
        re-arms the idle timeout too. While a body streams, a duplicate of the socket's fd is
        kept (see `_salvage`)."""
        ex = self.ex
        tunnel = self.state is TUNNEL
        if self._spare_fd < 0 and ex is not None and not tunnel:
            self._keep_spare_fd()
        self.engine.flush_writes()  # (in order: see Engine.flush_writes)
        self.transport.write(data)
        if ex is not None and not tunnel:
            self.deadline = monotonic() + ex.timeout

    def _keep_spare_fd(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                self._spare_fd = os.dup(sock.fileno())

    def _drop_spare_fd(self) -> None:
        fd, self._spare_fd = self._spare_fd, -1
        if fd >= 0:
            os.close(fd)

    def _salvage(self) -> bytes:
        """What the app sent that was never read: an app that answers early and closes with
        request bytes unread resets the connection, and a body write that meets the reset ends
        the transport (uvloop) before the answer waiting in the socket was read. The kernel
        keeps those bytes while a descriptor of the socket stays open: ours."""
        out: list[bytes] = []
        while True:
            try:
                chunk = os.read(self._spare_fd, 65536)
            except OSError:  # EAGAIN (nothing more), ECONNRESET (after the data)
                break
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)

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
        self.state = move(UPSTREAM, self.state, UpEvent.CLOSE)
        self.engine.flush_writes()  # (what was written before the close goes first)
        self.transport.close()

    def abort(self) -> None:
        self.ex = None
        self.state = move(UPSTREAM, self.state, UpEvent.CLOSE)
        self.engine.flush_writes()  # (as if written at once: see Engine.flush_writes)
        self.transport.abort()

    def _protocol_error(self, ex: Exchange) -> None:
        self.out.clear()
        self._spliced = None
        ex.upstream_lost(self, UpstreamProtocolError())

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.engine.loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        if self.state is CLOSED:
            return
        now = monotonic()
        tick = now + self.pool.idle_timeout
        ex = self.ex
        if ex is None:  # parked
            if now >= self.deadline:
                self.pool.forget(self)
                self.close()
                return
        elif self.state is TUNNEL:
            pass  # upgraded connections have no timeout
        elif now >= self.deadline:
            ex.upstream_lost(self, UpstreamTimeout())
            return
        self._arm(max(min(self.deadline, tick), now + _TIMER_SLACK))
