"""Deleting an app (miren_store.deploy.apps): everything of it goes, nothing of another app,
and a deletion cut short by a store failure at any step is finished by the next call."""

from __future__ import annotations

import pytest

from miren_store.deploy.apps import delete_app
from miren_store.deploy.deploys import deploy
from miren_store.deploy.errors import AppNotFound, CleanupFailed
from miren_store.entities import App, AppVersion, HttpRoute, SandboxPool
from miren_store.errors import StoreUnavailable
from miren_store.memory import MemoryStore
from tests.ephemeral.conftest import FakeClock, add_pool, eph, normal, setup_app
from tests.faults import FaultyStore


async def two_apps(mem: MemoryStore, clock: FakeClock) -> None:
    """`app` (two routes, an active version, two previews, pools) beside `other`."""
    await setup_app(mem, "app", "app.example.com", "*.apps.example.com")
    active = (await deploy(mem, "app", normal(), now=clock)).version
    pr = (await deploy(mem, "app", eph("pr-1", ttl="1h"), now=clock)).version
    await deploy(mem, "app", eph("pr-2", ttl="1h"), now=clock)
    await add_pool(mem, "pool-active", active.id)
    await add_pool(mem, "pool-pr", pr.id)
    await setup_app(mem, "other", "other.example.com")
    other = (await deploy(mem, "other", normal(), now=clock)).version
    await add_pool(mem, "pool-other", other.id, app="other")


async def remaining(mem: MemoryStore) -> dict[str, list[str]]:
    return {
        "apps": sorted(a.name for a in await mem.list(App)),
        "routes": sorted(r.host for r in await mem.list(HttpRoute)),
        "versions": sorted(v.app for v in await mem.list(AppVersion)),
        "pools": sorted(p.id for p in await mem.list(SandboxPool)),
    }


ONLY_OTHER = {
    "apps": ["other"],
    "routes": ["other.example.com"],
    "versions": ["other"],
    "pools": ["pool-other"],
}


async def test_deletes_everything_of_the_app_and_nothing_else(clock: FakeClock) -> None:
    mem = MemoryStore()
    await two_apps(mem, clock)
    await delete_app(mem, "app", now=clock)
    assert await remaining(mem) == ONLY_OTHER
    with pytest.raises(AppNotFound):  # a retry after it finished: 404, nothing changes
        await delete_app(mem, "app", now=clock)
    assert await remaining(mem) == ONLY_OTHER


@pytest.mark.parametrize(
    "op,kind,skip",
    [
        ("list", HttpRoute, 0),  # before anything changed
        ("delete", HttpRoute, 1),  # one route gone, the other not
        ("update", App, 0),  # routes gone, the active pointer kept
        ("commit", None, 1),  # one version deleted (with its pool), the others not
        ("delete", App, 0),  # every version gone, the app itself kept
    ],
)
async def test_a_failure_at_any_step_is_finished_by_the_next_call(
    clock: FakeClock, op: str, kind: type | None, skip: int
) -> None:
    mem = MemoryStore()
    await two_apps(mem, clock)
    store = FaultyStore(mem)
    fault = store.fail(op, kind, skip=skip)
    with pytest.raises((StoreUnavailable, CleanupFailed)):  # (a version: CleanupFailed)
        await delete_app(store, "app", now=clock)
    assert fault.fired == 1
    assert "other" in (await remaining(mem))["apps"]
    await delete_app(store, "app", now=clock)  # the retry
    assert await remaining(mem) == ONLY_OTHER
