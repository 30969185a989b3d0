"""EdgeRouter over a real RouteTable, MemoryStore and Activator (upstream runtime on a real
loopback server), alone and under the proxy engine: the hit path of `miren serve`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from miren_activator.activator import Activator, PoolSnapshot
from miren_ingress.proxy import Refusal, Target
from miren_ingress.routing.router import EdgeRouter
from miren_ingress.routing.routes import RouteTable
from miren_store.entities import App, AppVersion, Concurrency, HttpRoute, Runtime, VersionSpec
from miren_store.memory import MemoryStore
from tests.support.poll import eventually

from .conftest import RawUpstream


class Edge:
    def __init__(self, router: EdgeRouter, activator: Activator, table: RouteTable) -> None:
        self.router = router
        self.activator = activator
        self.table = table


async def build_edge(
    upstream: RawUpstream, preview_ttl: float = 3600.0, cap: int | None = None
) -> Edge:
    spec = VersionSpec(
        runtime=Runtime.UPSTREAM,
        urls=(f"http://{upstream.address}",),
        concurrency=Concurrency(
            requests_per_instance=cap or 10, max_requests_per_instance=cap, max_instances=1
        ),
    )
    store = MemoryStore()
    expires = datetime.now(UTC) + timedelta(seconds=preview_ttl)
    preview = AppVersion(
        id="v2", app="shop", spec=spec, ephemeral_label="pr-1", ephemeral_ttl="1h",
        ephemeral_expires_at=expires,
    )  # fmt: skip
    entities = [
        await store.create(App(name="shop", active_version="v1")),
        await store.create(AppVersion(id="v1", app="shop", spec=spec)),
        await store.create(preview),
        await store.create(HttpRoute(host="shop.test", app="shop")),
        await store.create(HttpRoute(host="api.shop.test", app="shop", service="api")),
    ]
    table = RouteTable()
    table.load(entities, revision=1)
    activator = Activator(store, registry=CollectorRegistry())
    await activator.start()
    return Edge(EdgeRouter(table, activator), activator, table)


@pytest.fixture
async def edge() -> AsyncIterator[Callable[..., Awaitable[Edge]]]:
    built: list[Edge] = []

    async def make(upstream: RawUpstream, **kwargs: Any) -> Edge:
        e = await build_edge(upstream, **kwargs)
        built.append(e)
        return e

    yield make
    for e in built:
        await e.activator.close()


def snapshot(edge: Edge, version: str = "v1") -> PoolSnapshot:
    snap = edge.activator.snapshot(version)
    assert snap is not None
    return snap


def in_use(edge: Edge, version: str) -> int:
    snap = edge.activator.snapshot(version)
    return 0 if snap is None else snap.in_use


async def test_route_and_preview_through_the_engine(proxy, ok_upstream, edge) -> None:
    e = await edge(ok_upstream)
    p = await proxy(router=e.router)
    async with aiohttp.ClientSession() as s:
        for host, version, robots in (
            ("shop.test", "v1", None),
            ("pr-1.shop.test", "v2", "noindex"),
        ):
            for _ in range(3):  # the first one boots the pool (a lease-cache miss)
                async with s.get(p.url + "/", headers={"Host": host}) as r:
                    assert r.status == 200 and await r.read() == b"ok"
                    assert r.headers.get("X-Robots-Tag") == robots
                    assert "keep-alive" not in r.headers.get("Connection", "")
            assert in_use(e, version) == 0  # every lease went back
    reg = p.registry
    hits = reg.get_sample_value("miren_ingress_lease_lookups_total", {"result": "hit"})
    misses = reg.get_sample_value("miren_ingress_lease_lookups_total", {"result": "miss"})
    assert (hits, misses) == (4.0, 2.0)
    done = reg.get_sample_value(
        "miren_ingress_requests_total", {"app": "shop", "code": "200", "method": "GET"}
    )
    assert done == 6.0


async def test_a_lease_is_held_while_its_request_is_in_flight(proxy, raw_upstream, edge) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            if b"GET /slow" in head:
                await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(handler)
    e = await edge(up)
    p = await proxy(router=e.router)
    async with aiohttp.ClientSession() as s:
        async with s.get(p.url + "/", headers={"Host": "shop.test"}) as r:
            assert r.status == 200
        task = asyncio.create_task(s.get(p.url + "/slow", headers={"Host": "shop.test"}))
        try:
            await eventually(lambda: in_use(e, "v1") == 1, what="lease taken")
            assert p.server.in_flight == 1
            release.set()
            async with await task as r:
                assert r.status == 200
        finally:
            release.set()
    await eventually(lambda: in_use(e, "v1") == 0, what="lease given back")
    assert p.server.in_flight == 0


def gated_upstream(gates: dict[bytes, asyncio.Event], seen: list[bytes] | None = None) -> Any:
    """A handler answering 200 "ok", after `gates[path]` is set for the paths it names; it
    appends each request's path to `seen` as it arrives."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            path = head.split(b" ", 2)[1]
            if seen is not None:
                seen.append(path)
            gate = gates.get(path)
            if gate is not None:
                await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return handler


async def test_under_a_hard_cap_a_released_unit_goes_to_the_queued_request(
    proxy, raw_upstream, edge
) -> None:
    # With max_requests_per_instance the sandbox never takes one unit past it, and a unit given
    # back goes to the queued request, never to a newcomer.
    gates = {b"/a": asyncio.Event(), b"/b": asyncio.Event()}
    seen: list[bytes] = []
    up = await raw_upstream(gated_upstream(gates, seen))
    e = await edge(up, cap=2)
    p = await proxy(router=e.router)

    async def get(s: aiohttp.ClientSession, path: str) -> int:
        async with s.get(p.url + path, headers={"Host": "shop.test"}) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as s:
        try:
            assert [await get(s, "/"), await get(s, "/")] == [200, 200]  # boot, then a hit
            assert "v1" in e.activator.warm
            n = len(seen)  # (with the upstream runtime's health check)
            a = asyncio.create_task(get(s, "/a"))
            b = asyncio.create_task(get(s, "/b"))
            await eventually(lambda: len(seen) == n + 2, what="both slow requests upstream")
            assert in_use(e, "v1") == 2
            c = asyncio.create_task(get(s, "/c"))
            await eventually(lambda: snapshot(e).waiters == 1, what="the third request queued")
            assert len(seen) == n + 2 and in_use(e, "v1") == 2  # not let past the cap
            gates[b"/a"].set()
            assert await a == 200
            # /b still holds its unit: /a's went to the queued request, which completes.
            assert await asyncio.wait_for(c, 10) == 200
            assert not b.done() and in_use(e, "v1") == 1
            gates[b"/b"].set()
            assert await b == 200
        finally:
            for gate in gates.values():
                gate.set()
    await eventually(lambda: in_use(e, "v1") == 0, what="every unit given back")


async def test_the_last_unit_given_back_starts_the_idle_clock(proxy, raw_upstream, edge) -> None:
    gates = {b"/slow": asyncio.Event()}
    up = await raw_upstream(gated_upstream(gates))
    e = await edge(up)
    p = await proxy(router=e.router)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # boot, then a hit puts the sandbox in `warm`
            async with s.get(p.url + "/", headers={"Host": "shop.test"}) as r:
                assert r.status == 200
        sandbox = e.activator.warm["v1"]
        slow = asyncio.create_task(s.get(p.url + "/slow", headers={"Host": "shop.test"}))
        try:
            await eventually(lambda: sandbox.in_use == 1, what="the slow request's unit")
            async with s.get(p.url + "/", headers={"Host": "shop.test"}) as r:
                assert r.status == 200  # taken and given back by the engine itself
            stamp = sandbox.last_used
            gates[b"/slow"].set()
            async with await slow as r:
                assert r.status == 200
        finally:
            gates[b"/slow"].set()
    await eventually(lambda: sandbox.in_use == 0, what="the last unit given back")
    assert sandbox.last_used > stamp  # the activator saw the sandbox go idle


async def test_units_are_counted_per_service(proxy, ok_upstream, edge) -> None:
    # Two services of one version are two pools: a sandbox of one never serves the other.
    e = await edge(ok_upstream)
    p = await proxy(router=e.router)
    async with aiohttp.ClientSession() as s:
        for host in ("shop.test", "shop.test", "api.shop.test", "api.shop.test"):
            async with s.get(p.url + "/", headers={"Host": host}) as r:
                assert r.status == 200
    web, api = snapshot(e), e.activator.snapshot("v1", "api")
    assert api is not None and api.ready == 1 and web.ready == 1
    misses = p.registry.get_sample_value("miren_ingress_lease_lookups_total", {"result": "miss"})
    assert misses == 2.0  # one boot per service


async def test_resolution_is_cached_until_the_table_changes(ok_upstream, edge) -> None:
    e = await edge(ok_upstream)
    router = e.router
    route = router.resolve(b"shop.test")
    preview = router.resolve(b"PR-1.shop.test:8080")
    assert isinstance(route, Target) and isinstance(preview, Target)
    assert (route.version, route.ephemeral) == ("v1", False)
    assert (preview.version, preview.ephemeral) == ("v2", True)
    assert router.resolve(b"shop.test") is route  # the same object every time
    assert router.resolve(b"PR-1.shop.test:8080") is preview
    assert isinstance(router.resolve(b"pr-9.shop.test"), Refusal)
    assert repr(router).startswith("<EdgeRouter hosts=3 targets=2 ")
    # A table change drops every cached answer.
    e.table.load([*e.table.apps.values(), *e.table.versions.values()], revision=2)  # no routes
    gone = router.resolve(b"shop.test")
    assert isinstance(gone, Refusal) and gone.status == 404
    assert repr(router).startswith("<EdgeRouter hosts=1 targets=0 ")


async def test_a_preview_stops_routing_at_its_expiry(ok_upstream, edge) -> None:
    e = await edge(ok_upstream, preview_ttl=0.3)
    router = e.router
    assert isinstance(router.resolve(b"pr-1.shop.test"), Target)

    def refused() -> Refusal | None:
        answer = router.resolve(b"pr-1.shop.test")
        return None if isinstance(answer, Target) else answer

    answer = await eventually(refused, 5, "the preview to expire")
    assert isinstance(answer, Refusal) and answer.status == 410
    assert router.resolve(b"pr-1.shop.test") is answer  # cached from now on


async def test_release_and_discard_reach_the_activator(ok_upstream, edge) -> None:
    e = await edge(ok_upstream)
    router = e.router
    target = router.resolve(b"shop.test")
    assert isinstance(target, Target)
    assert router.cached_lease(target) is None  # no pool yet: a miss
    lease = await router.acquire(target)
    again = router.cached_lease(target)
    assert again is not None and again.addr == lease.addr == ("127.0.0.1", ok_upstream.port)
    assert in_use(e, "v1") == 2
    assert not isinstance(again, type(lease))  # a hit is a unit without a Lease object...
    router.release(again)  # ...handed back once (the engine's contract: see ScriptedRouter)
    assert in_use(e, "v1") == 1
    router.release(lease)
    router.release(lease)  # a Lease from `acquire` stays safe to release twice
    assert in_use(e, "v1") == 0
    lease = await router.acquire(target)
    router.discard(lease)  # refused connections: the sandbox is taken out of service
    snap = e.activator.snapshot("v1")
    assert snap is not None and snap.in_use == 0 and snap.ready == 0
    assert router.cached_lease(target) is None
