"""Real frameworks as sandboxes, real clients: where the proxy's bugs were found before.

The edge runs in process (`running_edge`: the real store, route table, activator and proxy on
loopback sockets), its sandboxes are uvicorn + Starlette and gunicorn + Flask (tests/apps, run
by the system python with Debian's packages, confined as `miren serve` confines them), and the
clients are the `websockets` library, httpx and curl.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from miren_store.entities import Concurrency, Runtime, VersionSpec
from tests.support.apps import APPS, SANDBOX_PYTHON, StartApp
from tests.support.clients import free_port
from tests.support.edge import InProcessEdge, running_edge
from tests.support.poll import eventually

pytestmark = pytest.mark.timeout(180)

UVICORN = (
    SANDBOX_PYTHON, "-m", "uvicorn", "starlette_app:app", "--host", "127.0.0.1", "--port",
    "$PORT", "--no-access-log",
)  # fmt: skip
GUNICORN = (SANDBOX_PYTHON, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:$PORT", "flask_app:app")
FRAMEWORKS = {"uvicorn": UVICORN, "gunicorn": GUNICORN}
MB = 1 << 20


def spec(command: tuple[str, ...], **concurrency: Any) -> VersionSpec:
    return VersionSpec(
        runtime=Runtime.PROCESS,
        command=command,
        cwd=str(APPS),
        health_path="/health",
        boot_timeout=timedelta(seconds=60),
        concurrency=Concurrency(**concurrency),
    )


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[InProcessEdge]:
    async with running_edge(tmp_path) as e:
        await e.app("web")
        await e.route("web.test", "web")
        yield e


async def preview(edge: InProcessEdge, command: tuple[str, ...], label: str = "pr-1") -> str:
    """Deploy `command` as the preview `label` of app web; returns its host, once it serves."""
    await edge.deploy("web", spec(command), label=label)
    host = f"{label}.web.test"
    async with client(edge, host, timeout=60) as c:

        async def healthy() -> bool:
            return (await c.get("/health")).status_code == 200

        await eventually(healthy, 60, f"{host} to serve", interval=0.1)
    return host


def client(edge: InProcessEdge, host: str, timeout: float = 30) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{edge.port}", headers={"Host": host}, timeout=timeout
    )


async def curl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, (out + err).decode(errors="replace")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "50mb.bin"
    block = hashlib.sha256(b"miren").digest() * (MB // 32)
    with path.open("wb") as f:
        for i in range(50):
            f.write(bytes([i]) + block[1:])
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


async def test_sse_events_arrive_one_by_one(edge: InProcessEdge) -> None:
    host = await preview(edge, UVICORN)
    arrivals: list[tuple[float, float]] = []  # (sent by the app, received here)
    async with client(edge, host) as c, c.stream("GET", "/sse?n=5&ms=300") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                arrivals.append((float(line[6:]), time.time()))
    assert len(arrivals) == 5
    for (_, received), (next_sent, _) in itertools.pairwise(arrivals):
        assert received < next_sent  # each event reached us before the next was even sent


async def test_websockets_1000_messages_and_one_of_a_megabyte(edge: InProcessEdge) -> None:
    host = await preview(edge, UVICORN)
    async with connect(
        f"ws://{host}:{edge.port}/ws", host="127.0.0.1", port=edge.port, max_size=2 * MB
    ) as ws:
        for i in range(1000):
            await ws.send(f"message {i}")
            assert await ws.recv() == f"message {i}"
        big = bytes(range(256)) * (MB // 256)
        await ws.send(big)
        assert await ws.recv() == big


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
async def test_50_mb_up_and_down(
    edge: InProcessEdge, big_file: tuple[Path, str], framework: str
) -> None:
    path, digest = big_file
    host = await preview(edge, FRAMEWORKS[framework])
    url = f"http://127.0.0.1:{edge.port}"
    for extra in ((), ("-H", "Transfer-Encoding: chunked")):  # Content-Length, then chunked
        rc, out = await curl(
            "-H", f"Host: {host}", "--data-binary", f"@{path}", *extra, f"{url}/upload"
        )  # fmt: skip
        assert rc == 0, out
        assert json.loads(out) == {"length": 50 * MB, "sha256": digest}, extra
    pattern = hashlib.sha256()
    for _ in range(50):
        pattern.update(bytes(range(256)) * 4096)
    for query in ("mb=50", "mb=50&cl=1", "mb=50&chunked=1"):
        sha = hashlib.sha256()
        size = 0
        async with client(edge, host, timeout=120) as c, c.stream("GET", f"/download?{query}") as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                sha.update(chunk)
                size += len(chunk)
        assert (size, sha.hexdigest()) == (50 * MB, pattern.hexdigest()), query


@pytest.mark.parametrize("expect", [False, True], ids=["no-expect", "expect-100"])
@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
async def test_an_early_413_during_a_50_mb_upload_is_delivered(
    edge: InProcessEdge, big_file: tuple[Path, str], framework: str, expect: bool
) -> None:
    """10 tries, 10 delivered: never a 502, never a reset before curl has the answer."""
    path, _ = big_file
    host = await preview(edge, FRAMEWORKS[framework])
    extra = () if expect else ("-H", "Expect:")  # (curl sends Expect for a large body)
    results = []
    for _ in range(10):
        results.append(
            await curl(
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                f"Host: {host}",
                "--data-binary",
                f"@{path}",
                *extra,
                f"http://127.0.0.1:{edge.port}/early-413",
            )
        )
    assert results == [(0, "413")] * 10


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
async def test_expect_100_continue_then_the_body(
    edge: InProcessEdge, big_file: tuple[Path, str], framework: str
) -> None:
    path, digest = big_file
    host = await preview(edge, FRAMEWORKS[framework])
    rc, out = await curl(
        "-H", f"Host: {host}", "-H", "Expect: 100-continue", "--data-binary", f"@{path}",
        f"http://127.0.0.1:{edge.port}/upload",
    )  # fmt: skip
    assert rc == 0 and json.loads(out)["sha256"] == digest, out


async def overlap(c: httpx.AsyncClient, n: int) -> list[dict[str, float]]:
    """n concurrent 1-second requests; what the app reports of each."""
    answers = await asyncio.gather(*(c.get("/slow?ms=1000") for _ in range(n)))
    assert [a.status_code for a in answers] == [200] * n
    return [a.json() for a in answers]


async def test_30_concurrent_slow_requests_to_a_preview_are_not_queued(edge: InProcessEdge) -> None:
    """A preview has one sandbox and requests_per_instance 10 (a target, not a cap): all 30
    run at once in it."""
    host = await preview(edge, UVICORN)
    async with client(edge, host) as c:
        spans = await overlap(c, 30)
    assert max(s["started"] for s in spans) < min(s["ended"] for s in spans)


async def test_30_concurrent_slow_requests_to_an_upstream_are_not_queued(
    edge: InProcessEdge, app_process: StartApp
) -> None:
    """An upstream version has one instance per URL: 30 requests to its one URL run at once."""
    server = await app_process(list(UVICORN), cwd=APPS)
    await edge.app("up")
    await edge.route("up.test", "up")
    await edge.deploy(
        "up", VersionSpec(runtime=Runtime.UPSTREAM, urls=(server.url,), health_path="/health")
    )
    async with client(edge, "up.test") as c:

        async def healthy() -> bool:
            return (await c.get("/health")).status_code == 200

        await eventually(healthy, 30, "up.test to serve", interval=0.05)
        spans = await overlap(c, 30)
    assert max(s["started"] for s in spans) < min(s["ended"] for s in spans)


async def test_12_open_websockets_then_a_get(edge: InProcessEdge) -> None:
    host = await preview(edge, UVICORN)
    sockets = []
    try:
        for _ in range(12):
            ws = await connect(f"ws://{host}:{edge.port}/ws", host="127.0.0.1", port=edge.port)
            sockets.append(ws)
            await ws.send("hi")
            assert await ws.recv() == "hi"
        async with client(edge, host, timeout=10) as c:
            assert (await c.get("/")).status_code == 200  # not queued behind the tunnels
        metrics = await edge.metrics()
        assert "miren_ingress_open_tunnels 12.0" in metrics
    finally:
        for ws in sockets:
            await ws.close()


async def test_a_dead_upstream_is_a_502_not_a_timeout(edge: InProcessEdge) -> None:
    await edge.app("dead")
    await edge.route("dead.test", "dead")
    url = f"http://127.0.0.1:{free_port()}"
    await edge.deploy("dead", VersionSpec(runtime=Runtime.UPSTREAM, urls=(url,)))
    async with client(edge, "dead.test", timeout=10) as c:

        async def routed() -> httpx.Response | None:
            r = await c.get("/")
            return r if r.status_code != 404 else None  # (until the route table has it)

        r = await eventually(routed, 10, "dead.test to be routed", interval=0.05)
        assert r.status_code == 502, r.text
        assert (await c.get("/")).status_code == 502  # again at once: it is known down


async def test_a_refused_upgrade_behind_gunicorn_cannot_smuggle(edge: InProcessEdge) -> None:
    """Flask has no WebSockets: it answers an upgrade request like any other (404 here). The
    request behind it in the same write is answered second, on its own; another client gets
    its own answer."""
    host = await preview(edge, GUNICORN)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(
            f"GET /up HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert first.startswith(b"HTTP/1.1 404 ")
        length = int(first.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        second = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        assert second.startswith(b"HTTP/1.1 200 ") and b'"framework":"flask"' in second
    finally:
        writer.close()
    async with client(edge, host) as c:
        assert (await c.get("/")).json()["framework"] == "flask"
