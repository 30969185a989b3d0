"""The expiry GC: deletes expired ephemeral versions, with their pools, shortly after expiry.

Theory of operation
-------------------
Routing never waits for the GC: the lookup ignores an expired version from its expiry instant on.
The GC frees what is left (the version and its pools; the activator stops the sandboxes of a
deleted pool). One background task runs two mechanisms, serialized by one lock:

- **Timers.** A heap of (fire at, version id), one entry per ephemeral version expiring within
  the horizon (default twice the sweep interval, so every version is armed by some sweep before
  it expires). The task sleeps until the earliest entry or a `notify()`; a due entry is re-read
  from the store and deleted if it is still ephemeral and expired (if it was extended, it is
  armed again at its new expiry). A failed deletion is retried after `retry_delay`.
- **Sweeps**, at start and then every `sweep_interval` (default 60 s): one read of the ordered
  index `ephemeral_expires_at` (only ephemeral versions are in it), deleting every expired one
  and (re-)arming those within the horizon. After a restart the first sweep therefore collects
  everything that expired meanwhile and re-arms the timers from the store: no state is lost with
  the process. The sweep also sets `miren_ephemeral_versions{app}`.

Deletion goes through `miren_store.deploy.cascade.delete_version`: pools and version in one atomic,
revision-checked commit, so a version that was extended or replaced meanwhile is not deleted, and
a pool failure keeps the version (counted in `miren_gc_failures_total`, retried by the next
timer or sweep). Non-ephemeral versions are never touched: they are not in the index, and every
candidate is checked again before deletion. StoreUnavailable never stops the loop: it is logged
at warning and the next pass retries. Several nodes on one etcd elect one GC (`leading`); should
two ever overlap, revision checks make the second deletion of a version a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections import Counter as Tally
from collections.abc import Callable
from datetime import datetime, timedelta

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge

from miren_store.deploy.cascade import Deleted, delete_orphan_pools, delete_version
from miren_store.deploy.errors import ActiveVersion, StoreFailure
from miren_store.entities import AppVersion, utcnow
from miren_store.errors import NotFound, StoreUnavailable
from miren_store.settings import setting
from miren_store.store import Store
from miren_store.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_EPSILON = 0.001  # seconds added to a timer so a wake-up lands just after the instant, not before
_ERROR_PAUSE = 1.0  # seconds to wait after an unexpected error before the next pass
_FOLLOWER_CHECK = 1.0  # seconds between checks of a node that does not lead the GC


@attrs.frozen(kw_only=True)
class GcConfig:
    """The `[gc]` section of the edge's config: how `miren serve` runs its `ExpiryGC`."""

    sweep_interval: float = attrs.field(
        default=60.0,
        metadata=setting(
            "a full sweep of the expiry index, besides one timer per preview",
            duration=True,
            positive=True,
        ),
    )
    expiry_grace: float = attrs.field(
        default=1.0,
        metadata=setting(
            "an expired preview answers 410 this long, then it is collected (404)",
            duration=True,
            minimum=0.0,
            maximum=60.0,
        ),
    )


@attrs.frozen
class GCResult:
    """What one pass did. `failed` counts versions kept for a retry (and a failed listing)."""

    deleted: int = 0
    failed: int = 0
    scanned: int = 0
    error: str | None = None


class GCMetrics:
    """The GC's Prometheus metrics, registered in one registry (one GC per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deleted = Counter(
            "miren_gc_deleted_versions",
            "Expired ephemeral versions deleted by the GC.",
            registry=registry,
        )
        self.failures = Counter(
            "miren_gc_failures",
            "GC deletions or listings that failed (retried on the next pass).",
            registry=registry,
        )
        # Labelled by app only: the ephemeral label is never a metric label (unbounded).
        self.versions = Gauge(
            "miren_ephemeral_versions",
            "Ephemeral versions in the store, by app (as of the last sweep).",
            ["app"],
            registry=registry,
        )


class ExpiryGC:
    def __init__(
        self,
        store: Store,
        *,
        now: Callable[[], datetime] = utcnow,
        sweep_interval: float = 60.0,
        horizon: float | None = None,
        retry_delay: float = 5.0,
        max_armed: int = 10_000,
        grace: float = 1.0,
        registry: CollectorRegistry | None = None,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        if sweep_interval <= 0 or retry_delay <= 0 or max_armed < 1:
            raise ValueError("sweep_interval and retry_delay must be > 0, max_armed >= 1")
        self.store = store
        self._now = now
        self.sweep_interval = sweep_interval
        self.horizon = timedelta(seconds=horizon if horizon is not None else 2 * sweep_interval)
        self.retry_delay = timedelta(seconds=retry_delay)
        self.max_armed = max_armed
        # Collect a preview this long after its expiry: routing stops at the expiry instant
        # (410, "expired"), and for this moment a client still learns why before it is gone (404).
        self.grace = timedelta(seconds=grace)
        self.metrics = GCMetrics(registry) if registry is not None else None
        self.deleted_total = 0
        self.failed_total = 0
        self.sweeps = 0
        self._armed: dict[str, datetime] = {}  # version id -> when its timer fires
        self._heap: list[tuple[datetime, str]] = []  # may hold stale entries; _armed decides
        self._gauge_apps: set[str] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Several nodes: the loop works only while this node leads the job (one GC at a time,
        # see miren_activator.cluster.Leadership); the others check again every second.
        self._leading = leading

    def __repr__(self) -> str:
        state = "running" if self._task is not None else "stopped"
        return (
            f"<ExpiryGC {state} armed={len(self._armed)} sweeps={self.sweeps} "
            f"deleted={self.deleted_total} failed={self.failed_total}>"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop (inside a running event loop); its first sweep runs at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="miren-expiry-gc")

    async def stop(self) -> None:
        """Stop the loop and wait for it; safe to call twice or before start."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    @property
    def running(self) -> bool:
        return self._task is not None

    def armed(self) -> dict[str, datetime]:
        """A copy of the armed timers: version id -> when it fires."""
        return dict(self._armed)

    def notify(self, version: AppVersion) -> None:
        """Arm a timer for a version just deployed or extended in this process."""
        expires = version.ephemeral_expires_at
        if (
            version.is_ephemeral
            and expires is not None
            and self._arm(version.id, expires + self.grace, self._now())
        ):
            self._wake.set()

    # -- passes -------------------------------------------------------------------------------

    async def run_once(self) -> GCResult:
        """One sweep: delete every expired ephemeral version, arm the upcoming ones."""
        async with self._lock:
            return await self._sweep()

    async def fire_due(self) -> GCResult:
        """Handle the timers that are due now."""
        async with self._lock:
            return await self._fire_due()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            self._wake.clear()
            pause = 0.0
            if self._leading is not None and not self._leading():
                next_sweep = loop.time()  # (sweep at once when this node becomes the leader)
                await asyncio.sleep(_FOLLOWER_CHECK)
                continue
            try:
                if loop.time() >= next_sweep:
                    await self.run_once()
                    next_sweep = loop.time() + self.sweep_interval
                await self.fire_due()
            except Exception:
                # Never let the loop die; StoreUnavailable is handled inside the passes, so
                # this is a bug: log it loudly and pause so it cannot spin.
                log.exception("expiry GC pass failed")
                self._count_failure()
                pause = _ERROR_PAUSE
            delay = max(pause, min(next_sweep - loop.time(), self._next_timer_in()))
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _next_timer_in(self) -> float:
        if not self._heap:
            return math.inf
        return max(0.0, (self._heap[0][0] - self._now()).total_seconds()) + _EPSILON

    async def _sweep(self) -> GCResult:
        t = self._now()
        self.sweeps += 1
        try:
            versions = await self.store.range(AppVersion, "ephemeral_expires_at")
        except StoreUnavailable as exc:
            log.warning("expiry GC: listing ephemeral versions failed, retrying next pass: %s", exc)
            self._count_failure()
            return GCResult(failed=1, error=str(exc))
        deleted = failed = 0
        per_app: Tally[str] = Tally()
        for version in versions:
            expires = version.ephemeral_expires_at
            if not version.is_ephemeral or expires is None:
                continue  # never touch a normal version, whatever the index says
            if version.expired(t - self.grace):
                outcome = await self._delete(version)
                if outcome is Deleted.DELETED:
                    deleted += 1
                if outcome in (Deleted.DELETED, Deleted.GONE):
                    continue
                if outcome is None:
                    failed += 1
            else:
                self._arm(version.id, expires + self.grace, t)
            per_app[version.app] += 1
        self._set_gauge(per_app)
        try:
            orphans = await delete_orphan_pools(self.store)
        except StoreUnavailable as exc:
            log.warning("expiry GC: orphan pool sweep failed, retrying next pass: %s", exc)
            orphans = 0
        if orphans:
            log.info("expiry GC: deleted %d orphan pool(s)", orphans)
        if deleted or failed:
            log.info(
                "expiry GC sweep: deleted=%d failed=%d scanned=%d", deleted, failed, len(versions)
            )
        return GCResult(deleted=deleted, failed=failed, scanned=len(versions))

    async def _fire_due(self) -> GCResult:
        t = self._now()
        due: list[str] = []
        while self._heap and self._heap[0][0] <= t:
            fire_at, vid = heapq.heappop(self._heap)
            if self._armed.get(vid) == fire_at:
                del self._armed[vid]
                due.append(vid)
        deleted = failed = 0
        for vid in due:
            try:
                version = await self.store.get(AppVersion, vid)
            except NotFound:
                continue  # replaced, deleted by label, or collected by another node
            except StoreUnavailable as exc:
                log.warning("expiry GC: reading version %s failed, retrying: %s", vid, exc)
                self._count_failure()
                self._arm(vid, t + self.retry_delay, t)
                failed += 1
                continue
            expires = version.ephemeral_expires_at
            if not version.is_ephemeral or expires is None:
                continue
            if not version.expired(self._now() - self.grace):
                self._arm(vid, expires + self.grace, t)  # extended meanwhile
                continue
            outcome = await self._delete(version)
            if outcome is Deleted.DELETED:
                deleted += 1
                if self.metrics is not None and version.app in self._gauge_apps:
                    self.metrics.versions.labels(app=version.app).dec()
            elif outcome is None:
                failed += 1
                self._arm(vid, t + self.retry_delay, t)
        return GCResult(deleted=deleted, failed=failed, scanned=len(due))

    async def _delete(self, version: AppVersion) -> Deleted | None:
        """Delete one expired version; None when it failed (counted, kept for a retry)."""
        try:
            outcome = await delete_version(self.store, version)
        except ActiveVersion:
            log.warning("expiry GC: ephemeral version %s is active; not deleting it", version.id)
            self._count_failure()
            return None
        except StoreFailure as exc:
            log.warning("expiry GC: %s", exc)
            self._count_failure()
            return None
        self._armed.pop(version.id, None)
        if outcome is Deleted.DELETED:
            self.deleted_total += 1
            if self.metrics is not None:
                self.metrics.deleted.inc()
            log.info(
                "expiry GC: deleted version %s of app %s (label %s, expired %s)",
                version.id,
                version.app,
                version.ephemeral_label,
                version.ephemeral_expires_at,
            )
        return outcome

    # -- bookkeeping --------------------------------------------------------------------------

    def _arm(self, vid: str, fire_at: datetime, now: datetime) -> bool:
        """Arm (or move) the timer of `vid`; False when beyond the horizon or the bound."""
        if fire_at > now + self.horizon:
            self._armed.pop(vid, None)  # the sweep that covers it will arm it
            return False
        if vid not in self._armed and len(self._armed) >= self.max_armed:
            return False
        if self._armed.get(vid) == fire_at:
            return False
        self._armed[vid] = fire_at
        heapq.heappush(self._heap, (fire_at, vid))
        if len(self._heap) > 2 * len(self._armed) + 64:
            # Drop stale entries (moved or fired timers) so the heap stays bounded.
            self._heap = [(at, v) for v, at in self._armed.items()]
            heapq.heapify(self._heap)
        return True

    def _count_failure(self) -> None:
        self.failed_total += 1
        if self.metrics is not None:
            self.metrics.failures.inc()

    def _set_gauge(self, per_app: Tally[str]) -> None:
        if self.metrics is None:
            return
        for app in self._gauge_apps - set(per_app):
            with contextlib.suppress(KeyError):
                self.metrics.versions.remove(app)
        for app, n in per_app.items():
            self.metrics.versions.labels(app=app).set(n)
        self._gauge_apps = set(per_app)
