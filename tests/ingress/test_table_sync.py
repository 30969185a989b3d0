"""The route table follows the store: initial list, live changes, re-list on Resync, outages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from miren_ingress.routing.routes import NOT_LOADED, Resolved, RouteTable
from miren_ingress.routing.table_sync import TableSync
from miren_store.entities import App, AppVersion, HttpRoute, Runtime, VersionSpec
from miren_store.memory import MemoryStore
from tests.support.poll import eventually

SPEC = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))


def serves(t: RouteTable, host: str) -> str | None:
    r = t.resolve(host, datetime.now(UTC))
    return r.version.id if isinstance(r, Resolved) else None


@pytest.fixture
async def synced() -> AsyncIterator[tuple[MemoryStore, RouteTable, TableSync]]:
    store = MemoryStore(history=50)
    await store.create(App(name="a", active_version="a-1"))
    await store.create(AppVersion(id="a-1", app="a", spec=SPEC))
    await store.create(HttpRoute(host="a.example.com", app="a"))
    table = RouteTable()
    sync = TableSync(store, table, backoff=(0.01, 0.05))
    assert table.resolve("a.example.com", datetime.now(UTC)) == NOT_LOADED
    sync.start()
    try:
        assert await sync.wait_loaded(5)
        yield store, table, sync
    finally:
        await sync.stop()
        await store.close()


async def test_loads_then_follows_changes(
    synced: tuple[MemoryStore, RouteTable, TableSync],
) -> None:
    store, table, sync = synced
    assert serves(table, "a.example.com") == "a-1"
    await store.create(HttpRoute(host="b.example.com", app="a"))
    await eventually(lambda: serves(table, "b.example.com") == "a-1", 5.0)
    assert sync.watch_ok


async def test_relists_when_history_was_compacted(
    synced: tuple[MemoryStore, RouteTable, TableSync],
) -> None:
    store, table, sync = synced
    await eventually(lambda: sync.watch_ok, 5.0)
    await sync.stop()  # fall behind: changes happen while nobody watches
    for i in range(60):
        await store.create(HttpRoute(host=f"h{i}.example.com", app="a"))
    store.compact(store.revision)
    relists = sync.relists
    sync.start()
    await eventually(
        lambda: sync.relists > relists and serves(table, "h59.example.com") == "a-1", 5.0
    )
    assert len(table.routes) == 61


async def test_outage_keeps_serving_and_reports(
    synced: tuple[MemoryStore, RouteTable, TableSync],
) -> None:
    store, table, sync = synced
    await sync.stop()
    store.unavailable = True
    sync.start()
    await eventually(lambda: not sync.watch_ok and sync.last_error != "", 5.0)
    assert serves(table, "a.example.com") == "a-1"
    store.unavailable = False
    await store.create(HttpRoute(host="c.example.com", app="a"))
    await eventually(lambda: sync.watch_ok and serves(table, "c.example.com") == "a-1", 5.0)
