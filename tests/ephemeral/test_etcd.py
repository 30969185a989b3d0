"""The deploy domain and the GC against a real etcd: concurrency across clients (as across
processes), the label never missing during a redeploy, and a real outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest

from miren_store.backends import open_store
from miren_store.codec import encode
from miren_store.deploy.deploys import (
    DeployRequest,
    EphemeralConfig,
    LabelLookup,
    LabelState,
    deploy,
    resolve_label,
)
from miren_store.deploy.errors import StoreFailure
from miren_store.deploy.gc import ExpiryGC, GCResult
from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import App, AppVersion, SandboxPool, utcnow
from miren_store.errors import NotFound
from miren_store.store import Store
from tests.ephemeral.conftest import SPEC, add_pool, eph, ephemeral_versions, labelled, setup_app
from tests.etcd_fixtures import etcd_factory, etcd_server  # noqa: F401
from tests.support.poll import eventually

pytestmark = pytest.mark.etcd

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture
async def clients(etcd_server: EmbeddedEtcd) -> AsyncIterator[StoreFactory]:  # noqa: F811
    """Open etcd store clients on one server (each its own gRPC channel, like another
    process); all are closed at teardown."""
    opened: list[Store] = []

    async def make(timeout: float = 2.0) -> Store:
        store = open_store(etcd_server.url, prefix="/eph", timeout=timeout)
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.close()


async def test_two_concurrent_deploys_of_one_label_leave_exactly_one(
    clients: StoreFactory,
) -> None:
    one, two = await clients(), await clients()
    await setup_app(one)
    for _ in range(3):
        results = await asyncio.gather(
            deploy(one, "app", eph("feat-x")),
            deploy(two, "app", eph("feat-x")),
            deploy(one, "app", eph("feat-x")),
            deploy(two, "app", eph("feat-x")),
        )
        left = await labelled(one, "app", "feat-x")
        assert len(left) == 1
        newest = max(results, key=lambda r: (r.version.created_at, r.version.id))
        assert left[0].id == newest.version.id


async def test_twenty_concurrent_distinct_labels_leave_exactly_the_ten_newest(
    clients: StoreFactory,
) -> None:
    stores = [await clients() for _ in range(2)]
    await setup_app(stores[0])
    cfg = EphemeralConfig(max_per_app=10)
    results = await asyncio.gather(
        *(deploy(stores[i % 2], "app", eph(f"pr-{i}"), config=cfg) for i in range(20))
    )
    left = await ephemeral_versions(stores[0], "app")
    assert len(left) == 10
    newest = sorted(results, key=lambda r: (r.version.created_at, r.version.id))[-10:]
    assert {v.id for v in left} == {r.version.id for r in newest}


async def test_label_never_missing_for_a_reader_during_redeploys(clients: StoreFactory) -> None:
    writer, reader = await clients(), await clients()
    await setup_app(writer)
    await deploy(writer, "app", eph("feat-x"))
    misses: list[LabelState] = []
    reads = 0
    done = asyncio.Event()

    async def read_loop() -> None:
        nonlocal reads
        while not done.is_set():
            found = await resolve_label(reader, "app", "feat-x")
            reads += 1
            if found.state is not LabelState.LIVE:
                misses.append(found.state)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(read_loop())
    try:
        for _ in range(25):
            await deploy(writer, "app", eph("feat-x"))
    finally:
        done.set()
        await task
    assert misses == []
    assert reads >= 25
    assert len(await labelled(writer, "app", "feat-x")) == 1


async def test_cloning_the_active_version_leaves_it_byte_for_byte(clients: StoreFactory) -> None:
    store = await clients()
    await setup_app(store)
    active = (await deploy(store, "app", DeployRequest(spec=SPEC))).version
    before = await store.get(AppVersion, active.id)
    result = await deploy(store, "app", eph("feat-x", from_version=active.id))
    after = await store.get(AppVersion, active.id)
    assert encode(after) == encode(before)
    assert after.revision == before.revision
    assert (await store.get(App, "app")).active_version == active.id
    assert result.version.ephemeral_label == "feat-x"


async def test_frozen_etcd_fails_the_deploy_and_keeps_the_previous_preview(
    clients: StoreFactory,
    etcd_server: EmbeddedEtcd,  # noqa: F811
) -> None:
    store = await clients(timeout=0.5)
    await setup_app(store)
    old = (await deploy(store, "app", eph("feat-x"))).version
    etcd_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StoreFailure) as info:
            await deploy(store, "app", eph("feat-x"))
        assert time.monotonic() - started < 3  # bounded by the store timeout, never hangs
        assert info.value.code == "store_unavailable"
        assert "step 'read'" in str(info.value)
    finally:
        etcd_server.thaw()

    async def resolved() -> tuple[LabelLookup]:
        return (await resolve_label(store, "app", "feat-x"),)  # (a tuple: always truthy)

    (found,) = await eventually(
        resolved, 10, "feat-x to resolve after the thaw", interval=0.05, ignore=(Exception,)
    )
    assert found.version == old
    assert [v.id for v in await store.list(AppVersion)] == [old.id]


async def test_gc_collects_on_etcd_and_rearms_after_a_restart(clients: StoreFactory) -> None:
    store = await clients()
    await setup_app(store)
    stale = (
        await deploy(store, "app", eph("stale"), now=lambda: utcnow() - timedelta(days=2))
    ).version
    await add_pool(store, "p-stale", stale.id)
    keep = (await deploy(store, "app", DeployRequest(spec=SPEC))).version
    assert await ExpiryGC(store).run_once() == GCResult(deleted=1, failed=0, scanned=1)
    with pytest.raises(NotFound):
        await store.get(SandboxPool, "p-stale")
    assert (await store.get(AppVersion, keep.id)).id == keep.id

    soon = await deploy(store, "app", eph("soon", ttl="2s"))
    first = ExpiryGC(store, sweep_interval=3600)
    try:
        first.start()
        first.notify(soon.version)
    finally:
        await first.stop()  # gone before the expiry: only the new GC can collect it
    second = ExpiryGC(store, sweep_interval=3600)
    second.start()
    try:
        assert soon.expires_at is not None
        expiry = time.monotonic() + (soon.expires_at - utcnow()).total_seconds()

        async def deleted() -> bool:
            return not await labelled(store, "app", "soon")

        await eventually(deleted, expiry + 2 - time.monotonic(), "its deletion (2 s after expiry)")
        assert second.sweeps == 1
    finally:
        await second.stop()
