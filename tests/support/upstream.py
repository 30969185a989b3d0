"""An upstream that records what reaches it: the oracle for "what did, and what did not, reach
the app" behind an `upstream` version.

`RecordingUpstream` is a keep-alive HTTP/1.1 server on a loopback port. It records the target
of every request head it parsed (`heads`, as soon as the head is complete), every complete
request (`requests`, with method, headers and body), every parse error and every Upgrade
request, and counts connections and bytes. Each complete request is answered by
`answer(request)`: response bytes, or None to reset the connection (SO_LINGER 0: an RST). Use it
as an async context manager, or `await start()` / `await close()`.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools


@dataclass
class Received:
    method: str
    target: str  # the request target as sent (query included)
    headers: list[tuple[str, str]]  # (lowercased name, value)
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


# What the upstream answers for a received request: response bytes, or None to reset.
Answer = Callable[[Received], bytes | None]


def ok_answer(req: Received) -> bytes | None:
    """200 with a small JSON body naming the path."""
    body = json.dumps({"path": req.path, "n": 1}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class _RequestCollector:
    def __init__(self, owner: RecordingUpstream) -> None:
        self.owner = owner
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.done: list[tuple[str, list[tuple[str, str]], bytes]] = []

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.owner.heads.append(self.url.decode("latin-1"))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done.append((self.url.decode("latin-1"), self.headers, b"".join(self.body)))


class RecordingUpstream:
    def __init__(self, answer: Answer = ok_answer) -> None:
        self.answer = answer
        self.heads: list[str] = []  # the target of every request head parsed
        self.requests: list[Received] = []  # every complete request
        self.upgrades: list[str] = []  # targets of requests that asked to upgrade
        self.parse_errors: list[str] = []
        self.connections = 0
        self.received_bytes = 0  # every byte read, parsed or not
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (
            f"<RecordingUpstream :{self.port} conns={self.connections} heads={len(self.heads)} "
            f"reqs={len(self.requests)} errors={len(self.parse_errors)}>"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def complete(self) -> list[str]:
        """The targets of the complete requests, in order."""
        return [r.target for r in self.requests]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def start(self) -> RecordingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Open keep-alive connections from the proxy would hold wait_closed() forever.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> RecordingUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        collector = _RequestCollector(self)
        parser = httptools.HttpRequestParser(collector)
        try:
            while data := await reader.read(1 << 16):
                self.received_bytes += len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    self.upgrades.append(collector.url.decode("latin-1"))
                except httptools.HttpParserError as exc:
                    self.parse_errors.append(f"{type(exc).__name__}: {exc}")
                    return
                while collector.done:
                    target, headers, body = collector.done.pop(0)
                    req = Received(parser.get_method().decode(), target, headers, body)
                    self.requests.append(req)
                    out = self.answer(req)
                    if out is None:
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                        writer.transport.abort()
                        return
                    writer.write(out)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
