"""Tools of the reliability suite: a running `miren serve` in async tests, admin shortcuts, a
paced load generator, a /proc sampler (RSS, fds), raw-socket exchanges, log checks.

Everything is loopback only and bounded in count and time: a load runs for a given duration or
until an event, with a fixed number of connections; every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import httptools

from tests.e2e.harness import ECHO_APP, REPO, MirenServer, Reply
from tests.support.apps import SANDBOX_PYTHON

POLL = 0.02

# -- a server in an async test ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(server: MirenServer) -> AsyncIterator[MirenServer]:
    """Start `server` (in a thread: the harness blocks) and stop it when the block ends, also
    when it raised; a clean block also checks that no child process survived the server."""
    await asyncio.to_thread(server.start)
    failed = True
    try:
        yield server
        failed = False
    finally:
        if failed:
            print(f"---- {server!r}: the end of {server.log_path}\n{server.log_tail(80)}")
        await asyncio.to_thread(server.stop, check=not failed)


async def admin(edge: MirenServer, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
    return await asyncio.to_thread(edge.admin, method, path, body, **kw)


def echo_spec(
    *, env: dict[str, str] | None = None, health_path: str = "/health", **concurrency: Any
) -> dict[str, Any]:
    """A process spec running tests/apps/echo_server.py (with `python -S`: fast to start)."""
    spec: dict[str, Any] = {
        "runtime": "process",
        "command": [SANDBOX_PYTHON, "-S", str(ECHO_APP)],
        "cwd": str(REPO),
        "health_path": health_path,
    }
    if env:
        spec["env"] = env
    if concurrency:
        spec["concurrency"] = concurrency
    return spec


def expect(reply: Reply, *statuses: int) -> Reply:
    assert reply.status in statuses, f"expected {statuses}, got {reply!r}"
    return reply


async def create_app(edge: MirenServer, app: str, *hosts: str) -> None:
    expect(await admin(edge, "POST", "/v1/apps", {"name": app}), 201)
    for host in hosts:
        expect(await admin(edge, "PUT", f"/v1/routes/{host}", {"app": app}), 200, 201)


async def deploy(
    edge: MirenServer,
    app: str,
    spec: dict[str, Any],
    *,
    label: str | None = None,
    ttl: str | None = None,
) -> dict[str, Any]:
    """A normal deploy (activates) or, with `label`, a preview; returns the deploy answer."""
    body: dict[str, Any] = {"spec": spec}
    if label is not None:
        body["ephemeral"] = {"label": label, **({"ttl": ttl} if ttl else {})}
    reply = expect(await admin(edge, "POST", f"/v1/apps/{app}/deploys", body), 201)
    answer: dict[str, Any] = reply.json()
    return answer


async def get(edge: MirenServer, host: str, path: str = "/", timeout: float = 10.0) -> Reply:
    return await asyncio.to_thread(edge.get, host, path, timeout=timeout)


async def wait_status(
    edge: MirenServer, host: str, want: int, *, path: str = "/", timeout: float = 15.0
) -> Reply:
    """Poll the proxy for `host` until it answers `want`."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while True:
        reply = await get(edge, host, path)
        if reply.status == want:
            return reply
        if not seen or seen[-1] != reply.status:
            seen.append(reply.status)
        if time.monotonic() >= deadline:
            raise AssertionError(f"{host}{path} never answered {want} in {timeout}s; saw {seen}")
        await asyncio.sleep(POLL)


async def poll(what: str, probe: Callable[[], Any], timeout: float, interval: float = POLL) -> Any:
    """Await `probe()` (sync or async) until truthy; AssertionError naming `what` at the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


# -- figures helpers ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- load ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One request of a load: what was asked, when (wall clock, `time.time()`), what came back."""

    kind: str
    method: str
    host: str
    path: str
    t0: float
    t1: float = 0.0
    status: int = 0  # 0: no HTTP answer (see `error`)
    error: str = ""
    note: str = ""  # what `Load.extract` took from the answer (e.g. the sandbox pid)
    retry_after: str | None = None

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


Target = tuple[str, str, str, str]  # (kind, method, host, path); a POST sends BODY
BODY = b"x" * 64


@dataclass
class Load:
    """A closed-loop load of `concurrency` workers on one aiohttp session, paced to `rate`
    requests per second in total (None: as fast as they can). `pick()` chooses each request;
    `extract(status, body)` may keep a short note of each answer."""

    port: int
    pick: Callable[[], Target]
    concurrency: int = 8
    rate: float | None = None
    extract: Callable[[int, bytes], str] | None = None
    timeout: float = 30.0
    samples: list[Sample] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<Load :{self.port} c={self.concurrency} rate={self.rate} n={len(self.samples)}>"

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> None:
        """Run until `duration` seconds passed or `stop` is set (at least one must be given)."""
        assert duration is not None or stop is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + duration if duration is not None else float("inf")
        start = loop.time()
        slot = 0
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
        client_timeout = aiohttp.ClientTimeout(total=self.timeout)

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal slot
            while loop.time() < end and not (stop is not None and stop.is_set()):
                if self.rate:
                    due = start + slot / self.rate
                    slot += 1
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    if loop.time() >= end or (stop is not None and stop.is_set()):
                        return
                await self._one(session, *self.pick())

        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            await asyncio.gather(*(worker(session) for _ in range(self.concurrency)))

    async def _one(
        self, session: aiohttp.ClientSession, kind: str, method: str, host: str, path: str
    ) -> None:
        sample = Sample(kind, method, host, path, time.time())
        self.samples.append(sample)
        url = f"http://127.0.0.1:{self.port}{path}"
        body = BODY if method == "POST" else None
        try:
            async with session.request(method, url, headers={"Host": host}, data=body) as resp:
                body = await resp.read()
                sample.status = resp.status
                sample.retry_after = resp.headers.get("Retry-After")
                if self.extract is not None:
                    sample.note = self.extract(resp.status, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        sample.t1 = time.time()


async def request(
    port: int, host: str, path: str = "/", *, method: str = "GET", timeout: float = 10.0
) -> Sample:
    """One request on a fresh connection, as a Sample (status 0 and `error` when no answer
    came within `timeout`)."""
    load = Load(port, lambda: ("one", method, host, path), concurrency=1, timeout=timeout)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await load._one(session, "one", method, host, path)
    return load.samples[0]


def tally(samples: Iterable[Sample]) -> dict[str, dict[int, int]]:
    """{kind: {status: count}} (status 0: transport error)."""
    out: dict[str, Counter[int]] = {}
    for s in samples:
        out.setdefault(s.kind, Counter())[s.status] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def sandbox_note(status: int, body: bytes) -> str:
    """The sandbox id the echo server reports in its JSON answer ("" for anything else). (Not
    its pid: inside bubblewrap's pid namespace the app sees another pid than the host.)"""
    if status != 200:
        return ""
    try:
        return str(json.loads(body)["sandbox"])
    except (ValueError, KeyError, TypeError):
        return ""


async def sandbox_record(edge: MirenServer, app: str, sandbox_id: str) -> dict[str, Any]:
    """The admin API's record of one sandbox (its `pid` is the process the activator started:
    the launcher or bubblewrap, whose death ends the sandbox)."""
    for box in (await admin(edge, "GET", f"/v1/apps/{app}/sandboxes")).json():
        if box["id"] == sandbox_id:
            return dict(box)
    raise AssertionError(f"no sandbox {sandbox_id} in {app}")


# -- /proc --------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # (closed meanwhile)
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _connection_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets, not listening, whose local port is `port` (the accepted
    connections of a server listening there)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cells = line.split()
                local, state, inode = cells[1], cells[3], int(cells[9])
                if state != "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(inode)
    return inodes


def client_connection_count(pid: int, port: int) -> int:
    """How many of `pid`'s fds are connections accepted on `port`: the clients' choice (a load
    generator's keep-alive pool), not the server's own resources."""
    return len(_socket_inodes(pid) & _connection_inodes(port))


@dataclass
class ProcSampler:
    """Samples a process's RSS (KiB) and open fds every `interval` seconds while running; with
    `client_port`, also how many of those fds are client connections accepted on that port.
    A sample is (monotonic, rss, fds, client connections)."""

    pid: int
    interval: float = 1.0
    client_port: int | None = None
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<ProcSampler pid={self.pid} n={len(self.samples)}>"

    def sample(self) -> tuple[float, int, int, int]:
        clients = 0
        if self.client_port is not None:
            clients = client_connection_count(self.pid, self.client_port)
        s = (time.monotonic(), rss_kib(self.pid), fd_count(self.pid), clients)
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def window(self, start: float, end: float) -> list[tuple[float, int, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def median_of(samples: Sequence[tuple[float, ...]], index: int) -> float:
    assert samples, "no samples in the window"
    return float(statistics.median(s[index] for s in samples))


# -- raw sockets --------------------------------------------------------------------------------


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
    deadline passes."""
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


# -- logs ---------------------------------------------------------------------------------------

_BAD_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def log_text(edge: MirenServer) -> str:
    return edge.log_path.read_text(errors="replace")


def log_errors(text: str) -> list[str]:
    """Lines of a serve log that report an error or a traceback."""
    return [line for line in text.splitlines() if _BAD_LINE.search(line)]


def log_warnings(text: str, allowed: Iterable[str] = ()) -> list[str]:
    """WARNING lines of a serve log that match none of the `allowed` regexes."""
    pats = [re.compile(p) for p in allowed]
    out = []
    for line in text.splitlines():
        m = _LEVEL.match(line)
        if m and m.group(1) == "WARNING" and not any(p.search(line) for p in pats):
            out.append(line)
    return out


# -- an upstream that records what reaches it ---------------------------------------------------


class _UpstreamConn(asyncio.Protocol):
    def __init__(self, owner: RecordingUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.owner.connections += 1
        self.owner._open.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.owner._open.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.owner.bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.owner.parse_errors.append(f"{type(exc).__name__}: {exc}")
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.owner.heads.append(self.url.decode("latin-1"))

    def on_message_complete(self) -> None:
        self.owner.complete.append(self.url.decode("latin-1"))
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@dataclass
class RecordingUpstream:
    """A loopback HTTP/1.1 server answering 200 `ok` to every complete request and recording
    the target of every request head and every complete request that reached it."""

    heads: list[str] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)
    connections: int = 0
    bytes: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _open: set[asyncio.Transport] = field(default_factory=set)

    def __repr__(self) -> str:
        return (
            f"<RecordingUpstream :{self.port} conns={self.connections} heads={len(self.heads)} "
            f"complete={len(self.complete)} errors={len(self.parse_errors)}>"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _UpstreamConn(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            # Open keep-alive connections from the proxy would hold wait_closed() forever.
            for transport in list(self._open):
                transport.abort()
            await self._server.wait_closed()
