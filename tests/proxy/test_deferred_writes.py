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

    def __init__(self, *, closing: bool = False, fails: bool = False) -> None:
        self.data: list[bytes] = []
        self.closing = closing
        self.fails = fails
        self.aborted = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        if self.fails:  # a fault no real transport produces on demand
            raise RuntimeError("defect")
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


async def test_a_closed_or_failing_transport_does_not_stop_the_others(proxy, caplog) -> None:
    engine = (await proxy()).server.engine
    assert engine is not None
    gone, broken, fine = _Transport(closing=True), _Transport(fails=True), _Transport()
    for t in (gone, broken, fine):
        engine.write_later(t, b"r")  # type: ignore[arg-type]
    engine.flush_writes()
    assert (gone.data, gone.aborted) == ([], False)
    assert broken.aborted  # its peer is not left waiting for bytes that never come
    assert fine.data == [b"r"]
    assert "a deferred write failed" in caplog.text
    assert engine.later == []
