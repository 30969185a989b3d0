"""The Store interface: a small async entity store with revisions, indexes and a resumable watch.

Theory of operation
-------------------
One global, monotonically increasing revision numbers every write (etcd's revision; the memory
backend keeps its own counter). An entity read from the store carries the revision of its last
write. Writes are optimistic: `update` and revision-checked `delete` succeed only when the entity
is still at the revision the caller read (else `Conflict`; `NotFound` when it is gone). `commit`
applies several writes and checks atomically: all or nothing.

Secondary indexes are declared on the entity classes (`entities.py`). A backend maintains them in
the same atomic step as the entity, so an index never points at a missing or changed entity.

`snapshot` lists kinds at one revision R; `watch(since=R)` then yields every change with a revision
> R exactly once, in revision order (the informer pattern). When the backend can no longer resume
from `since` (history compacted) the watch raises `Resync`: list again and watch from there.

Leases (etcd's): `grant_lease(ttl)` returns a lease that lives `ttl` seconds unless renewed
with `keep_alive`; an entity created under it (`Create(entity, lease=...)`) is deleted, as one
watch change, when it expires or is revoked. Nodes register this way (miren_activator.cluster).

Every call is bounded by the backend's timeout and raises `StoreUnavailable` instead of hanging.
"""

from __future__ import annotations

import abc
import builtins
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import attrs

from miren_store.entities import E, indexed_fields, ordered_fields
from miren_store.errors import Conflict, InvalidQuery, NotFound


@attrs.frozen
class Create:
    """Create `entity`; the commit fails (Conflict) if it exists. With `lease` (from
    `Store.grant_lease`), the entity is deleted when the lease expires or is revoked (a later
    Update of it detaches it: leased entities are written once)."""

    entity: Any
    lease: int = 0


@attrs.frozen
class Update:
    """Replace `entity` if it is still at `entity.revision` (Conflict if not, NotFound if gone)."""

    entity: Any


@attrs.frozen
class Delete:
    """Delete an entity; with `revision`, only if it is still at that revision."""

    kind: type[Any]
    id: str
    revision: int | None = None


@attrs.frozen
class Check:
    """Condition only: the entity is at `revision` (0: it must not exist)."""

    kind: type[Any]
    id: str
    revision: int


Op = Create | Update | Delete | Check


@attrs.frozen
class Change:
    """One write seen by a watch. `entity` is None for a deletion."""

    kind: type[Any]
    id: str
    revision: int
    entity: Any | None

    @property
    def deleted(self) -> bool:
        return self.entity is None


@attrs.frozen
class Snapshot:
    """Entities listed at one revision: watch from `revision` to follow them."""

    revision: int
    entities: tuple[Any, ...]


@attrs.define
class StoreStats:
    """Operation counts by (op, result), for tests and the `miren_store_operations_total` metric."""

    counts: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    observer: Any = None  # optional callable(op, result), e.g. a Prometheus counter's inc

    def record(self, op: str, result: str) -> None:
        self.counts[(op, result)] += 1
        if self.observer is not None:
            self.observer(op, result)

    def total(self) -> int:
        return sum(self.counts.values())


class Store(abc.ABC):
    """The entity store. Backends: `MemoryStore`, `EtcdStore` (see `backends.open_store`)."""

    stats: StoreStats

    @abc.abstractmethod
    async def get(self, kind: type[E], id: str) -> E:
        """The entity, or NotFound."""

    @abc.abstractmethod
    async def create(self, entity: E) -> E:
        """Store a new entity; Conflict if one with its id exists. Returns it with its revision."""

    @abc.abstractmethod
    async def update(self, entity: E) -> E:
        """Replace the entity if still at `entity.revision`. Conflict if stale, NotFound if gone."""

    @abc.abstractmethod
    async def delete(self, kind: type[Any], id: str, *, revision: int | None = None) -> None:
        """Delete; NotFound if absent; with `revision`, Conflict if the entity moved on."""

    @abc.abstractmethod
    async def list(self, kind: type[E], **where: object) -> builtins.list[E]:
        """Entities of a kind, filtered by equality on indexed fields (all when no filter).

        Ordered by id. A tuple-valued indexed field matches when it contains the value.
        """

    @abc.abstractmethod
    async def range(
        self,
        kind: type[E],
        field: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[E]:
        """Entities whose ordered `field` is in [start, end), ascending (None values: absent)."""

    @abc.abstractmethod
    async def commit(self, ops: Sequence[Op]) -> int:
        """Apply all ops atomically, or none (Conflict / NotFound). Returns the new revision."""

    @abc.abstractmethod
    async def snapshot(self, kinds: Sequence[type[Any]]) -> Snapshot:
        """Every entity of `kinds`, consistent at one revision."""

    @abc.abstractmethod
    def watch(self, since: int) -> AsyncIterator[Change]:
        """Changes with revision > `since`, in order, each once; raises Resync when it cannot."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> int:
        """A new lease living `ttl` seconds (at least 1) unless renewed: its id."""

    @abc.abstractmethod
    async def keep_alive(self, lease: int) -> int:
        """Renew the lease for its whole TTL: the TTL, in seconds. NotFound once it expired."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """End the lease now, deleting its entities (no error if it is already gone)."""

    @property
    def shared(self) -> bool:
        """True when other processes may use the same data (etcd): then nodes must prove
        their membership by their lease. The memory store lives in one process."""
        return True

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False after the last call failed with StoreUnavailable (until one succeeds)."""

    @property
    def watch_healthy(self) -> bool:
        """False while a watch is cut off from the backend and retrying to resume."""
        return True


def check_query(kind: type[Any], where: dict[str, object]) -> None:
    """Refuse filters on fields that have no index (the backends would have to scan)."""
    allowed = indexed_fields(kind)
    for name in where:
        if name not in allowed:
            raise InvalidQuery(
                f"{kind.KIND}.{name} is not indexed (indexed: {', '.join(allowed) or 'none'})"
            )


def check_range(kind: type[Any], field: str) -> None:
    if field not in ordered_fields(kind):
        raise InvalidQuery(f"{kind.KIND}.{field} has no ordered index")


async def put(store: Store, entity: E, *, attempts: int = 5) -> E:
    """Create `entity`, or replace the stored one of the same id, whatever its revision (last
    writer wins); a race with another writer is retried. Raises Conflict after `attempts`."""
    kind = type(entity)
    ident = entity.id
    for _ in range(attempts):
        try:
            current = await store.get(kind, ident)
        except NotFound:
            try:
                return await store.create(entity)
            except Conflict:
                continue
        try:
            return await store.update(attrs.evolve(entity, revision=current.revision))  # type: ignore[misc]
        except (Conflict, NotFound):
            continue
    raise Conflict(f"{kind.__name__} {ident!r} kept changing under {attempts} attempts")
