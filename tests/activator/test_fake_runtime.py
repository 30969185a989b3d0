"""The activator's key behaviours on the shipped in-memory runtime and a manual clock: no
process, no socket. Each sandbox does only what the test tells it (become ready, fail its health
check, crash, refuse connections), so every step is exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import attrs
import pytest

from miren_activator import (
    ActivationTimeout,
    Activator,
    ActivatorConfig,
    BootFailed,
    CrashBackoff,
    FakeRuntime,
    FakeSandbox,
    Lease,
    ManualClock,
    PoolSnapshot,
    Unreachable,
)
from miren_store.entities import AppVersion, Runtime, SandboxStatus
from miren_store.memory import MemoryStore
from tests.activator.conftest import make_version, sample, wait_until

RUNNING = SandboxStatus.RUNNING
DOWN = SandboxStatus.DOWN
STOPPED = SandboxStatus.STOPPED
DEAD = SandboxStatus.DEAD
STEP = 5.0  # seconds any single awaited step may take before the test fails


@attrs.define
class Rig:
    act: Activator
    runtime: FakeRuntime  # process-like sandboxes
    upstream: FakeRuntime  # upstream-like ones (static: DOWN and re-probed, never dead)
    clock: ManualClock

    def snapshot(self, vid: str = "app-v1") -> PoolSnapshot:
        snap = self.act.snapshot(vid)
        assert snap is not None
        return snap

    def states(self, vid: str = "app-v1") -> list[SandboxStatus]:
        return [s.state for s in self.snapshot(vid).sandboxes]

    async def boot(self, version: AppVersion, nth: int) -> tuple[Lease, FakeSandbox]:
        """Acquire on a pool with no running sandbox: the `nth` start, made ready."""
        task = asyncio.ensure_future(self.act.acquire(version))
        sb = await asyncio.wait_for(self.runtime.started(nth), STEP)
        sb.ready()
        lease = await asyncio.wait_for(task, STEP)
        assert lease.sandbox_id == sb.sandbox_id
        return lease, sb


@pytest.fixture
async def rig(store: MemoryStore) -> AsyncIterator[Rig]:
    clock = ManualClock()
    runtime, upstream = FakeRuntime(), FakeRuntime(static=True)
    act = Activator(
        store,
        config=ActivatorConfig(node="node-a", sweep_interval=3600.0, stop_grace=3.0),
        runtimes={Runtime.PROCESS: runtime, Runtime.UPSTREAM: upstream},
        clock=clock,
    )
    await act.start()
    try:
        yield Rig(act, runtime, upstream, clock)
    finally:
        await act.close()
        for sb in (*runtime.sandboxes, *upstream.sandboxes):
            assert sb.ended, f"{sb!r} outlived the activator"


# -- cold start --------------------------------------------------------------------------------


async def test_a_cold_start_queues_every_caller_until_the_sandbox_is_ready(rig: Rig) -> None:
    version = make_version("app-v1")
    tasks = [asyncio.ensure_future(rig.act.acquire(version)) for _ in range(3)]
    sb = await asyncio.wait_for(rig.runtime.started(), STEP)
    await wait_until(lambda: rig.snapshot().waiters == 3, STEP, "three waiters")
    snap = rig.snapshot()
    assert (snap.pending, snap.ready, snap.in_use) == (1, 0, 0)
    assert not any(t.done() for t in tasks)  # queued, not failed, while it boots
    sb.ready()
    leases = await asyncio.wait_for(asyncio.gather(*tasks), STEP)
    assert {lease.addr for lease in leases} == {(sb.host, sb.port)}
    assert len(rig.runtime.starts) == 1  # one boot served them all
    assert (rig.snapshot().ready, rig.snapshot().in_use) == (1, 3)
    for lease in leases:
        rig.act.release(lease)


async def test_a_sandbox_that_exits_while_booting_fails_its_waiters_at_once(rig: Rig) -> None:
    version = make_version("app-v1", boot_timeout=3600)
    tasks = [asyncio.ensure_future(rig.act.acquire(version)) for _ in range(2)]
    sb = await asyncio.wait_for(rig.runtime.started(), STEP)
    await wait_until(lambda: rig.snapshot().waiters == 2, STEP, "two waiters")
    sb.exit(3)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), STEP)
    assert all(type(r) is BootFailed for r in results)
    assert "exited with status 3 while booting" in str(results[0])
    assert rig.states() == [DEAD]


async def test_a_sandbox_that_never_gets_healthy_meets_boot_timeout(rig: Rig) -> None:
    version = make_version("app-v1", boot_timeout=0.05)
    task = asyncio.ensure_future(rig.act.acquire(version))
    sb = await asyncio.wait_for(rig.runtime.started(), STEP)
    sb.fail_health()
    with pytest.raises(ActivationTimeout):
        await asyncio.wait_for(task, STEP)
    assert await asyncio.wait_for(sb.wait_stopped(), STEP) == 1.0  # and it is stopped
    assert rig.states() == [DEAD]


async def test_a_failed_start_fails_the_waiters_at_once(rig: Rig) -> None:
    runtime = rig.runtime
    runtime.fail_starts("no such image")
    runtime.hold_starts()  # so the caller is queued when the spawn fails
    task = asyncio.ensure_future(rig.act.acquire(make_version("app-v1")))
    await asyncio.wait_for(runtime.called(1), STEP)
    await wait_until(lambda: rig.snapshot().waiters == 1, STEP, "the waiter")
    runtime.release_starts()
    with pytest.raises(BootFailed, match="no such image"):
        await asyncio.wait_for(task, STEP)
    assert runtime.sandboxes == [] and len(runtime.starts) == 1
    assert rig.states() == [DEAD] and rig.snapshot().crash_count == 1


# -- scaling -----------------------------------------------------------------------------------


async def test_past_the_target_the_pool_scales_up_to_max_instances(rig: Rig) -> None:
    act, runtime = rig.act, rig.runtime
    version = make_version("app-v1", rpi=2, max_instances=3)
    first, sb1 = await rig.boot(version, 1)
    units: list[Lease | None] = [first, act.try_acquire("app-v1")]
    assert len(runtime.starts) == 1  # at the target: nothing more yet
    units.append(act.try_acquire("app-v1"))  # past it: taken anyway, and a second one starts
    sb2 = await asyncio.wait_for(runtime.started(2), STEP)
    units.append(act.try_acquire("app-v1"))  # while one boots, no third: spread over sb1
    assert len(runtime.starts) == 2
    assert all(u is not None and u.sandbox_id == sb1.sandbox_id for u in units)
    sb2.ready()
    await wait_until(lambda: rig.snapshot().ready == 2, STEP, "the second sandbox")
    units += [act.try_acquire("app-v1") for _ in range(3)]  # sb2 fills, then goes past
    sb3 = await asyncio.wait_for(runtime.started(3), STEP)
    sb3.ready()
    await wait_until(lambda: rig.snapshot().ready == 3, STEP, "the third sandbox")
    units += [act.try_acquire("app-v1") for _ in range(20)]  # every one past the target
    assert all(u is not None for u in units)  # no hard cap: nothing queues
    assert len(runtime.starts) == 3  # max_instances: never a fourth
    loads = sorted(s.in_use for s in rig.snapshot().sandboxes)
    assert sum(loads) == len(units) and loads[-1] - loads[0] <= 1  # spread evenly
    for unit in units:
        assert unit is not None
        act.release(unit)


async def test_a_hard_cap_queues_work_until_a_unit_is_given_back(rig: Rig) -> None:
    act = rig.act
    version = make_version("app-v1", rpi=1, cap=1, max_instances=1)
    lease, sb = await rig.boot(version, 1)
    assert act.try_acquire("app-v1") is None  # at the cap
    waiter = asyncio.ensure_future(act.acquire(version))
    await wait_until(lambda: rig.snapshot().waiters == 1, STEP, "a waiter")
    assert not waiter.done()
    act.release(lease)  # the unit goes straight to the waiter
    nxt = await asyncio.wait_for(waiter, STEP)
    assert nxt.sandbox_id == sb.sandbox_id
    assert len(rig.runtime.starts) == 1 and rig.snapshot().in_use == 1
    act.release(nxt)


# -- crashes -----------------------------------------------------------------------------------


async def test_quick_crashes_back_off_doubling_until_one_lives(rig: Rig) -> None:
    act, runtime, clock = rig.act, rig.runtime, rig.clock
    version = make_version("app-v1")

    async def crash(nth: int, uptime: float = 0.0) -> str:
        lease, sb = await rig.boot(version, nth)
        clock.advance(uptime)
        sb.exit(1)
        await wait_until(lambda: not lease.alive, STEP, "the crash to be seen")
        act.release(lease)
        return sb.sandbox_id

    await crash(1)  # the first quick crash is replaced at once: no back-off
    assert rig.snapshot().crash_count == 1 and rig.snapshot().backoff_remaining == 0
    second = await crash(2)
    with pytest.raises(CrashBackoff) as info:
        await act.acquire(version)
    assert (info.value.retry_after, info.value.sandbox_id) == (10.0, second)
    assert len(runtime.starts) == 2  # nothing started during the back-off
    clock.advance(9.0)
    with pytest.raises(CrashBackoff):
        await act.acquire(version)
    clock.advance(1.0)
    await crash(3)
    with pytest.raises(CrashBackoff) as info:
        await act.acquire(version)
    assert info.value.retry_after == 20.0  # doubled
    clock.advance(20.0)
    await crash(4, uptime=61.0)  # lived past the quick-crash window: the count resets
    assert rig.snapshot().crash_count == 0
    lease, _ = await rig.boot(version, 5)
    act.release(lease)


# -- idle scale-down ---------------------------------------------------------------------------


async def test_an_idle_sandbox_is_stopped_after_its_delay_and_the_next_acquire_boots(
    rig: Rig,
) -> None:
    act, clock = rig.act, rig.clock
    version = make_version("app-v1", scale_down=30.0)
    lease, sb = await rig.boot(version, 1)
    clock.advance(3600)
    assert act.sweep() == 0  # a unit in flight: never stopped
    act.release(lease)
    clock.advance(29.0)
    assert act.sweep() == 0  # idle, not yet for the delay
    assert sb.stops == []
    clock.advance(1.0)
    assert act.sweep() == 1
    assert await asyncio.wait_for(sb.wait_stopped(), STEP) == 3.0  # the stop_grace
    assert rig.states() == [STOPPED] and not lease.alive
    again, sb2 = await rig.boot(version, 2)  # scaled to zero: a cold start
    assert sb2 is not sb and len(rig.runtime.starts) == 2
    act.release(again)


async def test_min_instances_are_kept_and_refilled(rig: Rig) -> None:
    act, clock = rig.act, rig.clock
    version = make_version("app-v1", rpi=1, min_instances=2, max_instances=3, scale_down=1.0)
    lease, _ = await rig.boot(version, 1)
    sb2 = await asyncio.wait_for(rig.runtime.started(2), STEP)  # filled up with the pool
    sb2.ready()
    await wait_until(lambda: rig.snapshot().ready == 2, STEP, "min_instances")
    act.release(lease)
    clock.advance(100)
    assert act.sweep() == 0  # both idle, but min_instances stay
    sb2.exit(1)  # one dies: the pool is refilled at once
    sb3 = await asyncio.wait_for(rig.runtime.started(3), STEP)
    assert rig.snapshot().ready == 1 and sb3.stops == []
    sb3.ready()
    await wait_until(lambda: rig.snapshot().ready == 2, STEP, "the refill")


# -- unreachable, down, re-probe ---------------------------------------------------------------


async def test_a_down_upstream_fails_fast_and_serves_again_after_a_reprobe(rig: Rig) -> None:
    act, upstream = rig.act, rig.upstream
    version = make_version(
        runtime=Runtime.UPSTREAM, urls=("http://192.0.2.1:40001",), boot_timeout=3600
    )
    task = asyncio.ensure_future(act.acquire(version))
    sb = await asyncio.wait_for(upstream.started(), STEP)
    sb.unreachable()
    with pytest.raises(Unreachable):  # at once, not at boot_timeout
        await asyncio.wait_for(task, STEP)
    assert rig.states() == [DOWN]
    with pytest.raises(Unreachable):
        await asyncio.wait_for(act.acquire(version), STEP)  # nothing to wait for
    assert sample(act, "miren_activator_sandboxes", state="down") == 1
    sb.ready()  # it answers again: the re-probe finds it
    await wait_until(lambda: rig.states() == [RUNNING], STEP, "the re-probe")
    lease = await asyncio.wait_for(act.acquire(version), STEP)
    assert lease.addr == (sb.host, sb.port)
    sb.unreachable()
    act.report_unreachable(lease)  # a refused connection: down again, not dead
    assert rig.states() == [DOWN] and sb.stops == []
    sb.ready()
    await wait_until(lambda: rig.states() == [RUNNING], STEP, "the second re-probe")
    assert len(upstream.starts) == 1  # the same instance all along


async def test_a_refused_connection_to_a_process_sandbox_replaces_it(rig: Rig) -> None:
    act = rig.act
    version = make_version("app-v1")
    lease, sb = await rig.boot(version, 1)
    act.report_unreachable(lease)
    assert rig.states() == [DEAD] and not lease.alive  # at once
    assert await asyncio.wait_for(sb.wait_stopped(), STEP) == 0.0
    fresh, sb2 = await rig.boot(version, 2)
    assert fresh.sandbox_id != lease.sandbox_id and sb2 is not sb
    act.release(fresh)
