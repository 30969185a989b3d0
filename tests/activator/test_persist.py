"""The background state writer on the memory store (a real backend): coalescing, optimistic
merges on Conflict, retry after an outage, and no resurrection of deleted entities."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest

from miren_activator.persist import StateWriter
from miren_store.entities import SandboxPool
from miren_store.memory import MemoryStore
from tests.activator.conftest import make_version


def pool(desired: int = 0, owner: str = "a") -> SandboxPool:
    return SandboxPool(
        id="pool-v1-web",
        app="app",
        spec=make_version().spec,
        desired_instances=desired,
        owner=owner,
    )


@pytest.fixture
async def writer(store: MemoryStore) -> AsyncIterator[StateWriter]:
    w = StateWriter(store)
    w.start()
    try:
        yield w
    finally:
        await w.close(1.0)


def set_desired(n: int):  # type: ignore[no-untyped-def]
    return lambda cur: attrs.evolve(cur if cur is not None else pool(), desired_instances=n)


async def test_a_burst_of_changes_is_one_write_of_the_latest(
    writer: StateWriter, store: MemoryStore
) -> None:
    for n in range(1, 50):
        writer.put(SandboxPool, "pool-v1-web", set_desired(n))
    assert await writer.flush(5.0)
    assert store.revision == 1
    assert (await store.get(SandboxPool, "pool-v1-web")).desired_instances == 49


async def test_conflict_rereads_and_keeps_the_other_writers_fields(
    writer: StateWriter, store: MemoryStore
) -> None:
    stored = await store.create(pool(owner="other-node"))
    writer.know(stored)
    await store.update(attrs.evolve(stored, referenced_by_versions=("v1", "v2")))  # moves on
    writer.put(SandboxPool, "pool-v1-web", set_desired(3))
    assert await writer.flush(5.0)
    now = await store.get(SandboxPool, "pool-v1-web")
    assert (now.desired_instances, now.referenced_by_versions, now.owner) == (
        3,
        ("v1", "v2"),
        "other-node",
    )


async def test_create_conflict_merges_onto_the_existing_entity(
    writer: StateWriter, store: MemoryStore
) -> None:
    await store.create(pool(owner="first"))
    writer.put(SandboxPool, "pool-v1-web", set_desired(2))
    assert await writer.flush(5.0)
    now = await store.get(SandboxPool, "pool-v1-web")
    assert (now.desired_instances, now.owner) == (2, "first")


async def test_an_entity_deleted_by_someone_else_is_not_recreated(
    writer: StateWriter, store: MemoryStore
) -> None:
    writer.put(SandboxPool, "pool-v1-web", set_desired(1))
    assert await writer.flush(5.0)
    await store.delete(SandboxPool, "pool-v1-web")  # e.g. the GC
    writer.put(SandboxPool, "pool-v1-web", set_desired(2))
    assert await writer.flush(5.0)
    assert await store.list(SandboxPool) == []


async def test_outage_is_retried_until_written(writer: StateWriter, store: MemoryStore) -> None:
    store.unavailable = True
    writer.put(SandboxPool, "pool-v1-web", set_desired(1))
    assert not await writer.flush(0.3)  # still pending: the store is down
    assert "failures=" in repr(writer) and "failures=0" not in repr(writer)
    store.unavailable = False
    assert await writer.flush(10.0)
    assert (await store.get(SandboxPool, "pool-v1-web")).desired_instances == 1


async def test_delete_wins_over_an_earlier_put(writer: StateWriter, store: MemoryStore) -> None:
    await store.create(pool())
    writer.put(SandboxPool, "pool-v1-web", set_desired(5))
    writer.delete(SandboxPool, "pool-v1-web")
    writer.delete(SandboxPool, "pool-absent")  # deleting what is not there is fine
    assert await writer.flush(5.0)
    assert await store.list(SandboxPool) == []


async def test_marks_after_close_are_dropped(store: MemoryStore) -> None:
    w = StateWriter(store)
    w.start()
    await w.close(1.0)
    w.put(SandboxPool, "pool-v1-web", set_desired(1))
    assert await w.flush(0.1)
    assert await store.list(SandboxPool) == []
