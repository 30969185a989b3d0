"""Slow clients: `idle_connections` idle keep-alive connections and `slowloris_clients` slowloris
clients (a request head that never ends, one header line every 0.5 s, reconnecting when cut)
must not stop a normal client from getting answers; the header-read and keep-alive timeouts
(`--set ingress.header_timeout=2s --set ingress.keepalive_timeout=5s`) must close them.

Figures: the normal client's p50/p99 alone and under that load, when each kind of slow
connection was closed (seconds after its last byte), the server's open fds before, at the peak
and after.

A second test holds request *bodies* open (slow POSTs) against a preview, whose capacity is
one sandbox of 10 concurrent requests (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures, percentile
from tests.reliability.load import Load, request
from tests.support.edge import MirenServer, echo_spec_data, log_errors
from tests.support.poll import eventually
from tests.support.procs import fd_count

pytestmark = pytest.mark.reliability

APP, HOST = "slow", "slow.test"
HEADER_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 5.0
SLACK = 5.0  # a close may come this long after its deadline on a loaded machine (timer ticks)
DRIP = 0.5  # a slowloris client sends a header line this often
HEALTH = b"GET /.well-known/miren/health HTTP/1.1\r\nHost: slow.test\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    return head + body


@dataclass
class Idle:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answered: float  # monotonic time its response ended
    closed_after: float | None = None  # seconds after `answered` the server closed it


async def open_idle(port: int, n: int, batch: int = 200) -> list[Idle]:
    """`n` keep-alive connections, each after one answered request (the proxy's own health)."""

    async def one() -> Idle:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        response = await read_response(reader)
        assert response.startswith(b"HTTP/1.1 200 "), response[:100]
        return Idle(reader, writer, time.monotonic())

    out: list[Idle] = []
    for i in range(0, n, batch):
        out += await asyncio.gather(*(one() for _ in range(min(batch, n - i))))
    return out


async def wait_closed_by_server(conn: Idle, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            try:
                data = await conn.reader.read(1)
            except ConnectionError:
                data = b""
            assert data == b"", f"unexpected data on an idle connection: {data!r}"
            conn.closed_after = time.monotonic() - conn.answered


@dataclass
class Slowloris:
    """Clients that keep a request head open; each closure by the server is timed from the
    client's first byte."""

    port: int
    connections: int = 0
    closed_after: list[float] = field(default_factory=list)

    async def client(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.connections += 1
            first = time.monotonic()
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
                i = 0
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRIP):
                            if await reader.read(1024) == b"":
                                break  # closed by the server
                            raise AssertionError("a slowloris client got an answer")
                    i += 1
                    writer.write(b"X-Drip-%d: x\r\n" % i)
                else:
                    return  # stopped: not a closure by the server
            except ConnectionError:
                pass  # reset by the server: a closure too
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
            self.closed_after.append(time.monotonic() - first)


async def normal_client(edge: MirenServer, seconds: float) -> list[float]:
    """One keep-alive client asking HOST sequentially for `seconds`: its latencies (s); every
    answer must be 200."""
    load = Load(edge.proxy_port, lambda: ("normal", "GET", HOST, "/"), concurrency=1)
    await load.run(seconds)
    bad = [s for s in load.samples if s.status != 200]
    assert not bad, f"the normal client failed: {bad[:5]}"
    return [s.latency for s in load.samples]


@pytest.mark.timeout(120)
async def test_idle_and_slowloris_clients_do_not_stop_a_normal_client(
    tmp_path: Path, figures: Figures, fd_limit: int
) -> None:
    n_idle, n_slow = BUDGET.idle_connections, BUDGET.slowloris_clients
    assert fd_limit > 2 * (n_idle + n_slow) + 1000, f"RLIMIT_NOFILE {fd_limit} is too low"
    server = MirenServer(
        tmp_path,
        store="memory",
        settings={
            "ingress.header_timeout": f"{HEADER_TIMEOUT:g}s",
            "ingress.keepalive_timeout": f"{KEEPALIVE_TIMEOUT:g}s",
        },
    )
    slowloris = Slowloris(0)
    async with server as edge:
        await edge.client.create_app(APP, HOST)
        await edge.client.post_deploy(APP, echo_spec_data())
        await edge.client.wait_status(HOST, 200)
        alone = await normal_client(edge, BUDGET.slow_measure_seconds)
        fds_before = fd_count(edge.pid)

        slowloris.port = edge.proxy_port
        stop = asyncio.Event()
        clients = [asyncio.create_task(slowloris.client(stop)) for _ in range(n_slow)]
        idle: list[Idle] = []
        try:
            await eventually(
                lambda: slowloris.connections >= n_slow, 10, "the slowloris clients to connect"
            )
            idle = await open_idle(edge.proxy_port, n_idle)
            # Measure while every idle connection is still within its keep-alive timeout.
            left = KEEPALIVE_TIMEOUT - (time.monotonic() - idle[0].answered) - 0.5
            window = min(BUDGET.slow_measure_seconds, left)
            assert window > 1.0, f"opening {n_idle} connections took too long"
            fds_peak = fd_count(edge.pid)
            under = await normal_client(edge, window)
            idle_open_at_end = sum(1 for c in idle if not c.reader.at_eof())
            # Slowloris clients have been cut and have reconnected meanwhile.
            await eventually(
                lambda: len(slowloris.closed_after) >= n_slow,
                HEADER_TIMEOUT + SLACK,
                "every slowloris client to be cut once",
            )
            stop.set()
            # The keep-alive timeout closes every idle connection.
            await asyncio.gather(
                *(wait_closed_by_server(c, KEEPALIVE_TIMEOUT + SLACK + 5) for c in idle)
            )
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
            for c in idle:
                c.writer.close()
        await eventually(
            lambda: fd_count(edge.pid) <= fds_before + 10, 10.0, "the server's fds to come back"
        )
        fds_after = fd_count(edge.pid)
        text = edge.log_text()

    idle_closes = [c.closed_after for c in idle if c.closed_after is not None]
    figures.add("idle keep-alive connections", n_idle)
    figures.add("slowloris clients", n_slow)
    figures.add("normal client alone: requests", len(alone))
    figures.add("normal client alone: p50", percentile(alone, 50) * 1000, "ms")
    figures.add("normal client alone: p99", percentile(alone, 99) * 1000, "ms")
    figures.add("normal client under load: window", window, "s")
    figures.add("normal client under load: requests", len(under))
    figures.add("normal client under load: p50", percentile(under, 50) * 1000, "ms")
    figures.add("normal client under load: p99", percentile(under, 99) * 1000, "ms")
    figures.add("idle connections still open at the end of the window", idle_open_at_end)
    figures.add("slowloris connections made", slowloris.connections)
    figures.add("slowloris cut after (min)", min(slowloris.closed_after), "s")
    figures.add("slowloris cut after (max)", max(slowloris.closed_after), "s")
    figures.add("idle closed after (min)", min(idle_closes, default=0.0), "s")
    figures.add("idle closed after (max)", max(idle_closes, default=0.0), "s")
    figures.add("server fds before / peak / after", f"{fds_before} / {fds_peak} / {fds_after}")

    assert len(under) >= 10, f"the normal client got only {len(under)} answers in {window:.1f}s"
    assert idle_open_at_end == n_idle, "idle connections were closed before their timeout"
    assert len(idle_closes) == n_idle, f"{n_idle - len(idle_closes)} idle connections stayed open"
    assert all(KEEPALIVE_TIMEOUT * 0.9 <= t <= KEEPALIVE_TIMEOUT + SLACK for t in idle_closes)
    assert all(HEADER_TIMEOUT * 0.9 <= t <= HEADER_TIMEOUT + SLACK for t in slowloris.closed_after)
    assert fds_peak >= fds_before + n_idle, "the idle connections were not all open at once"
    assert not log_errors(text), log_errors(text)[:20]


SLOW_BODIES = 10  # a preview's capacity: one sandbox, 10 concurrent requests
BODY_TIMEOUT = 2.0


async def stall_bodies(
    port: int, host: str, sent: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """SLOW_BODIES POSTs that announce 1 MB and stop after `sent` body bytes."""
    clients = []
    for _ in range(SLOW_BODIES):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: " + host.encode()
            + b"\r\nContent-Length: 1000000\r\n\r\n" + b"x" * sent
        )  # fmt: skip
        clients.append((reader, writer))
    return clients


@pytest.mark.parametrize(
    ("sent", "streamed"),
    [(1, False), (64 * 1024, True)],
    ids=["short-prefix-buffered", "long-prefix-streamed"],
)
@pytest.mark.timeout(60)
async def test_slow_request_bodies_do_not_stop_a_normal_client(
    tmp_path: Path, figures: Figures, sent: int, streamed: bool
) -> None:
    """10 clients stall their POST bodies against a preview whose capacity is 10 requests.
    Stalled after a few bytes, their bodies are buffered by the proxy and hold no capacity: a
    normal client is answered at once. Stalled after more than ingress.request_buffer, their
    bodies were streamed to the app and hold its capacity, but only until the body timeout
    answers them 408: the normal client waits for that, not for the 60 s request_timeout."""
    server = MirenServer(
        tmp_path,
        store="memory",
        settings={
            "ingress.header_timeout": f"{HEADER_TIMEOUT:g}s",
            "ingress.keepalive_timeout": f"{KEEPALIVE_TIMEOUT:g}s",
            "ingress.body_timeout": f"{BODY_TIMEOUT:g}s",
        },
    )
    async with server as edge:
        await edge.client.create_app(APP, HOST)
        await edge.client.post_deploy(APP, echo_spec_data())
        await edge.client.post_deploy(APP, echo_spec_data(), label="pr", ttl="1h")
        preview = f"pr.{HOST}"
        await edge.client.wait_status(preview, 200)
        stalled = await stall_bodies(edge.proxy_port, preview, sent)
        try:
            t0 = time.monotonic()
            answer = await request(edge.proxy_port, preview, timeout=BODY_TIMEOUT + SLACK)
            waited = time.monotonic() - t0
            closes = await asyncio.gather(
                *(asyncio.wait_for(r.read(), BODY_TIMEOUT + SLACK) for r, _ in stalled)
            )
        finally:
            for _, writer in stalled:
                writer.close()
        text = edge.log_text()
    figures.add("normal client answered after", waited, "s")
    assert answer.status == 200, answer
    if not streamed:
        assert waited < BODY_TIMEOUT, "the normal client waited for the body timeout"
    assert all(c.startswith(b"HTTP/1.1 408 ") for c in closes), [c[:40] for c in closes]
    assert not log_errors(text), log_errors(text)[:20]
