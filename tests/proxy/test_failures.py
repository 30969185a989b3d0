"""Upstream failures, routing errors, retries, timeouts, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import aiohttp
import pytest
from aiohttp import web

from miren_ingress.proxy import (
    ActivationTimeout,
    BootFailed,
    Lease,
    NotReady,
    Overloaded,
    ProxyError,
    Refusal,
    StaticLease,
    Target,
)
from tests.support.poll import eventually

from .conftest import (
    RawUpstream,
    parse_responses,
    raw_exchange,
    read_request,
)


def closed_port() -> int:
    """A loopback port with nothing listening (connect gets ECONNREFUSED)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ScriptedRouter:
    """A Router whose cache hit points at `cached` and whose acquire answers `acquired`, then
    each of `more` in turn, the last one again and again (a Lease, or a ProxyError to raise);
    it records every call."""

    def __init__(
        self,
        cached: Lease | None,
        acquired: Lease | ProxyError,
        *more: Lease | ProxyError,
        timeout: float = 5.0,
    ):
        self.target = Target(app="shop", version="v-123-internal", request_timeout=timeout)
        self.cached = cached
        self.acquired = acquired
        self.more = list(more)
        self.calls: list[str] = []
        self.outstanding: set[int] = set()
        self.acquire_started = asyncio.Event()
        self.acquire_gate: asyncio.Event | None = None

    def resolve(self, host: bytes | str, now: float | None = None) -> Target | Refusal:
        if host.startswith(b"gone."):  # type: ignore[union-attr]
            return Refusal(410, "This preview has expired.")
        return self.target

    def cached_lease(self, target: Target) -> Lease | None:
        self.calls.append("cached")
        if self.cached is not None:
            self.outstanding.add(id(self.cached))
        return self.cached

    async def acquire(self, target: Target, local: bool = False) -> Lease:
        self.calls.append("acquire")
        self.acquire_started.set()
        if self.acquire_gate is not None:
            try:
                await self.acquire_gate.wait()
            except asyncio.CancelledError:
                self.calls.append("acquire cancelled")
                raise
        answer = self.acquired
        if self.more:
            self.acquired = self.more.pop(0)
        if isinstance(answer, ProxyError):
            raise answer
        self.outstanding.add(id(answer))
        return answer

    def release(self, lease: Lease) -> None:
        self.calls.append("release")
        self.outstanding.discard(id(lease))

    def discard(self, lease: Lease) -> None:
        self.calls.append("discard")
        self.outstanding.discard(id(lease))
        self.cached = None


def lease_for(port: int, key: str) -> Lease:
    return StaticLease(host="127.0.0.1", port=port, key=key)


async def test_retry_once_when_cached_lease_is_refused(proxy, ok_upstream: RawUpstream) -> None:
    router = ScriptedRouter(lease_for(closed_port(), "dead"), lease_for(ok_upstream.port, "live"))
    p = await proxy(router=router)
    async with aiohttp.ClientSession() as s, s.post(p.url + "/", data=b"once") as r:
        assert r.status == 200
        assert await r.read() == b"ok"
    assert router.calls == ["cached", "discard", "acquire", "release"]
    assert len(ok_upstream.requests) == 1 and bytes(ok_upstream.requests[0].body) == b"once"
    assert router.outstanding == set()


async def test_a_defect_after_the_response_closes_the_client_connection(
    proxy, ok_upstream: RawUpstream
) -> None:
    # A fault we cannot cause for real: the router's release raises (a defect), after the
    # response went out. The client connection must close, not wait for a next answer.
    router = ScriptedRouter(lease_for(ok_upstream.port, "a"), lease_for(ok_upstream.port, "b"))
    faulty = router.release

    def release(lease: Lease) -> None:
        faulty(lease)
        raise RuntimeError("defect")

    router.release = release  # type: ignore[method-assign]
    p = await proxy(router=router)
    data = await raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 2)
    assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")]  # then closed
    assert router.calls == ["cached", "release"]


async def test_fresh_lease_refused_is_reported_and_retried_once(proxy, ok_upstream) -> None:
    """Refused on a fresh lease too (an upstream that just went away): the sandbox is reported
    (discard) and the request goes to another lease, once."""
    router = ScriptedRouter(
        None, lease_for(closed_port(), "dead"), lease_for(ok_upstream.port, "b")
    )
    p = await proxy(router=router)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == 200
    assert router.calls == ["cached", "acquire", "discard", "acquire", "release"]


async def test_refused_twice_is_502_and_both_are_reported(proxy) -> None:
    router = ScriptedRouter(
        None, lease_for(closed_port(), "dead"), lease_for(closed_port(), "dead too")
    )
    p = await proxy(router=router)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == 502
    assert router.calls == ["cached", "acquire", "discard", "acquire", "discard"]


async def test_reset_after_request_sent_is_502_not_retried(proxy, raw_upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    up = await raw_upstream(handler)
    router = ScriptedRouter(lease_for(up.port, "a"), lease_for(up.port, "b"))
    p = await proxy(router=router)
    async with aiohttp.ClientSession() as s, s.post(p.url + "/", data=b"pay") as r:
        assert r.status == 502
        assert "application is temporarily unavailable" in await r.text()
    assert up.connections == 1
    assert router.calls == ["cached", "release"]


async def test_stale_keepalive_connection_replayed_for_get(proxy, raw_upstream) -> None:
    """The upstream closes a parked connection exactly as it is reused (no response byte)."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        first = True
        while (await read_request(reader)) is not None:
            if not first and served == 1:
                served += 1
                return  # close without answering the reused connection's request
            first = False
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(p.url + "/") as r:
                assert r.status == 200
    assert up.connections == 2


async def test_504_when_upstream_never_answers(proxy, raw_upstream) -> None:
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await done.wait()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, request_timeout=0.3)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(p.url + "/", headers={"Accept": "application/json"}) as r:
                assert r.status == 504
                assert await r.json() == {
                    "error": {
                        "code": "gateway_timeout",
                        "message": "The application did not answer in time.",
                    }
                }
    finally:
        done.set()


async def test_stall_mid_body_closes_client_connection(proxy, raw_upstream) -> None:
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
        await writer.drain()
        await done.wait()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, request_timeout=0.3)
    try:
        data = await raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=5)
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"only-part")
    finally:
        done.set()


async def test_idle_timeout_rearmed_by_each_chunk(proxy, raw_upstream) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 8 x 0.1 s = 0.8 s total, never idle for 0.3 s
            writer.write(b"1\r\n.\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address}, request_timeout=0.3)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert await r.read() == b"." * 8


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (BootFailed(), 502, None),
        (ActivationTimeout(), 504, None),
        (Overloaded(retry_after=7), 503, "7"),
        (NotReady(), 503, "1"),
    ],
)
async def test_acquire_errors_become_responses(proxy, error, status, retry_after) -> None:
    router = ScriptedRouter(None, error)
    p = await proxy(router=router)
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == status
        assert r.headers.get("Retry-After") == retry_after
        assert r.headers["Cache-Control"] == "no-store"
        body = await r.text()
    assert "v-123" not in body and "Traceback" not in body


@pytest.mark.parametrize(
    ("accept", "content_type", "check"),
    [
        ("application/json", "application/json",
         lambda b: json.loads(b) == {"error": {
             "code": "not_found", "message": "No application is served at this address."}}),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "text/html; charset=utf-8",
         lambda b: b.startswith("<!doctype html>") and "404 Not Found" in b),
        ("", "text/plain; charset=utf-8",
         lambda b: b == "404 Not Found: No application is served at this address.\n"),
        ("image/png", "text/plain; charset=utf-8", lambda b: b.startswith("404 Not Found")),
        ("text/html;q=0.5, application/json", "application/json", lambda b: "not_found" in b),
    ],
)  # fmt: skip
async def test_error_body_follows_accept(proxy, accept, content_type, check) -> None:
    p = await proxy({"known.test": "127.0.0.1:1"})
    headers = {"Host": "unknown.test"}
    if accept:
        headers["Accept"] = accept
    async with aiohttp.ClientSession(skip_auto_headers=["Accept"]) as s:
        async with s.get(p.url + "/", headers=headers) as r:
            assert r.status == 404
            assert r.headers["Content-Type"] == content_type
            assert r.headers["Cache-Control"] == "no-store"
            assert r.headers["Vary"] == "Accept"
            assert check(await r.text())


async def test_refusals_and_bad_host(proxy) -> None:
    router = ScriptedRouter(None, BootFailed())
    p = await proxy(router=router)
    data = await raw_exchange(
        p.port, b"GET / HTTP/1.1\r\nHost: gone.x\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 410 Gone") and b"expired" in data
    p2 = await proxy({"*": "127.0.0.1:1"})
    data = await raw_exchange(
        p2.port, b"GET / HTTP/1.1\r\nHost: bad_host!\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 400 ")


async def test_client_gone_during_cold_start_leaves_nothing(
    proxy, ok_upstream: RawUpstream
) -> None:
    router = ScriptedRouter(None, lease_for(ok_upstream.port, "x"))
    router.acquire_gate = asyncio.Event()
    p = await proxy(router=router)
    _, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(router.acquire_started.wait(), 5)
    assert p.server.in_flight == 1
    writer.close()
    # The cold start is cancelled (not left to finish for nobody): checked by waiting for the
    # cancellation itself, since an acquire that went on would only show after the gate opens.
    await eventually(lambda: "acquire cancelled" in router.calls, what="acquire cancelled")
    await eventually(lambda: p.server.in_flight == 0, what="in-flight back to 0")
    await eventually(lambda: p.server.open_connections == 0, what="connection gone")
    router.acquire_gate.set()
    assert router.calls == ["cached", "acquire", "acquire cancelled"]
    assert router.outstanding == set()
    assert ok_upstream.requests == []


async def test_client_gone_mid_response_releases_lease(proxy, raw_upstream) -> None:
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        await done.wait()

    up = await raw_upstream(handler)
    router = ScriptedRouter(lease_for(up.port, "a"), lease_for(up.port, "b"))
    p = await proxy(router=router)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await reader.readuntil(b"partial")).startswith(b"HTTP/1.1 200")
    writer.close()
    await eventually(lambda: router.outstanding == set(), what="lease released")
    await eventually(lambda: p.server.upstream_connections == 0, what="upstream conn closed")
    assert p.server.in_flight == 0
    done.set()


async def test_graceful_close_lets_in_flight_finish(proxy, raw_upstream) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()

    up = await raw_upstream(handler)
    p = await proxy({"*": up.address})
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", p.port)  # idle: closed at once
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await eventually(lambda: p.server.in_flight == 1)
        closing = asyncio.create_task(p.server.close(grace=5))
        assert await asyncio.wait_for(idle_r.read(), 5) == b""
        release.set()
        data = await asyncio.wait_for(reader.read(), 5)  # response, then the proxy closes
        assert parse_responses(data)[0][2] == b"done"
        assert b"Connection: close" in data
        await asyncio.wait_for(closing, 5)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", p.port)
    finally:
        release.set()
        idle_w.close()
        writer.close()


async def test_websocket_survives_request_timeout(proxy, aiohttp_upstream) -> None:
    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    p = await proxy({"*": await aiohttp_upstream(app)}, request_timeout=0.3)
    async with aiohttp.ClientSession() as s, s.ws_connect(p.url + "/ws") as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while loop.time() - start < 1.0:  # > 3x the request timeout, frames every 0.1 s
            await ws.send_str(f"m{n}")
            assert (await ws.receive(timeout=2)).data == f"echo:m{n}"
            n += 1
            await asyncio.sleep(0.1)
        # Idle longer than request_timeout: upgraded connections have no timeout at all.
        await asyncio.sleep(0.5)
        await ws.send_str("late")
        assert (await ws.receive(timeout=2)).data == "echo:late"
    await eventually(lambda: p.server.upstream_connections == 0, what="tunnel closed")
