"""The hit path's writes go out at the end of the loop iteration (engine.py, "Writes").

Every other write, close or abort flushes them first: each connection sees its bytes in the
order they were written. The pipelined cases below put a write that is not deferred right
behind a deferred one, in the same callback.
"""

from __future__ import annotations

import asyncio
import json

from .conftest import RawUpstream, parse_responses, raw_exchange

HEALTH = b"GET /.well-known/miren/health HTTP/1.1\r\nHost: a\r\n\r\n"


async def test_a_local_answer_follows_the_deferred_response_before_it(
    proxy, ok_upstream: RawUpstream
) -> None:
    # The upstream's response is spliced and deferred; finishing it starts the next pipelined
    # request in the same callback, answered by the proxy itself (written at once).
    p = await proxy({"*": ok_upstream.address})
    data = await raw_exchange(
        p.port,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        + HEALTH
        + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
        + b"GET /.well-known/miren/nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    responses = parse_responses(data)
    assert [status for status, _, _ in responses] == [200, 200, 200, 404]
    assert (responses[0][2], responses[2][2]) == (b"ok", b"ok")
    assert json.loads(responses[1][2]) == {"status": "ok"}
    assert [r.url for r in ok_upstream.requests] == [b"/1", b"/2"]


async def test_the_hit_path_defers_the_request_head_and_the_response(
    proxy, ok_upstream: RawUpstream
) -> None:
    p = await proxy({"*": ok_upstream.address})
    engine = p.server.engine
    assert engine is not None
    batches: list[list[bytes]] = []
    flush = engine.flush_soon

    def recording_flush() -> None:
        batches.append([data for _, data in engine.later])
        flush()

    engine.flush_soon = recording_flush  # (read by the hit path each time it schedules)
    # The first request connects (the slow path, written at once); its response and the
    # second request, on the parked connection, take the hit path.
    data = await raw_exchange(
        p.port,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert [s for s, _, _ in parse_responses(data)] == [200, 200]
    deferred = [d for batch in batches for d in batch]
    assert any(d.startswith(b"GET /2 HTTP/1.1\r\n") for d in deferred), deferred
    assert any(d.startswith(b"HTTP/1.1 200 OK\r\n") for d in deferred), deferred


async def test_a_response_to_a_closing_connection_is_written_before_the_close(
    proxy, ok_upstream: RawUpstream
) -> None:
    p = await proxy({"*": ok_upstream.address})
    for n in range(20):  # the first one on a new upstream connection, then reused ones
        data = await raw_exchange(
            p.port, b"GET /%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % n
        )
        assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok")], n


class _Transport:
    """A write sink: the engine's queue is tested here without sockets."""

    def __init__(self, *, gone: bool = False, fails: bool = False) -> None:
        self.data: list[bytes] = []
        self.gone = gone
        self.fails = fails
        self.aborted = False

    def write(self, data: bytes) -> None:
        if self.gone:  # what uvloop raises once the connection is lost
            raise RuntimeError("unable to perform operation; the handler is closed")
        if self.fails:  # a fault no real transport produces on demand
            raise ValueError("defect")
        self.data.append(data)

    def abort(self) -> None:
        self.aborted = True


async def test_deferred_writes_go_out_in_order_when_the_iteration_ends(proxy) -> None:
    engine = (await proxy()).server.engine
    assert engine is not None
    a, b = _Transport(), _Transport()
    engine.write_later(a, b"1")  # type: ignore[arg-type]
    engine.write_later(b, b"x")  # type: ignore[arg-type]
    engine.write_later(a, b"2")  # type: ignore[arg-type]
    assert a.data == b.data == []
    await asyncio.sleep(0)  # one iteration of the loop
    assert (a.data, b.data) == ([b"1", b"2"], [b"x"])
    engine.write_later(a, b"3")  # type: ignore[arg-type]  (scheduled again once flushed)
    await asyncio.sleep(0)
    assert a.data == [b"1", b"2", b"3"]


async def test_a_lost_or_failing_transport_does_not_stop_the_others(proxy, caplog) -> None:
    engine = (await proxy()).server.engine
    assert engine is not None
    gone, broken, fine = _Transport(gone=True), _Transport(fails=True), _Transport()
    for t in (gone, broken, fine):
        engine.write_later(t, b"r")  # type: ignore[arg-type]
    engine.flush_writes()
    assert (gone.data, gone.aborted) == ([], False)  # a lost peer: nothing to do, no error
    assert broken.aborted  # its peer is not left waiting for bytes that never come
    assert fine.data == [b"r"]
    assert caplog.text.count("a deferred write failed") == 1
    assert engine.later == []


async def test_a_closing_transport_still_delivers_what_was_deferred_to_it(proxy) -> None:
    # A graceful close with bytes still buffered (a slow reader) is "closing" but delivers
    # them; bytes deferred to it before the flush follow them, as a write made at once would.
    engine = (await proxy()).server.engine
    assert engine is not None
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, client = await asyncio.open_connection("127.0.0.1", port)
    try:
        transport = (await accepted).transport
        body = b"x" * (8 << 20)  # more than the socket buffers take: the rest stays buffered
        transport.write(body)
        transport.close()
        assert transport.is_closing()
        engine.write_later(transport, b"tail")  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the flush
        async with asyncio.timeout(10):
            got = await reader.read()  # to EOF
        assert got == body + b"tail"
    finally:
        client.close()
        server.close()
        await server.wait_closed()
