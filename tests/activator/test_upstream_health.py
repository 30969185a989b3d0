"""Upstream instances that do not answer: DOWN at once (never a wait until boot_timeout),
re-probed with back-off, and serving again by themselves within seconds of coming back."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from miren_activator import Unreachable
from miren_store.entities import Runtime, SandboxStatus
from tests.activator.conftest import ActivatorFactory, make_version, sample, wait_until


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    finally:
        writer.close()


def states(act: object, vid: str = "app-v1") -> list[SandboxStatus]:
    snap = act.snapshot(vid)  # type: ignore[attr-defined]
    return [] if snap is None else [s.state for s in snap.sandboxes]


async def test_a_dead_upstream_fails_fast_and_comes_back_by_itself(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    port = closed_port()
    version = make_version(
        runtime=Runtime.UPSTREAM, urls=(f"http://127.0.0.1:{port}",), boot_timeout=60
    )
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as info:
        await act.acquire(version)
    assert time.monotonic() - t0 < 5  # not the 60 s boot timeout
    assert info.value.http_status == 502
    assert states(act) == [SandboxStatus.DOWN]
    with pytest.raises(Unreachable):  # nothing to wait for: fails at once again
        await asyncio.wait_for(act.acquire(version), 1)
    assert sample(act, "miren_activator_sandboxes", state="down") == 1
    # The server comes up: a re-probe finds it within seconds, and it serves.
    server = await asyncio.start_server(answer_ok, "127.0.0.1", port, reuse_address=True)
    try:
        await wait_until(lambda: states(act) == [SandboxStatus.RUNNING], 10, "back up")
        lease = await asyncio.wait_for(act.acquire(version), 5)
        assert lease.port == port
        act.release(lease)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_dead_instance_among_live_ones_is_left_out(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    live = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
    live_port = live.sockets[0].getsockname()[1]
    try:
        version = make_version(
            runtime=Runtime.UPSTREAM,
            urls=(f"http://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{live_port}"),
            rpi=1,
        )
        first = await act.acquire(version)
        second = act.try_acquire("app-v1")  # past the target: scale up to the second URL
        assert first.port == live_port and second is not None
        await wait_until(lambda: len(states(act)) == 2, 5, "both instances tried")
        leases = [first, second] + [await act.acquire(version) for _ in range(5)]
        assert {lease.port for lease in leases} == {live_port}  # never the dead one
        await wait_until(
            lambda: sorted(states(act)) == [SandboxStatus.DOWN, SandboxStatus.RUNNING], 5
        )
        for lease in leases:
            act.release(lease)
    finally:
        live.close()
        await live.wait_closed()


async def test_an_instance_that_stops_answering_is_down_then_back(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    server = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    version = make_version(runtime=Runtime.UPSTREAM, urls=(f"http://127.0.0.1:{port}",))
    lease = await act.acquire(version)
    server.close()
    await server.wait_closed()
    act.report_unreachable(lease)  # the ingress's connect was refused
    assert states(act) == [SandboxStatus.DOWN]
    with pytest.raises(Unreachable):
        await act.acquire(version)
    server = await asyncio.start_server(answer_ok, "127.0.0.1", port, reuse_address=True)
    try:
        await wait_until(lambda: states(act) == [SandboxStatus.RUNNING], 10, "back up")
        act.release(await act.acquire(version))
    finally:
        server.close()
        await server.wait_closed()
