"""Several nodes on one store: membership under a lease, one owner per pool, one GC leader.

Theory of operation
-------------------
**Membership.** Each `miren serve` node writes a `Node` entity (its name, the address where other
nodes reach its proxy, its lease id) under a store lease of `ttl` seconds and renews the lease
every `ttl / 3`. A node that dies, freezes or loses the store stops renewing; the store deletes
its `Node` when the lease expires, and every node's watch sees it go. A lease id is a membership:
a node that lost its lease joins again under a new one.

**Proof.** A renewal sent at monotonic time t0 and answered keeps the lease alive until at least
t0 + ttl in the store's clock (the store restarts the TTL when it receives the renewal, after t0).
`proven_until` is that instant less a margin. Past it, this node can no longer prove it is a
member, so it must not act as an owner (fencing): the activator drops its own pools and takes no
new lease until the node has joined again. The proxy compares its clock with `proven_until` on
every request (one float compare), so a node resumed after a freeze is fenced before it serves
anything, whatever order the event loop runs its callbacks in.

**Ownership** (`decide`, pure). A `SandboxPool` names its owner node and the lease of the owner's
membership. The pool is this node's when both match this node's; another node's when that node
is live under that same lease (then requests are forwarded to it); otherwise it is free to take,
and the taker writes itself in one transaction conditioned on the old owner's `Node` being gone
or re-joined under another lease (`Check` at the revision read), so two nodes never both win.

**Leadership.** Jobs one node runs at a time (the expiry GC) are held by a `Leader` entity created
under the holder's lease: it goes with the holder's membership, and the next node to try takes
it. A node holds it only while its membership is proven.

A store that is not shared (the memory backend: one process) needs none of this: the node is
always proven and owns every pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from time import monotonic

import attrs

from miren_store.entities import Leader, Node, SandboxPool
from miren_store.errors import Conflict, NotFound, StoreError, StoreUnavailable
from miren_store.settings import setting
from miren_store.store import Check, Create, Store
from miren_store.tasks import cancel_and_wait

log = logging.getLogger("miren.cluster")

MARGIN = 0.2  # of the TTL: proven_until is this much before the store's earliest expiry
_RETRY = 0.5  # seconds between attempts while the store is unreachable


@attrs.frozen(kw_only=True)
class NodeConfig:
    """The `[node]` section (with `node.name`, which the activator keeps as `node`)."""

    advertise: str | None = attrs.field(
        default=None,
        metadata=setting(
            "host:port where the other nodes reach this node's proxy",
            shown="the listen address (the host name when it listens on all addresses)",
        ),
    )
    lease_ttl: int = attrs.field(
        default=10,
        metadata=setting(
            "membership lease (seconds): a node silent this long loses its pools to the others",
            minimum=2,
        ),
    )


class Ownership(enum.Enum):
    LOCAL = "local"  # this node's: run and lease its sandboxes
    REMOTE = "remote"  # a live node's: forward to it
    FREE = "free"  # its owner is gone (or re-joined since): take it over


def decide(pool: SandboxPool, me: Node, owner: Node | None) -> Ownership:
    """Who serves `pool`, given this node's membership `me` and the `Node` now stored under the
    pool's owner name (None: absent)."""
    if pool.owner == me.id and pool.owner_lease == me.lease:
        return Ownership.LOCAL
    if (
        owner is not None
        and owner.id != me.id
        and pool.owner_lease != 0
        and owner.lease == pool.owner_lease
    ):
        return Ownership.REMOTE
    return Ownership.FREE


def takeover_check(pool: SandboxPool, owner: Node | None) -> Check:
    """The condition a takeover commits under: the old owner's `Node` is still as read (absent,
    or re-joined under another lease)."""
    return Check(Node, pool.owner, 0 if owner is None else owner.revision)


class NotMember(Exception):
    """This node cannot prove its membership now (joining, or its lease lapsed)."""


class NodeNameTaken(StoreError):
    """Another live node registered under this node's name."""


class Membership:
    """This node's membership: join, renew, re-join, leave; its view of the live nodes."""

    def __init__(
        self,
        store: Store,
        *,
        name: str,
        advertise: str,
        ttl: int = 10,
        state_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.advertise = advertise
        self.ttl = ttl
        self.shared = store.shared
        self.node: Node | None = None  # this node's entity while it is a member
        # Monotonic instant until which the membership is proven (inf: a store of one process).
        self.proven_until = -math.inf if self.shared else math.inf
        self.nodes: dict[str, Node] = {}  # live nodes as the watch last showed them
        self.on_proven: list[Callable[[float], None]] = []  # called with each new proven_until
        self.on_lost: list[Callable[[], None]] = []  # membership lost (fence!)
        self.on_peer_gone: list[Callable[[Node], None]] = []  # a node left or re-joined
        # Memberships (leases) seen to end: a pool read as theirs just before the watch said
        # so must not be trusted afterwards (see Activator._create_pool).
        self.departed: set[int] = set()
        self._state = state_dir / "node-lease" if state_dir is not None else None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        lease = f"{self.node.lease:x}" if self.node is not None else "-"
        return f"<Membership {self.name} lease={lease} nodes={sorted(self.nodes)}>"

    # -- what the activator asks ---------------------------------------------------------------

    def proven(self, now: float | None = None) -> bool:
        """This node may act as an owner now: its lease is proven, or it is alone."""
        if (monotonic() if now is None else now) < self.proven_until:
            return True
        return self.node is not None and self.alone

    @property
    def alone(self) -> bool:
        """No other live node in this node's last view of the cluster. Then nobody could take
        its pools over, and an unrenewable lease (an etcd outage) does not fence it: a node
        alone keeps serving from what it has, as a single edge always did. (A node that joins
        while this one cannot reach etcd could take its pools over unseen: run two nodes or
        more, and they fence as the lease says.)"""
        return all(name == self.name for name in self.nodes)

    def fence_check(self, now: float) -> float:
        """The proxy's check once its clock passed the last `proven_until`: the next instant
        to check again (inf: fenced until the node has joined again)."""
        if self.check(now):
            return self.proven_until if now < self.proven_until else now + 1.0
        return math.inf

    def me(self) -> Node:
        """This node's entity, when its membership is proven now; else NotMember."""
        if not self.shared:
            if self.node is None:  # (one process: membership is a formality)
                self.node = Node(id=self.name, advertise=self.advertise, lease=0)
            return self.node
        node = self.node
        if node is None or not self.proven():
            raise NotMember(f"node {self.name} is not a proven cluster member right now")
        return node

    # -- the watch's news ----------------------------------------------------------------------

    def load(self, nodes: Mapping[str, Node]) -> None:
        """The live nodes after a re-list: every node that left or re-joined is reported."""
        before = self.nodes
        self.nodes = dict(nodes)
        for name, old in before.items():
            new = self.nodes.get(name)
            if new is None or new.lease != old.lease:
                self._peer_gone(old)

    def node_changed(self, name: str, node: Node | None) -> None:
        old = self.nodes.pop(name, None)
        if node is not None:
            self.nodes[name] = node
        if old is not None and (node is None or node.lease != old.lease):
            self._peer_gone(old)

    def _peer_gone(self, old: Node) -> None:
        self.departed.add(old.lease)
        for callback in self.on_peer_gone:
            try:
                callback(old)
            except Exception:
                log.exception("peer-gone listener failed")

    # -- join, renew, leave --------------------------------------------------------------------

    async def join(self, timeout: float | None = None) -> Node:
        """Register this node (waiting up to `timeout`, default 2 TTLs, for a previous
        incarnation of it to expire); NodeNameTaken when a live node holds the name."""
        if not self.shared:
            return self.me()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (2 * self.ttl + 1 if timeout is None else timeout)
        await self._revoke_previous()
        while True:
            sent = monotonic()
            lease = await self.store.grant_lease(self.ttl)
            node = Node(id=self.name, advertise=self.advertise, lease=lease)
            try:
                rev = await self.store.commit([Create(node, lease=lease)])
            except Conflict:
                with contextlib.suppress(StoreError):
                    await self.store.revoke_lease(lease)
                holder = await self._read(self.name)
                if loop.time() >= deadline:
                    where = holder.advertise if holder is not None else "?"
                    raise NodeNameTaken(
                        f"node name {self.name!r} is held by a live node at {where}: give this "
                        "node another node.name"
                    ) from None
                await asyncio.sleep(_RETRY)
                continue
            self.node = attrs.evolve(node, revision=rev)
            self.nodes[self.name] = self.node
            self._remember(lease)
            self._proven(sent + self.ttl * (1 - MARGIN))
            log.info("joined the cluster as %s (%s, lease %x)", self.name, self.advertise, lease)
            return self.node

    def start(self) -> None:
        """Renew the lease in the background (re-joining when it was lost)."""
        if self.shared and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="miren-membership"
            )

    async def stop_renewing(self) -> None:
        """Stop the background renewal (the lease then runs out by itself)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def leave(self) -> None:
        """Stop renewing and revoke the lease: this node's pools are free at once."""
        self._closed = True
        await self.stop_renewing()
        node, self.node = self.node, None
        if node is not None and self.shared:
            self.proven_until = -math.inf
            try:
                await self.store.revoke_lease(node.lease)
            except StoreError as exc:
                log.warning("could not revoke lease %x on leaving: %s", node.lease, exc)
            else:
                self._remember(0)

    async def _renew_loop(self) -> None:
        """Renew every ttl/3 counted from the last renewal sent; after a failure, again at once
        (with a short back-off), so one slow or failed round trip never costs the proof."""
        last = monotonic()
        failures = 0
        while not self._closed:
            node = self.node
            try:
                if node is None:
                    await self.join(timeout=math.inf)
                    last, failures = monotonic(), 0
                    continue
                if not failures:
                    await asyncio.sleep(max(0.0, last + self.ttl / 3 - monotonic()))
                sent = monotonic()
                ttl = await self.store.keep_alive(node.lease)
                if self.node is node:  # (not fenced meanwhile: a late answer proves nothing)
                    self._proven(sent + ttl * (1 - MARGIN))
                last, failures = sent, 0
            except NotFound:
                log.warning("node %s lost its lease: re-joining", self.name)
                self._lost()
            except StoreUnavailable as exc:
                failures += 1
                log.warning("cannot renew the node lease (attempt %d): %s", failures, exc)
                if not self.proven():
                    self._lost()
                await asyncio.sleep(min(_RETRY, 0.05 * 2**failures))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("membership renewal failed")
                failures += 1
                await asyncio.sleep(_RETRY)

    def check(self, now: float) -> bool:
        """The proxy's fence check (its clock passed `proven_until`): True when still proven;
        else the membership is lost now (listeners fence) and False."""
        if now < self.proven_until:
            return True
        if self.node is not None and self.alone:
            return True  # (see `alone`)
        if self.node is not None:
            log.warning("node %s: membership not proven since %.1fs: fencing", self.name,
                        now - self.proven_until)  # fmt: skip
            self._lost()
        return False

    def _lost(self) -> None:
        self.node = None
        self.proven_until = -math.inf
        for callback in self.on_lost:
            try:
                callback()
            except Exception:
                log.exception("membership-lost listener failed")

    def _proven(self, until: float) -> None:
        self.proven_until = until
        for callback in self.on_proven:
            callback(until)

    async def _read(self, name: str) -> Node | None:
        try:
            return await self.store.get(Node, name)
        except NotFound:
            return None

    # -- the previous incarnation's lease (a restart must not wait for it to expire) ----------

    async def _revoke_previous(self) -> None:
        if self._state is None:
            return
        try:
            previous = int(self._state.read_text().strip() or "0", 16)
        except (OSError, ValueError):
            return
        holder = await self._read(self.name)
        if previous and holder is not None and holder.lease == previous:
            log.info("revoking lease %x of this node's previous run", previous)
            await self.store.revoke_lease(previous)

    def _remember(self, lease: int) -> None:
        if self._state is None:
            return
        try:
            tmp = self._state.with_suffix(".tmp")
            tmp.write_text(f"{lease:x}\n")
            os.replace(tmp, self._state)
        except OSError as exc:
            log.warning("cannot record the node lease in %s: %s", self._state, exc)


class Leadership:
    """Holds the `Leader` entity of one job while this node's membership is proven."""

    def __init__(self, membership: Membership, job: str, *, interval: float | None = None) -> None:
        self.membership = membership
        self.job = job
        self.interval = interval if interval is not None else membership.ttl / 3
        self.held_lease = 0  # the lease under which this node holds it (0: not held)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Leadership {self.job} held={self.leading}>"

    @property
    def leading(self) -> bool:
        m = self.membership
        if not m.shared:
            return True
        node = m.node
        return node is not None and self.held_lease == node.lease and m.proven()

    def start(self) -> None:
        if self.membership.shared and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"miren-leader-{self.job}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def try_lead(self) -> bool:
        """One attempt: hold the job if it is free; True when this node holds it."""
        m = self.membership
        node = m.node
        if node is None or not m.proven():
            self.held_lease = 0
            return False
        store = m.store
        try:
            current = await store.get(Leader, self.job)
        except NotFound:
            current = None
        if current is None:
            try:
                await store.commit(
                    [Create(Leader(id=self.job, node=node.id, lease=node.lease), lease=node.lease)]
                )
            except Conflict:
                return False
            log.info("node %s now runs %s", node.id, self.job)
            current = Leader(id=self.job, node=node.id, lease=node.lease)
        self.held_lease = current.lease if current.node == node.id else 0
        return self.leading

    async def _loop(self) -> None:
        while True:
            try:
                await self.try_lead()
            except StoreError as exc:
                log.debug("leadership of %s: %s", self.job, exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("leadership of %s failed", self.job)
            await asyncio.sleep(self.interval)
