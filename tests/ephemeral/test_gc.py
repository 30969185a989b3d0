"""The expiry GC on the memory store (reference R-2, R-9, cases 67-69 adapted: a range over the
ordered expiry index instead of a full scan, a timer per version, the first pass at start)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry

from miren_store.deploy.deploys import DeployRequest, deploy, extend_label
from miren_store.deploy.gc import ExpiryGC, GCResult
from miren_store.entities import App, AppVersion, SandboxPool, utcnow
from miren_store.errors import NotFound
from miren_store.memory import MemoryStore
from miren_store.store import Store
from tests.ephemeral.conftest import SPEC, FakeClock, add_pool, eph, normal, setup_app
from tests.faults import FaultyStore
from tests.support.poll import eventually


@pytest.fixture
async def gcs() -> AsyncIterator[list[ExpiryGC]]:
    """GCs a test starts; all stopped at teardown, even when the test failed."""
    made: list[ExpiryGC] = []
    try:
        yield made
    finally:
        for gc in made:
            await gc.stop()


async def exists(store: Store, vid: str) -> bool:
    try:
        await store.get(AppVersion, vid)
    except NotFound:
        return False
    return True


async def wait_gone(store: Store, vid: str, deadline: float) -> float:
    """Poll until the version is gone (at most until the monotonic `deadline`); the monotonic
    time it was first seen gone."""

    async def gone_at() -> float | None:
        return None if await exists(store, vid) else time.monotonic()

    return await eventually(gone_at, deadline - time.monotonic(), f"version {vid} to be gone")


async def test_case67_expired_preview_and_its_pool_go_everything_else_stays(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    active = (await deploy(store, "app", normal(), now=clock)).version
    old_normal = (await deploy(store, "app", normal(), now=clock)).version
    expired = (await deploy(store, "app", eph("old", ttl="1m"), now=clock)).version
    valid = (await deploy(store, "app", eph("new", ttl="1h"), now=clock)).version
    await add_pool(store, "p-expired", expired.id)
    await add_pool(store, "p-valid", valid.id)
    await add_pool(store, "p-shared", expired.id, active.id)
    clock.advance(minutes=5)
    gc = ExpiryGC(store, now=clock, grace=0)
    assert await gc.run_once() == GCResult(deleted=1, failed=0, scanned=2)
    assert not await exists(store, expired.id)
    for vid in (active.id, old_normal.id, valid.id):
        assert await exists(store, vid)
    assert {p.id for p in await store.list(SandboxPool)} == {"p-valid", "p-shared"}
    assert (await store.get(SandboxPool, "p-shared")).referenced_by_versions == (active.id,)
    assert await gc.run_once() == GCResult(deleted=0, failed=0, scanned=1)


async def test_non_ephemeral_versions_are_never_touched(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    versions = [(await deploy(store, "app", normal(), now=clock)).version for _ in range(3)]
    clock.advance(days=400)
    gc = ExpiryGC(store, now=clock, grace=0)
    assert await gc.run_once() == GCResult(scanned=0)
    assert [v.id for v in await store.list(AppVersion)] == sorted(v.id for v in versions)


async def test_an_active_ephemeral_version_is_not_deleted(
    store: MemoryStore, clock: FakeClock
) -> None:
    # Impossible through deploys (they never activate a preview); written directly here.
    app = await setup_app(store)
    preview = (await deploy(store, "app", eph("x", ttl="1m"), now=clock)).version
    await store.update(
        App(
            name="app",
            active_version=preview.id,
            created_at=app.created_at,
            revision=(await store.get(App, "app")).revision,
        )
    )
    clock.advance(minutes=2)
    gc = ExpiryGC(store, now=clock, grace=0)
    assert (await gc.run_once()).failed == 1
    assert await exists(store, preview.id)


async def test_r9_gc_deletes_only_the_clone_of_the_active_version(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    active = (await deploy(store, "app", normal(), now=clock)).version
    clone = (
        await deploy(store, "app", eph("feat-x", ttl="1h", from_version=active.id), now=clock)
    ).version
    clock.advance(hours=2)
    assert (await ExpiryGC(store, now=clock, grace=0).run_once()).deleted == 1
    assert not await exists(store, clone.id)
    assert await store.get(AppVersion, active.id) == active
    assert (await store.get(App, "app")).active_version == active.id


async def test_r2_pool_failure_keeps_the_version_and_the_next_pass_retries(
    clock: FakeClock,
) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    expired = (await deploy(mem, "app", eph("old", ttl="1m"), now=clock)).version
    await add_pool(mem, "p", expired.id)
    clock.advance(minutes=2)
    faulty = FaultyStore(mem)
    faulty.fail("list", SandboxPool)  # listing the version's pools fails once
    registry = CollectorRegistry()
    gc = ExpiryGC(faulty, now=clock, registry=registry, grace=0)
    assert await gc.run_once() == GCResult(deleted=0, failed=1, scanned=1)
    assert await exists(mem, expired.id)
    assert [p.id for p in await mem.list(SandboxPool)] == ["p"]
    faulty.fail("commit", when=lambda c: c.writes(SandboxPool))  # now the pool delete fails
    assert await gc.run_once() == GCResult(deleted=0, failed=1, scanned=1)
    assert await exists(mem, expired.id)
    assert await gc.run_once() == GCResult(deleted=1, failed=0, scanned=1)
    assert not await exists(mem, expired.id)
    assert await mem.list(SandboxPool) == []
    assert registry.get_sample_value("miren_gc_failures_total") == 2
    assert registry.get_sample_value("miren_gc_deleted_versions_total") == 1


async def test_case68_failed_listing_is_retried_and_covers_every_app(clock: FakeClock) -> None:
    mem = MemoryStore()
    expired = []
    for name in ("a", "b"):
        await setup_app(mem, name)
        expired.append((await deploy(mem, name, eph("old", ttl="1m"), now=clock)).version)
    clock.advance(minutes=2)
    faulty = FaultyStore(mem)
    faulty.fail("range")
    gc = ExpiryGC(faulty, now=clock, grace=0)
    first = await gc.run_once()
    assert first.failed == 1 and first.deleted == 0 and first.error
    assert all([await exists(mem, v.id) for v in expired])
    assert (await gc.run_once()).deleted == 2
    assert not any([await exists(mem, v.id) for v in expired])


async def test_timer_fires_for_a_notified_version_and_is_rearmed_after_extend(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    gc = ExpiryGC(store, now=clock, sweep_interval=60, grace=0)
    made = (await deploy(store, "app", eph("x", ttl="90s"), now=clock)).version
    gc.notify(made)
    assert gc.armed() == {made.id: made.ephemeral_expires_at}
    far = (await deploy(store, "app", eph("far", ttl="7d"), now=clock)).version
    gc.notify(far)  # beyond the horizon: the sweep that covers it arms it
    assert far.id not in gc.armed()
    # extended meanwhile: the timer fires, finds a later expiry and re-arms
    clock.advance(seconds=30)
    extended = await extend_label(store, "app", "x", "90s", now=clock)
    clock.advance(seconds=61)
    assert await gc.fire_due() == GCResult(scanned=1)
    assert gc.armed() == {made.id: extended.ephemeral_expires_at}
    clock.advance(seconds=30)
    assert (await gc.fire_due()).deleted == 1
    assert not await exists(store, made.id)
    assert gc.armed() == {}


async def test_timer_failure_is_retried_after_the_retry_delay(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    made = (await deploy(mem, "app", eph("x", ttl="1m"), now=clock)).version
    faulty = FaultyStore(mem)
    gc = ExpiryGC(faulty, now=clock, retry_delay=5, grace=0)
    gc.notify(made)
    clock.advance(minutes=1)
    faulty.fail("commit")
    assert (await gc.fire_due()).failed == 1
    assert await exists(mem, made.id)
    assert (await gc.fire_due()).scanned == 0  # not yet: retry in 5 s
    clock.advance(seconds=5)
    assert (await gc.fire_due()).deleted == 1


async def test_replaced_version_timer_is_a_no_op(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    gc = ExpiryGC(store, now=clock, grace=0)
    first = (await deploy(store, "app", eph("x", ttl="1m"), now=clock)).version
    gc.notify(first)
    second = (await deploy(store, "app", eph("x", ttl="1h"), now=clock)).version
    clock.advance(minutes=2)
    assert await gc.fire_due() == GCResult(scanned=1)
    assert await exists(store, second.id)


async def test_metrics_gauge_by_app_never_by_label(store: MemoryStore, clock: FakeClock) -> None:
    registry = CollectorRegistry()
    for name in ("a", "b"):
        await setup_app(store, name)
    for label in ("x", "y", "z"):
        await deploy(store, "a", eph(label, ttl="1h"), now=clock)
    await deploy(store, "b", eph("x", ttl="1m"), now=clock)
    gc = ExpiryGC(store, now=clock, registry=registry)
    await gc.run_once()
    assert registry.get_sample_value("miren_ephemeral_versions", {"app": "a"}) == 3
    assert registry.get_sample_value("miren_ephemeral_versions", {"app": "b"}) == 1
    clock.advance(minutes=5)
    await gc.run_once()
    assert registry.get_sample_value("miren_ephemeral_versions", {"app": "b"}) is None
    assert registry.get_sample_value("miren_gc_deleted_versions_total") == 1
    for metric in registry.collect():
        for sample in metric.samples:
            assert set(sample.labels) <= {"app"}


async def test_case69_first_pass_at_start_and_stop_is_idempotent(
    store: MemoryStore, gcs: list[ExpiryGC]
) -> None:
    await setup_app(store)
    expired = (
        await deploy(store, "app", eph("old", ttl="1s"), now=lambda: utcnow() - timedelta(hours=1))
    ).version
    gc = ExpiryGC(store, sweep_interval=3600)
    gcs.append(gc)
    await gc.stop()  # before start: fine
    assert repr(gc) == "<ExpiryGC stopped armed=0 sweeps=0 deleted=0 failed=0>"
    gc.start()
    gc.start()  # a second start is a no-op
    await wait_gone(store, expired.id, time.monotonic() + 5)
    assert repr(gc) == "<ExpiryGC running armed=0 sweeps=1 deleted=1 failed=0>"
    await gc.stop()
    await gc.stop()
    assert not gc.running


async def test_timer_deletes_within_2s_of_expiry(store: MemoryStore, gcs: list[ExpiryGC]) -> None:
    await setup_app(store)
    gc = ExpiryGC(store, sweep_interval=3600)  # the sweep cannot be what deletes it
    gcs.append(gc)
    gc.start()
    result = await deploy(store, "app", eph("x", ttl="1s"))
    gc.notify(result.version)
    assert result.expires_at is not None
    expiry = time.monotonic() + (result.expires_at - utcnow()).total_seconds()
    gone_at = await wait_gone(store, result.version.id, expiry + 2)
    assert gone_at >= expiry - 0.05  # never before it expired
    assert gc.sweeps == 1


async def test_timer_is_rearmed_from_the_store_after_a_restart(
    store: MemoryStore, gcs: list[ExpiryGC]
) -> None:
    await setup_app(store)
    first = ExpiryGC(store, sweep_interval=3600)
    gcs.append(first)
    first.start()
    result = await deploy(store, "app", eph("x", ttl="2s"))
    first.notify(result.version)
    await first.stop()  # the process state goes; the store stays
    assert await exists(store, result.version.id)
    second = ExpiryGC(store, sweep_interval=3600)
    gcs.append(second)
    second.start()
    assert result.expires_at is not None
    expiry = time.monotonic() + (result.expires_at - utcnow()).total_seconds()
    await wait_gone(store, result.version.id, expiry + 2)
    assert second.sweeps == 1 and second.deleted_total == 1


async def test_loop_survives_an_unavailable_store(store: MemoryStore, gcs: list[ExpiryGC]) -> None:
    await setup_app(store)
    expired = (
        await deploy(store, "app", eph("old", ttl="1s"), now=lambda: utcnow() - timedelta(hours=1))
    ).version
    store.unavailable = True
    gc = ExpiryGC(store, sweep_interval=0.05)
    gcs.append(gc)
    gc.start()
    await eventually(lambda: gc.failed_total >= 2, 5, lambda: f"two failed sweeps: {gc!r}")
    assert gc.running
    store.unavailable = False
    await wait_gone(store, expired.id, time.monotonic() + 5)


async def test_gc_ignores_notify_for_normal_versions(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    result = await deploy(store, "app", DeployRequest(spec=SPEC), now=clock)
    gc = ExpiryGC(store, now=clock, grace=0)
    gc.notify(result.version)
    assert gc.armed() == {}


async def test_sweep_deletes_orphan_pools_and_keeps_referenced_ones() -> None:
    from miren_store.deploy.gc import ExpiryGC
    from miren_store.entities import AppVersion, Runtime, SandboxPool, VersionSpec
    from miren_store.memory import MemoryStore

    spec = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))
    store = MemoryStore()
    await store.create(AppVersion(id="v-live", app="a", spec=spec))
    await store.create(
        SandboxPool(id="p-live", app="a", spec=spec, referenced_by_versions=("v-live",))
    )
    await store.create(
        SandboxPool(id="p-shared", app="a", spec=spec, referenced_by_versions=("v-gone", "v-live"))
    )
    await store.create(
        SandboxPool(id="p-orphan", app="a", spec=spec, referenced_by_versions=("v-gone",))
    )
    gc = ExpiryGC(store)
    await gc.run_once()
    assert [p.id for p in await store.list(SandboxPool)] == ["p-live", "p-shared"]
    await store.close()


async def test_expired_preview_is_collected_after_the_grace_not_before(
    store: MemoryStore, clock: FakeClock
) -> None:
    """Routing stops at the expiry instant (410); collection waits `grace` so clients can see why."""
    await setup_app(store)
    gc = ExpiryGC(store, now=clock, grace=1.0)
    made = (await deploy(store, "app", eph("x", ttl="60s"), now=clock)).version
    gc.notify(made)
    assert made.ephemeral_expires_at is not None
    assert gc.armed() == {made.id: made.ephemeral_expires_at + timedelta(seconds=1)}
    clock.advance(seconds=60)  # expired now, within the grace
    assert (await gc.fire_due()).deleted == 0
    assert (await gc.run_once()).deleted == 0
    assert await exists(store, made.id)
    clock.advance(seconds=1)
    assert (await gc.fire_due()).deleted == 1
    assert not await exists(store, made.id)
