"""Pipelined requests the proxy answers itself (health checks, 404s, redirects, login pages)
finish inside their own start: the connection starts the next one in a loop, never by
recursion, and stays open.

Found on the compiled hot path: two pipelined health checks closed the connection with a
TypeError (the compiled code checked a type the checker had narrowed across a call that
changed it), and a read of thousands of them crashed the process on the C stack (on the
sources: a RecursionError after about 250)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from miren_ingress.proxy import StaticRouter
from miren_ingress.proxy.states import Life
from miren_ingress.proxy.testing import Bench

from .conftest import RawUpstream, parse_responses

HEALTH = b"GET /.well-known/miren/health HTTP/1.1\r\nHost: a\r\n\r\n"
UNKNOWN = b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n"


async def test_pipelined_local_answers_keep_the_connection_open() -> None:
    bench = Bench(StaticRouter({}))
    client, transport = bench.client()
    client.data_received(HEALTH + HEALTH + UNKNOWN + UNKNOWN)
    statuses = [status for status, _, _ in parse_responses(transport.take())]
    assert statuses == [200, 200, 404, 404]
    assert client.life is Life.OPEN and not transport.closed
    client.data_received(HEALTH)  # the same connection serves on
    assert [status for status, _, _ in parse_responses(transport.take())] == [200]
    client.connection_lost(None)


@pytest.mark.parametrize(
    "request_bytes",
    [
        UNKNOWN,
        # An upgrade request answered without a 101: what follows it is parsed once it is
        # answered (RFC 9931), and each of these is one more.
        b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: upgrade\r\nUpgrade: a\r\n\r\n",
    ],
    ids=["plain", "refused-upgrades"],
)
def test_twenty_thousand_pipelined_local_answers_in_one_read(request_bytes: bytes) -> None:
    # In a child process: the recursion this guards against crashed the process when compiled.
    script = textwrap.dedent(
        """
        import asyncio, sys
        from miren_ingress.proxy import StaticRouter
        from miren_ingress.proxy.testing import Bench

        async def main():
            bench = Bench(StaticRouter({}))
            client, transport = bench.client(record=False)
            client.data_received(sys.stdin.buffer.read() * 20_000)
            print(transport.writes, client.life.name)
            client.connection_lost(None)

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=request_bytes,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [b"20000", b"OPEN"]


async def test_a_local_answer_to_a_long_body_leaves_the_connection_reading() -> None:
    # The health check answers at its start; the rest of its 260 KiB body then arrives in one
    # read, past buffer_limit: it is dropped with the finished exchange, and reading goes on.
    bench = Bench(StaticRouter({}))
    client, transport = bench.client()
    body = 260 * 1024
    client.data_received(
        b"POST /.well-known/miren/health HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % body
        + b"x" * 10_000
    )
    client.data_received(b"x" * (body - 10_000))
    assert [status for status, _, _ in parse_responses(transport.take())] == [200]
    assert client.life is Life.OPEN
    assert client.blocked == 0 and transport.reading
    client.data_received(HEALTH)
    assert [status for status, _, _ in parse_responses(transport.take())] == [200]
    client.connection_lost(None)


async def test_local_answers_pipelined_behind_a_proxied_request(
    proxy, ok_upstream: RawUpstream
) -> None:
    # The queued health checks start from the upstream's response (its exchange_done), over
    # real sockets; the connection then serves one more request.
    p = await proxy({"*": ok_upstream.address})
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n" + HEALTH + HEALTH)
        data = b""
        async with asyncio.timeout(10):
            while len(parse_responses(data)) < 3:
                data += await reader.read(65536)
        assert [s for s, _, _ in parse_responses(data)] == [200, 200, 200]
        writer.write(b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            rest = await reader.read()
        assert [(s, b) for s, _, b in parse_responses(rest)] == [(200, b"ok")]
    finally:
        writer.close()


async def test_queued_requests_wait_while_the_client_does_not_read() -> None:
    # A client that pipelines requests and reads no answer: once its write buffer is past the
    # high-water mark (pause_writing), nothing more is rendered into it; the rest start when
    # it drains (resume_writing). Meanwhile the connection is not idle.
    bench = Bench(StaticRouter({}))
    client, transport = bench.client()
    client.pause_writing()
    client.data_received(UNKNOWN * 3 + HEALTH)
    assert [status for status, _, _ in parse_responses(transport.take())] == [404]
    assert not transport.reading  # (the queued requests hold reading)
    client._idle_deadline = 0.0  # (long past: a connection with nothing to do would close)
    client._on_timer()
    assert client.life is Life.OPEN and not transport.aborted
    client.resume_writing()
    assert [status for status, _, _ in parse_responses(transport.take())] == [404, 404, 200]
    assert client.life is Life.OPEN and transport.reading
    client.connection_lost(None)
