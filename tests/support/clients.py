"""HTTP clients for the end-to-end tests: loopback only, every call bounded by a timeout.

- `Response`: one answer, whatever client got it: status, header fields in arrival order
  (names lowercased), a `headers` dict (the first value of each name), the body.
- `http_call`: one synchronous request with `http.client` (for sync tests and threads).
- `Conn`: an HTTP/1.1 keep-alive client on asyncio streams and httptools. It sends exactly the
  bytes asked for (any `Host`, duplicate or malformed headers) and parses one response at a
  time, so a test can tell one response from two on one connection. `get` is one request on a
  fresh `Conn`.
- `raw_exchange`: raw bytes on a fresh connection, read (while still sending, so an early
  answer is heard) until the server closes or the deadline passes.
- `metric`: one sample of a Prometheus text scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httptools


def free_port() -> int:
    """A loopback port that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    fields: list[tuple[str, str]]  # (lowercased name, value) in arrival order
    body: bytes
    keep_alive: bool = True
    headers: dict[str, str] = field(init=False, repr=False)  # the first value of each name

    def __post_init__(self) -> None:
        self.headers = {}
        for name, value in self.fields:
            self.headers.setdefault(name, value)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


def http_call(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request with `http.client` to 127.0.0.1:`port` (blocking)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        fields = [(k.lower(), v) for k, v in resp.getheaders()]
        return Response(resp.status, fields, data, not resp.will_close)
    finally:
        conn.close()


# -- an HTTP/1.1 client that sends exactly what it is told --------------------------------------


class _ResponseCollector:
    def __init__(self, on_body: Callable[[bytes], None] | None) -> None:
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.on_body_cb = on_body
        self.headers_done = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.on_body_cb is not None:
            self.on_body_cb(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class ConnectionClosed(Exception):
    """The server closed the connection before a complete response."""


Headers = Iterable[tuple[str, str]]


class Conn:
    """One client connection. `request()` sends a request and reads one response; `send()` +
    `response()` do it in two steps (raw bytes, pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = b""  # bytes read past the end of the last response

    def __repr__(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"<Conn {peer} buffered={len(self._buffer)}>"

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def __aenter__(self) -> Conn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()

    @staticmethod
    def render(
        method: str,
        path: str,
        host: str | bytes | None,
        headers: Headers = (),
        body: bytes | None = None,
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1\r\n".encode()]
        if host is not None:
            lines.append(b"Host: " + (host.encode() if isinstance(host, str) else host) + b"\r\n")
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(
        self,
        method: str,
        path: str,
        host: str | bytes | None,
        headers: Headers = (),
        body: bytes | None = None,
        timeout: float = 15.0,
    ) -> Response:
        self.send(self.render(method, path, host, headers, body))
        return await self.response(timeout=timeout, head_only=method == "HEAD")

    async def response(
        self,
        timeout: float = 15.0,
        *,
        head_only: bool = False,
        on_body: Callable[[bytes], None] | None = None,
    ) -> Response:
        """Read exactly one response (bytes after it stay buffered for the next call)."""
        collector = _ResponseCollector(on_body)
        parser = httptools.HttpResponseParser(collector)
        data, self._buffer = self._buffer, b""
        async with asyncio.timeout(timeout):
            while True:
                if data:
                    try:
                        parser.feed_data(data)
                    except httptools.HttpParserUpgrade as up:
                        self._buffer = data[up.args[0] :]
                        break
                    if collector.complete or (head_only and collector.headers_done):
                        break
                data = await self.reader.read(1 << 18)
                if not data:  # (the proxy frames every body it sends: EOF is never the end)
                    raise ConnectionClosed(f"connection closed; got {collector.headers!r}")
        return Response(
            parser.get_status_code(),
            collector.headers,
            b"".join(collector.chunks),
            parser.should_keep_alive(),
        )

    async def read_to_eof(self, timeout: float = 10.0) -> bytes:
        """Everything the server sends until it closes."""
        out = [self._buffer]
        self._buffer = b""
        async with asyncio.timeout(timeout):
            while data := await self.reader.read(1 << 16):
                out.append(data)
        return b"".join(out)


async def get(port: int, host: str | bytes | None, path: str = "/", **kw: Any) -> Response:
    """One request (`method=`, default GET; `headers=`, `body=`, `timeout=`) on a fresh
    connection."""
    conn = await Conn.open(port)
    try:
        return await conn.request(kw.pop("method", "GET"), path, host, **kw)
    finally:
        conn.close()


# -- raw bytes ----------------------------------------------------------------------------------


@dataclass
class RawResult:
    data: bytes  # everything read before the server closed (or the deadline)
    closed: bool  # the server closed the connection (EOF or reset) before the deadline
    reset: bool  # the close was a reset (ECONNRESET) rather than a FIN
    send_error: str  # the client could not send everything (the server closed first)

    @property
    def status(self) -> int:
        m = re.match(rb"HTTP/1\.[01] (\d{3}) ", self.data)
        return int(m.group(1)) if m else 0

    def __repr__(self) -> str:
        return (
            f"<RawResult status={self.status} closed={self.closed} reset={self.reset} "
            f"send_error={self.send_error!r} {self.data[:200]!r}>"
        )


async def raw_exchange(
    port: int,
    payload: bytes,
    *,
    timeout: float = 10.0,
    half_close: bool = False,
    chunk: int = 65536,
) -> RawResult:
    """Send `payload` on a fresh connection (while reading concurrently, so a server that
    answers early is heard), optionally half-close, and read until the server closes or the
    deadline passes (then `closed` is False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    closed = reset = False
    send_error = ""

    async def send() -> None:
        nonlocal send_error
        try:
            for i in range(0, len(payload), chunk):
                writer.write(payload[i : i + chunk])
                await writer.drain()
            if half_close and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError) as exc:
            send_error = type(exc).__name__

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    closed = reset = True
                    break
                if not data:
                    closed = True
                    break
                got += data
    except TimeoutError:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return RawResult(bytes(got), closed, reset, send_error)


# -- metrics ------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text` (0.0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0
