"""The activator end to end on the memory store: real echo-server sandboxes, real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from miren_activator import (
    ActivationTimeout,
    ActivatorClosed,
    BootFailed,
    CrashBackoff,
    CrashPolicy,
    Lease,
    ManualClock,
    Overloaded,
    PoolCreationFailed,
    VersionRemoved,
)
from miren_store.entities import Runtime, Sandbox, SandboxPool, SandboxStatus
from miren_store.memory import MemoryStore
from tests.activator.conftest import (
    ActivatorFactory,
    get_json,
    make_version,
    pid_gone,
    sample,
    wait_until,
)

RUNNING = SandboxStatus.RUNNING
STOPPED = SandboxStatus.STOPPED
DEAD = SandboxStatus.DEAD


def pid_of(act: object, lease: Lease) -> int:
    from miren_activator import Activator

    assert isinstance(act, Activator)
    snap = act.snapshot(lease.version_id, lease.service)
    assert snap is not None
    (info,) = [s for s in snap.sandboxes if s.id == lease.sandbox_id]
    assert info.pid is not None
    return info.pid


# -- cold start, concurrency, pool creation ---------------------------------------------------


async def test_500_concurrent_first_acquires_share_one_pool_and_one_sandbox(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    act = await make_activator()
    version = make_version("app-v1", label="pr-1", rpi=1000)  # ephemeral: at most 1 sandbox
    leases = await asyncio.gather(*(act.acquire(version) for _ in range(500)))
    assert len({lease.sandbox_id for lease in leases}) == 1
    assert len({(lease.host, lease.port) for lease in leases}) == 1
    snap = act.snapshot("app-v1")
    assert snap is not None
    assert (snap.desired, snap.ready, snap.waiters, snap.in_use) == (1, 1, 0, 500)
    # The lease points at the version's own sandbox.
    body = await get_json(leases[0])
    assert (body["version"], body["label"]) == ("app-v1", "pr-1")
    for lease in leases:
        act.release(lease)
    assert act.snapshot("app-v1").in_use == 0  # type: ignore[union-attr]
    assert [p.id for p in await store.list(SandboxPool)] == ["pool-app-v1-web"]
    assert sample(act, "miren_activator_pool_creations_total") == 1
    assert sample(act, "miren_activator_cold_starts_total", app="app") == 1


async def test_crowd_beyond_a_hard_cap_is_served_in_turn_never_over_it(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", label="pr-1", cap=10)  # rpi 10, max 1, hard cap 10
    in_use = 0
    peak = 0
    sandboxes: set[str] = set()

    async def one() -> None:
        nonlocal in_use, peak
        lease = await act.acquire(version)
        in_use += 1
        peak = max(peak, in_use)
        sandboxes.add(lease.sandbox_id)
        await asyncio.sleep(0)  # hold it across a loop turn so leases overlap
        in_use -= 1
        act.release(lease)

    await asyncio.gather(*(one() for _ in range(500)))
    assert len(sandboxes) == 1
    assert peak == 10  # exactly max_requests_per_instance, never one more
    snap = act.snapshot("app-v1")
    assert snap is not None and (snap.in_use, snap.waiters, snap.desired) == (0, 0, 1)


async def test_without_a_hard_cap_a_crowd_on_a_preview_never_queues_once_it_runs(
    make_activator: ActivatorFactory,
) -> None:
    """requests_per_instance is a target: a preview (one sandbox) takes everything."""
    act = await make_activator()
    version = make_version("app-v1", label="pr-1")  # rpi 10, max 1, no cap
    leases = [await act.acquire(version)]  # the cold start
    leases += [act.try_acquire("app-v1") for _ in range(499)]  # type: ignore[misc]
    assert all(lease is not None for lease in leases)
    assert {lease.sandbox_id for lease in leases} == {leases[0].sandbox_id}
    snap = act.snapshot("app-v1")
    assert snap is not None and (snap.in_use, snap.waiters, snap.desired) == (500, 0, 1)
    for lease in leases:
        act.release(lease)


async def test_past_the_target_work_spreads_and_the_pool_scales_up(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=2, max_instances=2)
    first = await act.acquire(version)
    units = [first, act.try_acquire("app-v1")]  # at the target: 2 on the first sandbox
    assert act.snapshot("app-v1").desired == 1  # type: ignore[union-attr]
    units.append(act.try_acquire("app-v1"))  # past it: taken anyway, and a second one starts
    assert all(u is not None and u.sandbox_id == first.sandbox_id for u in units)
    assert act.snapshot("app-v1").desired == 2  # type: ignore[union-attr]
    await wait_until(lambda: act.snapshot("app-v1").ready == 2)  # type: ignore[union-attr]
    nxt = act.try_acquire("app-v1")  # the new one is below the target: it takes the next
    assert nxt is not None and nxt.sandbox_id != first.sandbox_id
    more = [act.try_acquire("app-v1") for _ in range(6)]  # at max_instances: spread, no queue
    loads = sorted(s.in_use for s in act.snapshot("app-v1").sandboxes)  # type: ignore[union-attr]
    assert loads == [5, 5] and act.snapshot("app-v1").waiters == 0  # type: ignore[union-attr]
    for u in (*units, nxt, *more):
        assert u is not None
        act.release(u)


async def test_pool_creation_failure_reaches_every_waiter_then_is_forgotten(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    act = await make_activator()
    await act.flush()
    version = make_version("app-v1", label="pr-1")
    store.unavailable = True
    results = await asyncio.gather(
        *(act.acquire(version) for _ in range(500)), return_exceptions=True
    )
    assert all(isinstance(r, PoolCreationFailed) for r in results)
    assert len({id(r) for r in results}) == 1  # one creation, one error, shared by all
    assert store.stats.counts[("create", "unavailable")] == 1
    assert act.snapshot("app-v1") is None
    assert "creating=0" in repr(act)
    store.unavailable = False
    lease = await act.acquire(version)
    assert lease.version_id == "app-v1"
    assert [p.id for p in await store.list(SandboxPool)] == ["pool-app-v1-web"]
    act.release(lease)


async def test_existing_pool_entity_is_used_not_duplicated(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    version = make_version("app-v1", label="pr-1")
    other = await make_activator(node="node-b")
    lease = await other.acquire(version)
    other.release(lease)
    act = await make_activator(node="node-a")
    lease = await act.acquire(version)
    act.release(lease)
    (pool,) = await store.list(SandboxPool)
    assert pool.owner == "node-b"
    assert sample(act, "miren_activator_pool_creations_total") == 0


async def test_versions_never_share_sandboxes(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    active = make_version("app-v1")
    preview = make_version("app-v2", label="pr-1")
    a, b = await asyncio.gather(act.acquire(active), act.acquire(preview))
    assert a.sandbox_id != b.sandbox_id
    assert (await get_json(a))["version"] == "app-v1"
    assert (await get_json(b))["version"] == "app-v2"
    assert act.try_acquire("app-v1").sandbox_id == a.sandbox_id  # type: ignore[union-attr]


async def test_invalid_spec_fails_without_creating_a_pool(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    act = await make_activator()
    version = make_version("app-v1", command=())
    with pytest.raises(BootFailed, match="needs a command"):
        await act.acquire(version)
    assert await store.list(SandboxPool) == []


# -- the warm path -----------------------------------------------------------------------------


async def test_warm_path_with_a_hard_cap_takes_exactly_the_cap(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=3, cap=3, max_instances=1)
    assert act.try_acquire("app-v1") is None  # no pool yet
    first = await act.acquire(version)
    second = act.try_acquire("app-v1")
    third = act.try_acquire("app-v1")
    assert second is not None and third is not None
    assert act.try_acquire("app-v1") is None  # 3 in flight: full
    fourth = asyncio.ensure_future(act.acquire(version))
    await wait_until(lambda: act.snapshot("app-v1").waiters == 1)  # type: ignore[union-attr]
    assert act.try_acquire("app-v1") is None  # a waiter is queued: no overtaking
    act.release(second)
    lease = await fourth  # the released unit went straight to the waiter
    assert lease.sandbox_id == first.sandbox_id
    act.release(second)  # a second release is ignored
    assert act.snapshot("app-v1").in_use == 3  # type: ignore[union-attr]
    assert act.touch(first)
    for held in (first, third, lease):
        act.release(held)
    assert act.snapshot("app-v1").in_use == 0  # type: ignore[union-attr]
    assert not act.touch(first)  # released: good for nothing any more


async def test_reprs_are_one_line(
    make_activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The reprs as the logs show them (the pool's own: tests/activator/test_pools.py)."""
    caplog.set_level(logging.INFO, logger="miren.activator")
    act = await make_activator()
    lease = await act.acquire(make_version("app-v3"))
    pid = pid_of(act, lease)
    logged = caplog.text  # (formatted as each record was emitted)
    assert (
        f"starting <Sandbox {lease.sandbox_id} v=app-v3 svc=web pending pid=None in_use=0/10 "
        "url=->\n"
    ) in logged
    assert (
        f" <Sandbox {lease.sandbox_id} v=app-v3 svc=web running pid={pid} in_use=0/10 "
        f"url={lease.url}> ready after "
    ) in logged
    assert repr(lease) == (
        f"<Lease {lease.sandbox_id} {lease.host}:{lease.port} v=app-v3 svc=web held>"
    )
    assert repr(act).startswith("<Activator node=node-a pools=1 sandboxes=1 creating=0 open>")
    assert all("\n" not in r.getMessage() for r in caplog.records)
    act.release(lease)
    assert repr(lease).endswith(" released>")


# -- boot failures -----------------------------------------------------------------------------


async def test_exit_during_boot_fails_waiters_fast_then_backs_off(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", env={"ECHO_FAIL_BOOT": "1"}, boot_timeout=30)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(
        *(act.acquire(version) for _ in range(20)), return_exceptions=True
    )
    assert loop.time() - t0 < 1.0  # at the exit, not at boot_timeout
    assert all(type(r) is BootFailed for r in results)
    err = results[0]
    assert isinstance(err, BootFailed) and err.http_status == 502
    log_path = act.log_path(err.sandbox_id or "")
    assert log_path is not None and "failing at boot" in log_path.read_text()
    # The first quick crash is replaced at once: the next acquire boots (and fails) again...
    with pytest.raises(BootFailed) as again:
        await act.acquire(version)
    assert type(again.value) is BootFailed
    # ...a crash loop: now the next acquire fails at once, without starting anything.
    with pytest.raises(CrashBackoff) as info:
        await act.acquire(version)
    assert 9.0 < info.value.retry_after <= 10.0
    assert sample(act, "miren_activator_cold_starts_total", app="app") == 2


async def test_never_healthy_fails_waiters_at_boot_timeout_and_stops_it(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", env={"ECHO_NEVER_HEALTHY": "1"}, boot_timeout=0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(
        *(act.acquire(version) for _ in range(5)), return_exceptions=True
    )
    elapsed = loop.time() - t0
    assert all(isinstance(r, ActivationTimeout) for r in results)
    assert 0.5 <= elapsed < 2.0
    snap = act.snapshot("app-v1")
    assert snap is not None
    (info,) = snap.sandboxes
    assert info.state is DEAD and info.pid is not None
    pid = info.pid
    await wait_until(lambda: pid_gone(pid), 5.0, "the unhealthy sandbox to be stopped")


async def test_slow_boot_within_timeout_serves_all_waiters(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", env={"BOOT_DELAY_MS": "300"}, rpi=100)
    leases = await asyncio.gather(*(act.acquire(version) for _ in range(50)))
    assert len({lease.sandbox_id for lease in leases}) == 1
    assert sample(act, "miren_activator_cold_starts_total", app="app") == 1
    assert sample(act, "miren_activator_cold_start_duration_seconds_count") == 1
    assert sample(act, "miren_activator_cold_start_duration_seconds_sum") >= 0.3
    for lease in leases:
        act.release(lease)


async def test_missing_command_binary_fails_fast(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    version = make_version("app-v1", command=("/nonexistent/miren-app",), boot_timeout=30)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BootFailed):
        await act.acquire(version)
    assert loop.time() - t0 < 1.0


# -- crashes of running sandboxes ----------------------------------------------------------------


async def test_sigkill_invalidates_leases_at_once_and_next_acquire_restarts(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator(crash=CrashPolicy(window=0.0))  # no crash counts as quick
    version = make_version("app-v1")
    lease = await act.acquire(version)
    pid = pid_of(act, lease)
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not lease.alive, 2.0, "the lease to see its sandbox end")
    snap = act.snapshot("app-v1")
    assert snap is not None
    assert [(s.id, s.state) for s in snap.sandboxes] == [(lease.sandbox_id, DEAD)]
    assert act.try_acquire("app-v1") is None
    fresh = await act.acquire(version)
    assert fresh.sandbox_id != lease.sandbox_id
    assert pid_of(act, fresh) != pid
    assert (await get_json(fresh))["version"] == "app-v1"
    act.release(lease)  # releasing a lease of a dead sandbox is harmless
    act.release(fresh)
    assert sample(act, "miren_activator_sandboxes", state="dead") == 1
    assert sample(act, "miren_activator_sandboxes", state="running") == 1


async def test_quick_crashes_back_off_doubling_and_fail_fast(
    make_activator: ActivatorFactory,
) -> None:
    clock = ManualClock()
    act = await make_activator(clock=clock)
    version = make_version("app-v1")

    async def crash_one() -> str:
        lease = await act.acquire(version)
        os.kill(pid_of(act, lease), signal.SIGKILL)
        await wait_until(lambda: not lease.alive, 2.0, "the sandbox to die")
        act.release(lease)
        return lease.sandbox_id

    await crash_one()  # the first quick crash is replaced at once (no back-off)
    second = await crash_one()
    with pytest.raises(CrashBackoff) as info:
        await act.acquire(version)
    assert info.value.retry_after == 10.0
    assert info.value.sandbox_id == second
    clock.advance(10.0)
    await crash_one()
    with pytest.raises(CrashBackoff) as info:
        await act.acquire(version)
    assert info.value.retry_after == 20.0
    clock.advance(20.0)
    # A sandbox that lives past the quick-crash window resets the count.
    lease = await act.acquire(version)
    clock.advance(61.0)
    os.kill(pid_of(act, lease), signal.SIGKILL)
    await wait_until(lambda: not lease.alive, 2.0, "the sandbox to die")
    act.release(lease)
    again = await act.acquire(version)
    assert act.snapshot("app-v1").crash_count == 0  # type: ignore[union-attr]
    act.release(again)


async def test_crash_with_waiters_for_capacity_starts_a_replacement(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator(crash=CrashPolicy(window=0.0))
    version = make_version("app-v1", rpi=1, cap=1, max_instances=1)
    lease = await act.acquire(version)
    waiter = asyncio.ensure_future(act.acquire(version))
    await wait_until(lambda: act.snapshot("app-v1").waiters == 1)  # type: ignore[union-attr]
    os.kill(pid_of(act, lease), signal.SIGKILL)
    fresh = await asyncio.wait_for(waiter, 10)
    assert fresh.sandbox_id != lease.sandbox_id
    act.release(lease)
    act.release(fresh)


# -- scaling -------------------------------------------------------------------------------------


async def test_three_long_requests_under_a_hard_cap_start_exactly_two_sandboxes(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=1, cap=1, max_instances=2)
    served: list[tuple[str, int]] = []
    third_waited = asyncio.Event()

    async def long_request() -> None:
        lease = await act.acquire(version)
        try:
            body = await get_json(lease, "/slow?ms=400")
            served.append((lease.sandbox_id, body["pid"]))
        finally:
            act.release(lease)

    tasks = [asyncio.ensure_future(long_request()) for _ in range(3)]

    def two_busy_one_waiting() -> bool:
        snap = act.snapshot("app-v1")
        ok = snap is not None and (snap.ready, snap.in_use, snap.waiters) == (2, 2, 1)
        if ok:
            third_waited.set()
        return ok

    await wait_until(two_busy_one_waiting, 10.0, "two busy sandboxes and one waiter")
    await asyncio.gather(*tasks)
    assert third_waited.is_set()
    assert len(served) == 3
    assert len({sid for sid, _ in served}) == 2
    assert sample(act, "miren_activator_cold_starts_total", app="app") == 2


async def test_ephemeral_web_never_exceeds_one_sandbox(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    version = make_version("app-v1", label="pr-1", rpi=1, cap=1)
    first = await act.acquire(version)
    waiting = [asyncio.ensure_future(act.acquire(version)) for _ in range(20)]
    await wait_until(lambda: act.snapshot("app-v1").waiters == 20)  # type: ignore[union-attr]
    assert act.snapshot("app-v1").desired == 1  # type: ignore[union-attr]
    act.release(first)
    for task in waiting:
        lease = await task
        assert lease.sandbox_id == first.sandbox_id
        act.release(lease)


async def test_cold_start_queue_is_bounded(make_activator: ActivatorFactory) -> None:
    act = await make_activator(max_waiters=5)
    version = make_version("app-v1", env={"BOOT_DELAY_MS": "200"})
    waiting = [asyncio.ensure_future(act.acquire(version)) for _ in range(5)]
    await wait_until(lambda: (s := act.snapshot("app-v1")) is not None and s.waiters == 5)
    with pytest.raises(Overloaded) as info:
        await act.acquire(version)
    assert info.value.http_status == 503
    for lease in await asyncio.gather(*waiting):
        act.release(lease)


async def test_acquire_timeout_when_capacity_never_frees(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator(acquire_timeout=0.2)
    version = make_version("app-v1", rpi=1, cap=1, max_instances=1)
    lease = await act.acquire(version)
    with pytest.raises(ActivationTimeout):
        await act.acquire(version)
    snap = act.snapshot("app-v1")
    assert snap is not None and (snap.waiters, snap.in_use) == (0, 1)
    act.release(lease)


# -- idle scale-down -----------------------------------------------------------------------------


async def test_idle_sandbox_stops_after_delay_and_next_acquire_cold_starts(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator(sweep_interval=0.05)
    version = make_version("app-v1", scale_down=1.0)
    lease = await act.acquire(version)
    pid = pid_of(act, lease)
    act.release(lease)

    def stopped() -> bool:
        snap = act.snapshot("app-v1")
        return snap is not None and snap.desired == 0

    await wait_until(stopped, 5.0, "the idle sandbox to stop")
    assert not lease.alive
    snap = act.snapshot("app-v1")
    assert snap is not None
    assert [(s.id, s.state) for s in snap.sandboxes] == [(lease.sandbox_id, STOPPED)]
    await wait_until(lambda: pid_gone(pid), 5.0, "its process to end")
    assert act.snapshot("app-v1").sandboxes[0].state is STOPPED  # type: ignore[union-attr]
    again = await act.acquire(version)  # scaled to zero: cold start
    assert again.sandbox_id != lease.sandbox_id
    assert sample(act, "miren_activator_cold_starts_total", app="app") == 2
    act.release(again)


async def test_sandbox_with_in_flight_lease_is_never_stopped(
    make_activator: ActivatorFactory,
) -> None:
    clock = ManualClock()
    act = await make_activator(clock=clock, sweep_interval=3600)
    version = make_version("app-v1", scale_down=1.0)
    lease = await act.acquire(version)
    clock.advance(3600)
    assert act.sweep() == 0
    assert lease.alive
    act.release(lease)
    clock.advance(0.5)
    assert act.sweep() == 0  # idle, but not yet for the delay
    clock.advance(0.5)
    assert act.sweep() == 1
    assert not lease.alive


async def test_min_instances_are_kept_and_started_with_the_pool(
    make_activator: ActivatorFactory,
) -> None:
    clock = ManualClock()
    act = await make_activator(clock=clock, sweep_interval=3600)
    version = make_version("app-v1", rpi=1, cap=1, min_instances=2, max_instances=3, scale_down=1.0)
    lease = await act.acquire(version)
    await wait_until(lambda: act.snapshot("app-v1").ready == 2)  # type: ignore[union-attr]
    extra = [act.try_acquire("app-v1"), await act.acquire(version)]
    assert act.snapshot("app-v1").ready == 3  # type: ignore[union-attr]
    for held in (lease, *extra):
        assert held is not None
        act.release(held)
    clock.advance(10)
    assert act.sweep() == 1  # down to min_instances, not below
    clock.advance(1000)
    assert act.sweep() == 0
    assert act.snapshot("app-v1").desired == 2  # type: ignore[union-attr]


async def test_ephemeral_default_scale_down_is_15_minutes(
    make_activator: ActivatorFactory,
) -> None:
    clock = ManualClock()
    act = await make_activator(clock=clock, sweep_interval=3600)
    lease = await act.acquire(make_version("app-v1", label="pr-1"))
    act.release(lease)
    clock.advance(899)
    assert act.sweep() == 0
    clock.advance(1)
    assert act.sweep() == 1


# -- cancellation --------------------------------------------------------------------------------


async def test_cancelled_acquire_mid_boot_leaves_nothing_behind(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", env={"BOOT_DELAY_MS": "300"})
    task = asyncio.ensure_future(act.acquire(version))
    await wait_until(
        lambda: (s := act.snapshot("app-v1")) is not None and (s.pending, s.waiters) == (1, 1)
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snap = act.snapshot("app-v1")
    assert snap is not None and (snap.waiters, snap.in_use) == (0, 0)
    assert sample(act, "miren_activator_waiters") == 0
    # The boot goes on for whoever comes next; nobody holds capacity on it.
    await wait_until(lambda: act.snapshot("app-v1").ready == 1)  # type: ignore[union-attr]
    assert act.snapshot("app-v1").in_use == 0  # type: ignore[union-attr]
    lease = await act.acquire(version)
    act.release(lease)


async def test_cancelled_acquire_during_pool_creation_does_not_cancel_it(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1")
    task = asyncio.ensure_future(act.acquire(version))
    await asyncio.sleep(0)  # it is now waiting on the creation sentinel
    assert "creating=1" in repr(act)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: act.snapshot("app-v1") is not None, 2.0, "the pool")
    # The creation finished and started the first sandbox for whoever comes next.
    await wait_until(lambda: act.snapshot("app-v1").ready == 1)  # type: ignore[union-attr]
    snap = act.snapshot("app-v1")
    assert snap is not None and (snap.waiters, snap.in_use, snap.desired) == (0, 0, 1)
    lease = act.try_acquire("app-v1")
    assert lease is not None
    act.release(lease)


async def test_lease_handed_to_a_cancelled_waiter_is_given_back(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=1, cap=1, max_instances=1)
    held = await act.acquire(version)
    task = asyncio.ensure_future(act.acquire(version))
    await wait_until(lambda: act.snapshot("app-v1").waiters == 1)  # type: ignore[union-attr]
    act.release(held)  # hands the unit to the waiter's future...
    task.cancel()  # ...whose task is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await task
    snap = act.snapshot("app-v1")
    assert snap is not None and (snap.in_use, snap.waiters) == (0, 0)
    assert act.try_acquire("app-v1") is not None


# -- store records -------------------------------------------------------------------------------


async def test_store_is_written_on_state_changes_only(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    act = await make_activator()
    version = make_version("app-v1", label="pr-1")
    lease = await act.acquire(version)
    await act.flush()
    (sb,) = await store.list(Sandbox)
    assert (sb.id, sb.status, sb.node, sb.url) == (lease.sandbox_id, RUNNING, "node-a", lease.url)
    assert sb.pid == pid_of(act, lease) and sb.pool == "pool-app-v1-web"
    (pool,) = await store.list(SandboxPool)
    assert (pool.desired_instances, pool.owner, pool.ephemeral) == (1, "node-a", True)
    assert pool.referenced_by_versions == ("app-v1",)
    act.release(lease)
    writes_before = store.revision
    for _ in range(1000):
        act.release(await act.acquire(version))
    await act.flush()
    assert store.revision == writes_before  # no write per request
    await act.remove_version("app-v1")
    await act.flush()
    assert await store.list(Sandbox) == []


async def test_last_activity_is_persisted_at_most_every_interval(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    clock = ManualClock()
    act = await make_activator(clock=clock, sweep_interval=3600)
    version = make_version("app-v1", scale_down=100000)
    act.release(await act.acquire(version))
    await act.flush()
    rev = store.revision
    clock.advance(10)
    act.release(await act.acquire(version))
    act.sweep()
    await act.flush()
    assert store.revision == rev  # 10 s: not yet
    clock.advance(25)
    act.release(await act.acquire(version))
    act.sweep()
    await act.flush()
    (sb,) = await store.list(Sandbox)
    assert store.revision == rev + 1
    assert sb.last_activity == clock.now()


async def test_store_outage_never_blocks_leases(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    act = await make_activator()
    version = make_version("app-v1")
    act.release(await act.acquire(version))  # the pool exists
    await act.flush()
    store.unavailable = True
    lease = await act.acquire(version)
    act.release(lease)
    store.unavailable = False
    assert await act.flush(10.0)


async def test_admin_views(make_activator: ActivatorFactory, tmp_path: Path) -> None:
    act = await make_activator()
    lease = await act.acquire(make_version("app-v1"))
    other = await act.acquire(make_version("other-v1", app="other"))
    (info,) = act.sandboxes("app")
    assert (info.id, info.status, info.version, info.url) == (
        lease.sandbox_id,
        RUNNING,
        "app-v1",
        lease.url,
    )
    assert info.started_at is not None and info.last_activity is not None
    path = act.log_path(lease.sandbox_id)
    assert path == tmp_path / "logs" / f"{lease.sandbox_id}.log"
    assert "listening on" in path.read_text()
    assert act.log_path("sb-unknown") is None
    assert sorted(act.pools()) == [("app-v1", "web"), ("other-v1", "web")]
    act.release(lease)
    act.release(other)


async def test_ended_sandboxes_are_kept_up_to_history(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    act = await make_activator(history=1, crash=CrashPolicy(window=0.0))
    version = make_version("app-v1")
    ids = []
    for _ in range(3):
        lease = await act.acquire(version)
        ids.append(lease.sandbox_id)
        path = act.log_path(lease.sandbox_id)
        os.kill(pid_of(act, lease), signal.SIGKILL)
        await wait_until(lambda lease=lease: not lease.alive, 2.0)  # type: ignore[misc]
        act.release(lease)
    assert [s.id for s in act.sandboxes("app")] == [ids[2]]
    assert act.log_path(ids[0]) is None
    assert path is not None and path.exists()  # the retained one keeps its log
    await act.flush()
    assert [s.id for s in await store.list(Sandbox)] == [ids[2]]
    assert not (path.parent / f"{ids[0]}.log").exists()


# -- removal and shutdown ------------------------------------------------------------------------


async def test_remove_version_fails_waiters_and_stops_its_sandboxes(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=1, cap=1, max_instances=1)
    keep = await act.acquire(make_version("app-v2"))
    lease = await act.acquire(version)
    pid = pid_of(act, lease)
    waiter = asyncio.ensure_future(act.acquire(version))
    await wait_until(lambda: act.snapshot("app-v1").waiters == 1)  # type: ignore[union-attr]
    await act.remove_version("app-v1")
    with pytest.raises(VersionRemoved):
        await waiter
    assert pid_gone(pid)
    assert act.snapshot("app-v1") is None
    assert keep.alive
    act.release(lease)
    act.release(keep)


async def test_close_stops_every_sandbox_within_the_grace(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    leases = await asyncio.gather(
        act.acquire(make_version("app-v1")),
        act.acquire(make_version("app-v2", env={"ECHO_IGNORE_SIGTERM": "1"})),
        act.acquire(make_version("app-v3", label="pr-3")),
    )
    pids = [pid_of(act, lease) for lease in leases]
    booting = asyncio.ensure_future(
        act.acquire(make_version("app-v4", env={"BOOT_DELAY_MS": "5000"}))
    )
    await wait_until(lambda: (s := act.snapshot("app-v4")) is not None and s.pending == 1)
    (booting_info,) = act.snapshot("app-v4").sandboxes  # type: ignore[union-attr]
    await wait_until(lambda: act.snapshot("app-v4").sandboxes[0].pid is not None)  # type: ignore[union-attr]
    pids.append(act.snapshot("app-v4").sandboxes[0].pid)  # type: ignore[union-attr, arg-type]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await act.close(grace=0.5)
    assert loop.time() - t0 < 2.0
    assert all(pid_gone(pid) for pid in pids)
    with pytest.raises(ActivatorClosed):
        await booting
    with pytest.raises(ActivatorClosed):
        await act.acquire(make_version("app-v1"))
    assert booting_info.state is SandboxStatus.PENDING  # the snapshot was taken while booting


# -- upstream runtime through the activator -------------------------------------------------------


async def test_upstream_version_leases_its_url(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    server = await act.acquire(make_version("srv-v1", app="srv"))  # any running echo server
    version = make_version(
        "app-v1", runtime=Runtime.UPSTREAM, urls=(server.url,), rpi=2, max_instances=5
    )
    a, b = await act.acquire(version), await act.acquire(version)
    assert (a.host, a.port) == (server.host, server.port)
    # One URL: one sandbox, which takes work past the target (nothing queues).
    c = await asyncio.wait_for(act.acquire(version), 5)
    assert act.snapshot("app-v1").desired == 1  # type: ignore[union-attr]
    assert act.snapshot("app-v1").waiters == 0  # type: ignore[union-attr]
    assert (await get_json(c))["version"] == "srv-v1"
    for lease in (a, b, c, server):
        act.release(lease)


# -- store-backed details ------------------------------------------------------------------------


async def test_backoff_recorded_in_the_pool_is_honoured_by_another_activator(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    first = await make_activator(node="node-a")
    version = make_version("app-v1", env={"ECHO_FAIL_BOOT": "1"})
    for _ in range(2):  # the second consecutive quick crash starts a back-off
        with pytest.raises(BootFailed):
            await first.acquire(version)
    await first.flush()
    (pool,) = await store.list(SandboxPool)
    assert pool.consecutive_crashes == 2 and pool.cooldown_until is not None
    assert pool.last_crash_at is not None
    second = await make_activator(node="node-b")
    with pytest.raises(CrashBackoff) as info:
        await second.acquire(version)
    assert 0 < info.value.retry_after <= 10.0


async def test_no_pool_for_a_version_deleted_from_the_store(
    make_activator: ActivatorFactory, store: MemoryStore
) -> None:
    from miren_store.entities import AppVersion

    act = await make_activator()
    stored = await store.create(make_version("app-v1"))
    await store.delete(AppVersion, "app-v1")
    with pytest.raises(VersionRemoved):
        await act.acquire(stored)
    assert await store.list(SandboxPool) == []
    live = await store.create(make_version("app-v2"))
    act.release(await act.acquire(live))  # a stored version that exists is fine


async def test_tail_log_returns_the_last_lines(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    lease = await act.acquire(make_version("app-v1"))
    lines = act.tail_log(lease.sandbox_id, 1)
    assert lines is not None and len(lines) == 1 and "listening on" in lines[0]
    full = act.tail_log(lease.sandbox_id)
    assert full is not None and full[0].startswith("--- miren: ")
    assert act.tail_log("sb-unknown") is None
    act.release(lease)


async def test_acquire_starts_an_unstarted_activator(store: MemoryStore, tmp_path: Path) -> None:
    from miren_activator import Activator, ActivatorConfig

    act = Activator(store, config=ActivatorConfig(node="n", log_dir=tmp_path))
    try:
        lease = await act.acquire(make_version("app-v1"))
        act.release(lease)
        assert await act.flush(5.0)
        assert len(await store.list(Sandbox)) == 1
    finally:
        await act.close(grace=1.0)
    assert await act.flush(0.1)


async def test_stop_requested_while_spawning_stops_the_sandbox_once_spawned(
    make_activator: ActivatorFactory,
) -> None:
    from miren_activator import FakeRuntime

    runtime = FakeRuntime(ready=True)
    runtime.hold_starts()  # the boot waits in its spawn step, a moment no process stops in
    act = await make_activator(runtimes={Runtime.PROCESS: runtime})
    waiter = asyncio.ensure_future(act.acquire(make_version("app-v1")))
    await asyncio.wait_for(runtime.called(1), 5)
    removal = asyncio.ensure_future(act.remove_version("app-v1"))
    with pytest.raises(VersionRemoved):
        await waiter
    assert runtime.sandboxes == []  # not spawned yet
    runtime.release_starts()
    await asyncio.wait_for(removal, 5)
    (sb,) = runtime.sandboxes
    assert await asyncio.wait_for(sb.wait_stopped(), 5) == 0.0  # stopped as soon as spawned
    assert sb.ended and act.snapshot("app-v1") is None


async def test_a_sandbox_that_ends_ends_its_own_leases_and_no_other(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator(crash=CrashPolicy(window=0.0))
    other = await act.acquire(make_version("app-v2"))
    lease = await act.acquire(make_version("app-v1"))
    twin = act.try_acquire("app-v1")  # a second lease on the same sandbox
    assert twin is not None and twin.sandbox_id == lease.sandbox_id
    os.kill(pid_of(act, lease), signal.SIGKILL)
    await wait_until(lambda: not lease.alive, 2.0, "the lease to see its sandbox end")
    assert not twin.alive  # every lease of it, in the same step
    assert other.alive  # another version's sandbox is not touched
    act.release(lease)
    act.release(twin)
    fresh = await act.acquire(make_version("app-v1"))
    assert fresh.alive and fresh.sandbox_id != lease.sandbox_id
    await act.remove_version("app-v1")
    assert not fresh.alive and other.alive  # removal ends the version's sandboxes only
    act.release(fresh)
    act.release(other)


async def test_a_log_past_its_cap_is_rotated_and_stays_appendable(
    make_activator: ActivatorFactory,
) -> None:
    """The sweep copies a log past log_max_bytes to `<name>.1` and truncates it; the sandbox
    keeps writing at the new end (O_APPEND: no hole of NULs), and both files go with the
    sandbox's history."""
    from miren_activator.logs import rotated_path

    cap = 64 * 1024
    act = await make_activator(log_max_bytes=cap, sweep_interval=3600.0)  # sweeps by hand
    lease = await act.acquire(make_version("app-v1"))
    path = act.log_path(lease.sandbox_id)
    assert path is not None
    old = rotated_path(path)

    async def log_bytes(n: int) -> None:
        reader, writer = await asyncio.open_connection(*lease.addr)
        try:
            writer.write(f"GET /log?bytes={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    await log_bytes(cap // 2)
    act.sweep()
    assert not old.exists(), "rotated under the cap"
    await log_bytes(cap)
    act.sweep()
    await wait_until(lambda: old.exists() and path.stat().st_size < cap, 5.0, "the rotation")
    assert old.stat().st_size > cap
    assert old.read_bytes().startswith(b"--- miren: ")  # the start line moved to `.1`
    await log_bytes(1000)
    tail = path.read_bytes()
    assert tail and b"\0" not in tail and tail.endswith(b"x\n")
    assert act.tail_log(lease.sandbox_id, 1) == [tail.decode().splitlines()[-1]]
    act.release(lease)
    await act.remove_version("app-v1")
    await wait_until(lambda: not path.exists() and not old.exists(), 5.0, "logs removed")
