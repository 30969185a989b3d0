"""Shared pieces of the ingress end-to-end tests: the whole edge in-process, real sockets.

`running_edge(tmp_path, **settings)` runs `miren_ingress.shell.serve.Edge` (memory store unless told
otherwise, both listeners on free ports) in a task of the test's event loop and yields a
`RunningEdge`: the store for deploys and routes, the proxy and admin ports, the store's operation
counts. Leaving the block stops the edge (sandboxes included), also when the test failed; a
shutdown that overruns its deadline cancels the task, so nothing outlives the test.

`Conn` is a small HTTP/1.1 keep-alive client on asyncio streams and httptools: it sends exactly
the bytes asked for (any `Host`, duplicate or malformed headers) and parses one response at a
time, so a test can tell one response from two on one connection. `RecordingUpstream` is an
upstream server that records every request it parsed (a version of runtime `upstream` points at
it), to prove what did, and what did not, reach an app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import httptools

from miren_ingress.shell.config import load_config
from miren_ingress.shell.serve import Edge
from miren_store.deploy.deploys import DeployRequest, EphemeralRequest, deploy
from miren_store.entities import App, Concurrency, HttpRoute, Runtime, Sandbox, VersionSpec
from miren_store.store import Store
from tests.support.apps import SANDBOX_PYTHON

REPO = Path(__file__).resolve().parents[2]
ECHO_APP = REPO / "tests" / "apps" / "echo_server.py"
# The sandbox command: this interpreter without `site`, so the echo app listens ~20 ms after exec.
ECHO_CMD = (SANDBOX_PYTHON, "-S", str(ECHO_APP))

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
POLL = 0.01


async def until(
    what: str, probe: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = POLL
) -> Any:
    """Await `probe()` until it returns something truthy (returned); AssertionError naming
    `what` (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {what}; last {last!r}"
            )
        await asyncio.sleep(interval)


# -- an HTTP/1.1 client that sends exactly what it is told --------------------------------------


@attrs.define
class Response:
    status: int
    headers: list[tuple[str, str]]  # (lowercased name, value) in arrival order
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


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


class Conn:
    """One client connection to the proxy. `request()` sends a request and reads one response;
    `send()` + `response()` do it in two steps (raw bytes, pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._buffer = b""  # bytes read past the end of the last response

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
        headers: Iterable[tuple[str, str]] = (),
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
        headers: Iterable[tuple[str, str]] = (),
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
    """One request on a fresh connection."""
    conn = await Conn.open(port)
    try:
        return await conn.request(kw.pop("method", "GET"), path, host, **kw)
    finally:
        conn.close()


async def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return all the proxy answered until it closed the connection."""
    conn = await Conn.open(port)
    try:
        conn.send(data)
        return await conn.read_to_eof(timeout)
    finally:
        conn.close()


# -- an upstream that records what it receives ---------------------------------------------------


@attrs.define
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]  # (lowercased name, value)
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


class _RequestCollector:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.done: list[tuple[str, list[tuple[str, str]], bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done.append((self.url.decode("latin-1"), self.headers, b"".join(self.body)))
        self.url, self.headers, self.body = b"", [], []


# What a handler answers for a received request: response bytes, or None to reset the connection.
Answer = Callable[[Received], bytes | None]


def ok_answer(req: Received) -> bytes | None:
    body = json.dumps({"path": req.path, "n": 1}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class RecordingUpstream:
    """A keep-alive HTTP/1.1 server recording every complete request it parsed. It answers with
    `answer(request)`; an answer of None resets the connection (SO_LINGER 0: an RST)."""

    def __init__(self, answer: Answer = ok_answer) -> None:
        self.answer = answer
        self.requests: list[Received] = []
        self.connections = 0
        self.received_bytes = 0  # every byte read, parsed or not
        self.parse_errors = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (
            f"<RecordingUpstream :{self.port} conns={self.connections} reqs={len(self.requests)}>"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def start(self) -> RecordingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        collector = _RequestCollector()
        parser = httptools.HttpRequestParser(collector)
        try:
            while data := await reader.read(1 << 16):
                self.received_bytes += len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError:
                    self.parse_errors += 1
                    return
                while collector.done:
                    url, headers, body = collector.done.pop(0)
                    path = url.partition("?")[0]
                    req = Received(parser.get_method().decode(), path, headers, body)
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


# -- the edge, in-process ------------------------------------------------------------------------


def echo_spec(
    env: Mapping[str, str] | None = None,
    *,
    command: Iterable[str] = ECHO_CMD,
    health_path: str | None = "/health",
    requests_per_instance: int = 10,
) -> VersionSpec:
    return VersionSpec(
        runtime=Runtime.PROCESS,
        command=tuple(command),
        env=dict(env or {}),
        cwd=str(REPO),
        health_path=health_path,
        boot_timeout=timedelta(seconds=20),
        concurrency=Concurrency(requests_per_instance=requests_per_instance),
    )


def upstream_spec(url: str) -> VersionSpec:
    # Health by TCP connect: the recording upstream then records only what the proxy forwarded.
    return VersionSpec(runtime=Runtime.UPSTREAM, urls=(url,), health_path=None)


@attrs.define
class RunningEdge:
    edge: Edge
    task: asyncio.Task[None]

    @property
    def store(self) -> Store:
        assert self.edge.store is not None
        return self.edge.store

    @property
    def port(self) -> int:
        assert self.edge.proxy_address is not None
        return self.edge.proxy_address[1]

    @property
    def admin_port(self) -> int:
        assert self.edge.admin_address is not None
        return self.edge.admin_address[1]

    def store_ops(self) -> dict[tuple[str, str], int]:
        return dict(self.edge.stats.counts)

    # -- set-up through the store (what the admin API does, minus HTTP) --

    async def app(self, name: str) -> None:
        await self.store.create(App(name=name))

    async def route(
        self,
        host: str,
        app: str,
        *,
        default: bool = False,
        request_timeout: timedelta | None = None,
    ) -> None:
        await self.store.create(
            HttpRoute(host=host, app=app, default=default, request_timeout=request_timeout)
        )

    async def deploy(
        self,
        app: str,
        spec: VersionSpec | None = None,
        *,
        label: str | None = None,
        ttl: str | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> str:
        """Deploy (a normal, activating deploy; a preview with `label`); returns the version id."""
        request = DeployRequest(
            spec=spec or echo_spec(),
            ephemeral=EphemeralRequest(label=label, ttl=ttl) if label is not None else None,
        )
        kwargs: dict[str, Any] = {} if now is None else {"now": now}
        result = await deploy(self.store, app, request, **kwargs)
        return result.version.id

    async def sandboxes(self, app: str) -> list[Sandbox]:
        return await self.store.list(Sandbox, app=app)

    # -- observing it through its sockets --

    async def served_by(self, host: str, version: str, timeout: float = 15.0) -> Response:
        """Poll `GET /` on `host` until the echo app of `version` answers it (the route table
        follows the store through a watch, and the first request cold-starts a sandbox)."""
        last: list[Response] = []

        async def probe() -> bool:
            reply = await get(self.port, host, "/", timeout=timeout)
            last.append(reply)
            return reply.status == 200 and reply.json().get("version") == version

        await until(f"{host} served by {version}", probe, timeout)
        return last[-1]

    async def answers(self, host: str, status: int, path: str = "/", timeout: float = 10.0) -> None:
        """Poll until `host` answers `status` (for a route table change to arrive)."""

        async def probe() -> bool:
            return (await get(self.port, host, path)).status == status

        await until(f"{host}{path} to answer {status}", probe, timeout)

    async def admin(self, method: str, path: str, body: Any = None) -> Response:
        conn = await Conn.open(self.admin_port)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = [("Content-Type", "application/json")] if data is not None else []
            headers.append(("Connection", "close"))
            headers.append(("Authorization", f"Bearer {self.edge.admin_token}"))
            return await conn.request(method, path, f"127.0.0.1:{self.admin_port}", headers, data)
        finally:
            conn.close()

    async def metrics(self) -> str:
        reply = await self.admin("GET", "/metrics")
        assert reply.status == 200, reply
        return reply.body.decode()


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


@contextlib.asynccontextmanager
async def running_edge(
    tmp_path: Path, *, store: str = "memory", wait_ready: bool = True, **settings: Any
) -> AsyncIterator[RunningEdge]:
    """The whole edge in this event loop. `settings` are config overrides by section, e.g.
    `ingress={"request_timeout": "1s"}`. With `wait_ready=False` it yields as soon as the proxy
    listens (the route table may not be loaded yet)."""
    ingress = {"shutdown_grace": "1s", **settings.pop("ingress", {})}
    activator = {"stop_grace": "2s", **settings.pop("activator", {})}
    config = load_config(
        env={},
        overrides={
            "store": store,
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "node_name": "e2e",
            "log_level": "warning",
            "ingress": ingress,
            "activator": activator,
            **settings,
        },
    )
    edge = Edge(config)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ready(_edge: Edge) -> None:
        if not ready.done():
            ready.set_result(None)

    task = asyncio.create_task(edge.run(on_ready=on_ready), name="e2e-edge")
    try:
        async with asyncio.timeout(START_TIMEOUT):
            if wait_ready:
                await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
            else:
                while edge.proxy_address is None and not task.done():
                    await asyncio.sleep(POLL)
        if task.done():
            task.result()  # raises what made it stop
            raise AssertionError("the edge stopped before it was ready")
        yield RunningEdge(edge, task)
    finally:
        edge.request_stop()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise AssertionError("the edge did not stop in time") from None
        finally:
            if not ready.done():
                ready.cancel()


def vm_kib(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM`-style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
