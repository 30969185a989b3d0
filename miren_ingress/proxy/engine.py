"""The ingress hot path engine: theory of operation.

Objects
- `InboundConnection` (inbound.py): one per client connection, an asyncio Protocol feeding an
  httptools request parser. It validates each request head (the request-smuggling defences live
  here and in llhttp), renders the head to send upstream, and runs `Exchange`s one at a time in
  arrival order (HTTP/1.1 pipelining is answered in order, never interleaved).
- `Exchange` (exchange.py): one request/response cycle. `start()` answers reserved paths itself,
  asks the `Router` for a Target and a cached lease, and a parked upstream connection: on that
  hit path everything is synchronous, driven from protocol callbacks, with no Task, no await
  and no lock. A lease-cache miss or a pool without an idle
  connection runs `_connect()` in a Task.
- `UpstreamConnection` (upstream.py): an asyncio Protocol feeding an httptools response parser,
  re-framing the body for the client and forwarding it as it arrives.
- `UpstreamPool` (pool.py): parked keep-alive connections per upstream address.
- `Engine` (this module): what all of them share: router, config, metrics, pools, counters.

The hit path's cost (CPU per request) is the design constraint: a request through it is two
reads and two writes on sockets plus about 15 parser callbacks into Python, and the rest is
kept to plain attribute and dict operations. Habits that follow from measuring it (see the
"Proxy" section of benchmarks/README.md): one clock read when an exchange starts and one when
it finishes, shared by the duration metric and every deadline; no per-request Task, closure,
timer call or bound-method object; request heads are rendered with one join of parts; response
heads are spliced from the upstream's raw bytes (upstream.py); counters a scrape can compute
(in-flight requests) are not kept per request. Each rule has one owner, which the hit path
calls: taking a parked connection (`UpstreamPool.take`), attaching it (`UpstreamConnection.begin`),
a hit-path write (`Engine.write_hit`), parking it (`UpstreamConnection.park`), counting a
request (`ProxyMetrics.request_done`), moving the client connection on
(`InboundConnection.exchange_done`), taking and giving back a unit of work (the router's, that
is the activator's, `hold` / `release`). States and their moves: states.py.

Data flow and back-pressure
  client --data_received--> parser callbacks --> exchange.pending --one write--> upstream
  upstream --data_received--> parser callbacks --> out list --one write--> client
Each side pauses reading the other when its own transport's write buffer passes the high-water
mark and resumes on drain, so memory stays flat whatever the body size. Bodies are never
buffered whole: Content-Length bodies pass through unchanged, chunked ones are re-framed chunk
by chunk, bodies delimited by the upstream's close are re-framed as chunked.

Writes
The hit path's two writes (the request head to the upstream, the spliced response to the
client) go out at once while the loop is quiet, and are deferred to the end of the loop
iteration while it is busy. Busy means the previous hit-path write, or the end of the last
flush, was less than `Engine.busy_gap` (`BUSY_GAP`, 20 µs) ago, or writes are already queued.
Deferred writes are appended to `Engine.later` and written by one callback, scheduled with
`call_soon` by the first of them, which runs before the loop polls again. Under load one
iteration handles the ready events of many connections, so the peers (the sandboxes, the
clients) get their bytes together instead of being woken one write at a time (measured at 32
connections: p99 -9 %, req/s +4 %). With one request in flight its writes are tens of
microseconds apart, so they go out at once, without waiting for the rest of their callback
(deferring them too cost 6 µs of latency per request at one connection). The gap is measured
from the end of the last flush as well: a flush of many writes takes longer than the gap
itself, and without that the first write of every busy iteration would go out alone.
Every other write, close or abort of a connection, and a client's FIN, calls
`Engine.flush_writes` first, and a hit-path write is only made at once when nothing is queued,
so each transport gets its bytes in program order: a pipelined local answer after a deferred
response, a close after it, or a request body after a deferred head all follow what was
written before them.

Timeouts
One timer per connection, lazily re-armed (see upstream.py and inbound.py): the upstream side
enforces the route's request_timeout as an idle timeout (504 before a response head, close
after) and the pool idle timeout; the client side enforces the header and keep-alive timeouts.
Upgraded (101) connections become raw byte tunnels with no timeout. Deadlines are
`time.monotonic()` values, which are valid `loop.call_at` instants: asyncio's loop clock is
`time.monotonic()` and uvloop's is the same CLOCK_MONOTONIC truncated to milliseconds (a timer
may fire up to a millisecond early; it re-checks and re-arms).

Shutdown
`drain` closes idle client connections at once and marks busy ones: their active exchange's
response says `Connection: close` and the connection closes after it (pipelined requests behind
it are not served); then it waits up to the grace and aborts what is left.

Failure rules
- Connect refused, reset or timed out (nothing was sent): `discard` the lease (the router takes
  its sandbox out of service), `acquire` once more and retry once: another instance, or a fresh
  boot; a second failure is 502.
- A reused keep-alive connection that closes before any response byte, for a GET/HEAD/OPTIONS
  without body: resent once on a new connection (the stale keep-alive race).
- Anything else after request bytes were written: 502, never retried.
- Errors become responses in errorpage.py only; an error after the response head went out
  closes the client connection instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from . import guard
from .config import ProxyConfig
from .interfaces import Lease, Router
from .metrics import ProxyMetrics
from .pool import UpstreamPool

if TYPE_CHECKING:
    from .inbound import InboundConnection

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[int, Mapping[str, Any]]]


def default_health() -> tuple[int, Mapping[str, Any]]:
    return 200, {"status": "ok"}


BUSY_GAP: Final = 20e-6  # seconds: hit-path writes closer than this are deferred (see "Writes")
HOP_WINDOW: Final = 30  # seconds: a signed internal hop is accepted this far from its time stamp


def _hop_text(stamp: bytes, line: bytes, host: bytes, node: bytes) -> bytes:
    """What an internal hop's HMAC covers (Engine.sign_hop, Engine.is_hop)."""
    return stamp + b"\n" + line + b"\n" + host + b"\n" + node


class HeadTables:
    """What the proxy adds to a response head, precomputed per kind of client connection (plain
    or TLS: HSTS) and indexed by `target.ephemeral`:

    - `head_tails[ephemeral][keep_alive]`: the end of a rebuilt head, after the upstream's own
      header lines;
    - `head_inserts[ephemeral]`: on the fast path to a keep-alive client, what replaces the CRLF
      ending the status line (b"" when nothing is inserted);
    - `close_lines[ephemeral]`: to a client whose connection closes, the lines that replace the
      upstream's Connection line or follow the status line (each starts with CRLF, the last
      does not end with it).
    """

    __slots__ = ("close_lines", "head_inserts", "head_tails")

    def __init__(self, robots: bytes, extra: bytes = b"") -> None:
        """`robots`: the X-Robots-Tag line previews get (b"": none); `extra`: lines every
        response gets (HSTS over TLS)."""
        close = b"Connection: close\r\n"
        preview = robots + extra
        self.head_tails = (
            (extra + close + b"\r\n", extra + b"\r\n"),
            (preview + close + b"\r\n", preview + b"\r\n"),
        )
        self.head_inserts = (
            b"\r\n" + extra if extra else b"",
            b"\r\n" + preview if preview else b"",
        )
        self.close_lines = (b"\r\n" + extra + close[:-2], b"\r\n" + preview + close[:-2])


class Engine:
    """State shared by every connection of one ProxyServer."""

    __slots__ = (
        "_drained",
        "_hop_warned",
        "_robots",
        "acme_answers",
        "busy_gap",
        "closing",
        "config",
        "connections",
        "fence_at",
        "fence_check",
        "fences",
        "flush_soon",
        "health",
        "hop_key",
        "last_write",
        "later",
        "later_armed",
        "login_attempts",
        "loop",
        "metrics",
        "node_name",
        "plain",
        "pools",
        "redirect_port",
        "router",
        "secure",
        "tasks",
        "upstream_open",
    )

    def __init__(
        self,
        router: Router,
        config: ProxyConfig,
        metrics: ProxyMetrics,
        health: HealthCheck,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.health = health
        self.loop = loop
        self.pools: dict[tuple[str, int], UpstreamPool] = {}
        self.connections: set[InboundConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.upstream_open = 0  # upstream connections with an open transport
        self.closing = False
        self._drained: asyncio.Event | None = None
        # Writes of the hit path, deferred to the end of the loop iteration (see "Writes"
        # above): (transport, data) in the order they were made.
        self.later: list[tuple[asyncio.WriteTransport, bytes]] = []
        self.later_armed = False  # flush_soon is scheduled
        self.last_write = 0.0  # monotonic: the last hit-path write, or the end of a flush
        self.busy_gap = BUSY_GAP
        self.flush_soon = self._flush_soon  # (bound once: arm_flush schedules it)
        # What goes into response heads, per kind of client connection (see HeadTables).
        # (An empty robots_tag: no X-Robots-Tag line at all.)
        tag = config.robots_tag.encode("latin-1")
        self._robots = b"X-Robots-Tag: " + tag + b"\r\n" if tag else b""
        self.plain = self.secure = HeadTables(self._robots)
        # TLS (see ProxyServer.start_tls): the HTTP-01 answers an ACME issuer publishes
        # (token -> key authorization; served on every listener), and the HTTPS port plain
        # requests are redirected to (None: no redirect).
        self.acme_answers: dict[bytes, bytes] = {}
        self.redirect_port: int | None = None
        self.login_attempts = guard.Attempts()  # protected hosts' password attempts, per client
        # Several nodes (miren_activator.cluster): past monotonic `fence_at` this node's
        # membership is unproven, and the next request calls `check_fence` (which fences the
        # activator; `fences` counts it). `hop_key` signs the requests this node forwards to
        # another node and checks the ones forwarded to it (X-Miren-Hop; see `sign_hop`).
        # (A node alone: fence_at is inf, hop_key b"": no hop is sent or accepted.)
        self.fence_at = math.inf
        self.fence_check: Callable[[float], float] = lambda now: math.inf
        self.fences = 0
        self.hop_key = b""
        self.node_name = b""  # this node's name: a hop must be signed for it
        self._hop_warned = -math.inf

    def check_fence(self, now: float) -> None:
        """The clock passed `fence_at`: ask the cluster (it fences when the membership is
        unproven, and says until when it is proven; inf while fenced)."""
        until = self.fence_check(now)
        if until == math.inf:
            self.fences += 1
        self.fence_at = until

    def sign_hop(self, head: bytes, host: bytes, peer: bytes) -> bytes:
        """`head` (a request head to the node named `peer`) with its X-Miren-Hop line: the
        time and an HMAC-SHA256, under the cluster key, of the time, the request line, the Host
        value and the node it is for. A captured line is good for that request to that node
        only, for HOP_WINDOW seconds."""
        stamp = b"%d" % int(time.time())
        line = head[: head.find(b"\r\n")]
        mac = hmac.new(self.hop_key, _hop_text(stamp, line, host, peer), hashlib.sha256)
        return head[:-2] + b"X-Miren-Hop: " + stamp + b"." + mac.hexdigest().encode() + b"\r\n\r\n"

    def is_hop(self, value: bytes, line: bytes, host: bytes) -> bool:
        """An X-Miren-Hop value signed by a node of this cluster for this request line and
        host, to this node (`node_name`), within HOP_WINDOW seconds of now."""
        key = self.hop_key
        if not key:
            return False  # (a node alone: the header is a client's, dropped)
        stamp, dot, mac = value.strip().partition(b".")
        skew = 0.0
        ok = dot and stamp.isdigit() and len(stamp) <= 12
        if ok:
            skew = time.time() - int(stamp)
            want = hmac.new(key, _hop_text(stamp, line, host, self.node_name), hashlib.sha256)
            ok = abs(skew) <= HOP_WINDOW and hmac.compare_digest(mac, want.hexdigest().encode())
        if not ok:
            self._hop_refused(skew)
        return bool(ok)

    def _hop_refused(self, skew: float) -> None:
        """Counted, and logged at most once a minute: a stream of them means a forger, or a node
        whose clock is off (its forwards lose their X-Forwarded-* and are asked to log in)."""
        self.metrics.hops_refused += 1
        now = time.monotonic()
        if now - self._hop_warned >= 60.0:
            self._hop_warned = now
            log.warning(
                "refused an X-Miren-Hop that did not verify (%d so far; its time stamp %.0f s "
                "from this node's clock): a forgery, or a node whose clock is off",
                self.metrics.hops_refused,
                skew,
            )

    def forget_peer(self, address: str) -> None:
        """A node left: close its keep-alive connections (its address may serve something
        else later, and must never receive a signed hop then)."""
        host, _, port = address.rpartition(":")
        if port.isdigit():
            pool = self.pools.pop((host.strip("[]"), int(port)), None)
            if pool is not None:
                pool.close()

    def set_hsts(self, max_age: int) -> None:
        """HTTPS answers carry `Strict-Transport-Security: max-age=N` (0: none)."""
        extra = b"Strict-Transport-Security: max-age=%d\r\n" % max_age if max_age > 0 else b""
        self.secure = HeadTables(self._robots, extra)

    def __repr__(self) -> str:
        return (
            f"<Engine connections={len(self.connections)} in_flight={self.in_flight} "
            f"upstream_open={self.upstream_open} pools={len(self.pools)}>"
        )

    @property
    def in_flight(self) -> int:
        """Exchanges started and not finished. Counted when asked (scrapes, tests), not kept
        per request: each connection has at most one started exchange, its active one."""
        n = 0
        for conn in self.connections:
            if conn.busy:
                n += 1
        return n

    @property
    def tunnels(self) -> int:
        """Upgraded connections (WebSockets) open now, counted when asked."""
        n = 0
        for conn in self.connections:
            if conn.tunneled:
                n += 1
        return n

    def write_hit(self, transport: asyncio.WriteTransport, data: bytes, now: float) -> None:
        """Write `data` (a hit-path write at monotonic `now`): at once while the loop is quiet,
        at the end of this loop iteration while it is busy (see "Writes" above). (`arm_flush`
        runs once per iteration, not per write.)"""
        later = self.later
        if later or now - self.last_write < self.busy_gap:
            later.append((transport, data))
            if not self.later_armed:
                self.arm_flush()
        else:
            transport.write(data)
        self.last_write = now

    def arm_flush(self) -> None:
        """Schedule the flush of `later` for the end of this loop iteration."""
        self.later_armed = True
        self.loop.call_soon(self.flush_soon)

    def flush_writes(self) -> None:
        """Write what the hit path deferred, in order. Every write, close or abort that is not
        deferred calls this first, so bytes reach each transport in the order they were
        written. A transport that is closing still takes them (a graceful close sends what
        is buffered first, as for a write made before the deferral); one whose connection
        was lost meanwhile drops them (uvloop: RuntimeError, its handle is closed)."""
        later = self.later
        if not later:  # (the common case: callers need not test first)
            return
        self.later = []
        for transport, data in later:
            try:
                transport.write(data)
            except RuntimeError:  # the connection is gone: nobody to deliver to
                continue
            except Exception:  # (a defect: never leave the peer waiting for these bytes)
                log.exception("a deferred write failed; aborting its connection")
                transport.abort()

    def _flush_soon(self) -> None:
        self.later_armed = False
        self.flush_writes()
        self.last_write = monotonic()  # (the busy gap counts from the end of the batch)

    def pool_for(self, lease: Lease) -> UpstreamPool:
        key = lease.addr
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = UpstreamPool(self, key[0], key[1])
            if getattr(lease, "remote", False):  # another node's proxy: requests are signed
                pool.peer = str(getattr(lease, "peer", "")).encode()
        return pool

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def connection_opened(self, conn: InboundConnection) -> None:
        self.connections.add(conn)
        if self.closing:
            conn.close()

    def connection_closed(self, conn: InboundConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._drained is not None:
            self._drained.set()

    async def drain(self, grace: float) -> None:
        """Stop: close idle connections, let active exchanges finish up to `grace` seconds,
        then abort what is left and close the pools."""
        self.closing = True
        self._drained = asyncio.Event()
        for conn in list(self.connections):
            conn.stop_after_active()  # closes it now if it is idle
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
            except TimeoutError:
                log.warning(
                    "closing %d connections still busy after %.1fs", len(self.connections), grace
                )
        for conn in list(self.connections):
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for pool in self.pools.values():
            pool.close()
