"""Deleting versions together with their sandbox pools, in one atomic commit.

A pool is referenced by the versions that may use it (`SandboxPool.referenced_by_versions`,
indexed). Deleting versions D:
- a pool referenced only by versions in D is deleted (revision-checked, so a reference added
  meanwhile is not lost);
- a pool also referenced by other versions only loses the references to D (revision-checked
  update): a shared pool survives (reference R-8).

The pool operations, the version deletions and a check that the app does not point at any of the
versions go in ONE `commit`, so there is never a version without its pools cleaned nor a pool
deleted under a version that was kept: if listing the pools or any pool step fails, nothing
changes and the version is kept for the next attempt (reference R-2). Sandboxes are not deleted
here: the activator stops a pool's sandboxes when it sees the pool deleted.

`plan_pool_ops` is the pure part; `delete_version` does the I/O and retries on races with other
writers (re-reading what moved), never on a store failure.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable

import attrs

from miren_store.deploy.errors import ActiveVersion, CleanupFailed
from miren_store.entities import App, AppVersion, SandboxPool
from miren_store.errors import Conflict, NotFound, StoreUnavailable
from miren_store.store import Check, Delete, Op, Store, Update

DELETE_ATTEMPTS = 5


def plan_pool_ops(pools: Iterable[SandboxPool], deleting: Collection[str]) -> list[Op]:
    """The pool writes that go with deleting the versions `deleting` (each pool once)."""
    ops: list[Op] = []
    seen: set[str] = set()
    for pool in sorted(pools, key=lambda p: p.id):
        if pool.id in seen:
            continue
        seen.add(pool.id)
        if not any(v in deleting for v in pool.referenced_by_versions):
            continue
        keep = tuple(v for v in pool.referenced_by_versions if v not in deleting)
        if keep:
            ops.append(Update(attrs.evolve(pool, referenced_by_versions=keep)))
        else:
            ops.append(Delete(SandboxPool, pool.id, pool.revision))
    return ops


async def pools_of(store: Store, version_ids: Iterable[str]) -> list[SandboxPool]:
    """Every pool referencing any of the versions (each once). Raises StoreUnavailable."""
    found: dict[str, SandboxPool] = {}
    for vid in version_ids:
        for pool in await store.list(SandboxPool, referenced_by_versions=vid):
            found.setdefault(pool.id, pool)
    return list(found.values())


class Deleted(enum.Enum):
    DELETED = "deleted"
    GONE = "gone"  # someone else deleted it first
    CHANGED = "changed"  # the version moved on (e.g. extended): re-read and decide again


async def delete_version(
    store: Store, version: AppVersion, *, attempts: int = DELETE_ATTEMPTS
) -> Deleted:
    """Delete `version` (at exactly its revision) with its pool cascade, atomically.

    Refuses the app's active version (ActiveVersion). A store failure or a pool that keeps moving
    raises CleanupFailed naming the step; the version is then kept for a retry.
    """
    step = "read app"
    try:
        for _ in range(attempts):
            step = "read app"
            app_check: Op
            try:
                app = await store.get(App, version.app)
            except NotFound:
                app_check = Check(App, version.app, 0)  # orphan version: the app stays gone
            else:
                if app.active_version == version.id:
                    raise ActiveVersion(
                        f"version {version.id!r} is the active version of app {app.name!r}"
                    )
                app_check = Check(App, app.name, app.revision)
            step = "list pools"
            pools = await pools_of(store, [version.id])
            ops = plan_pool_ops(pools, {version.id})
            ops.append(Delete(AppVersion, version.id, version.revision))
            ops.append(app_check)
            step = "delete"
            try:
                await store.commit(ops)
            except (Conflict, NotFound):
                step = "re-read version"
                try:
                    now_there = await store.get(AppVersion, version.id)
                except NotFound:
                    return Deleted.GONE
                if now_there.revision != version.revision:
                    return Deleted.CHANGED
                continue  # a pool or the app moved: plan again
            return Deleted.DELETED
    except StoreUnavailable as exc:
        raise CleanupFailed(
            step,
            f"deleting version {version.id!r} failed at step {step!r} ({exc}); "
            "the version is kept for a retry",
            version.id,
        ) from exc
    raise CleanupFailed(
        "delete",
        f"deleting version {version.id!r}: its pools or app kept changing; "
        "the version is kept for a retry",
        version.id,
    )


def orphan_pools(pools: Iterable[SandboxPool], versions: Collection[str]) -> list[SandboxPool]:
    """Pools none of whose referenced versions exist (pure)."""
    return [p for p in pools if not any(v in versions for v in p.referenced_by_versions)]


async def delete_orphan_pools(store: Store) -> int:
    """Delete pools left behind by a race (a pool created for a version being deleted).

    Versions and pools are read in one snapshot, so a version and its pool created between two
    reads are never mistaken for an orphan; each delete is revision-checked, so a pool that gained
    a reference meanwhile is kept. Returns how many were deleted; raises StoreUnavailable.
    """
    snap = await store.snapshot([AppVersion, SandboxPool])
    versions = {e.id for e in snap.entities if isinstance(e, AppVersion)}
    pools = [e for e in snap.entities if isinstance(e, SandboxPool)]
    deleted = 0
    for pool in orphan_pools(pools, versions):
        try:
            await store.delete(SandboxPool, pool.id, revision=pool.revision)
        except (Conflict, NotFound):
            continue
        deleted += 1
    return deleted
