"""Store failures at each step of a deploy or a delete (reference R-2, R-4, R-5): the operation
fails with a message naming the step and leaves nothing half-made."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest

from miren_store.deploy.cascade import Deleted, delete_version
from miren_store.deploy.deploys import LabelState, delete_label, deploy, extend_label, resolve_label
from miren_store.deploy.errors import CleanupFailed, StoreFailure
from miren_store.entities import App, AppVersion, SandboxPool
from miren_store.memory import MemoryStore
from tests.ephemeral.conftest import FakeClock, add_pool, eph, labelled, normal, setup_app
from tests.faults import Call, FaultyStore


async def world(mem: MemoryStore, clock: FakeClock) -> tuple[AppVersion, AppVersion]:
    """An app at its limit (10 previews): the previous `feat-x` preview with a pool, and `l1`,
    the nearest expiry, which the next new label evicts."""
    await setup_app(mem, "app", "app.example.com")
    await deploy(mem, "app", normal(), now=clock)
    victim = (await deploy(mem, "app", eph("l1", ttl="1h"), now=clock)).version
    for i in range(2, 10):
        await deploy(mem, "app", eph(f"l{i}", ttl="2h"), now=clock)
    old = (await deploy(mem, "app", eph("feat-x", ttl="3h"), now=clock)).version
    await add_pool(mem, "pool-old", old.id)
    await add_pool(mem, "pool-victim", victim.id)
    return old, victim


Predicate = Callable[[Call], bool]


def _list(kind: type, **where: object) -> Predicate:
    return lambda c: c.op == "list" and c.kind is kind and c.where == where


STEPS: dict[str, tuple[str, Callable[[AppVersion, AppVersion], Predicate]]] = {
    "read": ("read", lambda old, victim: lambda c: c.op == "get" and c.kind is App),
    "replace-list": (
        "replace",
        lambda old, victim: _list(AppVersion, app="app", ephemeral_label="feat-x"),
    ),
    "replace-pools": (
        "replace",
        lambda old, victim: _list(SandboxPool, referenced_by_versions=old.id),
    ),
    "evict-list": ("evict", lambda old, victim: _list(AppVersion, app="app")),
    "evict-pools": (
        "evict",
        lambda old, victim: _list(SandboxPool, referenced_by_versions=victim.id),
    ),
    "create": ("create", lambda old, victim: lambda c: c.op == "commit"),
}


@pytest.mark.parametrize("where", list(STEPS))
async def test_failure_at_each_step_leaves_the_previous_preview_serving(
    clock: FakeClock, where: str
) -> None:
    mem = MemoryStore()
    old, victim = await world(mem, clock)
    faulty = FaultyStore(mem)
    step, predicate = STEPS[where]
    fault = faulty.fail(when=predicate(old, victim))
    before_ids = sorted(v.id for v in await mem.list(AppVersion))
    before_rev = mem.revision

    # feat-x is redeployed (replace) and the limit is full, so `l1` would be evicted
    req = eph("feat-x", ttl="3h")
    if step == "evict":
        req = eph("new-label", ttl="3h")
    with pytest.raises(StoreFailure) as info:
        await deploy(faulty, "app", req, now=clock)

    assert fault.fired == 1
    assert info.value.step == step
    assert f"step '{step}'" in str(info.value)
    assert "injected fault" in str(info.value)
    assert info.value.code == "store_unavailable"
    assert "nothing was changed" in str(info.value) or step != "create"
    assert mem.revision == before_rev  # not one write
    assert sorted(v.id for v in await mem.list(AppVersion)) == before_ids
    found = await resolve_label(mem, "app", "feat-x", now=clock)
    assert found.state is LabelState.LIVE and found.version == old
    assert {p.id for p in await mem.list(SandboxPool)} == {"pool-old", "pool-victim"}


async def test_commit_applied_but_answer_lost_is_read_back_as_success(clock: FakeClock) -> None:
    mem = MemoryStore()
    old, _ = await world(mem, clock)
    faulty = FaultyStore(mem)
    faulty.fail("commit", applied=True)
    result = await deploy(faulty, "app", eph("feat-x"), now=clock)
    assert [v.id for v in await labelled(mem, "app", "feat-x")] == [result.version.id]
    assert result.replaced == (old.id,)  # the commit applied whole: the plan is what happened
    assert old.id not in {v.id for v in await mem.list(AppVersion)}


async def test_commit_outcome_unknown_says_so(clock: FakeClock) -> None:
    mem = MemoryStore()
    await world(mem, clock)
    faulty = FaultyStore(mem)
    faulty.fail("commit")
    faulty.fail("get", AppVersion)  # the read-back fails too
    with pytest.raises(StoreFailure, match="outcome is unknown"):
        await deploy(faulty, "app", eph("feat-x"), now=clock)


async def test_r5_clone_path_read_failure_fails_the_deploy(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    base = await deploy(mem, "app", normal(), now=clock)
    faulty = FaultyStore(mem)
    faulty.fail("get", AppVersion)
    with pytest.raises(StoreFailure, match="step 'read'"):
        await deploy(faulty, "app", eph("x", from_version=base.version.id), now=clock)
    assert await labelled(mem, "app", "x") == []


async def test_normal_deploy_commit_failure(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    faulty = FaultyStore(mem)
    faulty.fail("commit")
    with pytest.raises(StoreFailure, match=r"step 'create'.*nothing was changed"):
        await deploy(faulty, "app", normal(), now=clock)
    assert await mem.list(AppVersion) == []
    assert (await mem.get(App, "app")).active_version is None


# -- the delete cascade -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault_at", "step"),
    [
        (lambda c: c.op == "list" and c.kind is SandboxPool, "list pools"),
        (lambda c: c.op == "commit" and c.writes(SandboxPool), "delete"),
        (lambda c: c.op == "get" and c.kind is App, "read app"),
    ],
)
async def test_r2_pool_failure_keeps_the_version_for_a_retry(
    clock: FakeClock, fault_at: Callable[[Call], bool], step: str
) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    made = (await deploy(mem, "app", eph("feat-x"), now=clock)).version
    await add_pool(mem, "private", made.id)
    faulty = FaultyStore(mem)
    faulty.fail(when=fault_at)
    with pytest.raises(CleanupFailed) as info:
        await delete_version(faulty, made)
    assert info.value.step == step
    assert info.value.version_id == made.id
    assert "kept for a retry" in str(info.value)
    assert await mem.get(AppVersion, made.id) == made
    assert [p.id for p in await mem.list(SandboxPool)] == ["private"]
    # the retry succeeds
    assert await delete_version(faulty, made) is Deleted.DELETED
    assert await mem.list(SandboxPool) == []


async def test_delete_of_a_changed_or_gone_version(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    made = (await deploy(mem, "app", eph("feat-x"), now=clock)).version
    await extend_label(mem, "app", "feat-x", "2h", now=clock)
    assert await delete_version(mem, made) is Deleted.CHANGED
    assert await labelled(mem, "app", "feat-x") != []
    current = (await labelled(mem, "app", "feat-x"))[0]
    assert await delete_version(mem, current) is Deleted.DELETED
    assert await delete_version(mem, current) is Deleted.GONE


async def test_delete_replans_when_a_pool_moves_under_it(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    made = (await deploy(mem, "app", eph("feat-x"), now=clock)).version
    pool = await add_pool(mem, "private", made.id)
    faulty = FaultyStore(mem)
    # Just before the first commit, the activator writes the pool: the revision-checked delete
    # of the pool conflicts, and the cascade lists the pools again and deletes the new revision.
    race = faulty.race(lambda: mem.update(attrs.evolve(pool, desired_instances=1)), "commit")
    assert await delete_version(faulty, made) is Deleted.DELETED
    assert race.fired == 1
    assert sum(c.op == "commit" for c in faulty.calls) == 2
    assert await mem.list(SandboxPool) == []


async def test_delete_keeps_a_pool_that_gained_a_reference(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    made = (await deploy(mem, "app", eph("feat-x"), now=clock)).version
    pool = await add_pool(mem, "p", made.id)
    faulty = FaultyStore(mem)
    share = attrs.evolve(pool, referenced_by_versions=(made.id, "other"))
    faulty.race(lambda: mem.update(share), "commit")
    assert await delete_version(faulty, made) is Deleted.DELETED
    assert (await mem.get(SandboxPool, "p")).referenced_by_versions == ("other",)


async def test_delete_label_failure_keeps_the_version(clock: FakeClock) -> None:
    mem = MemoryStore()
    await setup_app(mem)
    made = (await deploy(mem, "app", eph("feat-x"), now=clock)).version
    faulty = FaultyStore(mem)
    faulty.fail("commit")
    with pytest.raises(CleanupFailed):
        await delete_label(faulty, "app", "feat-x")
    assert await mem.get(AppVersion, made.id) == made
