"""One owner per pool, decided from the store (miren_activator.cluster): the pure decision, then
two nodes' activators on one real etcd racing for a free pool, and a node that can no longer
prove its membership giving its pools up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from time import monotonic

import pytest

from miren_activator import Activator, ActivatorConfig
from miren_activator.cluster import (
    Membership,
    NodeNameTaken,
    Ownership,
    decide,
    takeover_check,
)
from miren_activator.errors import NotOwner
from miren_activator.policy import pool_id_for
from miren_activator.pools import RemoteRecord
from miren_store.backends import open_store
from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import Node, Sandbox, SandboxPool, SandboxStatus
from miren_store.memory import MemoryStore
from miren_store.store import Store
from tests.activator.conftest import make_version, pid_gone
from tests.faults import FaultyStore
from tests.support.poll import eventually

VERSION = make_version("web-v1", app="web")
LIVE = (SandboxStatus.PENDING, SandboxStatus.RUNNING)


POOL_ID = pool_id_for(VERSION.id, "web")


def pool(owner: str, lease: int) -> SandboxPool:
    return SandboxPool(id=POOL_ID, app="web", spec=VERSION.spec, owner=owner, owner_lease=lease)


ME = Node(id="a", advertise="10.0.0.1:80", lease=7)


@pytest.mark.parametrize(
    ("stored", "owner", "verdict"),
    [
        (pool("a", 7), ME, Ownership.LOCAL),
        (pool("b", 9), Node(id="b", advertise="10.0.0.2:80", lease=9), Ownership.REMOTE),
        (pool("b", 9), None, Ownership.FREE),  # b's lease expired: its Node is gone
        (
            pool("b", 9),
            Node(id="b", advertise="10.0.0.2:80", lease=10),
            Ownership.FREE,
        ),  # re-joined
        (pool("a", 6), ME, Ownership.FREE),  # this node's previous membership
        (pool("", 0), None, Ownership.FREE),  # written before there were owners
        (pool("b", 0), Node(id="b", advertise="10.0.0.2:80", lease=9), Ownership.FREE),
    ],
)
def test_who_serves_a_pool(stored: SandboxPool, owner: Node | None, verdict: Ownership) -> None:
    assert decide(stored, ME, owner) is verdict


def test_a_takeover_is_conditioned_on_the_old_owner_as_read() -> None:
    assert takeover_check(pool("b", 9), None).revision == 0  # still absent
    rejoined = Node(id="b", advertise="x:1", lease=10, revision=42)
    check = takeover_check(pool("b", 9), rejoined)
    assert (check.kind, check.id, check.revision) == (Node, "b", 42)


async def test_a_node_alone_on_the_memory_store_owns_everything() -> None:
    store = MemoryStore()
    m = Membership(store, name="solo", advertise="127.0.0.1:1")
    assert m.proven() and (await m.join()).lease == 0
    assert m.me().id == "solo"


@pytest.fixture
async def etcd_store(etcd_server: EmbeddedEtcd) -> AsyncIterator[Store]:
    store = open_store(etcd_server.url)
    try:
        yield store
    finally:
        await store.close()


async def member(store: Store, name: str, ttl: int = 5) -> Membership:
    """A joined membership, renewed in the background (a loaded machine cannot lapse it)."""
    m = Membership(store, name=name, advertise=f"127.0.0.{1 + len(name)}:80{len(name)}", ttl=ttl)
    await m.join()
    m.start()
    return m


async def with_peer(store: Store, m: Membership) -> Membership:
    """Another live member, in `m`'s view (as the watch would report it): `m` is not alone."""
    peer = await member(store, "peer")
    assert peer.node is not None
    m.node_changed("peer", peer.node)
    return peer


async def lapse(m: Membership) -> None:
    """Stop renewing and wait until the lease is no longer proven by time."""
    await m.stop_renewing()
    await eventually(lambda: monotonic() >= m.proven_until, 10, "the proof to run out")


async def test_two_nodes_race_for_a_free_pool_and_exactly_one_takes_it(
    etcd_store: Store, tmp_path: Path
) -> None:
    await etcd_store.create(VERSION)
    await etcd_store.create(pool("gone", 12345))  # its owner's lease is long gone
    ms = [await member(etcd_store, n) for n in ("a", "bb")]
    acts = [
        Activator(
            etcd_store, config=ActivatorConfig(node=m.name, log_dir=tmp_path / m.name), membership=m
        )
        for m in ms
    ]
    try:
        leases = await asyncio.gather(*(act.acquire(VERSION, timeout=20) for act in acts))
        local = [i for i, lease in enumerate(leases) if not lease.remote]
        assert len(local) == 1, leases
        winner = ms[local[0]]
        loser = leases[1 - local[0]]
        assert isinstance(loser.record, RemoteRecord)
        assert loser.record.owner == winner.name
        assert f"{loser.host}:{loser.port}" == winner.advertise  # forwarded to the winner
        entity = await etcd_store.get(SandboxPool, POOL_ID)
        assert winner.node is not None
        assert (entity.owner, entity.owner_lease) == (winner.name, winner.node.lease)
        for act, lease in zip(acts, leases, strict=True):
            act.release(lease)
    finally:
        for act in acts:
            await act.close(grace=2.0)
        for m in ms:
            await m.leave()


async def test_a_node_that_cannot_prove_its_membership_gives_its_pools_up(
    etcd_store: Store, tmp_path: Path
) -> None:
    await etcd_store.create(VERSION)
    m = await member(etcd_store, "a", ttl=2)
    peer = await with_peer(etcd_store, m)
    act = Activator(etcd_store, config=ActivatorConfig(node="a", log_dir=tmp_path), membership=m)
    try:
        lease = await act.acquire(VERSION, timeout=20)
        assert not lease.remote
        pid = lease.record.pid
        assert pid is not None
        act.release(lease)
        await lapse(m)
        assert not m.proven()
        with pytest.raises(NotOwner):
            await act.acquire(VERSION, timeout=5)
        assert act.snapshot(VERSION.id) is None  # fenced: the pool is dropped ...
        await eventually(lambda: pid_gone(pid), 10, "its sandbox to stop")  # ... and stopped
        await m.join()  # a new membership: the pool (its old one's) is taken back
        m.start()
        again = await act.acquire(VERSION, timeout=20)
        assert not again.remote and again.record.pid != pid
        entity = await etcd_store.get(SandboxPool, again.record.pool.entity.id)
        assert m.node is not None and entity.owner_lease == m.node.lease
        act.release(again)
    finally:
        await act.close(grace=2.0)
        await m.leave()
        await peer.leave()


async def test_a_node_alone_keeps_serving_when_it_cannot_renew(
    etcd_store: Store, tmp_path: Path
) -> None:
    """Nobody could take its pools over (an etcd outage must not stop a single edge): it
    serves on past its lease. Once another node is in its view, the lease rules again."""
    await etcd_store.create(VERSION)
    m = await member(etcd_store, "a", ttl=2)
    act = Activator(etcd_store, config=ActivatorConfig(node="a", log_dir=tmp_path), membership=m)
    try:
        first = await act.acquire(VERSION, timeout=20)
        act.release(first)
        await lapse(m)
        assert m.alone and m.proven() and m.check(monotonic())
        again = await act.acquire(VERSION, timeout=5)
        assert again.record is first.record  # the same sandbox, still served
        act.release(again)
        peer = await with_peer(etcd_store, m)
        try:
            assert not m.proven()
            with pytest.raises(NotOwner):
                await act.acquire(VERSION, timeout=5)
            assert act.snapshot(VERSION.id) is None
        finally:
            await peer.leave()
    finally:
        await act.close(grace=2.0)
        await m.leave()


async def test_a_pool_loaded_across_a_lapse_is_never_used(
    etcd_store: Store, tmp_path: Path
) -> None:
    """The pool's creation is slow (the store answers after the membership lapsed): the pool
    is not kept, no sandbox starts, the caller gets NotOwner."""
    await etcd_store.create(VERSION)
    m = await member(etcd_store, "a", ttl=2)
    peer = await with_peer(etcd_store, m)
    faulty = FaultyStore(etcd_store)
    faulty.race(lambda: lapse(m), op="create", kind=SandboxPool)
    act = Activator(faulty, config=ActivatorConfig(node="a", log_dir=tmp_path), membership=m)
    try:
        with pytest.raises(NotOwner):
            await act.acquire(VERSION, timeout=20)
        assert act.snapshot(VERSION.id) is None and act.sandboxes() == []
    finally:
        await act.close(grace=2.0)
        await m.leave()
        await peer.leave()


async def test_requests_queued_before_a_lapse_get_no_lease_after_it(
    etcd_store: Store, tmp_path: Path
) -> None:
    """A request waits for a boot (3 s); the membership lapses meanwhile: when the sandbox is
    up nobody is handed a lease on it, the waiter gets NotOwner, and no other sandbox starts
    (the pool wants one at all times, min_instances 1: the fenced pool is not refilled)."""
    slow = make_version("web-slow", app="web", env={"BOOT_DELAY_MS": "3000"}, min_instances=1)
    await etcd_store.create(slow)
    m = await member(etcd_store, "a", ttl=2)
    peer = await with_peer(etcd_store, m)
    act = Activator(etcd_store, config=ActivatorConfig(node="a", log_dir=tmp_path), membership=m)
    try:
        waiting = asyncio.ensure_future(act.acquire(slow, timeout=20))
        await eventually(lambda: act.snapshot(slow.id) is not None, 10, "the boot to start")
        await lapse(m)
        with pytest.raises(NotOwner):
            await waiting

        async def none_live() -> bool:  # (as recorded in the store: every sandbox it started)
            await act.flush(5)
            return all(s.status not in LIVE for s in await etcd_store.list(Sandbox))

        await eventually(none_live, 10, "no live sandbox (none started after the fence)")
    finally:
        await act.close(grace=2.0)
        await m.leave()
        await peer.leave()


async def test_a_second_live_node_with_the_same_name_is_refused(etcd_store: Store) -> None:
    first = await member(etcd_store, "a")
    try:
        twin = Membership(etcd_store, name="a", advertise="127.0.0.9:80", ttl=5)
        with pytest.raises(NodeNameTaken, match="node name 'a' is held by a live node at"):
            await twin.join(timeout=0.5)
        assert twin.node is None and first.proven()
    finally:
        await first.leave()


async def test_a_restart_takes_its_name_back_at_once(etcd_store: Store, tmp_path: Path) -> None:
    """A node killed without leaving (its Node still lives under its lease) starts again on the
    same data dir: it revokes its previous lease (recorded there) instead of waiting it out."""
    before = Membership(etcd_store, name="a", advertise="127.0.0.2:80", ttl=30,
                        state_dir=tmp_path)  # fmt: skip
    old = await before.join()
    after = Membership(etcd_store, name="a", advertise="127.0.0.2:80", ttl=30, state_dir=tmp_path)
    new = await after.join(timeout=1.0)  # (a wait for the 30 s lease would fail here)
    assert new.lease != old.lease and (await etcd_store.get(Node, "a")).lease == new.lease
    await after.leave()
