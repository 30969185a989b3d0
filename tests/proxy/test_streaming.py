"""Large bodies stream through with flat memory: the proxy runs in a subprocess and its peak
RSS (VmHWM) is compared before and after moving 200 MB up and 200 MB down."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator

import pytest

from .conftest import RawUpstream

SIZE = 200 * 1024 * 1024
BLOCK = 1024 * 1024
PROXY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, uvloop
    from miren_ingress.proxy import ProxyServer, StaticRouter

    async def main():
        server = ProxyServer(StaticRouter({"*": sys.argv[1]}))
        host, port = await server.start("127.0.0.1", 0)
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.close(1.0)

    uvloop.run(main())
    """
)


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
async def big_upstream(raw_upstream) -> RawUpstream:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if head.startswith(b"POST"):
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                got = 0
                while got < length:
                    chunk = await reader.read(min(BLOCK, length - got))
                    if not chunk:
                        return
                    if got < BLOCK <= got + len(chunk):
                        await asyncio.sleep(0.5)  # a slow consumer: the client must be paused
                    got += len(chunk)
                body = b"got %d" % got
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                block = b"%x\r\n%s\r\n" % (BLOCK, b"d" * BLOCK)
                for _ in range(SIZE // BLOCK):
                    writer.write(block)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()

    return await raw_upstream(handler)


@pytest.fixture
async def proxy_process(big_upstream: RawUpstream) -> AsyncIterator[tuple[int, int]]:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROXY_SCRIPT, big_upstream.address,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        yield proc.pid, int(line)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_200mb_up_and_down_with_flat_memory(proxy_process: tuple[int, int]) -> None:
    pid, port = proxy_process
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Warm up (imports, first buffers), then take the baseline.
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789")
        assert (await reader.readuntil(b"got 10")).startswith(b"HTTP/1.1 200")
        baseline = peak_rss_kib(pid)

        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % SIZE)
        block = b"u" * BLOCK
        for _ in range(SIZE // BLOCK):
            writer.write(block)
            await writer.drain()
        assert (await reader.readuntil(b"got %d" % SIZE)).startswith(b"HTTP/1.1 200")

        writer.write(b"GET /download HTTP/1.1\r\nHost: a\r\n\r\n")
        received = 0
        tail = b""
        async with asyncio.timeout(60):
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                chunk = await reader.read(BLOCK)
                assert chunk, "connection closed mid-download"
                if received < BLOCK <= received + len(chunk):
                    await asyncio.sleep(0.5)  # a slow client: the upstream must be paused
                received += len(chunk)
                tail = (tail + chunk)[-16:]
        assert received > SIZE
        growth_mib = (peak_rss_kib(pid) - baseline) / 1024
        # ~1 MiB with back-pressure; ~190 MiB when either direction's pause is broken.
        assert growth_mib < 50, f"proxy peak RSS grew by {growth_mib:.1f} MiB"
    finally:
        writer.close()
