"""The HTTPS listener: peek at the ClientHello, pick (or obtain) the certificate, then TLS.

A connection is accepted as a plain socket and its first bytes are *peeked* (`MSG_PEEK`: left in
the socket) until the ClientHello is whole (`clienthello.parse`). Its server name picks the
certificate: a file certificate (exact, then wildcard), else an on-demand one (which may be
awaited: the only await that a synchronous SNI callback could not do). Then the socket goes to
the event loop's TLS transport with that certificate's context, which reads the same ClientHello
and completes the handshake; the protocol is the proxy's own (`TlsInboundConnection`), so
routing, leases and upgrades are the same as on the plain listener. Everything before the
protocol runs, the peek, an issuance and the handshake, is bounded by `tls.handshake_timeout`.

A name nothing serves, or bytes that are not a ClientHello: the connection is closed without
a certificate (counted in `miren_tls_handshakes{outcome=...}`). A client that names no host
(no SNI, or an IP address) gets the default certificate the caller picks (the first file one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from miren_ingress.proxy.inbound import TlsInboundConnection
from miren_ingress.proxy.server import ProxyServer
from miren_ingress.tls.clienthello import MAX_HELLO, NEED_MORE, Hello, parse
from miren_ingress.tls.metrics import TlsMetrics

log = logging.getLogger("miren.tls")

ContextFor = Callable[[Hello], Awaitable[ssl.SSLContext | None]]
PARTIAL_WAIT = 0.005  # seconds before peeking again at a ClientHello that came in pieces, ...
PARTIAL_WAIT_MAX = 0.25  # ... doubling up to this while nothing more arrives
MAX_PENDING = 4096  # connections before their handshake, in all ...
MAX_PENDING_PER_ADDRESS = 64  # ... and from one address (an IPv6 /64 counts as one)


class TlsListener:
    def __init__(
        self,
        proxy: ProxyServer,
        context_for: ContextFor,
        metrics: TlsMetrics,
        *,
        handshake_timeout: float,
    ) -> None:
        self._proxy = proxy
        self._context_for = context_for
        self._metrics = metrics
        self._timeout = handshake_timeout
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._per_address: dict[str, int] = {}

    async def start(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(4096)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name="miren-tls-accept")
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Stop accepting and drop connections still before their handshake (the proxy drains
        the established ones)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.wait(list(self._pending))
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and the like: back off a little, keep serving
                log.warning("TLS listener: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            address = address_key(str(peer[0]))
            held = self._per_address.get(address, 0)
            if len(self._pending) >= MAX_PENDING or held >= MAX_PENDING_PER_ADDRESS:
                self._metrics.handshakes.labels(outcome="refused").inc()
                sock.close()  # too many handshakes in progress (from this address)
                continue
            self._per_address[address] = held + 1
            task = loop.create_task(self._serve(sock))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            task.add_done_callback(functools.partial(self._released, address))

    def _released(self, address: str, _task: object = None) -> None:
        left = self._per_address.get(address, 1) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        outcome = "failed"
        handed = False
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                hello = await _peek_hello(loop, sock)
                if not isinstance(hello, Hello):
                    outcome = "not_tls"
                    return
                ctx = await self._context_for(hello)
                if ctx is None:
                    outcome = "no_certificate"
                    return
                left = max(0.1, (deadline.when() or loop.time() + 1) - loop.time())
                engine = self._proxy.engine
                assert engine is not None  # (the proxy listener started first)
                factory: Callable[[], asyncio.Protocol] = (
                    _HandshakeOnly  # a CA's TLS-ALPN-01 check: the handshake is all it gets
                    if hello.alpn == (ACME_ALPN,)
                    else lambda: TlsInboundConnection(engine)
                )
                await loop.connect_accepted_socket(
                    factory, sock, ssl=ctx, ssl_handshake_timeout=left
                )
                handed = True
                outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
        except (OSError, ssl.SSLError, ConnectionError):
            outcome = "failed"
        finally:
            self._metrics.handshakes.labels(outcome=outcome).inc()
            if not handed:
                sock.close()


async def _peek_hello(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> object:
    """Peek until the ClientHello is whole (or is not one); the bytes stay in the socket."""
    seen = 0
    wait = PARTIAL_WAIT
    while True:
        try:
            data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        if data == b"":
            raise ConnectionResetError("closed before its ClientHello")
        if not data:
            await _readable(loop, sock)
            continue
        if len(data) > seen:  # parsed again only when more came (each parse is bounded)
            seen = len(data)
            wait = PARTIAL_WAIT
            verdict = parse(data)
            if verdict is not NEED_MORE:
                return verdict
        else:
            wait = min(wait * 2, PARTIAL_WAIT_MAX)
        # A partial hello stays readable: wait instead of spinning on it.
        await asyncio.sleep(wait)


ACME_ALPN = "acme-tls/1"


class _HandshakeOnly(asyncio.Protocol):
    """The connection of a TLS-ALPN-01 validation: closed once the handshake is done."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def address_key(address: str) -> str:
    """What the per-address limit counts: an IPv4 address, or the /64 of an IPv6 one (one
    host usually has a whole /64)."""
    if ":" in address:
        return ":".join(address.split(":")[:4])
    return address


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
