"""One contract, two backends: every test here runs on the memory store and on a real etcd."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import App, AppVersion, Runtime, SandboxPool, VersionSpec
from miren_store.errors import Conflict, InvalidQuery, NotFound
from miren_store.memory import MemoryStore
from miren_store.store import Change, Check, Create, Delete, Store, Update

SPEC = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def version(
    id: str, app: str = "a", label: str = "", expires: datetime | None = None
) -> AppVersion:
    return AppVersion(
        id=id, app=app, spec=SPEC, ephemeral_label=label, ephemeral_expires_at=expires
    )


async def open_backend(name: str, tmp_path: Path) -> tuple[Store, EmbeddedEtcd | None]:
    if name == "memory":
        return MemoryStore(), None
    from miren_store.backends import open_store

    etcd = EmbeddedEtcd(data_dir=tmp_path / "etcd")
    await etcd.start()
    try:
        return open_store(etcd.url, prefix=f"/t{random.randrange(1 << 30)}"), etcd
    except BaseException:
        await etcd.stop()
        raise


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    st_, etcd = await open_backend(request.param, tmp_path)
    try:
        yield st_
    finally:
        await st_.close()
        if etcd is not None:
            await etcd.stop()


# -- single-entity semantics --------------------------------------------------------------------


async def test_create_get_roundtrip_carries_revision(store: Store) -> None:
    made = await store.create(version("v1", label="pr-1", expires=T0))
    assert made.revision > 0
    got = await store.get(AppVersion, "v1")
    assert got == made
    assert got.revision == made.revision


async def test_create_twice_is_conflict(store: Store) -> None:
    await store.create(App(name="a"))
    with pytest.raises(Conflict):
        await store.create(App(name="a"))


async def test_update_with_stale_revision_is_conflict(store: Store) -> None:
    first = await store.create(App(name="a"))
    second = await store.update(attrs.evolve(first, active_version="v1"))
    assert second.revision > first.revision
    with pytest.raises(Conflict):
        await store.update(attrs.evolve(first, active_version="v2"))
    assert (await store.get(App, "a")).active_version == "v1"


async def test_update_or_checked_delete_of_deleted_entity_is_not_found(store: Store) -> None:
    made = await store.create(App(name="a"))
    await store.delete(App, "a", revision=made.revision)
    with pytest.raises(NotFound):
        await store.update(attrs.evolve(made, active_version="v1"))
    with pytest.raises(NotFound):
        await store.delete(App, "a", revision=made.revision)
    with pytest.raises(NotFound):
        await store.get(App, "a")


async def test_checked_delete_of_changed_entity_is_conflict(store: Store) -> None:
    made = await store.create(App(name="a"))
    await store.update(attrs.evolve(made, active_version="v1"))
    with pytest.raises(Conflict):
        await store.delete(App, "a", revision=made.revision)
    await store.delete(App, "a")
    with pytest.raises(NotFound):
        await store.get(App, "a")


async def test_concurrent_read_modify_write_increments_lose_nothing(store: Store) -> None:
    await store.create(SandboxPool(id="p", app="a", spec=SPEC, referenced_by_versions=("v",)))

    async def increment() -> None:
        while True:
            cur = await store.get(SandboxPool, "p")
            try:
                await store.update(attrs.evolve(cur, desired_instances=cur.desired_instances + 1))
                return
            except Conflict:
                continue

    await asyncio.gather(*(increment() for _ in range(50)))
    assert (await store.get(SandboxPool, "p")).desired_instances == 50


async def test_list_on_unindexed_field_is_refused(store: Store) -> None:
    with pytest.raises(InvalidQuery):
        await store.list(AppVersion, ephemeral_ttl="1h")
    with pytest.raises(InvalidQuery):
        await store.range(AppVersion, "created_at")


async def test_list_matches_tuple_members(store: Store) -> None:
    await store.create(
        SandboxPool(id="p1", app="a", spec=SPEC, referenced_by_versions=("v1", "v2"))
    )
    await store.create(SandboxPool(id="p2", app="a", spec=SPEC, referenced_by_versions=("v2",)))
    assert [p.id for p in await store.list(SandboxPool, referenced_by_versions="v2")] == [
        "p1",
        "p2",
    ]
    assert [p.id for p in await store.list(SandboxPool, referenced_by_versions="v1")] == ["p1"]
    assert [p.id for p in await store.list(SandboxPool, app="a", referenced_by_versions="v1")] == [
        "p1"
    ]


async def test_range_is_ordered_and_half_open(store: Store) -> None:
    for i in (3, 1, 2):
        await store.create(version(f"v{i}", label=f"l{i}", expires=T0 + timedelta(hours=i)))
    await store.create(version("plain"))
    got = await store.range(AppVersion, "ephemeral_expires_at", end=T0 + timedelta(hours=3))
    assert [v.id for v in got] == ["v1", "v2"]
    got = await store.range(AppVersion, "ephemeral_expires_at", start=T0 + timedelta(hours=2))
    assert [v.id for v in got] == ["v2", "v3"]
    got = await store.range(AppVersion, "ephemeral_expires_at", limit=1)
    assert [v.id for v in got] == ["v1"]


# -- multi-key commit -----------------------------------------------------------------------------


async def test_commit_applies_all_ops_at_one_revision(store: Store) -> None:
    app = await store.create(App(name="a"))
    rev = await store.commit(
        [
            Create(version("v1")),
            Update(attrs.evolve(app, active_version="v1")),
            Check(AppVersion, "v2", 0),
        ]
    )
    assert (await store.get(App, "a")).revision == rev
    assert (await store.get(AppVersion, "v1")).revision == rev


async def test_commit_create_with_check_on_existing_entity(store: Store) -> None:
    app = await store.create(App(name="a"))
    rev = await store.commit([Create(version("v1")), Check(App, "a", app.revision)])
    assert (await store.get(AppVersion, "v1")).revision == rev
    with pytest.raises(Conflict):
        await store.commit([Create(version("v2")), Check(App, "a", app.revision + 1000)])
    with pytest.raises(NotFound):
        await store.get(AppVersion, "v2")


@pytest.mark.parametrize("failing", ["stale-update", "exists", "check", "missing-delete"])
async def test_commit_whose_condition_fails_changes_nothing(store: Store, failing: str) -> None:
    app = await store.create(App(name="a"))
    old = await store.create(version("old", label="x"))
    await store.update(attrs.evolve(app, active_version="old"))  # makes `app` stale
    fresh_app = await store.get(App, "a")
    before = await store.snapshot([App, AppVersion])
    ops: list[Any] = [Create(version("new", label="x")), Delete(AppVersion, "old", old.revision)]
    if failing == "stale-update":
        ops.append(Update(attrs.evolve(app, active_version="new")))
    elif failing == "exists":
        ops.append(Create(App(name="a")))
    elif failing == "check":
        ops.append(Check(App, "a", fresh_app.revision + 1000))
    else:
        ops.append(Delete(AppVersion, "ghost"))
    with pytest.raises((Conflict, NotFound)):
        await store.commit(ops)
    after = await store.snapshot([App, AppVersion])
    assert after.revision == before.revision
    assert after.entities == before.entities
    assert [v.id for v in await store.list(AppVersion, ephemeral_label="x")] == ["old"]


# -- watch ------------------------------------------------------------------------------------------


async def _collect(store: Store, since: int, n: int) -> list[Change]:
    out: list[Change] = []
    agen = store.watch(since)
    try:
        async with asyncio.timeout(10):
            async for change in agen:
                out.append(change)
                if len(out) == n:
                    break
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
    return out


async def test_watch_from_revision_yields_each_later_change_once_in_order(store: Store) -> None:
    await store.create(App(name="before"))
    start = (await store.snapshot([App])).revision
    expected: list[tuple[str, int, bool]] = []
    a = await store.create(App(name="a"))
    expected.append(("a", a.revision, False))
    a2 = await store.update(attrs.evolve(a, active_version="v"))
    expected.append(("a", a2.revision, False))
    rev = await store.commit([Create(App(name="b")), Delete(App, "before")])
    expected += [("b", rev, False), ("before", rev, True)]
    await store.delete(App, "a")
    expected.append(("a", rev + 1, True))

    seen = await _collect(store, start, len(expected))
    got = [(c.id, c.revision, c.deleted) for c in seen]
    # Within one commit the order of keys is the backend's; across revisions it is strict.
    assert sorted(got) == sorted(expected)
    assert [r for _, r, _ in got] == sorted(r for _, r, _ in got)
    assert seen[1].entity is not None and seen[1].entity.active_version == "v"


async def test_watch_started_before_writes_sees_concurrent_writes(store: Store) -> None:
    start = (await store.snapshot([App])).revision
    task = asyncio.create_task(_collect(store, start, 20))
    for i in range(20):
        await store.create(App(name=f"app{i:02d}"))
    seen = await task
    assert [c.id for c in seen] == [f"app{i:02d}" for i in range(20)]
    assert len({c.revision for c in seen}) == 20


# -- model-based: indexes always equal a plain-dict model ----------------------------------------------

LABELS = st.sampled_from(["", "", "pr-1", "pr-2", "feat"])
APPS = st.sampled_from(["a", "b", "c"])
IDS = st.sampled_from([f"v{i}" for i in range(8)])
EXPIRY = st.one_of(st.none(), st.integers(0, 48).map(lambda h: T0 + timedelta(hours=h)))


class IndexModel(RuleBasedStateMachine):
    """Random create / update (moving indexed fields) / delete; queries always equal the model."""

    backend = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model: dict[str, AppVersion] = {}
        self.tmp: Path | None = None
        self.etcd: EmbeddedEtcd | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize()
    def open(self) -> None:
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="miren-model-"))
        self.store, self.etcd = self.run(open_backend(self.backend, self.tmp))

    def teardown(self) -> None:
        try:
            if hasattr(self, "store"):
                self.run(self.store.close())
            if self.etcd is not None:
                self.run(self.etcd.stop())
        finally:
            self.loop.close()
            if self.tmp is not None:
                import shutil

                shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(id=IDS, app=APPS, label=LABELS, expires=EXPIRY)
    def create(self, id: str, app: str, label: str, expires: datetime | None) -> None:
        v = version(id, app, label, expires)
        if id in self.model:
            with pytest.raises(Conflict):
                self.run(self.store.create(v))
        else:
            self.model[id] = self.run(self.store.create(v))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), app=APPS, label=LABELS, expires=EXPIRY)
    def update(self, data: st.DataObject, app: str, label: str, expires: datetime | None) -> None:
        id = data.draw(st.sampled_from(sorted(self.model)))
        cur = self.model[id]
        new = attrs.evolve(cur, app=app, ephemeral_label=label, ephemeral_expires_at=expires)
        self.model[id] = self.run(self.store.update(new))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), checked=st.booleans())
    def delete(self, data: st.DataObject, checked: bool) -> None:
        id = data.draw(st.sampled_from(sorted(self.model)))
        rev = self.model[id].revision if checked else None
        self.run(self.store.delete(AppVersion, id, revision=rev))
        del self.model[id]

    @rule(id=IDS)
    def delete_missing_is_not_found(self, id: str) -> None:
        if id not in self.model:
            with pytest.raises(NotFound):
                self.run(self.store.delete(AppVersion, id))

    @invariant()
    def queries_match_model(self) -> None:
        if not hasattr(self, "store"):
            return
        vs = sorted(self.model.values(), key=lambda v: v.id)
        for app in ("a", "b", "c"):
            got = self.run(self.store.list(AppVersion, app=app))
            assert got == [v for v in vs if v.app == app]
        for label in ("", "pr-1", "pr-2", "feat"):
            got = self.run(self.store.list(AppVersion, ephemeral_label=label))
            assert got == [v for v in vs if v.ephemeral_label == label]
        got = self.run(self.store.list(AppVersion, app="a", ephemeral_label="pr-1"))
        assert got == [v for v in vs if v.app == "a" and v.ephemeral_label == "pr-1"]
        lo, hi = T0 + timedelta(hours=6), T0 + timedelta(hours=30)
        got = self.run(self.store.range(AppVersion, "ephemeral_expires_at", start=lo, end=hi))
        want = sorted(
            (
                v
                for v in vs
                if v.ephemeral_expires_at is not None and lo <= v.ephemeral_expires_at < hi
            ),
            key=lambda v: (v.ephemeral_expires_at, v.id),
        )
        assert got == want
        assert [v.revision for v in got] == [v.revision for v in want]


class MemoryIndexModel(IndexModel):
    backend = "memory"


class EtcdIndexModel(IndexModel):
    backend = "etcd"


_MODEL_SETTINGS = settings(
    max_examples=8,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)

# 8 runs x 40 steps = 320 steps per backend (the issue asks for at least 200).
TestMemoryIndexModel = _MODEL_SETTINGS(MemoryIndexModel).TestCase
TestEtcdIndexModel = pytest.mark.etcd(_MODEL_SETTINGS(EtcdIndexModel).TestCase)


async def test_put_creates_then_replaces_whatever_the_revision(store: Store) -> None:
    from miren_store.entities import TlsCertificate
    from miren_store.store import put

    first = TlsCertificate(name="a.test", chain_pem="c1", key_pem="k1", not_after=T0, serial="1")
    made = await put(store, first)
    assert made.revision > 0 and (await store.get(TlsCertificate, "a.test")).chain_pem == "c1"
    newer = TlsCertificate(name="a.test", chain_pem="c2", key_pem="k2", not_after=T0, serial="2")
    replaced = await put(store, newer)  # (revision 0: put reads the stored one's)
    assert replaced.revision > made.revision
    assert (await store.get(TlsCertificate, "a.test")).serial == "2"


# -- leases -------------------------------------------------------------------------------------


async def _gone(store: Store, kind: type[Any], id: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await store.get(kind, id)
        except NotFound:
            return
        assert loop.time() < deadline, f"{kind.KIND} {id} still there after {timeout} s"
        await asyncio.sleep(0.05)


async def test_an_entity_under_a_lease_goes_with_it_as_one_watch_change(store: Store) -> None:
    from miren_store.entities import Node

    start = (await store.snapshot([Node])).revision
    lease = await store.grant_lease(1)
    await store.commit([Create(Node(id="n1", advertise="127.0.0.1:1", lease=lease), lease=lease)])
    await store.create(Node(id="n2", advertise="127.0.0.1:2", lease=0))  # not leased
    assert await store.keep_alive(lease) >= 1
    await _gone(store, Node, "n1", 10.0)  # nobody renews it: it expires
    assert (await store.get(Node, "n2")).id == "n2"
    with pytest.raises(NotFound):
        await store.keep_alive(lease)
    seen: list[Change] = []
    async with asyncio.timeout(10):
        async for change in store.watch(start):
            seen.append(change)
            if change.deleted:
                break
    assert [(c.id, c.deleted) for c in seen] == [("n1", False), ("n2", False), ("n1", True)]


async def test_keep_alive_keeps_it_and_revoke_ends_it_now(store: Store) -> None:
    from miren_store.entities import Leader

    lease = await store.grant_lease(2)
    await store.commit([Create(Leader(id="gc", node="a", lease=lease), lease=lease)])
    loop = asyncio.get_running_loop()
    until = loop.time() + 4.5  # past two TTLs, renewed every 0.3 s
    while loop.time() < until:
        assert await store.keep_alive(lease) >= 1
        await asyncio.sleep(0.3)
    assert (await store.get(Leader, "gc")).node == "a"
    await store.revoke_lease(lease)
    with pytest.raises(NotFound):
        await store.get(Leader, "gc")
    await store.revoke_lease(lease)  # already gone: no error


async def test_creating_under_an_unknown_lease_is_not_found_and_writes_nothing(
    store: Store,
) -> None:
    from miren_store.entities import Leader

    lease = await store.grant_lease(5)
    await store.revoke_lease(lease)
    with pytest.raises(NotFound):
        await store.commit([Create(Leader(id="gc", node="a", lease=lease), lease=lease)])
    with pytest.raises(NotFound):
        await store.get(Leader, "gc")
