"""The hit path's writes go out at once while the loop is quiet and at the end of the loop
iteration while it is busy (engine.py, "Writes").

Every other write, close or abort flushes the deferred ones first: each connection sees its
bytes in the order they were written. The pipelined cases below put a write that is not
deferred right behind a deferred one, in the same callback. Tests that need the hit path to
defer (or not) set `engine.busy_gap` (inf: always busy; 0: never, unless writes are queued):
the default depends on how fast this machine answers.
"""

from __future__ import annotations

import asyncio
import json
import math
from time import monotonic

import pytest

from miren_ingress.proxy.engine import Engine
from tests.support.hotpath import needs_sources

from .conftest import ProxyHandle, RawUpstream, parse_responses, raw_exchange

HEALTH = b"GET /.well-known/miren/health HTTP/1.1\r\nHost: a\r\n\r\n"


async def _started(
    proxy, upstream: RawUpstream | None = None, busy_gap: float | None = None
) -> tuple[ProxyHandle, Engine]:
    """A proxy (to `upstream` for every host, if given) and its engine, `busy_gap` set."""
    p = await proxy({"*": upstream.address} if upstream is not None else None)
    engine = p.server.engine
    assert engine is not None
    if busy_gap is not None:
        engine.busy_gap = busy_gap
    return p, engine


async def test_a_local_answer_follows_the_deferred_response_before_it(
    proxy, ok_upstream: RawUpstream
) -> None:
    # The upstream's response is spliced and deferred; finishing it starts the next pipelined
    # request in the same callback, answered by the proxy itself (written at once).
    p, _ = await _started(proxy, ok_upstream, busy_gap=math.inf)
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


def _record_flushes(engine) -> list[list[bytes]]:
    """Each flush's batch of deferred writes, as the loop runs them."""
    batches: list[list[bytes]] = []
    flush = engine.flush_soon

    def recording_flush() -> None:
        batches.append([data for _, data in engine.later])
        flush()

    engine.flush_soon = recording_flush  # (read by the hit path each time it schedules)
    return batches


TWO_REQUESTS = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
)
ONE_REQUEST = b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
# Both take the hit path once ONE_REQUEST has parked an upstream connection; /3 starts when /2
# is answered, in the same callback.
NEXT_TWO = (
    b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
)


async def test_a_busy_hit_path_defers_the_request_head_and_the_response(
    proxy, ok_upstream: RawUpstream
) -> None:
    p, engine = await _started(proxy, ok_upstream, busy_gap=math.inf)
    batches = _record_flushes(engine)
    # The first request connects (the slow path, written at once); its response and the
    # second request, on the parked connection, take the hit path.
    data = await raw_exchange(p.port, TWO_REQUESTS)
    assert [s for s, _, _ in parse_responses(data)] == [200, 200]
    deferred = [d for batch in batches for d in batch]
    assert any(d.startswith(b"GET /2 HTTP/1.1\r\n") for d in deferred), deferred
    assert any(d.startswith(b"HTTP/1.1 200 OK\r\n") for d in deferred), deferred


async def test_a_quiet_hit_path_writes_at_once(proxy, ok_upstream: RawUpstream) -> None:
    p, engine = await _started(proxy, ok_upstream, busy_gap=0.0)
    batches = _record_flushes(engine)
    data = await raw_exchange(p.port, TWO_REQUESTS)
    assert [s for s, _, _ in parse_responses(data)] == [200, 200]
    assert [r.url for r in ok_upstream.requests] == [b"/1", b"/2"]
    assert batches == []  # nothing was deferred: no flush was even scheduled
    assert engine.last_write > 0  # (and the hit path did run)


async def test_a_quiet_hit_write_still_queues_behind_queued_writes(
    proxy, ok_upstream: RawUpstream
) -> None:
    # Order before speed: with writes queued, a hit-path write joins the queue however quiet
    # the loop is. The queue is kept non-empty here (re-filled after each flush), so the
    # hit-path writes must reach a flush, behind what was queued.
    p, engine = await _started(proxy, ok_upstream, busy_gap=0.0)
    sink = _Transport()
    await raw_exchange(p.port, ONE_REQUEST)
    batches: list[list[bytes]] = []
    flush = engine.flush_soon

    def flush_and_refill() -> None:
        batches.append([data for _, data in engine.later])
        flush()
        engine.later.append((sink, b"queued"))  # type: ignore[arg-type]

    engine.flush_soon = flush_and_refill
    engine.later.append((sink, b"queued"))  # type: ignore[arg-type]
    data = await raw_exchange(p.port, NEXT_TWO)
    assert [(s, b) for s, _, b in parse_responses(data)] == [(200, b"ok"), (200, b"ok")]
    assert [[d[:15] for d in batch] for batch in batches[:2]] == [
        [b"queued", b"GET /2 HTTP/1.1"],
        [b"queued", b"HTTP/1.1 200 OK", b"GET /3 HTTP/1.1"],
    ]
    engine.later.clear()


class _QuietGap:
    """A busy gap that finds the loop quiet every time and notes, for each decision, the
    last write's time it was measured from and the decision's own time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.seen: list[tuple[float, float]] = []

    def __gt__(self, elapsed: float) -> bool:  # (`elapsed < gap`, reflected)
        last = self.engine.last_write
        self.seen.append((last, last + elapsed))
        return False


@needs_sources  # (busy_gap is a float in compiled code)
async def test_every_hit_path_write_sets_the_time_the_next_is_measured_from(
    proxy, ok_upstream: RawUpstream
) -> None:
    p, engine = await _started(proxy, ok_upstream)
    await raw_exchange(p.port, ONE_REQUEST)
    gap = engine.busy_gap = _QuietGap(engine)  # type: ignore[assignment]
    batches = _record_flushes(engine)
    data = await raw_exchange(p.port, NEXT_TWO)
    assert [s for s, _, _ in parse_responses(data)] == [200, 200]
    assert batches == []  # all four went out at once
    assert len(gap.seen) == 4  # two request heads, two responses
    for (_, previous), (last, _) in zip(gap.seen, gap.seen[1:], strict=False):
        assert last == pytest.approx(previous, abs=1e-9)


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
    _, engine = await _started(proxy, busy_gap=math.inf)
    a, b = _Transport(), _Transport()
    now = monotonic()
    engine.write_hit(a, b"1", now)  # type: ignore[arg-type]
    engine.write_hit(b, b"x", now)  # type: ignore[arg-type]
    engine.write_hit(a, b"2", now)  # type: ignore[arg-type]
    assert a.data == b.data == []
    await asyncio.sleep(0)  # one iteration of the loop
    assert (a.data, b.data) == ([b"1", b"2"], [b"x"])
    engine.write_hit(a, b"3", monotonic())  # type: ignore[arg-type]  (scheduled again)
    await asyncio.sleep(0)
    assert a.data == [b"1", b"2", b"3"]


async def test_busy_means_a_recent_write_a_recent_flush_or_a_queue(proxy) -> None:
    _, engine = await _started(proxy)
    gap = engine.busy_gap = 0.001
    t = _Transport()
    start = monotonic() + 10.0  # (a time ahead of the clock: the flush reads the clock)
    engine.write_hit(t, b"quiet", start)  # type: ignore[arg-type]
    assert t.data == [b"quiet"] and engine.later == []  # at once
    engine.write_hit(t, b"busy", start + gap / 2)  # type: ignore[arg-type]
    assert t.data == [b"quiet"]  # deferred: the previous write was within the gap
    engine.write_hit(t, b"queued", start + 3 * gap)  # type: ignore[arg-type]
    assert t.data == [b"quiet"]  # quiet again, but behind a queued write: deferred too
    await asyncio.sleep(0)  # the flush
    assert t.data == [b"quiet", b"busy", b"queued"]
    flushed_at = engine.last_write
    assert flushed_at < start  # the flush's own end (the clock), not the last write's time
    engine.write_hit(t, b"after a flush", flushed_at + gap / 2)  # type: ignore[arg-type]
    assert t.data[-1] == b"queued"  # deferred: the flush ended within the gap
    engine.write_hit(t, b"late", flushed_at + 10.0)  # type: ignore[arg-type]
    assert t.data[-1] == b"queued"  # (still behind the queued one)
    await asyncio.sleep(0)
    assert t.data[-2:] == [b"after a flush", b"late"]


async def test_a_lost_or_failing_transport_does_not_stop_the_others(proxy, caplog) -> None:
    _, engine = await _started(proxy, busy_gap=math.inf)
    gone, broken, fine = _Transport(gone=True), _Transport(fails=True), _Transport()
    for t in (gone, broken, fine):
        engine.write_hit(t, b"r", monotonic())  # type: ignore[arg-type]
    engine.flush_writes()
    assert (gone.data, gone.aborted) == ([], False)  # a lost peer: nothing to do, no error
    assert broken.aborted  # its peer is not left waiting for bytes that never come
    assert fine.data == [b"r"]
    assert caplog.text.count("a deferred write failed") == 1
    assert engine.later == []


async def test_a_closing_transport_still_delivers_what_was_deferred_to_it(proxy) -> None:
    # A graceful close with bytes still buffered (a slow reader) is "closing" but delivers
    # them; bytes deferred to it before the flush follow them, as a write made at once would.
    _, engine = await _started(proxy)
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
        engine.busy_gap = math.inf
        engine.write_hit(transport, b"tail", monotonic())  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the flush
        async with asyncio.timeout(10):
            got = await reader.read()  # to EOF
        assert got == body + b"tail"
    finally:
        client.close()
        server.close()
        await server.wait_closed()
