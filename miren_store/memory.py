"""The in-process store: a real backend with etcd's semantics, for tests and `--store memory`.

Values are kept as the same JSON the etcd backend writes and decoded on read, so both backends
round-trip entities identically. Each operation yields to the loop once before acting, as a
network round trip would, so races between tasks show up here as they would against etcd.
History for watches is kept up to `history` changes; a watch from an older revision gets Resync,
as etcd answers a compacted revision.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import attrs

from miren_store.codec import decode, encode
from miren_store.entities import (
    E,
    index_text,
    index_values,
    indexed_fields,
    ordered_fields,
    ordered_text,
)
from miren_store.errors import Conflict, NotFound, Resync, StoreUnavailable
from miren_store.store import (
    Change,
    Check,
    Create,
    Delete,
    Op,
    Snapshot,
    Store,
    StoreStats,
    Update,
    check_query,
    check_range,
)

_Key = tuple[str, str]  # (kind name, id)


@attrs.define
class _Lease:
    ttl: int
    deadline: float  # loop time
    keys: set[_Key] = attrs.Factory(set)
    timer: asyncio.TimerHandle | None = None


class MemoryStore(Store):
    def __init__(self, *, history: int = 100_000) -> None:
        self.stats = StoreStats()
        self._rev = 0
        self._data: dict[_Key, tuple[bytes, int]] = {}
        self._kinds: dict[str, type[Any]] = {}
        # (kind, field) -> index text -> ids
        self._index: dict[tuple[str, str], dict[str, set[str]]] = {}
        # (kind, field) -> sorted [(ordered text, id)]
        self._ordered: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._log: list[Change] = []
        self._log_revs: list[int] = []
        self._compacted = 0  # changes at or below this revision are gone from the log
        self._history = history
        self._changed = asyncio.Event()
        self._closed = False
        self.unavailable = False  # fault switch for tests: every call raises StoreUnavailable
        self._leases: dict[int, _Lease] = {}
        self._leased: dict[_Key, int] = {}  # entity -> the lease it lives under
        self._next_lease = 0x6D690000  # (any start: ids are opaque, like etcd's)

    def __repr__(self) -> str:
        return f"<MemoryStore rev={self._rev} entities={len(self._data)}>"

    @property
    def healthy(self) -> bool:
        return not self.unavailable

    @property
    def revision(self) -> int:
        return self._rev

    @property
    def shared(self) -> bool:
        return False

    async def _enter(self, op: str) -> None:
        await asyncio.sleep(0)
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self.unavailable:
            self.stats.record(op, "unavailable")
            raise StoreUnavailable("memory store switched unavailable")

    # -- reads ------------------------------------------------------------------------------

    def _read(self, kind: type[E], id: str) -> E:
        raw = self._data.get((kind.KIND, id))
        if raw is None:
            raise NotFound(f"{kind.KIND} {id!r} not found")
        return decode(kind, raw[0], raw[1])

    async def get(self, kind: type[E], id: str) -> E:
        await self._enter("get")
        try:
            found = self._read(kind, id)
        except NotFound:
            self.stats.record("get", "not_found")
            raise
        self.stats.record("get", "ok")
        return found

    async def list(self, kind: type[E], **where: object) -> builtins.list[E]:
        check_query(kind, where)
        await self._enter("list")
        self.stats.record("list", "ok")
        return self._list_now(kind, where)

    def _list_now(self, kind: type[E], where: dict[str, object]) -> builtins.list[E]:
        if not where:
            ids = sorted(i for (k, i) in self._data if k == kind.KIND)
        else:
            sets = [
                self._index.get((kind.KIND, f), {}).get(index_text(v), set())
                for f, v in where.items()
            ]
            ids = sorted(set.intersection(*sets)) if sets else []
        return [self._read(kind, i) for i in ids]

    async def range(
        self,
        kind: type[E],
        field: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[E]:
        check_range(kind, field)
        await self._enter("range")
        self.stats.record("range", "ok")
        rows = self._ordered.get((kind.KIND, field), [])
        lo = 0 if start is None else bisect.bisect_left(rows, (ordered_text(start), ""))
        hi = len(rows) if end is None else bisect.bisect_left(rows, (ordered_text(end), ""))
        picked = rows[lo:hi] if limit is None else rows[lo : min(hi, lo + limit)]
        return [self._read(kind, i) for _, i in picked]

    async def snapshot(self, kinds: Sequence[type[Any]]) -> Snapshot:
        await self._enter("snapshot")
        self.stats.record("snapshot", "ok")
        ents: builtins.list[Any] = []
        for kind in kinds:
            ents.extend(self._list_now(kind, {}))
        return Snapshot(revision=self._rev, entities=tuple(ents))

    # -- writes -----------------------------------------------------------------------------

    async def create(self, entity: E) -> E:
        rev = await self._write("create", [Create(entity)])
        return attrs.evolve(entity, revision=rev)  # type: ignore[misc]

    async def update(self, entity: E) -> E:
        rev = await self._write("update", [Update(entity)])
        return attrs.evolve(entity, revision=rev)  # type: ignore[misc]

    async def delete(self, kind: type[Any], id: str, *, revision: int | None = None) -> None:
        await self._write("delete", [Delete(kind, id, revision)])

    async def commit(self, ops: Sequence[Op]) -> int:
        return await self._write("commit", list(ops))

    async def _write(self, op: str, ops: builtins.list[Op]) -> int:
        await self._enter(op)
        try:
            self._check_all(ops)
        except Conflict:
            self.stats.record(op, "conflict")
            raise
        except NotFound:
            self.stats.record(op, "not_found")
            raise
        # All conditions hold: apply at one new revision (no await from here on).
        self._rev += 1
        rev = self._rev
        for o in ops:
            if isinstance(o, Create | Update):
                self._put(o.entity, rev)
                key = (o.entity.KIND, o.entity.id)
                self._detach(key)  # (etcd: a put without the lease detaches the key)
                if isinstance(o, Create) and o.lease:
                    self._leases[o.lease].keys.add(key)
                    self._leased[key] = o.lease
            elif isinstance(o, Delete):
                self._remove(o.kind, o.id, rev)
                self._detach((o.kind.KIND, o.id))
        self.stats.record(op, "ok")
        self._wake_watches()
        return rev

    def _wake_watches(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _detach(self, key: _Key) -> None:
        lease = self._leased.pop(key, None)
        if lease is not None and lease in self._leases:
            self._leases[lease].keys.discard(key)

    # -- leases -----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        await self._enter("grant_lease")
        self.stats.record("grant_lease", "ok")
        self._next_lease += 1
        lease = self._next_lease
        self._leases[lease] = _Lease(ttl=max(1, ttl), deadline=0.0)
        self._arm(lease)
        return lease

    async def keep_alive(self, lease: int) -> int:
        await self._enter("keep_alive")
        found = self._leases.get(lease)
        if found is None:
            self.stats.record("keep_alive", "not_found")
            raise NotFound(f"lease {lease:x} not found (expired or revoked)")
        self.stats.record("keep_alive", "ok")
        self._arm(lease)
        return found.ttl

    async def revoke_lease(self, lease: int) -> None:
        await self._enter("revoke_lease")
        self.stats.record("revoke_lease", "ok")
        self._end_lease(lease)

    def _arm(self, lease: int) -> None:
        found = self._leases[lease]
        loop = asyncio.get_running_loop()
        found.deadline = loop.time() + found.ttl
        if found.timer is not None:
            found.timer.cancel()
        found.timer = loop.call_at(found.deadline, self._expire, lease)

    def _expire(self, lease: int) -> None:
        found = self._leases.get(lease)
        if found is not None and found.deadline <= asyncio.get_running_loop().time():
            self._end_lease(lease)

    def _end_lease(self, lease: int) -> None:
        """Delete the lease's entities, all at one new revision (as etcd does)."""
        found = self._leases.pop(lease, None)
        if found is None:
            return
        if found.timer is not None:
            found.timer.cancel()
        if not found.keys or self._closed:
            return
        self._rev += 1
        for key in sorted(found.keys):
            self._leased.pop(key, None)
            if key in self._data:
                self._remove(self._kinds[key[0]], key[1], self._rev)
        self._wake_watches()

    def _check_all(self, ops: builtins.list[Op]) -> None:
        seen: set[_Key] = set()
        for o in ops:
            if isinstance(o, Create | Update):
                kind: type[Any] = type(o.entity)
                id = o.entity.id
            else:
                kind, id = o.kind, o.id
            key = (kind.KIND, id)
            if not isinstance(o, Check):
                if key in seen:
                    raise ValueError(f"commit writes {kind.KIND} {id!r} twice")
                seen.add(key)
            cur = self._data.get(key)
            cur_rev = cur[1] if cur else 0
            if isinstance(o, Create):
                if cur is not None:
                    raise Conflict(f"{kind.KIND} {id!r} already exists")
                if o.lease and o.lease not in self._leases:
                    raise NotFound(f"lease {o.lease:x} not found (expired or revoked)")
            elif isinstance(o, Update):
                if cur is None:
                    raise NotFound(f"{kind.KIND} {id!r} not found")
                if cur_rev != o.entity.revision:
                    raise Conflict(
                        f"{kind.KIND} {id!r} changed (revision {cur_rev}, "
                        f"expected {o.entity.revision})"
                    )
            elif isinstance(o, Delete):
                if cur is None:
                    raise NotFound(f"{kind.KIND} {id!r} not found")
                if o.revision is not None and cur_rev != o.revision:
                    raise Conflict(f"{kind.KIND} {id!r} changed (revision {cur_rev})")
            elif cur_rev != o.revision:
                if o.revision == 0:
                    raise Conflict(f"{kind.KIND} {id!r} already exists")
                if cur is None:
                    raise NotFound(f"{kind.KIND} {id!r} not found")
                raise Conflict(f"{kind.KIND} {id!r} changed (revision {cur_rev})")

    def _put(self, entity: Any, rev: int) -> None:
        kind = type(entity)
        self._kinds[kind.KIND] = kind
        key = (kind.KIND, entity.id)
        if key in self._data:
            self._unindex(kind, entity.id)
        self._data[key] = (encode(entity), rev)
        for f in indexed_fields(kind):
            idx = self._index.setdefault((kind.KIND, f), {})
            for v in index_values(entity, f):
                idx.setdefault(v, set()).add(entity.id)
        for f in ordered_fields(kind):
            value = getattr(entity, f)
            if value is not None:
                rows = self._ordered.setdefault((kind.KIND, f), [])
                bisect.insort(rows, (ordered_text(value), entity.id))
        self._append(Change(kind, entity.id, rev, attrs.evolve(entity, revision=rev)))

    def _remove(self, kind: type[Any], id: str, rev: int) -> None:
        self._unindex(kind, id)
        del self._data[(kind.KIND, id)]
        self._append(Change(kind, id, rev, None))

    def _unindex(self, kind: type[Any], id: str) -> None:
        old = self._read(kind, id)
        for f in indexed_fields(kind):
            idx = self._index.get((kind.KIND, f), {})
            for v in index_values(old, f):
                ids = idx.get(v)
                if ids is not None:
                    ids.discard(id)
                    if not ids:
                        del idx[v]
        for f in ordered_fields(kind):
            value = getattr(old, f)
            if value is not None:
                rows = self._ordered[(kind.KIND, f)]
                rows.pop(bisect.bisect_left(rows, (ordered_text(value), id)))

    def _append(self, change: Change) -> None:
        self._log.append(change)
        self._log_revs.append(change.revision)
        if len(self._log) > self._history:
            drop = len(self._log) - self._history
            self._compacted = self._log_revs[drop - 1]
            del self._log[:drop]
            del self._log_revs[:drop]

    def compact(self, revision: int) -> None:
        """Forget history up to `revision` (as etcd's compaction does)."""
        cut = bisect.bisect_right(self._log_revs, revision)
        del self._log[:cut]
        del self._log_revs[:cut]
        self._compacted = max(self._compacted, revision)

    # -- watch ------------------------------------------------------------------------------

    async def watch(self, since: int) -> AsyncIterator[Change]:
        pos = since
        while True:
            if self._closed:
                raise StoreUnavailable("store is closed")
            if pos < self._compacted:
                raise Resync(pos)
            i = bisect.bisect_right(self._log_revs, pos)
            if i < len(self._log):
                batch = self._log[i:]
                for change in batch:
                    yield change
                    pos = change.revision
                continue
            await self._changed.wait()

    async def close(self) -> None:
        self._closed = True
        for found in self._leases.values():
            if found.timer is not None:
                found.timer.cancel()
        self._changed.set()
