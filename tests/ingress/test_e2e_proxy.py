"""The proxy's behaviour end to end: the whole edge (store, route-table watch, EdgeRouter,
activator, real sandboxes, the engine) driven through its sockets.

The engine's own tests (tests/proxy) prove these rules with a StaticRouter; here they hold through
the real routing and activator path: zero store operations on the warm path, flat memory under
200 MB bodies, WebSockets on a preview host, timeouts (reference case 51, adapted to SPEC §6: 504,
extended by a route's `request_timeout`), resets, dead sandboxes, forwarded and hop-by-hop headers
(case 49, adapted), negotiated error bodies, request smuggling (a representative set: the engine
tests cover all shapes) and the SPEC §10 metrics.

Case 49's `X-Miren-Access` is not applicable: the product has no internal entry point and no
access modes, so it neither sets nor interprets that header.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import miren_ingress.shell.serve as serve_module
from miren_activator.config import ActivatorConfig
from miren_activator.policy import CrashPolicy
from miren_store.entities import Sandbox, SandboxStatus
from tests.support.apps import REPO, SANDBOX_PYTHON
from tests.support.clients import Conn, Response, get, metric, raw_exchange
from tests.support.edge import (
    ECHO_APP,
    ECHO_CMD,
    InProcessEdge,
    MirenServer,
    echo_spec,
    running_edge,
    upstream_spec,
)
from tests.support.poll import eventually, eventually_sync
from tests.support.procs import host_pid, pid_alive, status_kib
from tests.support.upstream import Answer, Received, RecordingUpstream

MB = 1 << 20


async def setup_app(
    edge: InProcessEdge, app: str, host: str, *, label: str | None = None, **route: Any
) -> tuple[str, str | None]:
    """An app with one route and an active echo version (and a preview `label`): the active
    and preview version ids, once the route serves."""
    await edge.app(app)
    await edge.route(host, app, **route)
    active = await edge.deploy(app)
    await edge.served_by(host, active)
    preview = None
    if label is not None:
        preview = await edge.deploy(app, label=label, ttl="1h")
        await edge.served_by(f"{label}.{host}", preview)
    return active, preview


async def running_sandbox(edge: InProcessEdge, version: str) -> Sandbox:
    """The running sandbox of `version` as the store records it (written in the background)."""

    async def probe() -> Sandbox | None:
        for sb in await edge.store.list(Sandbox, version=version):
            if sb.status is SandboxStatus.RUNNING and sb.pid:
                return sb
        return None

    found: Sandbox = await eventually(probe, 10.0, f"a running sandbox of {version}")
    return found


# -- the warm path touches no store ------------------------------------------------------------


async def test_10000_warm_requests_cause_zero_store_operations(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as edge:
        active, _ = await setup_app(edge, "hot", "hot.example.com")
        conns = [await Conn.open(edge.port) for _ in range(8)]  # <= one sandbox's capacity (10)
        try:

            async def run(conn: Conn, n: int) -> None:
                for _ in range(n):
                    reply = await conn.request("GET", "/health", "hot.example.com")
                    assert reply.status == 200 and reply.body == b"ok", reply

            await asyncio.gather(*(run(c, 20) for c in conns))  # warm-up: every connection
            # The activator writes pool and sandbox records in the background after the boot:
            # wait until they are written, so the window below starts at rest.
            await running_sandbox(edge, active)
            before = edge.store_ops()
            assert sum(before.values()) > 0  # the counter is live: set-up and boot were counted
            scrape = await edge.metrics()
            hits, misses = (
                metric(scrape, "miren_ingress_lease_lookups_total", result=r)
                for r in ("hit", "miss")
            )
            started = time.monotonic()
            await asyncio.gather(*(run(c, 1250) for c in conns))  # 8 x 1250 = 10,000
            elapsed = time.monotonic() - started
            after = edge.store_ops()
            assert after == before, f"store operations during {elapsed:.1f}s: {before} -> {after}"
            scrape = await edge.metrics()
            assert (
                metric(scrape, "miren_ingress_lease_lookups_total", result="hit") == hits + 10_000
            )
            assert metric(scrape, "miren_ingress_lease_lookups_total", result="miss") == misses
        finally:
            for c in conns:
                c.close()


# -- memory stays flat under 200 MB bodies (the `miren serve` process) -------------------------

BIG = 200 * MB


class RssSampler:
    """The peak VmRSS of a process while the block runs (sampled every 5 ms, plus VmHWM reset
    at the start when the kernel allows it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._hwm_reset = False

    def __enter__(self) -> RssSampler:
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
            self._hwm_reset = True
        self.peak = status_kib(self.pid, "VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._hwm_reset:
            self.peak = max(self.peak, status_kib(self.pid, "VmHWM"))


def _upload(port: int, host: str, size: int) -> dict[str, Any]:
    block = bytes(MB)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        view = memoryview(block)
        left = size
        while left:
            n = min(left, MB)
            sock.sendall(view[:n])
            left -= n
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 200, (resp.status, resp.read()[:300])
        info: dict[str, Any] = json.loads(resp.read())
        return info


def _download(port: int, host: str, size: int) -> int:
    chunk = 64 * 1024
    assert size % chunk == 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"GET /stream?chunks={size // chunk}&size={chunk} HTTP/1.1\r\nHost: {host}\r\n"
            "\r\n".encode()
        )
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 200, resp.status
        assert resp.getheader("x-robots-tag") == "noindex"
        total = 0
        while data := resp.read(MB):
            total += len(data)
        return total


def test_200mb_upload_and_download_through_a_preview_keep_rss_flat(tmp_path: Path) -> None:
    with MirenServer(tmp_path, store="memory") as server:
        assert server.admin("POST", "/v1/apps", {"name": "big"}).status == 201
        assert server.admin("PUT", "/v1/routes/big.example.com", {"app": "big"}).status in (
            200,
            201,
        )
        spec = {
            "runtime": "process",
            "command": list(ECHO_CMD),
            "cwd": str(REPO),
            "health_path": "/health",
        }
        reply = server.admin(
            "POST", "/v1/apps/big/deploys", {"spec": spec, "ephemeral": {"label": "dl"}}
        )
        assert reply.status == 201, reply
        preview = reply.json()["version"]["id"]
        host = "dl.big.example.com"

        def serving() -> bool:
            reply = server.get(host)
            return reply.status == 200 and reply.json()["version"] == preview

        eventually_sync(serving, 15, "the preview to serve")
        # Warm-up: one transfer each way, so first-use allocations are not counted.
        assert _upload(server.proxy_port, host, 4 * MB)["body_length"] == 4 * MB
        assert _download(server.proxy_port, host, 4 * MB) == 4 * MB

        baseline = status_kib(server.pid, "VmRSS")
        with RssSampler(server.pid) as up:
            info = _upload(server.proxy_port, host, BIG)
        assert info["body_length"] == BIG and info["version"] == preview
        baseline_down = status_kib(server.pid, "VmRSS")
        with RssSampler(server.pid) as down:
            assert _download(server.proxy_port, host, BIG) == BIG
        growth_up = (up.peak - baseline) / 1024
        growth_down = (down.peak - baseline_down) / 1024
        print(
            f"miren serve RSS: baseline {baseline / 1024:.1f} MiB; peak growth during a 200 MiB "
            f"upload {growth_up:.1f} MiB, download {growth_down:.1f} MiB"
        )
        assert growth_up < 50, f"RSS grew {growth_up:.1f} MiB during the upload"
        assert growth_down < 50, f"RSS grew {growth_down:.1f} MiB during the download"


# -- WebSocket on a preview host outlives request_timeout (case 50) ------------------------------


async def test_50_websocket_through_a_preview_outlives_request_timeout(tmp_path: Path) -> None:
    timeout = 1.0
    async with running_edge(tmp_path, ingress={"request_timeout": f"{timeout}s"}) as edge:
        await setup_app(edge, "ws", "ws.example.com", label="live")
        host = "live.ws.example.com"
        # The timeout is in force on this host: a silent upstream gets 504.
        stalled = await get(edge.port, host, f"/slow?ms={int(timeout * 4000)}")
        assert stalled.status == 504, stalled

        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"http://127.0.0.1:{edge.port}/ws", headers={"Host": host}, autoping=False
            ) as ws,
        ):
            opened = time.monotonic()
            i = 0
            while time.monotonic() - opened < 2.5 * timeout:  # frames flowing past the timeout
                await ws.send_str(f"frame {i}")
                msg = await ws.receive(timeout=5)
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, f"frame {i}"), msg
                i += 1
                await asyncio.sleep(timeout / 4)
            await asyncio.sleep(1.5 * timeout)  # and silent for longer than it
            await ws.send_bytes(b"\x00binary\xff")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00binary\xff"), msg
            assert time.monotonic() - opened > 3 * timeout
            await ws.close()
        assert i >= 4


# -- timeouts (case 51, adapted), resets, dead sandboxes ------------------------------------------


async def test_51_stalled_upstream_is_504_and_a_route_timeout_extends_it(tmp_path: Path) -> None:
    async with running_edge(tmp_path, ingress={"request_timeout": "1s"}) as edge:
        await setup_app(edge, "slow", "slow.example.com")
        await edge.route("patient.slow.test", "slow", request_timeout=timedelta(seconds=20))
        await edge.wait_status("patient.slow.test", 200, timeout=10.0)
        started = time.monotonic()
        reply = await get(edge.port, "slow.example.com", "/slow?ms=6000")
        assert reply.status == 504, reply
        assert time.monotonic() - started >= 0.9
        # The same app on a route with request_timeout=20s: 2 s of silence is fine.
        reply = await get(edge.port, "patient.slow.test", "/slow?ms=2000")
        assert reply.status == 200, reply
        assert reply.json()["path"] == "/slow"
        scrape = await edge.metrics()
        assert metric(scrape, "miren_ingress_upstream_errors_total", reason="timeout") == 1


def reset_on(path: str) -> Answer:
    def answer(req: Received) -> bytes | None:
        if req.path == path:
            return None
        body = json.dumps({"path": req.path}).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    return answer


async def serve_recording(edge: InProcessEdge, upstream: RecordingUpstream) -> None:
    """App `rec` at rec.example.com on the recording upstream, routed, its lease and pool warm."""
    await edge.app("rec")
    await edge.route("rec.example.com", "rec")
    await edge.deploy("rec", upstream_spec(upstream.url))
    await edge.wait_status("rec.example.com", 200, path="/warm", timeout=10.0)


async def test_upstream_reset_is_502_and_not_retried(tmp_path: Path) -> None:
    upstream = await RecordingUpstream(reset_on("/reset")).start()
    try:
        async with running_edge(tmp_path) as edge:
            await serve_recording(edge, upstream)
            async with await Conn.open(edge.port) as conn:
                reply = await conn.request("POST", "/reset", "rec.example.com", body=b"payload")
                assert reply.status == 502, reply
            assert upstream.paths().count("/reset") == 1  # sent once, never retried
            assert (await get(edge.port, "rec.example.com", "/after")).status == 200
            scrape = await edge.metrics()
            assert metric(scrape, "miren_ingress_upstream_errors_total", reason="reset") == 1
    finally:
        await upstream.close()


async def test_sandbox_dying_mid_request_is_502(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as edge:
        active, _ = await setup_app(edge, "crashy", "crashy.example.com")
        sandbox = await running_sandbox(edge, active)
        reply = await get(edge.port, "crashy.example.com", "/crash", method="POST", body=b"x")
        assert reply.status == 502, reply
        assert sandbox.pid is not None
        await eventually(
            lambda: not pid_alive(sandbox.pid or 0), 10.0, "the crashed sandbox to be gone"
        )


async def _kill_and_request(edge: InProcessEdge, host: str, box: dict[str, Any]) -> Response:
    """SIGKILL the sandbox, then at once a request on a warm keep-alive connection (the cached
    lease and a parked upstream connection still point at the dead sandbox)."""
    conn = await Conn.open(edge.port)
    try:
        warm = await conn.request("GET", "/before", host)
        assert warm.status == 200 and warm.json()["sandbox"] == box["id"], warm
        os.kill(host_pid(box["pid"], "echo_server.py"), signal.SIGKILL)
        reply = await conn.request("GET", "/after-kill", host)
        # Exactly one response came back for it: the next request gets its own answer.
        follow = await conn.request("GET", "/follow-up", host)
        assert follow.status == 200 and follow.json()["path"] == "/follow-up", follow
        return reply
    finally:
        conn.close()


async def test_killed_sandbox_cached_lease_gives_one_200(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as edge:
        active, _ = await setup_app(edge, "k", "k.example.com")
        listed = await edge.admin("GET", "/v1/apps/k/sandboxes")
        boxes = [b for b in listed.json() if b["status"] == "running"]
        assert len(boxes) == 1, listed
        reply = await _kill_and_request(edge, "k.example.com", boxes[0])
        assert reply.status == 200, reply
        info = reply.json()
        assert info["sandbox"] != boxes[0]["id"]
        assert info["version"] == active and info["path"] == "/after-kill"


@pytest.fixture
def no_crash_backoff(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`miren serve`'s activator with a crash window of 0 (no death counts as a quick crash), to
    test the retry paths apart from product bug 1. Config does not expose the crash policy, so
    the serve wiring's config class is wrapped."""

    def config(**kwargs: Any) -> ActivatorConfig:
        return ActivatorConfig(crash=CrashPolicy(window=0.0), **kwargs)

    monkeypatch.setattr(serve_module, "ActivatorConfig", config)
    yield


# The sandbox process stays up while its server dies: the activator still holds it RUNNING,
# so the request deterministically takes the cached lease, is refused, and retries once.
WRAPPED_ECHO = ("sh", "-c", '"$0" -S "$1"; exec sleep 600', SANDBOX_PYTHON, str(ECHO_APP))


async def test_refused_cached_lease_is_dropped_and_retried_once(
    tmp_path: Path, no_crash_backoff: None
) -> None:
    async with running_edge(tmp_path) as edge:
        await edge.app("r")
        await edge.route("r.example.com", "r")
        version = await edge.deploy("r", echo_spec(command=WRAPPED_ECHO))
        first = await edge.served_by("r.example.com", version)
        port = first.json()["port"]
        sandbox = await running_sandbox(edge, version)
        assert sandbox.pid is not None
        os.kill(host_pid(sandbox.pid, "echo_server.py"), signal.SIGKILL)  # (not the sh wrapper)

        async def refused() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                return True
            w.close()
            return False

        await eventually(refused, 10.0, "the sandbox's port to refuse connections")
        before = await edge.metrics()
        reply = await get(edge.port, "r.example.com", "/retried")
        assert reply.status == 200, reply
        assert reply.json()["sandbox"] != sandbox.id and reply.json()["path"] == "/retried"
        after = await edge.metrics()
        name = "miren_ingress_upstream_errors_total"
        assert metric(after, name, reason="connect_retried") == (
            metric(before, name, reason="connect_retried") + 1
        )
        assert metric(after, name, reason="connect") == metric(before, name, reason="connect")
        # The refused sandbox was taken out of service and its process group stopped.
        await eventually(
            lambda: not pid_alive(sandbox.pid or 0),
            10.0,
            "the refused sandbox's wrapper to be stopped",
        )


# A sandbox that dies the way a killed process can look from outside: once armed, it resets the
# parked keep-alive connection when the next request arrives on it, then accepts one more
# connection (the proxy's replay), resets it and exits. Deterministic, unlike SIGKILL's race.
DYING_SANDBOX = r"""
import json, os, socket, threading
armed, dying = threading.Event(), threading.Event()
def reset(c):
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    c.close()
def serve(c):
    f = c.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            f.close(); c.close(); return
        path = line.split()[1].decode()
        while f.readline() not in (b"\r\n", b""):
            pass
        if armed.is_set():
            dying.set(); f.close(); reset(c); return
        if path == "/arm":
            armed.set()
        body = json.dumps(
            {"sandbox": os.environ["MIREN_SANDBOX"], "path": path,
             "version": os.environ["MIREN_VERSION"]}
        ).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(os.environ["PORT"])))
ls.listen(64)
while True:
    c, _ = ls.accept()
    if dying.is_set():
        reset(c)
        os._exit(0)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


async def test_dying_sandbox_reset_on_replay_is_retried_on_a_fresh_lease(
    tmp_path: Path, no_crash_backoff: None
) -> None:
    async with running_edge(tmp_path) as edge:
        await edge.app("d")
        await edge.route("d.example.com", "d")
        command = (SANDBOX_PYTHON, "-S", "-c", DYING_SANDBOX)
        version = await edge.deploy("d", echo_spec(command=command))
        await edge.served_by("d.example.com", version)
        async with await Conn.open(edge.port) as conn:
            armed = await conn.request("GET", "/arm", "d.example.com")
            assert armed.status == 200, armed
            reply = await conn.request("GET", "/victim", "d.example.com")
        assert reply.status == 200, reply
        info = reply.json()
        assert info["sandbox"] != armed.json()["sandbox"] and info["path"] == "/victim", info


# -- headers: forwarded, hop-by-hop, robots (case 49, adapted) ----------------------------------


def hop_answer(req: Received) -> bytes | None:
    body = b"ok"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Resp-Hop\r\n"
        b"X-Resp-Hop: secret\r\nKeep-Alive: timeout=5, max=100\r\nProxy-Authenticate: Basic\r\n"
        b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
        b"X-End-To-End: kept\r\n\r\n" + body
    )


REQUEST_HOP = [
    ("Connection", "keep-alive, X-Hop-A"),
    ("X-Hop-A", "secret"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-T"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Connection", "keep-alive"),
    ("Upgrade", "h2c"),
]
HOP_NAMES = {
    "connection",
    "x-hop-a",
    "keep-alive",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "upgrade",
}


async def test_forwarded_headers_appended_and_hop_by_hop_never_cross(tmp_path: Path) -> None:
    upstream = await RecordingUpstream(hop_answer).start()
    try:
        async with running_edge(tmp_path) as edge:
            await serve_recording(edge, upstream)
            async with await Conn.open(edge.port) as conn:
                reply = await conn.request(
                    "GET",
                    "/hop",
                    "rec.example.com",
                    [
                        ("X-Forwarded-For", "1.2.3.4"),
                        ("X-Forwarded-For", "5.6.7.8"),
                        ("X-Forwarded-Host", "evil.example"),
                        ("X-Forwarded-Proto", "https"),
                        *REQUEST_HOP,
                        ("X-End-To-End", "kept"),
                    ],
                )
            assert reply.status == 200 and reply.body == b"ok", reply
            got = [r for r in upstream.requests if r.path == "/hop"]
            assert len(got) == 1
            seen = got[0]
            assert seen.header("x-forwarded-for") == ["1.2.3.4, 5.6.7.8, 127.0.0.1"]
            assert seen.header("x-forwarded-host") == ["rec.example.com"]
            assert seen.header("x-forwarded-proto") == ["http"]
            assert seen.header("host") == ["rec.example.com"]
            assert seen.header("x-end-to-end") == ["kept"]
            assert not HOP_NAMES & {n for n, _ in seen.headers}, seen.headers
            # ... and the other way.
            names = {n for n, _ in reply.fields}
            assert reply.header("x-end-to-end") == "kept"
            leaked = {"x-resp-hop", "keep-alive", "proxy-authenticate", "proxy-connection"}
            assert not leaked & names, reply.fields
            assert not {"trailer", "upgrade"} & names, reply.fields
            assert all(v.lower() in ("close", "keep-alive") for v in reply.all("connection"))
            assert reply.header("x-robots-tag") is None  # the active version: indexable
    finally:
        await upstream.close()


async def test_preview_request_carries_forwarded_headers_to_the_sandbox(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as edge:
        _, preview = await setup_app(edge, "app", "app.example.com", label="feat-x")
        reply = await get(
            edge.port,
            "feat-x.app.example.com",
            "/",
            headers=[("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https")],
        )
        assert reply.status == 200 and reply.json()["version"] == preview, reply
        assert reply.header("x-robots-tag") == "noindex"
        seen = {}
        for name, value in reply.json()["headers"]:
            assert name.lower() not in seen, f"{name} sent twice"
            seen[name.lower()] = value
        assert seen["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
        assert seen["x-forwarded-host"] == "feat-x.app.example.com"
        assert seen["x-forwarded-proto"] == "http"


# -- error bodies: negotiated by Accept, never an internal id ------------------------------------

ACCEPTS: dict[str | None, str] = {
    "application/json": "application/json",
    "text/html": "text/html",
    "text/plain": "text/plain",
    None: "text/plain",
    "*/*": "text/plain",
    "image/png": "text/plain",
    "text/html;q=0.5, application/json": "application/json",
}


def check_error_page(reply: Response, status: int, accept: str | None, secrets: list[str]) -> None:
    assert reply.status == status, reply
    want = ACCEPTS[accept]
    assert (reply.header("content-type") or "").startswith(want), (accept, reply.headers)
    assert reply.header("cache-control") == "no-store"
    body = reply.body.decode()
    if want == "application/json":
        data = json.loads(body)
        assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
        assert data["error"]["message"], data
    elif want == "text/html":
        assert body.startswith("<!doctype html>") and f"<h1>{status} " in body, body
    else:
        assert body.startswith(f"{status} "), body
    for secret in secrets:
        assert secret not in body, f"{secret!r} leaked in a {status} page: {body!r}"
    assert "Traceback" not in body and "sb-" not in body and "pool-" not in body


async def test_error_bodies_follow_accept_and_show_no_ids(tmp_path: Path) -> None:
    async with running_edge(tmp_path, ingress={"request_timeout": "1s"}) as edge:
        active, preview = await setup_app(edge, "shop", "shop.example.com", label="feat-x")
        await edge.deploy("shop", label="old", ttl="1m", now=_an_hour_ago)
        await edge.app("crashy")
        await edge.route("crashy.example.com", "crashy")
        crashy = await edge.deploy("crashy")
        await edge.served_by("crashy.example.com", crashy)
        boxes = [*await edge.sandboxes("shop"), *await edge.sandboxes("crashy")]
        secrets = [active, crashy, "crashy", "shop", *(b.id for b in boxes)]
        secrets += [str(b.pid) for b in boxes if b.pid] + [b.url for b in boxes if b.url]
        assert preview is not None
        secrets.append(preview)

        def headers(accept: str | None) -> list[tuple[str, str]]:
            return [] if accept is None else [("Accept", accept)]

        plain = {
            400: "bad..host",
            404: "nope.shop.example.com",
            410: "old.shop.example.com",
        }
        for status, host in plain.items():
            for accept in ACCEPTS:
                reply = await get(edge.port, host, headers=headers(accept))
                check_error_page(reply, status, accept, secrets)
        # 504: concurrent stalled requests (one request_timeout for all of them).
        replies = await asyncio.gather(
            *(
                get(edge.port, "shop.example.com", "/slow?ms=5000", headers=headers(a))
                for a in ACCEPTS
            )
        )
        for accept, reply in zip(ACCEPTS, replies, strict=True):
            check_error_page(reply, 504, accept, secrets)
        # 502: the sandbox dies mid-request, then its pool is in crash back-off (fails fast).
        for accept in ACCEPTS:
            reply = await get(
                edge.port,
                "crashy.example.com",
                "/crash",
                method="POST",
                body=b"x",
                headers=headers(accept),
            )
            check_error_page(reply, 502, accept, secrets)
        # HEAD: the head of the same page, no body.
        async with await Conn.open(edge.port) as conn:
            reply = await conn.request("HEAD", "/", "nope.shop.example.com")
            assert reply.status == 404 and reply.body == b"", reply


def _an_hour_ago() -> datetime:
    return datetime.now(UTC) - timedelta(hours=1)


# -- request smuggling: 400, and nothing reaches the app ---------------------------------------

H = b"Host: rec.example.com\r\n"
SMUGGLING = {
    "cl-and-te": b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
    "te-and-cl": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX",
    "two-cl": b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-list": b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl-sign": b"POST /s HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "te-gzip-chunked": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-chunked-gzip": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-twice": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-xchunked": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-bare-lf": b"POST /s HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "obs-fold": b"GET /s HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n",
    "lf-in-value": b"GET /s HTTP/1.1\r\n" + H + b"X-A: b\nX-B: c\r\n\r\n",
    "nul-in-value": b"GET /s HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n",
    "two-hosts": b"GET /s HTTP/1.1\r\n" + H + b"Host: other.example.com\r\n\r\n",
    "absolute-form-ftp": b"GET ftp://other.example.com/s HTTP/1.1\r\n" + H + b"\r\n",
    "http2-version": b"GET /s HTTP/2.0\r\n" + H + b"\r\n",
    "bare-lf-lines": b"GET /s HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n",
}  # fmt: skip


async def test_smuggling_shapes_get_400_and_never_reach_the_upstream(tmp_path: Path) -> None:
    upstream = await RecordingUpstream().start()
    try:
        async with running_edge(tmp_path) as edge:
            await serve_recording(edge, upstream)
            received, conns = upstream.received_bytes, upstream.connections
            failures = []
            for name, data in SMUGGLING.items():
                result = await raw_exchange(edge.port, data)
                answer = result.data
                if (
                    not result.closed
                    or not answer.startswith(b"HTTP/1.1 400 ")
                    or answer.count(b"HTTP/1.1 ") != 1
                ):
                    failures.append(f"{name}: {result!r}")
            assert not failures, failures
            assert upstream.received_bytes == received, "smuggled bytes reached the upstream"
            assert upstream.connections == conns
            assert "/s" not in upstream.paths()

            # A valid request and a CL.TE smuggle in one segment: the valid one is answered (as
            # nginx does), then one 400; nothing of the smuggle is forwarded.
            result = await raw_exchange(
                edge.port, b"GET /first HTTP/1.1\r\n" + H + b"\r\n" + SMUGGLING["cl-and-te"]
            )
            assert result.closed, result
            answer = result.data
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 2, answer
            assert b"HTTP/1.1 400 " in answer
            assert upstream.paths().count("/first") == 1 and "/s" not in upstream.paths()
            # The same two requests in two segments: the first is served, the second refused.
            async with await Conn.open(edge.port) as conn:
                first = await conn.request("GET", "/first", "rec.example.com")
                assert first.status == 200 and first.json()["path"] == "/first", first
                conn.send(SMUGGLING["cl-and-te"])
                answer = await conn.read_to_eof()
            assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
            assert upstream.paths().count("/first") == 2
            assert "/s" not in upstream.paths() and upstream.parse_errors == []
    finally:
        await upstream.close()


# -- /metrics moves as requests pass (SPEC §10) ----------------------------------------------------


async def test_metrics_move_as_requests_pass(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as edge:
        await edge.app("m")
        await edge.route("m.example.com", "m")
        await edge.route("m-short.example.com", "m", request_timeout=timedelta(seconds=0.5))
        version = await edge.deploy("m")
        before = await edge.metrics()
        for family in (
            "miren_ingress_requests_total",
            "miren_ingress_request_duration_seconds",
            "miren_ingress_in_flight_requests",
            "miren_ingress_lease_lookups_total",
            "miren_ingress_upstream_errors_total",
            "miren_store_operations_total",
            "miren_activator_cold_starts_total",
        ):
            assert f"# TYPE {family} " in before, family

        await edge.served_by("m.example.com", version)  # cold start: a lease miss
        async with await Conn.open(edge.port) as conn:
            for _ in range(20):
                assert (await conn.request("GET", "/", "m.example.com")).status == 200
            assert (await conn.request("POST", "/", "m.example.com", body=b"x")).status == 200
        assert (await get(edge.port, "nope.example.com")).status == 404
        assert (await get(edge.port, "m-short.example.com", "/slow?ms=3000")).status == 504

        # One request in flight while we scrape.
        slow = asyncio.create_task(get(edge.port, "m.example.com", "/slow?ms=1500"))
        try:

            async def in_flight() -> bool:
                return metric(await edge.metrics(), "miren_ingress_in_flight_requests") >= 1

            await eventually(in_flight, 10.0, "a request in flight")
        finally:
            assert (await slow).status == 200
        after = await edge.metrics()

        def moved(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        ok_gets = moved("miren_ingress_requests_total", app="m", code="200", method="GET")
        assert ok_gets >= 22  # served_by's probes, 20, the slow one
        assert moved("miren_ingress_requests_total", app="m", code="200", method="POST") == 1
        assert moved("miren_ingress_requests_total", app="m", code="504", method="GET") == 1
        assert moved("miren_ingress_requests_total", code="404", method="GET") >= 1
        assert moved("miren_ingress_request_duration_seconds_count", app="m") == ok_gets + 2
        assert moved("miren_ingress_request_duration_seconds_sum", app="m") >= 1.5
        assert moved("miren_ingress_request_duration_seconds_bucket", app="m", le="+Inf") == (
            ok_gets + 2
        )
        assert moved("miren_ingress_lease_lookups_total", result="miss") >= 1
        assert moved("miren_ingress_lease_lookups_total", result="hit") >= 20
        assert moved("miren_ingress_upstream_errors_total", reason="timeout") == 1
        assert metric(after, "miren_ingress_in_flight_requests") == 0
        assert moved("miren_activator_cold_starts_total", app="m") == 1
        assert moved("miren_activator_pool_creations_total") == 1
        assert moved("miren_activator_cold_start_duration_seconds_count") == 1
        assert metric(after, "miren_activator_sandboxes", state="running") == 1
        assert moved("miren_store_operations_total", op="create", result="ok") >= 1
