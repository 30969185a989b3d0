"""A Store wrapper that injects StoreUnavailable on chosen calls (faults we cannot cause for real
at a precise step: "the third list", "the commit that deletes a pool").

It delegates every call to a real store. `race(...)` runs another writer's action just before a
matching call is delegated, to lose a revision race at a precise point. A `Fault` matches calls by op name, kind and an optional
predicate over the call; it lets `skip` matching calls through, then fails the next `times`
(None: all of them). `applied=True` fails *after* delegating, as a write that reached the server
but whose answer was lost (a timed-out etcd transaction).
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import attrs

from miren_store.entities import E
from miren_store.errors import StoreUnavailable
from miren_store.store import Change, Create, Delete, Op, Snapshot, Store, Update


@attrs.frozen
class Call:
    """One store call as a fault sees it."""

    op: str  # get, create, update, delete, list, range, commit, snapshot
    kind: type[Any] | None
    id: str | None = None
    where: dict[str, object] = attrs.field(factory=dict)
    ops: tuple[Op, ...] = ()

    def writes(self, kind: type[Any], *, deletes: bool | None = None) -> bool:
        """True if this commit writes an entity of `kind` (only deletions / only puts)."""
        for o in self.ops:
            if isinstance(o, Delete) and o.kind is kind and deletes in (None, True):
                return True
            if (
                isinstance(o, Create | Update)
                and type(o.entity) is kind
                and deletes in (None, False)
            ):
                return True
        return False


@attrs.define
class Fault:
    op: str | None = None
    kind: type[Any] | None = None
    when: Callable[[Call], bool] | None = None
    skip: int = 0
    times: int | None = 1
    applied: bool = False
    hits: int = 0  # calls that matched
    fired: int = 0  # failures injected

    def matches(self, call: Call) -> bool:
        if self.op is not None and call.op != self.op:
            return False
        if self.kind is not None and call.kind is not self.kind:
            return False
        return self.when is None or self.when(call)

    def should_fire(self, call: Call) -> bool:
        if not self.matches(call):
            return False
        self.hits += 1
        if self.hits <= self.skip:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class FaultyStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.faults: list[Fault] = []
        self.races: list[tuple[Fault, Callable[[], Awaitable[object]]]] = []
        self.calls: list[Call] = []

    def __repr__(self) -> str:
        return (
            f"<FaultyStore faults={len(self.faults)} calls={len(self.calls)} inner={self.inner!r}>"
        )

    def fail(
        self,
        op: str | None = None,
        kind: type[Any] | None = None,
        *,
        when: Callable[[Call], bool] | None = None,
        skip: int = 0,
        times: int | None = 1,
        applied: bool = False,
    ) -> Fault:
        fault = Fault(op=op, kind=kind, when=when, skip=skip, times=times, applied=applied)
        self.faults.append(fault)
        return fault

    def race(
        self,
        action: Callable[[], Awaitable[object]],
        op: str | None = None,
        kind: type[Any] | None = None,
        *,
        when: Callable[[Call], bool] | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Run `action` (on the inner store) just before the next `times` matching calls."""
        trigger = Fault(op=op, kind=kind, when=when, times=times)
        self.races.append((trigger, action))
        return trigger

    def clear(self) -> None:
        self.faults.clear()
        self.races.clear()

    async def _call(self, call: Call, run: Callable[[], Any]) -> Any:
        self.calls.append(call)
        for trigger, action in self.races:
            if trigger.should_fire(call):
                await action()
        firing = [f for f in self.faults if f.should_fire(call)]
        if firing and not any(f.applied for f in firing):
            raise StoreUnavailable(f"injected fault: {call.op} {_kind_name(call.kind)}")
        result = await run()
        if firing:
            raise StoreUnavailable(f"injected fault after apply: {call.op} {_kind_name(call.kind)}")
        return result

    @property
    def healthy(self) -> bool:
        return self.inner.healthy

    async def get(self, kind: type[E], id: str) -> E:
        found: E = await self._call(Call("get", kind, id), lambda: self.inner.get(kind, id))
        return found

    async def create(self, entity: E) -> E:
        call = Call("create", type(entity), entity.id, ops=(Create(entity),))
        made: E = await self._call(call, lambda: self.inner.create(entity))
        return made

    async def update(self, entity: E) -> E:
        call = Call("update", type(entity), entity.id, ops=(Update(entity),))
        made: E = await self._call(call, lambda: self.inner.update(entity))
        return made

    async def delete(self, kind: type[Any], id: str, *, revision: int | None = None) -> None:
        call = Call("delete", kind, id, ops=(Delete(kind, id, revision),))
        await self._call(call, lambda: self.inner.delete(kind, id, revision=revision))

    async def list(self, kind: type[E], **where: object) -> builtins.list[E]:
        found: builtins.list[E] = await self._call(
            Call("list", kind, where=dict(where)), lambda: self.inner.list(kind, **where)
        )
        return found

    async def range(
        self,
        kind: type[E],
        field: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[E]:
        found: builtins.list[E] = await self._call(
            Call("range", kind, where={"field": field}),
            lambda: self.inner.range(kind, field, start=start, end=end, limit=limit),
        )
        return found

    async def commit(self, ops: Sequence[Op]) -> int:
        rev: int = await self._call(
            Call("commit", None, ops=tuple(ops)), lambda: self.inner.commit(ops)
        )
        return rev

    async def snapshot(self, kinds: Sequence[type[Any]]) -> Snapshot:
        snap: Snapshot = await self._call(
            Call("snapshot", None), lambda: self.inner.snapshot(kinds)
        )
        return snap

    def watch(self, since: int) -> AsyncIterator[Change]:
        return self.inner.watch(since)

    async def grant_lease(self, ttl: int) -> int:
        lease: int = await self._call(
            Call("grant_lease", None), lambda: self.inner.grant_lease(ttl)
        )
        return lease

    async def keep_alive(self, lease: int) -> int:
        ttl: int = await self._call(Call("keep_alive", None), lambda: self.inner.keep_alive(lease))
        return ttl

    async def revoke_lease(self, lease: int) -> None:
        await self._call(Call("revoke_lease", None), lambda: self.inner.revoke_lease(lease))

    @property
    def shared(self) -> bool:
        return self.inner.shared

    async def close(self) -> None:
        await self.inner.close()


def _kind_name(kind: type[Any] | None) -> str:
    return getattr(kind, "KIND", "") if kind is not None else ""
