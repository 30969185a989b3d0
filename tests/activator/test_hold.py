"""`Activator.hold`: the ingress's warm path (a unit of work without a Lease object), on real
echo-server sandboxes."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import NamedTuple

from miren_activator import Activator, Held, Lease, ManualClock
from miren_store.entities import AppVersion, SandboxStatus
from tests.activator.conftest import ActivatorFactory, make_version, sample, wait_until


class Ref(NamedTuple):
    version: str
    service: str = "web"


async def boot_and_hold(act: Activator, version: AppVersion) -> Held:
    """Boot a sandbox of `version` (one lease, given back), then hold a unit of it."""
    act.release(await act.acquire(version))
    held = act.hold(Ref(version.id))
    assert held is not None
    return held


async def test_hold_counts_like_a_lease_without_one(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=3, cap=3, max_instances=1)
    assert act.hold(Ref("app-v1")) is None  # no pool yet
    first = await act.acquire(version)
    a, b = act.hold(Ref("app-v1")), act.hold(Ref("app-v1"))
    assert a is not None and b is not None
    assert not isinstance(a, Lease)
    assert a.addr == b.addr == first.addr == (first.host, first.port)
    assert act.snapshot("app-v1").in_use == 3  # type: ignore[union-attr]
    assert act.hold(Ref("app-v1")) is None  # at the hard cap
    waiter = asyncio.ensure_future(act.acquire(version))
    await wait_until(lambda: act.snapshot("app-v1").waiters == 1)  # type: ignore[union-attr]
    act.release(a)  # the unit goes straight to the waiter...
    assert act.hold(Ref("app-v1")) is None  # ...and a newcomer does not overtake it
    lease = await waiter
    assert lease.addr == first.addr
    for unit in (first, b, lease):
        act.release(unit)
    assert act.snapshot("app-v1").in_use == 0  # type: ignore[union-attr]


async def test_hold_is_scoped_by_service(make_activator: ActivatorFactory) -> None:
    act = await make_activator()
    held = await boot_and_hold(act, make_version("app-v1"))  # the web sandbox is tried first
    assert act.hold(Ref("app-v1", "worker")) is None  # never the web sandbox for another service
    act.release(held)


async def test_hold_stays_on_its_sandbox_until_full_then_moves_on(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1", rpi=1, max_instances=2)
    one = await act.acquire(version)
    two = act.hold(Ref("app-v1"))  # past the target: the same sandbox, and a second one starts
    assert two is not None and two.addr == one.addr
    await wait_until(lambda: act.snapshot("app-v1").ready == 2)  # type: ignore[union-attr]
    act.release(one)
    act.release(two)
    first = act.hold(Ref("app-v1"))  # first fit: the first sandbox
    second = act.hold(Ref("app-v1"))  # it is at the target: pick finds the other one
    assert first is not None and second is not None and first.addr != second.addr
    act.release(first)
    act.release(second)
    again = act.hold(Ref("app-v1"))  # the sandbox found last, while it is below the target
    assert again is not None and again.addr == second.addr
    act.release(again)


async def test_hold_never_returns_a_sandbox_that_left_running(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    version = make_version("app-v1")
    lease = await act.acquire(version)
    held = act.hold(Ref("app-v1"))
    assert held is not None and held.addr == lease.addr
    act.release(held)
    snap = act.snapshot("app-v1")
    assert snap is not None
    (info,) = snap.sandboxes
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)

    def states() -> list[tuple[str, SandboxStatus]]:
        return [(s.id, s.state) for s in act.snapshot("app-v1").sandboxes]  # type: ignore[union-attr]

    await wait_until(lambda: states() != [(info.id, SandboxStatus.RUNNING)], 2.0, "its end")
    assert states() == [(info.id, SandboxStatus.DEAD)] and not lease.alive
    assert "app-v1" not in act.warm  # it left the cache as it left RUNNING (no stale ref kept)
    assert act.hold(Ref("app-v1")) is None  # not the dead sandbox it tried first before
    fresh = await act.acquire(version)  # a new sandbox boots
    held = act.hold(Ref("app-v1"))
    assert held is not None and held.addr == fresh.addr != lease.addr
    for unit in (lease, fresh, held):
        act.release(unit)


async def test_releasing_the_last_held_unit_starts_the_idle_clock(
    make_activator: ActivatorFactory,
) -> None:
    clock = ManualClock()
    act = await make_activator(clock=clock, sweep_interval=3600)
    held = await boot_and_hold(act, make_version("app-v1", scale_down=1.0))
    clock.advance(3600)
    assert act.sweep() == 0  # a unit in flight: never stopped
    act.release(held)
    clock.advance(0.5)
    assert act.sweep() == 0  # idle, but not yet for the delay
    clock.advance(0.5)
    assert act.sweep() == 1


async def test_report_unreachable_takes_a_held_sandbox_out_of_service(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    held = await boot_and_hold(act, make_version("app-v1"))
    act.report_unreachable(held)  # (releases it too)
    snap = act.snapshot("app-v1")  # out of service at once, not when its exit is noticed
    assert snap is not None and snap.in_use == 0 and snap.ready == 0
    assert [s.state for s in snap.sandboxes] == [SandboxStatus.DEAD]
    assert sample(act, "miren_activator_sandboxes", state="running") == 0
    assert sample(act, "miren_activator_sandboxes", state="dead") == 1
    assert "app-v1" not in act.warm
    assert act.hold(Ref("app-v1")) is None


async def test_a_removed_version_leaves_nothing_in_the_cache(
    make_activator: ActivatorFactory,
) -> None:
    act = await make_activator()
    held = await boot_and_hold(act, make_version("app-v1"))
    act.release(held)
    assert "app-v1" in act.warm
    await act.remove_version("app-v1")  # (previews expire all the time: nothing may pile up)
    assert "app-v1" not in act.warm
    assert act.hold(Ref("app-v1")) is None
