"""One request/response cycle through the proxy.

An exchange is created by the inbound connection when a request head has been parsed, started
when it becomes the connection's active exchange (requests are answered strictly in order), and
finished exactly once: then its metrics are recorded, its lease is handed back and the inbound
connection moves on to the next request or closes. Its states and their moves are the table
`states.EXCHANGE` (WAITING, ROUTING, SENDING, RESPONDING, TUNNEL, DONE: see states.py).

The request head for the upstream is rendered once (`head`, kept for a replay) and written when
an upstream connection is attached, together with any framed body bytes collected in `pending`
meanwhile; later body bytes are written after each parsed segment. Nothing is written for a
segment that fails to parse.

On the hit path an exchange reads the clock twice: at `start` (the upstream deadline, and the
duration's origin unless the request body was buffered: then its head's arrival) and when it
finishes (the duration's end, the parked connection's and the client connection's idle
deadlines), both `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from time import monotonic
from typing import TYPE_CHECKING, Final

from . import guard
from .errorpage import render_json, render_loading, render_page, render_plain, render_response
from .errors import ProxyError, ServiceUnavailable, Starting, UpstreamConnectError, UpstreamReset
from .headers import accept_of
from .interfaces import UNROUTED, Guard, Lease, Refusal, Target
from .retry import Next, after_connect_error, after_upstream_lost
from .states import EXCHANGE, Ex, ExEvent, move

if TYPE_CHECKING:
    from .engine import Engine
    from .inbound import InboundConnection
    from .upstream import UpstreamConnection

log = logging.getLogger(__name__)

# (Final: compiled, each is a C constant, not a lookup in the module's dict per use.)
WAITING: Final = Ex.WAITING
ROUTING: Final = Ex.ROUTING
SENDING: Final = Ex.SENDING
RESPONDING: Final = Ex.RESPONDING
TUNNEL: Final = Ex.TUNNEL
DONE: Final = Ex.DONE
_REDIRECT_HOST: Final = re.compile(rb"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
RESERVED_PREFIX: Final = b"/.well-known/miren/"
HEALTH_PATH: Final = b"/.well-known/miren/health"
ACME_PREFIX: Final = b"/.well-known/acme-challenge/"  # RFC 8555 §8.3: HTTP-01 answers
# Request properties passed to Exchange() as one int.
F_KEEP_ALIVE: Final = 1
F_HTTP10: Final = 2
F_UPGRADE: Final = 4
F_BODY: Final = 8
F_CHUNKED: Final = 16
F_RESERVED: Final = 32  # the target is under RESERVED_PREFIX: answered by the proxy
F_HEALTH: Final = 64  # ... and it is the health endpoint
F_HEAD: Final = 128  # a HEAD request
F_REJECT: Final = 256  # not a request: the answer to a malformed one (`error`), then a close
F_ACME: Final = 512  # an ACME HTTP-01 challenge request: answered from engine.acme_answers
F_LOGIN: Final = 2048  # the login form of a protected host (guard.py)
F_REDIRECT: Final = 1024  # the plain listener redirects to HTTPS (tls.redirect_http)


def reserved_flags(url: bytes) -> int:
    path = url.split(b"?", 1)[0]
    if path == HEALTH_PATH:
        return F_RESERVED | F_HEALTH
    return F_RESERVED | (F_LOGIN if path == guard.LOGIN_PATH else 0)


def special_flags(url: bytes, redirect: bool) -> int:
    """The flags of a request the proxy answers itself (0: none): its reserved paths, an ACME
    challenge, or, on a redirecting listener, everything else (a redirect to HTTPS)."""
    if url.startswith(RESERVED_PREFIX):
        return reserved_flags(url)
    if url.startswith(ACME_PREFIX):
        return F_RESERVED | F_ACME
    return F_RESERVED | F_REDIRECT if redirect else 0


class Exchange:
    # No __slots__: most fields keep their class-level default for the whole exchange, so an
    # exchange is built with a handful of stores (measured: cheaper than 30 slot stores). The
    # defaults describe the common request: HTTP/1.1, keep-alive, no body, not HEAD. Fields
    # read on every request are set in __init__ even so: reading a class default costs about
    # four times an instance attribute (CPython 3.11 does not specialize that lookup).
    app = "unknown"
    conn: UpstreamConnection | None = None  # attached (SENDING, RESPONDING, TUNNEL)
    lease: Lease | None = None
    lease_cached = True  # `lease` came from the router's cache (see retry.py)
    pending: list[bytes] | None = None  # framed body bytes not written upstream yet
    pending_size = 0
    replayed = False  # the one replay after a stale keep-alive connection was used
    request_complete = False  # the whole request was read from the client
    retried = False  # the one retry after a refused cached lease was used
    started = 0.0  # monotonic: the duration's origin (set by start)
    status = 0
    target: Target = UNROUTED  # (set by start when routed: before ROUTING or SENDING)
    task: asyncio.Task[None] | None = None
    timeout = 60.0
    # Properties of the request, set from its head (see `set_flags`):
    keep_alive = True  # the client connection stays open
    http10 = False
    upgrade = False
    has_body = False
    chunked_in = False
    buffered = False  # started only once its body is complete or request_buffer bytes long
    arrived = 0.0  # a buffered request: when its head arrived (its duration's origin)
    reserved = 0
    head_only = False
    error: ProxyError | None = None  # F_REJECT: the answer (None: close without one)
    stops_parser = False  # llhttp stops after this request (`Connection: upgrade` + `Upgrade`)
    body_length = 0  # ... and its Content-Length, which the inbound side then counts itself
    set_cookie = b""  # a Set-Cookie line the response gets (a protected host's bypass token)
    internal = False  # forwarded by another node of the cluster (X-Miren-Hop): served here

    def __init__(  # noqa: PLR0917  (positional: keywords cost per request, measured)
        self,
        inbound: InboundConnection,
        method: bytes,
        host: bytes,
        head: bytes,
        complete: bool,  # a request without body: complete with its head
        head_only: bool,  # a HEAD request
    ) -> None:
        self.inbound = inbound
        self.engine: Engine = inbound.engine
        self.method = method
        self.host = host
        self.head = head  # the request head for the upstream (kept for a replay)
        self.request_complete = complete  # (True: a request without body, complete already)
        self.head_only = head_only
        self.keep_alive = True
        self.reserved = 0
        self.started = 0.0
        self.pending: list[bytes] | None = None
        self.state = WAITING  # (see states.EXCHANGE)

    @classmethod
    def rejection(
        cls, inbound: InboundConnection, error: ProxyError | None, method: bytes, accept: bytes
    ) -> Exchange:
        """The answer to a malformed request, queued behind the requests read before it."""
        ex = cls(inbound, method, b"", b"\r\nAccept: " + accept + b"\r\n" if accept else b"",
                 True, False)  # fmt: skip
        ex.reserved = F_REJECT
        ex.error = error
        ex.keep_alive = False
        return ex

    def set_flags(self, flags: int) -> None:
        """Properties of a request that is not the common one (see the F_* flags)."""
        self.keep_alive = bool(flags & F_KEEP_ALIVE)
        self.http10 = bool(flags & F_HTTP10)
        self.upgrade = bool(flags & F_UPGRADE)
        self.has_body = bool(flags & F_BODY)
        self.chunked_in = bool(flags & F_CHUNKED)
        self.reserved = flags & (F_RESERVED | F_HEALTH | F_ACME | F_REDIRECT | F_LOGIN)
        self.head_only = bool(flags & F_HEAD)

    @property
    def accept(self) -> bytes:
        """The request's Accept value (negotiates the body of an error answered by the proxy)."""
        return accept_of(self.head)

    def add_body(self, data: bytes) -> None:
        """Framed request body bytes for the upstream, written with the next flush."""
        pending = self.pending
        if pending is None:
            self.pending = [data]
        else:
            pending.append(data)
        self.pending_size += len(data)

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method.decode()} app={self.app} status={self.status} "
            f"conn={'yes' if self.conn is not None else 'no'} {self.state.name}>"
        )

    # --- start: local answers, routing, lease, connection -------------------------------------
    def start(self) -> None:
        """Become the active exchange of the inbound connection: answer a reserved path or a
        refusal, else attach a parked connection of a warm lease (the hit path: synchronous),
        else obtain them in a task."""
        engine = self.engine
        now = monotonic()
        self.started = self.arrived or now
        if self.reserved:
            self._reserved()
            return
        if now >= engine.fence_at:  # (this node's cluster membership is unproven: fence)
            engine.check_fence(now)
        router = engine.router
        target = router.resolve(self.host, now)
        if isinstance(target, Refusal):
            self.respond_error(target.status, target.message, target.retry_after)
            return
        self.target = target
        # (a request another node forwarded was admitted there, its credentials stripped)
        if target.guard is not None and not self.internal and not self._admitted(target.guard):
            return
        self.app = target.app
        self.timeout = target.request_timeout
        lease = router.cached_lease(target)
        if lease is not None and self.internal and getattr(lease, "remote", False):
            router.release(lease)  # never forwarded twice: serve it here (see _acquire)
            lease = None
        if lease is not None:
            self.lease = lease  # (lease_cached: True by default)
            engine.metrics.lease_hits += 1
            pool = engine.pools.get(lease.addr)
            if pool is not None:
                conn = pool.take()
                if conn is not None:
                    self.attach(conn, now)
                    return
        self.state = move(EXCHANGE, self.state, ExEvent.ROUTE)
        self.task = engine.spawn(self._connect())

    def _reserved(self) -> None:
        if self.reserved & F_REJECT:
            err = self.error
            if err is None:  # (HTTP/0.9: no answer the client could read)
                self.status = 400
                self.finished(monotonic())
            else:
                self.respond_error(err.status, err.public_message, err.retry_after)
            return
        if self.reserved & F_HEALTH:
            status, payload = self.engine.health()
            self.status = status
            self.keep_alive = self.keep_alive and self.request_complete
            self.inbound.write(
                render_json(status, payload, keep_alive=self.keep_alive, head_only=self.head_only)
            )
            self.state = move(EXCHANGE, self.state, ExEvent.HEAD_SENT)
            self.finished(monotonic())
        elif self.reserved & F_ACME:
            token = self.url_path()[len(ACME_PREFIX) :]
            answer = self.engine.acme_answers.get(token)
            if answer is None:
                self.respond_error(404, "No such ACME challenge.")
            else:
                self._respond_plain(200, answer)
        elif self.reserved & F_REDIRECT:
            self._redirect_to_https()
        elif self.reserved & F_LOGIN:
            self._login()
        else:
            self.respond_error(404, "The page could not be found.")

    # -- protected hosts (guard.py) --------------------------------------------------------------

    def _admitted(self, g: Guard) -> bool:
        """A request to a protected host: let it through (its credentials stripped) or answer
        the login page. A connection that proved itself for this host is not checked again."""
        inbound = self.inbound
        cookie, token, stripped = guard.examine(self.head)
        if g.open:
            self.head = stripped
            return True
        host = guard.host_key(self.host)
        now = time.time()
        proven = inbound.admitted
        ok = proven is not None and proven[0] is g.key and proven[1] == host and proven[2] > now
        if not ok and cookie is not None and guard.verify(g.key, host, cookie, now):
            inbound.admitted = (g.key, host, float(cookie.partition(b".")[0]))
            ok = True
        if not ok and token is not None and guard.bypass_ok(g.bypass_hash, token) and g.key:
            age = int(self.engine.config.login_cookie_max_age)
            self.set_cookie = guard.set_cookie(
                guard.sign(g.key, host, now, age), secure=inbound.secure, max_age=age
            )
            inbound.admitted = (g.key, host, now + age)
            ok = True
        if ok:
            self.head = stripped
            return True
        self.app = g.app
        if token is not None and not self.engine.login_attempts.allow(inbound.peer):
            self.respond_error(429, "Too many attempts; wait a minute.", 60)  # guessing tokens
            return False
        self._respond_page(401, guard.login_page(guard.safe_next(self.url_target())))
        return False

    def _login(self) -> None:
        """POST /.well-known/miren/login?next=<path>: the password from the form; 303 to `next`
        with the cookie, or the login page again (401), or 429 past the attempts allowed."""
        target = self.engine.router.resolve(self.host, monotonic())
        g = None if isinstance(target, Refusal) else target.guard
        if g is None or self.method != b"POST":
            self.respond_error(404, "The page could not be found.")
            return
        query = self.url_target().partition(b"?")[2]
        next_path = guard.safe_next(
            urllib.parse.parse_qs(query.decode("latin-1")).get("next", ["/"])[0]
        )
        if not self.request_complete:
            self.respond_error(413, "The form is too large.")
            return
        if not self.engine.login_attempts.allow(self.inbound.peer):
            self.respond_error(429, "Too many attempts; wait a minute.", 60)
            return
        password = guard.form_password(b"".join(self.pending or ()))
        self.pending = None
        self.state = move(EXCHANGE, self.state, ExEvent.ROUTE)
        self.task = self.engine.spawn(self._check_password(g, password or b"", next_path))

    async def _check_password(self, g: Guard, password: bytes, next_path: str) -> None:
        ok = (
            bool(g.password_hash)
            and bool(g.key)
            and await asyncio.to_thread(guard.password_ok, g.password_hash, password)
        )
        self.task = None
        if not ok:
            self._respond_page(401, guard.login_page(next_path, "Wrong password."))
            return
        host = guard.host_key(self.host)
        age = int(self.engine.config.login_cookie_max_age)
        cookie = guard.set_cookie(
            guard.sign(g.key, host, time.time(), age), secure=self.inbound.secure, max_age=age
        )
        location = next_path.encode("latin-1", "replace")
        self._respond_plain(303, b"", b"Location: " + location + b"\r\n" + cookie)

    def _respond_page(self, status: int, page: bytes) -> None:
        self.status = status
        self.keep_alive = self.keep_alive and self.request_complete
        self.inbound.write(
            render_page(status, page, keep_alive=self.keep_alive, head_only=self.head_only)
        )
        self.state = move(EXCHANGE, self.state, ExEvent.HEAD_SENT)
        self.finished(monotonic())

    def url_target(self) -> bytes:
        """The request target (path and query) as the client sent it."""
        return self.head.split(b" ", 2)[1] if self.head[:1] != b"\r" else b"/"

    def url_path(self) -> bytes:
        """The request target's path (rare paths only: parsed from the head kept for the
        upstream)."""
        return self.url_target().split(b"?", 1)[0]

    def _respond_plain(self, status: int, body: bytes, extra: bytes = b"") -> None:
        self.status = status
        self.keep_alive = self.keep_alive and self.request_complete
        self.inbound.write(
            render_plain(status, body, extra, keep_alive=self.keep_alive, head_only=self.head_only)
        )
        self.state = move(EXCHANGE, self.state, ExEvent.HEAD_SENT)
        self.finished(monotonic())

    def _redirect_to_https(self) -> None:
        """308 to the same URL over HTTPS (RFC 9110 §15.4.9: method and body kept)."""
        port = self.engine.redirect_port
        name = guard.host_key(self.host)  # (the one reading of "Host without its port")
        if not _REDIRECT_HOST.fullmatch(name):  # never copy a stranger's text into Location
            self.respond_error(400, "The Host header is not a host name.")
            return
        authority = name if port in (None, 443) else name + b":%d" % port
        self._respond_plain(
            308,
            b"Moved to HTTPS.\n",
            b"Location: https://" + authority + self.url_target() + b"\r\n",
        )

    async def _acquire(self, target: Target) -> Lease:
        """A lease from the router (a cold start may boot); a browser navigation to a booting
        preview gets the loading page after `loading_page_after` instead (`Starting`) while the
        boot goes on."""
        router = self.engine.router
        if not target.loading or not self._is_navigation():
            return await router.acquire(target, self.internal)
        config = self.engine.config
        waiting = asyncio.ensure_future(router.acquire(target, self.internal))
        done, _ = await asyncio.wait((waiting,), timeout=config.loading_page_after)
        if done:
            return waiting.result()
        waiting.cancel()  # only this wait ends: the activator's boot goes on
        await asyncio.gather(waiting, return_exceptions=True)  # (our own cancel still raises)
        raise Starting()

    def _check_fence(self, fences: int) -> None:
        """After the await of a lease: if this node was fenced meanwhile (or must be now: a
        freeze ended), the lease is handed back unused and the answer is 503."""
        engine = self.engine
        now = monotonic()
        if now >= engine.fence_at:
            engine.check_fence(now)
        if engine.fences != fences:
            lease, self.lease = self.lease, None
            if lease is not None:
                engine.router.release(lease)
            raise ServiceUnavailable("This node cannot serve the application right now; retry.")

    def _is_navigation(self) -> bool:
        """A browser loading a page: GET with `Sec-Fetch-Mode: navigate`, or asking for HTML
        without `X-Requested-With` (which scripts send)."""
        if self.method != b"GET":
            return False
        head = self.head.lower()
        if b"\r\nsec-fetch-mode: navigate" in head:
            return True
        return b"text/html" in self.accept.lower() and b"\r\nx-requested-with:" not in head

    async def _connect(self) -> None:
        """ROUTING: acquire a lease (cache miss) and/or open a connection, then attach."""
        engine = self.engine
        target = self.target
        try:
            while True:
                lease = self.lease
                if lease is None:
                    engine.metrics.lease_misses += 1
                    fences = engine.fences
                    lease = self.lease = await self._acquire(target)
                    self.lease_cached = False
                    self._check_fence(fences)
                pool = engine.pool_for(lease)
                conn = pool.take()
                if conn is not None:
                    break
                try:
                    conn = await pool.connect()
                    break
                except (OSError, TimeoutError) as exc:
                    step = after_connect_error(exc, retried=self.retried)
                    if step is not Next.FAIL:  # the sandbox is out of service
                        self.lease = None
                        engine.router.discard(lease)
                    if step is not Next.FRESH_LEASE:
                        raise UpstreamConnectError() from exc
                    engine.metrics.upstream_error("connect_retried")
                    self.retried = True
        except ProxyError as err:
            self.task = None
            self.fail(err)
            return
        except Exception:
            self.task = None
            log.exception("unexpected error while acquiring an upstream")
            self.fail(ProxyError())
            return
        self.task = None
        if self.state is not ROUTING:  # (defensive: abort and fail cancel this task)
            pool.put(conn, monotonic())
            self._release()
            return
        self.attach(conn, monotonic())

    def attach(self, conn: UpstreamConnection, now: float) -> None:
        """Use `conn` (open, idle) for this exchange: it writes the head and pending body."""
        self.conn = conn
        self.state = SENDING  # (ATTACH: from WAITING on the hit path, else from ROUTING)
        conn.begin(self, now)  # sets the deadline: no need to re-arm it for this first write
        if self.inbound.blocked:
            self.inbound.attached()

    def flush(self) -> None:
        """Write the collected request body bytes to the upstream (one write). Once the app has
        begun its answer, the rest of the body is dropped, not sent: an app that answers early
        (401, 413) reads no more, and bytes written into its closed socket only earn a reset
        that can cost the answer itself. (The client connection then closes after the
        answer, draining what the client still sends: InboundConnection.close.)"""
        pending = self.pending
        conn = self.conn
        if pending and conn is not None:
            if not conn.answered:
                conn.write(pending[0] if len(pending) == 1 else b"".join(pending))
            self.pending = None
            self.pending_size = 0

    # --- outcomes -------------------------------------------------------------------------------
    def finished(self, now: float) -> None:
        """The exchange is over at monotonic `now`: the upstream response was forwarded whole
        (its connection is already parked or closed), or the proxy answered or ended it. Its
        metrics are recorded, its lease is handed back and the client connection moves on."""
        self.conn = None
        self.state = DONE  # (FINISH: from RESPONDING; from WAITING when nothing is answered)
        if self.pending is not None:  # (a local answer to a request with a body: never sent)
            self.pending = None
            self.pending_size = 0
        if not self.request_complete:
            self.keep_alive = False  # the rest of the request body cannot be skipped safely
        engine = self.engine
        engine.metrics.request_done(self.app, self.status, self.method, now - self.started)
        lease = self.lease
        if lease is not None:
            self.lease = None
            engine.router.release(lease)
        self.inbound.exchange_done(self, now)

    def switched(self) -> None:
        """101 forwarded: both sides are now a raw byte tunnel; the request is counted done."""
        conn = self.conn
        assert conn is not None
        self.state = move(EXCHANGE, self.state, ExEvent.SWITCH)
        self.inbound.become_tunnel(conn)
        self._record()

    def tunnel_closed(self) -> None:
        """Either side of a tunnel closed: close the other, hand the lease back."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.close()
        self.state = move(EXCHANGE, self.state, ExEvent.ABORT)
        self.inbound.close()
        self._release()

    def upstream_lost(self, conn: UpstreamConnection, err: ProxyError) -> None:
        """The upstream connection broke, timed out or spoke nonsense mid-exchange: answer the
        error, or send the request again where retry.py says it is safe."""
        self.conn = None
        conn.abort()
        step = after_upstream_lost(
            reset=isinstance(err, UpstreamReset),
            got_bytes=conn.got_bytes,
            request_complete=self.request_complete,
            has_body=self.has_body,
            method=self.method,
            upgrade=self.upgrade,
            reused=conn.reused,
            replayed=self.replayed,
            lease_cached=self.lease_cached,
            retried=self.retried,
        )
        if step is Next.REPLAY:  # the same lease, a new connection (attach writes the head)
            self.replayed = True
        elif step is Next.FRESH_LEASE:
            self.engine.metrics.upstream_error("connect_retried")
            self.retried = True
            lease, self.lease = self.lease, None
            if lease is not None:
                self.engine.router.discard(lease)
        else:
            self.fail(err)
            return
        self.state = move(EXCHANGE, self.state, ExEvent.RETRY)
        self.task = self.engine.spawn(self._connect())

    def fail(self, err: ProxyError, *, upstream: bool = True) -> None:
        """Answer an error: an error page if no response head went out yet, else close.
        `upstream` errors are also counted in miren_ingress_upstream_errors_total."""
        if self.state >= TUNNEL:
            return
        if self.task is not None:  # (a client error during a cold start or a connect)
            self.task.cancel()
            self.task = None
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        if isinstance(err, Starting):
            self.status = 503
            self.keep_alive = self.keep_alive and self.request_complete
            self.inbound.write(render_loading(keep_alive=self.keep_alive, head_only=self.head_only))
            self.state = move(EXCHANGE, self.state, ExEvent.HEAD_SENT)
            self.finished(monotonic())
            return
        if upstream:
            self.engine.metrics.upstream_error(err.reason)
        if self.state is RESPONDING:
            self.keep_alive = False
            self.finished(monotonic())
        else:
            self.respond_error(err.status, err.public_message, err.retry_after)

    def respond_error(self, status: int, message: str, retry_after: int | None = None) -> None:
        """The proxy's own answer; request body bytes still arriving are dropped."""
        self.status = status
        self.pending = None
        self.pending_size = 0
        self.keep_alive = self.keep_alive and self.request_complete
        self.inbound.write(
            render_response(
                status,
                message,
                self.accept,
                keep_alive=self.keep_alive,
                retry_after=retry_after,
                head_only=self.head_only,
            )
        )
        self.state = move(EXCHANGE, self.state, ExEvent.HEAD_SENT)
        self.finished(monotonic())

    def abort(self) -> None:
        """The client connection is gone: stop everything, keep no upstream connection."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        state = self.state
        if state < TUNNEL:  # not answered yet: recorded now
            if state is not RESPONDING:
                self.status = 499  # client closed the request
            self._record()
        self.state = move(EXCHANGE, state, ExEvent.ABORT)
        self._release()

    # --- bookkeeping ------------------------------------------------------------------------------
    def _record(self) -> None:
        self.engine.metrics.request_done(
            self.app, self.status, self.method, monotonic() - self.started
        )

    def _release(self) -> None:
        lease = self.lease
        if lease is not None:
            self.lease = None
            self.engine.router.release(lease)
