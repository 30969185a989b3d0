"""Pool and sandbox records in the store, written off the request path.

The store holds one `SandboxPool` entity per pool (id `pool-<version id>-<service>`, created by
the first node that needs it, shared by every node) and one `Sandbox` entity per sandbox of
this node, recent ended ones included. `Recorder` builds them from the in-memory records
(`pools.py`); they are written on state changes only, never per request: `last_activity` is
kept in memory and written at most every `activity_persist_interval` (30 s, by the sweep).

The StateWriter. The activator marks an entity dirty (`put`) or gone (`delete`) on a state
change; one background task writes the latest wish per entity, in order of marking. So:
- no request ever waits on the store (a store outage delays the record, not the traffic);
- a burst of changes to one entity coalesces into one write of its latest state;
- a write that fails with StoreUnavailable is retried with back-off (0.1 s doubling to 5 s),
  unless a newer wish for that entity replaced it meanwhile.

Writes are optimistic like every store write: `put` carries a `build(current)` function that
returns the entity to store given the stored one (None when absent), so a pool written by two
nodes keeps the other's fields. A Conflict re-reads and rebuilds (at most 5 times). An entity
someone else deleted is never re-created by an update (the GC owns deletions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import attrs

from miren_activator.clock import Clock, wall_of
from miren_activator.errors import PoolCreationFailed
from miren_activator.policy import CrashState, PoolParams, pool_id_for
from miren_activator.pools import PoolRecord, SandboxRecord
from miren_store.entities import AppVersion, Sandbox, SandboxPool
from miren_store.errors import Conflict, NotFound, StoreError, StoreUnavailable
from miren_store.store import Store

log = logging.getLogger("miren.activator")

Key = tuple[str, str]  # (kind name, id)
Build = Callable[[Any | None], Any]

_MAX_CONFLICTS = 5
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0


@attrs.frozen
class _Wish:
    kind: type[Any]
    id: str
    build: Build | None  # None: delete


class StateWriter:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[Key, _Wish] = {}
        self._known: dict[Key, Any] = {}  # last stored version (with its revision)
        self._gone: set[Key] = set()  # deleted by someone else: never re-create by update
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = False
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<StateWriter pending={len(self._pending)} known={len(self._known)} "
            f"failures={self._failures}>"
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="miren-activator-writer"
            )

    def know(self, entity: Any) -> None:
        """Record an entity the caller wrote or read itself (so updates carry its revision)."""
        key = (entity.KIND, entity.id)
        self._known[key] = entity
        self._gone.discard(key)

    def put(self, kind: type[Any], id: str, build: Build) -> None:
        self._mark(_Wish(kind, id, build))

    def delete(self, kind: type[Any], id: str) -> None:
        self._mark(_Wish(kind, id, None))

    def _mark(self, wish: _Wish) -> None:
        if self._closed:
            return  # after close: nothing will write it
        key = (wish.kind.KIND, wish.id)
        self._pending.pop(key, None)  # re-insert: written after the ones marked before it
        self._pending[key] = wish
        self._idle.clear()
        self._wake.set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything marked so far is written (or given up); False on timeout."""
        if self._task is None:
            return not self._pending  # not running: nothing will change
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> None:
        """Write what is pending for at most `timeout` seconds, then stop."""
        if self._task is None:
            self._closed = True
            return
        await self.flush(timeout)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        finally:
            self._task = None
            self._closed = True

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            key = next(iter(self._pending))
            wish = self._pending.pop(key)
            try:
                await self._write(key, wish)
            except StoreUnavailable as exc:
                if key not in self._pending:
                    self._pending[key] = wish
                self._failures += 1
                delay = min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** min(self._failures - 1, 10))
                log.warning(
                    "store unavailable writing %s %s (%s); retry in %.1fs", *key, exc, delay
                )
                await asyncio.sleep(delay)
            except StoreError as exc:
                log.error("giving up writing %s %s: %s", key[0], key[1], exc)
            except Exception:
                log.exception("bug writing %s %s", key[0], key[1])
            else:
                self._failures = 0

    async def _write(self, key: Key, wish: _Wish) -> None:
        if wish.build is None:
            self._known.pop(key, None)
            with contextlib.suppress(NotFound):
                await self._store.delete(wish.kind, wish.id)
            return
        if key in self._gone:
            return
        cur = self._known.get(key)
        for _ in range(_MAX_CONFLICTS):
            if cur is None:
                try:
                    self._known[key] = await self._store.create(wish.build(None))
                    return
                except Conflict:
                    cur = await self._read(wish.kind, wish.id)
                    continue
            new = attrs.evolve(wish.build(cur), revision=cur.revision)
            try:
                self._known[key] = await self._store.update(new)
                return
            except Conflict:
                cur = await self._read(wish.kind, wish.id)
                if cur is None:
                    self._forget(key)
                    return
            except NotFound:
                self._forget(key)
                return
        raise Conflict(f"{key[0]} {key[1]}: still conflicting after {_MAX_CONFLICTS} attempts")

    def _forget(self, key: Key) -> None:
        self._known.pop(key, None)
        self._gone.add(key)

    async def _read(self, kind: type[Any], id: str) -> Any | None:
        try:
            return await self._store.get(kind, id)
        except NotFound:
            return None


# -- the activator's records ------------------------------------------------------------------


def new_pool_entity(version: AppVersion, service: str, *, node: str, clock: Clock) -> SandboxPool:
    """The pool entity of (version, service) as its first creator writes it."""
    params = PoolParams.for_version(version, service)
    return SandboxPool(
        id=pool_id_for(version.id, service),
        app=version.app,
        service=service,
        spec=version.spec,
        ephemeral=version.is_ephemeral,
        referenced_by_versions=(version.id,),
        desired_instances=params.min_instances,
        owner=node,
        created_at=clock.now(),
    )


def crash_from_entity(entity: SandboxPool, clock: Clock) -> CrashState:
    """The crash state a pool entity records (a restarted node honours a back-off recorded
    before it went down)."""
    until = None
    if entity.cooldown_until is not None:
        left = (entity.cooldown_until - clock.now()).total_seconds()
        if left > 0:
            until = clock.monotonic() + left
    return CrashState(consecutive=entity.consecutive_crashes, cooldown_until=until)


class Recorder:
    """The store side of the activator: builds pool and sandbox entities from the in-memory
    records and hands them to a `StateWriter`."""

    def __init__(self, store: Store, *, node: str, clock: Clock) -> None:
        self._store = store
        self._node = node
        self._clock = clock
        self._writer = StateWriter(store)

    def __repr__(self) -> str:
        return f"<Recorder node={self._node} {self._writer!r}>"

    def start(self) -> None:
        self._writer.start()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every change recorded so far is written (False on timeout)."""
        return await self._writer.flush(timeout)

    async def close(self, timeout: float) -> None:
        await self._writer.close(timeout)

    async def create_pool(self, fresh: SandboxPool) -> tuple[SandboxPool, bool]:
        """Create `fresh` or read the one someone (maybe another node) created first: (the
        stored entity, whether this call created it). Raises StoreError, or PoolCreationFailed
        when it keeps disappearing (deleted concurrently)."""
        for _ in range(3):
            try:
                stored = await self._store.create(fresh)
                created = True
            except Conflict:
                try:
                    stored = await self._store.get(SandboxPool, fresh.id)
                except NotFound:
                    continue  # deleted between our create and get: try again
                created = False
            self._writer.know(stored)
            return stored, created
        raise PoolCreationFailed(f"pool {fresh.id} keeps disappearing (deleted concurrently)")

    def know(self, entity: SandboxPool) -> None:
        """A pool entity this node wrote itself (a takeover): later updates start from it."""
        self._writer.know(entity)

    def pool(self, pool: PoolRecord) -> None:
        """Record the pool's desired count and crash state (a removed pool is its owner's)."""
        if pool.removed:
            return
        desired = len(pool.live)
        crash = pool.crash
        cooldown = None
        if crash.cooldown_until is not None and crash.remaining(self._clock.monotonic()) > 0:
            cooldown = wall_of(self._clock, crash.cooldown_until)
        last_crash = pool.entity.last_crash_at
        if crash.consecutive > pool.entity.consecutive_crashes:
            last_crash = self._clock.now()

        def build(cur: SandboxPool | None) -> SandboxPool:
            base = cur if cur is not None else pool.entity
            return attrs.evolve(
                base,
                desired_instances=desired,
                consecutive_crashes=crash.consecutive,
                last_crash_at=last_crash,
                cooldown_until=cooldown,
            )

        pool.entity = build(pool.entity)
        self._writer.put(SandboxPool, pool.id, build)

    def sandbox(self, sb: SandboxRecord) -> None:
        """Record the sandbox as it is now."""
        entity = self.sandbox_entity(sb)
        self._writer.put(Sandbox, sb.id, lambda _cur: entity)

    def forget(self, sandbox_id: str) -> None:
        """Delete a sandbox's entity."""
        self._writer.delete(Sandbox, sandbox_id)

    def sandbox_entity(self, sb: SandboxRecord) -> Sandbox:
        return Sandbox(
            id=sb.id,
            pool=sb.pool.id,
            app=sb.pool.version.app,
            version=sb.pool.version.id,
            node=self._node,
            status=sb.state,
            url=sb.url,
            pid=sb.pid,
            started_at=sb.started_at,
            last_activity=wall_of(self._clock, sb.last_used),
            reason=sb.error,
        )

    async def forget_stale(self, known: Callable[[str], bool]) -> None:
        """Delete the sandbox entities of this node that `known` does not know: sandboxes it
        recorded before a restart died with it (PR_SET_PDEATHSIG)."""
        try:
            stale = [s for s in await self._store.list(Sandbox) if s.node == self._node]
        except StoreError as exc:
            log.warning("could not list stale sandboxes: %s", exc)
            return
        for s in stale:
            if not known(s.id):
                self._writer.delete(Sandbox, s.id)
