"""The test app itself (tests/apps/echo_server.py): what the activator and ingress tests rely on."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from miren_activator.runtimes.process import pick_port
from tests.activator.conftest import ECHO


class Echo:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def spawn(tmp_path: Path, **env: str) -> Echo:
    port = pick_port("127.0.0.1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-S",
        str(ECHO),
        "--port",
        str(port),
        env={**os.environ, "MIREN_VERSION": "v9", "MIREN_APP": "app", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return Echo(proc, port)


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[Echo]:
    server = await spawn(tmp_path)
    try:
        assert server.proc.stdout is not None
        line = await asyncio.wait_for(server.proc.stdout.readline(), 10)
        assert f"listening on 127.0.0.1:{server.port}".encode() in line
        yield server
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
        await server.proc.wait()


async def raw(port: int, data: bytes, until: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = b""
        while until not in out:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        writer.close()
        await writer.wait_closed()


async def test_info_keepalive_and_close(echo: Echo) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    try:
        for _ in range(3):  # three requests on one connection
            writer.write(b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\nX-Test: 1\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
            assert (body["version"], body["app"], body["path"], body["query"]) == (
                "v9",
                "app",
                "/x",
                "a=1",
            )
            assert ["X-Test", "1"] in body["headers"] and body["pid"] == echo.proc.pid
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)  # the server closes after it
        assert b"Connection: close" in rest
    finally:
        writer.close()
        await writer.wait_closed()


async def test_bodies_both_ways(echo: Echo) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([65 + i]) * 1000

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{echo.url}/echo", data=gen()) as resp:  # chunked upload
            assert await resp.read() == b"".join(bytes([65 + i]) * 1000 for i in range(5))
        async with session.post(f"{echo.url}/echo", data=b"x" * 100_000) as resp:
            assert len(await resp.read()) == 100_000
        async with session.get(f"{echo.url}/stream?chunks=4&size=3") as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert await resp.read() == b"aaabbbcccddd"
        async with session.get(f"{echo.url}/status/418") as resp:
            assert resp.status == 418
        async with session.head(f"{echo.url}/health") as resp:
            assert resp.status == 200 and await resp.read() == b""


async def test_expect_continue(echo: Echo) -> None:
    out = await raw(
        echo.port,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nok",
        b"\r\n\r\nok",
    )
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")


async def test_bad_request_is_400(echo: Echo) -> None:
    out = await raw(echo.port, b"NONSENSE\r\n\r\n", b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")


async def test_websocket_echo(echo: Echo) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{echo.url}/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        await ws.send_bytes(b"\x01" * 70_000)
        assert (await ws.receive()).data == b"\x01" * 70_000
        await ws.ping(b"p")
        await ws.send_str("after ping")
        assert (await ws.receive()).data == "after ping"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"ECHO_FAIL_BOOT": "1"}, 1), ({"ECHO_EXIT_AFTER_MS": "50"}, 2)],
)
async def test_exit_switches(tmp_path: Path, env: dict[str, str], expected: int) -> None:
    server = await spawn(tmp_path, **env)
    try:
        assert await asyncio.wait_for(server.proc.wait(), 10) == expected
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()


async def test_never_healthy_answers_503(tmp_path: Path) -> None:
    server = await spawn(tmp_path, ECHO_NEVER_HEALTHY="1")
    try:
        assert server.proc.stdout is not None
        await asyncio.wait_for(server.proc.stdout.readline(), 10)
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/health") as r:
            assert r.status == 503
    finally:
        server.proc.kill()
        await server.proc.wait()
