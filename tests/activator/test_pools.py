"""The in-memory records (`miren_activator.pools`): a pool's lists and limits through state
changes, retention, ordinals, snapshots and one-line reprs. Pure: no sandbox, no socket."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from miren_activator import ManualClock
from miren_activator.capacity import NO_LIMIT
from miren_activator.errors import CrashBackoff, Unreachable
from miren_activator.persist import new_pool_entity
from miren_activator.policy import CrashState
from miren_activator.pools import Lease, PoolRecord, SandboxRecord, sandbox_of
from miren_store.entities import SandboxStatus
from tests.activator.conftest import make_version

P, R, W, S, D = (
    SandboxStatus.PENDING,
    SandboxStatus.RUNNING,
    SandboxStatus.DOWN,
    SandboxStatus.STOPPED,
    SandboxStatus.DEAD,
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Spawned:
    """What a runtime's handle tells the record: where it listens and its pid."""

    host = "127.0.0.1"
    pid = 4242

    def __init__(self, port: int) -> None:
        self.port = port


def make_pool(vid: str = "app-v3", **kwargs: object) -> PoolRecord:
    version = make_version(vid, **kwargs)  # type: ignore[arg-type]
    entity = new_pool_entity(version, "web", node="node-a", clock=ManualClock())
    return PoolRecord(version, "web", entity, CrashState())


def add(pool: PoolRecord, sid: str) -> SandboxRecord:
    sb = SandboxRecord(pool, sid, pool.next_ordinal(), now=0.0, started_at=T0)
    pool.add(sb)
    return sb


def lists(pool: PoolRecord) -> tuple[list[str], list[str], list[str], list[str]]:
    return (
        [s.id for s in pool.live],
        [s.id for s in pool.running],
        [s.id for s in pool.down],
        [s.id for s in pool.finished],
    )


def test_moves_keep_the_lists_in_step() -> None:
    pool = make_pool(max_instances=3)
    a, b = add(pool, "a"), add(pool, "b")
    assert lists(pool) == (["a", "b"], [], [], []) and pool.pending == 2
    pool.move(a, R)
    assert lists(pool) == (["a", "b"], ["a"], [], []) and pool.pending == 1
    pool.move(b, W)  # an upstream that does not answer
    assert lists(pool) == (["a", "b"], ["a"], ["b"], []) and pool.pending == 0
    pool.move(b, R)  # a re-probe passed
    assert lists(pool) == (["a", "b"], ["a", "b"], [], [])
    pool.move(a, D)
    assert lists(pool) == (["b"], ["b"], [], ["a"])
    pool.move(b, S)
    assert lists(pool) == ([], [], [], ["a", "b"])
    assert (a.state, b.state) == (D, S)


def test_limits_follow_the_running_and_live_counts() -> None:
    pool = make_pool(rpi=10, max_instances=2)
    a = add(pool, "a")
    pool.move(a, R)
    assert a.limit == 10  # room for another sandbox: past the target needs a decision
    b = add(pool, "b")
    pool.move(b, R)
    assert (a.limit, b.limit) == (10, 10)
    pool.move(b, D)
    assert a.limit == 10  # one running, but another may start
    single = make_pool("app-v4", rpi=10, max_instances=1)
    c = add(single, "c")
    single.move(c, R)
    assert c.limit == NO_LIMIT  # the only sandbox there can be, no hard cap
    capped = make_pool("app-v5", rpi=10, cap=12, max_instances=1)
    d = add(capped, "d")
    capped.move(d, R)
    assert d.limit == 12


def test_ordinals_reuse_the_lowest_free_number() -> None:
    pool = make_pool(max_instances=3)
    a, b = add(pool, "a"), add(pool, "b")
    assert (a.ordinal, b.ordinal) == (0, 1)
    pool.move(a, D)
    assert add(pool, "c").ordinal == 0
    assert add(pool, "d").ordinal == 2


def test_trim_finished_returns_the_oldest_beyond_the_history() -> None:
    pool = make_pool(max_instances=3)
    for sid in ("a", "b", "c"):
        pool.move(add(pool, sid), D)
    assert [s.id for s in pool.trim_finished(1)] == ["a", "b"]
    assert [s.id for s in pool.finished] == ["c"]
    assert [s.id for s in pool.trim_finished(0)] == ["c"] and not pool.finished


def test_reprs_are_one_line() -> None:
    pool = make_pool("app-v3")
    sb = add(pool, "sb-1")
    assert repr(sb) == "<Sandbox sb-1 v=app-v3 svc=web pending pid=None in_use=0/10 url=->"
    sb.spawned(Spawned(8001))  # type: ignore[arg-type]
    pool.move(sb, R)
    sb.in_use = 1
    assert repr(pool) == "<Pool v=app-v3 svc=web desired=1 ready=1 waiters=0>"
    assert repr(sb) == (
        "<Sandbox sb-1 v=app-v3 svc=web running pid=4242 in_use=1/10 url=http://127.0.0.1:8001>"
    )
    lease = Lease(sb)
    assert repr(lease) == "<Lease sb-1 127.0.0.1:8001 v=app-v3 svc=web held>"
    assert sandbox_of(lease) is sb and sandbox_of(sb) is sb  # (a Held is its record)


async def test_waiters_show_in_the_repr_and_fail_together() -> None:
    pool = make_pool("app-v3")
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[Lease]] = [loop.create_future() for _ in range(3)]
    pool.waiters.extend(futs)
    assert repr(pool) == "<Pool v=app-v3 svc=web desired=0 ready=0 waiters=3>"
    futs[1].cancel()  # a caller that went away
    assert pool.snapshot(0.0).waiters == 2
    pool.fail_waiters(CrashBackoff("no", retry_after=1.0))
    assert not pool.waiters
    for fut in (futs[0], futs[2]):
        with pytest.raises(CrashBackoff):
            fut.result()


def test_all_down_only_when_nothing_else_can_serve() -> None:
    pool = make_pool(max_instances=2)
    a, b = add(pool, "a"), add(pool, "b")
    pool.move(a, W)
    assert not pool.all_down()  # b is booting
    pool.move(b, R)
    assert not pool.all_down()  # b serves
    pool.move(b, W)
    a.error = "refused"
    assert pool.all_down()
    err = pool.down_error()
    assert isinstance(err, Unreachable) and err.sandbox_id == "b"


def test_snapshot_lists_live_then_ended() -> None:
    pool = make_pool("app-v3", max_instances=2)
    a, b = add(pool, "a"), add(pool, "b")
    a.spawned(Spawned(8001))  # type: ignore[arg-type]
    pool.move(a, R)
    a.in_use = 4
    pool.move(b, D)
    pool.crash = CrashState(consecutive=2, cooldown_until=15.0)
    snap = pool.snapshot(5.0)
    assert (snap.pool_id, snap.desired, snap.ready, snap.pending, snap.waiters) == (
        "pool-app-v3-web",
        1,
        1,
        0,
        0,
    )
    assert (snap.crash_count, snap.backoff_remaining, snap.in_use) == (2, 10.0, 4)
    assert [(s.id, s.state, s.in_use, s.target, s.url) for s in snap.sandboxes] == [
        ("a", R, 4, 10, "http://127.0.0.1:8001"),
        ("b", D, 0, 10, ""),
    ]
    assert "retrying in 10s" in str(pool.backoff_error(10.0))
