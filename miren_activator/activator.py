"""The activator: leases on sandboxes, pools on demand, boot, scale up, idle scale-down.

Theory of operation
-------------------
The ingress asks for a `Lease` on a sandbox of (version id, service) for each request and gives
it back when the request ends. A lease is one unit of work on a sandbox (a request in flight, an
upgraded connection, a long response). Which sandbox takes it, and when a pool needs another
sandbox, is decided by `capacity.py`: `requests_per_instance` is a scaling target, not a limit
(work spreads over the running sandboxes beyond it and another one starts, up to
`max_instances`); only `max_requests_per_instance`, a hard cap, makes work queue.

Everything lives in this process, on one event loop, without locks: a state change is a
synchronous step between two awaits, so no other task can observe it half done.

- **Pools.** One in-memory `_Pool` per (version id, service), holding its sandboxes and a FIFO of
  waiting acquires. Its store entity has the deterministic id `pool-<version id>-<service>`, so
  every version gets a private pool (normal versions do not share pools here; an identical spec
  would only save a sandbox, and private pools keep deletion trivial).
- **Warm path** (`try_acquire`, `hold`, `release`): a dict lookup and `capacity.pick` over the
  pool's running sandboxes (first below the target, else the least loaded below the hard cap).
  No await, no store call. Both decline while anyone waits, so newcomers never overtake queued
  callers. The ingress calls `hold` on every request: the same unit of work without a Lease
  object (the sandbox's own handle, given back with `release` exactly once). It tries first the
  sandbox it got last for the version (`warm`), which takes the unit at once while it is below
  its `limit` (`capacity.unit_limit`: the target, or, for a pool that has one sandbox and can
  have no other, the hard cap or no limit at all); otherwise `pick` decides, and a unit that
  went past the target on every sandbox asks the policy for one more sandbox.
- **Miss path** (`acquire`): if the pool is not loaded, one creation per (version, service) runs
  in its own task behind an in-process sentinel future that every concurrent caller awaits; its
  outcome, pool or error, reaches all of them, and the sentinel is removed before it resolves, so
  the next call after a failure starts over. The creation is a `Store.create` of the
  deterministic id; Conflict means another process created it first, and it is read and used, so
  processes sharing one etcd create one pool. Then the caller queues a future on the pool and
  `_reconcile` runs.
- **`_reconcile`** is the one bookkeeping step: hand work to queued waiters in order by the same
  `pick` (a release or a boot hands a lease straight to the next waiter; a boot with no hard cap
  serves every waiter), then ask `policy.sandboxes_to_start` whether to start one more (when
  waiters remain or every running sandbox is past the target, none is booting, below
  `max_instances`, not in crash back-off; or to fill up to `min_instances`), or fail the waiters
  when nothing could ever serve them (crash back-off with no sandbox).
- **Sandboxes** change state only through `lifecycle.transition` (pending -> running | dead |
  stopped; running -> dead | stopped). A boot task spawns through the version's runtime and waits
  for the health check under `boot_timeout`; an exit watcher awaits the process's end from the
  moment it exists, so a sandbox that dies while booting fails its waiters at once (not at the
  timeout). When a sandbox leaves RUNNING every subscriber is called synchronously with its id
  (lease invalidation for the ingress: no queue that could drop it).
- **Crashes.** A sandbox that dies within `crash.window` of its start is a quick crash; the n-th
  in a row blocks starts for 10 s * 2^(n-1), at most 15 min. During it an acquire that finds no
  running sandbox fails fast with `CrashBackoff`.
- **Idle.** A sweep (every `sweep_interval`) stops running sandboxes that held no lease for the
  pool's `scale_down_delay` (never one with an in-flight lease, never below `min_instances`);
  a pool can reach zero sandboxes and the next acquire cold-starts one.
- **Logs.** A sandbox's stdout and stderr go to `<log_dir>/<sandbox id>.log`; the sweep
  rotates a log past `log_max_bytes` to `<name>.1` (copy, then truncate: `logs.py`), and the
  files go when the ended sandbox leaves the history.
- **Store.** Pool and sandbox entities are written on state changes only, by a background writer
  (`persist.StateWriter`), never per request; `last_activity` is kept in memory and written at
  most every `activity_persist_interval` (30 s).
- **Cancellation.** A caller cancelled while waiting removes its future; if a lease had already
  been handed to it, it is released. Boots and pool creations never run in the caller's task, so
  a client that goes away never aborts work other callers wait on.
- **Shutdown** (`close`): fail waiters, stop every sandbox (SIGTERM, SIGKILL after the grace),
  await every task. A process that dies without `close` takes its sandboxes with it (see
  `process.py`).

- **Removal.** A pool entity stays in the store while its version exists, also at zero
  sandboxes (the GC deletes it with the version, reference §12.22). Whoever learns that a
  version was deleted (the route-table watch) calls `remove_version`, which fails its waiters
  and stops its sandboxes. A pool is never created for a stored version that no longer exists.

Multi-node: the pool entity is shared through the store; each node runs and leases its own
sandboxes of it (the pool's `owner` is the node that created it). Serving another node's
sandboxes is not implemented.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol, cast

import attrs
from prometheus_client import CollectorRegistry

from miren_activator.capacity import pick, saturated, unit_limit
from miren_activator.clock import Clock, SystemClock, wall_of
from miren_activator.config import ActivatorConfig
from miren_activator.errors import (
    ActivationTimeout,
    ActivatorClosed,
    ActivatorError,
    BootFailed,
    CrashBackoff,
    Overloaded,
    PoolCreationFailed,
    Unreachable,
    VersionRemoved,
)
from miren_activator.lifecycle import FINAL, SandboxEvent, transition
from miren_activator.logs import over_cap, rotate, rotated_path
from miren_activator.metrics import ActivatorMetrics
from miren_activator.persist import StateWriter
from miren_activator.policy import (
    WEB,
    CrashState,
    IdleCandidate,
    PoolParams,
    after_clean_stop,
    after_death,
    idle_victims,
    pool_id_for,
    sandboxes_to_start,
)
from miren_activator.runtimes.base import SandboxHandle, SandboxRuntime, SandboxSpec
from miren_activator.runtimes.process import ProcessRuntime
from miren_activator.runtimes.upstream import UpstreamRuntime
from miren_store.entities import AppVersion, Runtime, Sandbox, SandboxPool, SandboxStatus, new_id
from miren_store.errors import Conflict, NotFound, StoreError
from miren_store.logfiles import read_tail, tail_lines
from miren_store.store import Store

log = logging.getLogger("miren.activator")

PENDING: Final = SandboxStatus.PENDING
RUNNING: Final = SandboxStatus.RUNNING
DOWN: Final = SandboxStatus.DOWN
STOPPED: Final = SandboxStatus.STOPPED
DEAD: Final = SandboxStatus.DEAD

InvalidationCallback = Callable[[str], None]
REPROBE_FIRST = 0.25  # seconds before a DOWN upstream is probed again; doubling ...
REPROBE_MAX = 4.0  # ... up to this: back within seconds of coming back


class _Ref(NamedTuple):
    """A VersionRef from plain ids (`try_acquire`; not the proxy's hot path)."""

    version: str
    service: str


class VersionRef(Protocol):
    """What `Activator.hold` reads: a (version id, service) pair."""

    @property
    def version(self) -> str: ...

    @property
    def service(self) -> str: ...


class Held(Protocol):
    """A unit of work on a sandbox from `Activator.hold`: where to send one request. Give it
    back with `Activator.release` exactly once. (It is the running sandbox itself.)"""

    @property
    def addr(self) -> tuple[str, int]: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class Lease:
    """One unit of a running sandbox's capacity, held for one in-flight request.

    Give it back with `Activator.release` exactly once (a second release is ignored).
    """

    # Only `addr` is copied from the sandbox (the ingress's pool key); the rest is read from the
    # sandbox, whose id, version and service never change. (The ingress's per-request unit is
    # not a Lease: see `Activator.hold`.)
    __slots__ = ("_released", "_sandbox", "addr")

    def __init__(self, sandbox: _Sandbox) -> None:
        self._sandbox = sandbox
        self._released = False
        self.addr = sandbox.addr  # (host, port): the ingress's key for its connection pools

    @property
    def host(self) -> str:
        return self.addr[0]

    @property
    def port(self) -> int:
        return self.addr[1]

    @property
    def sandbox_id(self) -> str:
        return self._sandbox.id

    @property
    def version_id(self) -> str:
        return self._sandbox.version_id

    @property
    def service(self) -> str:
        return self._sandbox.service

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        """False once its sandbox left RUNNING (the ingress should drop it)."""
        return self._sandbox.state is RUNNING

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return (
            f"<Lease {self.sandbox_id} {self.host}:{self.port} v={self.version_id} "
            f"svc={self.service} {state}>"
        )


def _sandbox_of(lease: Lease | Held) -> _Sandbox:
    """The sandbox behind a Lease, or a Held (the sandbox itself: see `Activator.hold`)."""
    return lease._sandbox if isinstance(lease, Lease) else cast(_Sandbox, lease)


class _Sandbox:
    __slots__ = (
        "addr",
        "boot_task",
        "error",
        "exit_task",
        "handle",
        "host",
        "id",
        "in_use",
        "last_used",
        "limit",
        "log_path",
        "log_rotating",
        "ordinal",
        "persisted_activity",
        "pid",
        "pool",
        "port",
        "service",
        "started_at",
        "started_mono",
        "state",
        "stop_task",
        "version_id",
    )

    def __init__(self, pool: _Pool, sid: str, ordinal: int, now: float, clock: Clock) -> None:
        self.pool = pool
        self.id = sid
        self.version_id = pool.version.id
        self.service = pool.service
        self.ordinal = ordinal
        self.state = PENDING
        self.limit = pool.params.target  # (capacity.unit_limit: set by _set_limits)
        self.in_use = 0
        self.last_used = now
        self.persisted_activity = now
        self.started_mono = now
        self.started_at = clock.now()
        self.host = ""
        self.port = 0
        self.addr = ("", 0)  # (host, port), set with them
        self.pid: int | None = None
        self.handle: SandboxHandle | None = None
        self.log_path: Path | None = None
        self.log_rotating = False
        self.boot_task: asyncio.Task[None] | None = None
        self.exit_task: asyncio.Task[None] | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.error = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}" if self.port else ""

    def __repr__(self) -> str:
        return (
            f"<Sandbox {self.id} v={self.pool.version.id} svc={self.pool.service} "
            f"{self.state.value} pid={self.pid} in_use={self.in_use}/{self.pool.params.target} "
            f"url={self.url or '-'}>"
        )


class _Pool:
    __slots__ = (
        "crash",
        "down",
        "entity",
        "finished",
        "id",
        "live",
        "params",
        "removed",
        "running",
        "service",
        "version",
        "waiters",
    )

    def __init__(
        self, version: AppVersion, service: str, entity: SandboxPool, crash: CrashState
    ) -> None:
        self.id = entity.id
        self.version = version
        self.service = service
        self.params = PoolParams.for_version(version, service)
        self.entity = entity
        self.live: list[_Sandbox] = []  # pending + running, in start order
        self.running: list[_Sandbox] = []  # the RUNNING subset, in boot order
        self.down: list[_Sandbox] = []  # the DOWN subset (upstreams being re-probed)
        self.finished: deque[_Sandbox] = deque()  # ended, newest last
        self.waiters: deque[asyncio.Future[Lease]] = deque()
        self.crash = crash
        self.removed = False

    @property
    def pending(self) -> int:
        """Sandboxes booting now."""
        return len(self.live) - len(self.running) - len(self.down)

    def __repr__(self) -> str:
        return (
            f"<Pool v={self.version.id} svc={self.service} desired={len(self.live)} "
            f"ready={len(self.running)} waiters={len(self.waiters)}>"
        )


@attrs.frozen
class SandboxInfo:
    id: str
    state: SandboxStatus
    in_use: int
    target: int
    pid: int | None
    url: str


@attrs.frozen
class PoolSnapshot:
    """A point-in-time view of one pool (admin debug output, test oracle)."""

    pool_id: str
    desired: int
    ready: int
    pending: int
    waiters: int
    crash_count: int
    backoff_remaining: float
    sandboxes: tuple[SandboxInfo, ...]  # live ones, then ended ones

    @property
    def in_use(self) -> int:
        return sum(s.in_use for s in self.sandboxes)


class Activator:
    """See the module docstring. Create, `await start()`, use, `await close()`."""

    def __init__(
        self,
        store: Store,
        *,
        config: ActivatorConfig | None = None,
        runtimes: Mapping[Runtime, SandboxRuntime] | None = None,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._store = store
        self._config = config or ActivatorConfig()
        self._runtimes: Mapping[Runtime, SandboxRuntime] = runtimes or {
            Runtime.PROCESS: ProcessRuntime(),
            Runtime.UPSTREAM: UpstreamRuntime(),
        }
        self._clock = clock or SystemClock()
        self._mono = self._clock.monotonic
        self.metrics = ActivatorMetrics(registry)
        self._writer = StateWriter(store)
        self._pools: dict[tuple[str, str], _Pool] = {}
        # hold(): the sandbox found last per version id; running ones only (see _set_state).
        self.warm: dict[str, _Sandbox] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[_Pool]] = {}
        self._sandboxes: dict[str, _Sandbox] = {}  # live and retained ended ones
        self._subscribers: list[InvalidationCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._creators: set[asyncio.Task[Any]] = set()  # pool creations in flight
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        live = sum(len(p.live) for p in self._pools.values())
        state = "closed" if self._closed else "open"
        return (
            f"<Activator node={self._config.node} pools={len(self._pools)} sandboxes={live} "
            f"creating={len(self._creating)} {state}>"
        )

    @property
    def config(self) -> ActivatorConfig:
        return self._config

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background writer and the idle sweep."""
        if self._started:
            return
        self._started = True
        for runtime in self._runtimes.values():
            prepare = getattr(runtime, "prepare", None)
            if prepare is not None:
                await prepare()  # e.g. the process runtime picks its launcher once, now
        self._writer.start()
        self._sweeper = self._spawn(self._sweep_loop(), "miren-activator-sweep")
        self._spawn(self._forget_stale_sandboxes(), "miren-activator-recover")

    async def close(self, grace: float | None = None) -> None:
        """Fail waiters, stop every sandbox (SIGTERM, SIGKILL after `grace`), await all tasks."""
        if self._closed:
            return
        self._closed = True
        grace = self._config.stop_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + 5.0
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._creators:
            task.cancel()  # their callers get ActivatorClosed
        closed = ActivatorClosed("the activator is shutting down")
        for pool in list(self._pools.values()):
            self._fail_waiters(pool, closed)
            for sb in list(pool.live):
                self._request_stop(sb, grace)
        self._pools.clear()
        self.warm.clear()
        # Stops end within the grace (SIGKILL then); a boot still spawning stops its sandbox
        # as soon as the spawn returns, which may add a stop task: wait until none is left.
        while pending := [t for t in self._tasks if not t.done()]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(pending, timeout=remaining)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await self._writer.close(self._config.store_flush_timeout)

    async def __aenter__(self) -> Activator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def subscribe(self, callback: InvalidationCallback) -> Callable[[], None]:
        """Call `callback(sandbox_id)` synchronously whenever a sandbox leaves RUNNING.

        Returns a function that unsubscribes. A callback must not raise (it is logged if it does)
        and must not block.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # -- the warm path (no await) ----------------------------------------------------------------

    # `last_used` matters only while a sandbox holds no lease (the idle policy never stops one
    # that does): it is set when the last lease is given back, so a busy sandbox costs no clock
    # read per request; the sweep refreshes it on busy sandboxes for `last_activity`.

    def try_acquire(self, version_id: str, service: str = WEB) -> Lease | None:
        """A lease on a running sandbox with spare capacity, or None (then call `acquire`)."""
        sb = self._take(_Ref(version_id, service))
        return None if sb is None else Lease(sb)

    def hold(self, ref: VersionRef) -> Held | None:
        """`try_acquire` for the ingress's hot path, on a VersionRef the caller keeps per route
        (the ingress's Target). The unit of work comes as the sandbox's own `Held` handle (its
        `addr`, `host` and `port`), not a new Lease, and goes back with `release(held)` exactly
        once (unlike a Lease's, a second release is not detected: the caller's bookkeeping
        guarantees one). The sandbox found last for the version takes it at once while it runs
        (it leaves the cache when it stops), is below its `limit` and nobody is queued;
        otherwise `_take` decides."""
        sb = self.warm.get(ref.version)
        if (
            sb is not None
            and sb.in_use < sb.limit
            and not sb.pool.waiters
            and sb.service == ref.service
        ):
            sb.in_use += 1
            return sb
        sb = self._take(ref)
        if sb is not None:
            self.warm[ref.version] = sb
        return sb

    def _take(self, ref: VersionRef) -> _Sandbox | None:
        """One unit of work on the sandbox `capacity.pick` chooses, unless anyone waits; a unit
        past the target on every sandbox asks for one more sandbox."""
        pool = self._pools.get((ref.version, ref.service))
        if pool is None or pool.waiters:
            return None
        params = pool.params
        sb = pick(pool.running, params.target, params.hard_cap)
        if sb is None:
            return None
        sb.in_use += 1
        if sb.in_use > params.target:  # (pick spreads only when every sandbox is at the target)
            self._scale_up(pool)
        return sb

    def _scale_up(self, pool: _Pool) -> None:
        """Every running sandbox is past the target: start one more if the policy says so."""
        if pool.pending or len(pool.live) >= pool.params.max_instances or self._closed:
            return  # (the common case under load, decided without the policy call)
        n = sandboxes_to_start(
            waiting=len(pool.waiters),
            pending=pool.pending,
            live=len(pool.live),
            params=pool.params,
            in_backoff=pool.crash.remaining(self._mono()) > 0,
            saturated=True,
        )
        for _ in range(n):
            self._start_sandbox(pool)

    def release(self, lease: Lease | Held) -> None:
        """Give a lease's capacity back (hands it to the next waiter, if any); a `Held` from
        `hold` too."""
        if isinstance(lease, Lease):
            if lease._released:
                return
            lease._released = True
            sb = lease._sandbox
        else:
            sb = lease  # type: ignore[assignment]  # (a Held is its _Sandbox: see hold)
        sb.in_use -= 1
        if not sb.in_use:
            sb.last_used = self._mono()
        if sb.pool.waiters and sb.state is RUNNING:
            self._grant(sb.pool)

    def report_unreachable(self, lease: Lease | Held) -> None:
        """The ingress could not connect to the lease's sandbox: release the lease and take the
        sandbox out of service now, so the retry gets another one. A process sandbox is marked
        dead and stopped (usually its process just died and its exit watcher has not run yet;
        the next acquire starts another); an upstream instance is DOWN and re-probed with
        back-off until it answers (nothing could restart it)."""
        self.release(lease)
        sb = _sandbox_of(lease)
        if sb.state is not RUNNING:
            return
        if getattr(sb.handle, "static", False):  # an upstream: down until it answers again
            self._unreachable(sb, "refused or timed out a connection")
            return
        sb.error = "refused connections"
        self._set_state(sb, SandboxEvent.EXITED)
        if sb.handle is not None and sb.stop_task is None:
            sb.stop_task = self._spawn(self._stop_handle(sb, 0.0), f"stop {sb.id}")
        self._died(sb, None)

    def touch(self, lease: Lease) -> bool:
        """Mark activity on a held lease; False when its sandbox is no longer running."""
        sb = lease._sandbox
        sb.last_used = self._mono()
        return sb.state is RUNNING and not lease._released

    # -- the miss path ---------------------------------------------------------------------------

    async def acquire(self, version: AppVersion, service: str = WEB) -> Lease:
        """A lease on a sandbox of (version, service), creating the pool and booting a sandbox if
        needed. Raises an `ActivatorError` (see `errors.py` for how each maps to HTTP)."""
        lease = self.try_acquire(version.id, service)
        if lease is not None:
            return lease
        if self._closed:
            raise ActivatorClosed("the activator is shutting down")
        if not self._started:
            await self.start()
        pool = self._pools.get((version.id, service))
        if pool is None:
            pool = await self._pool_for(version, service)
        return await self._wait(pool)

    async def _pool_for(self, version: AppVersion, service: str) -> _Pool:
        key = (version.id, service)
        fut = self._creating.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._creating[key] = fut
            task = self._spawn(self._create_pool(key, version, service, fut), f"pool {key}")
            self._creators.add(task)
            task.add_done_callback(self._creators.discard)
        # shield: a caller that goes away does not cancel the creation others wait on.
        return await asyncio.shield(fut)

    async def _create_pool(
        self,
        key: tuple[str, str],
        version: AppVersion,
        service: str,
        fut: asyncio.Future[_Pool],
    ) -> None:
        try:
            pool = await self._load_or_create_pool(version, service)
            if self._closed:
                raise ActivatorClosed("the activator is shutting down")
        except BaseException as exc:
            # The sentinel goes before it resolves: whoever comes next starts over.
            del self._creating[key]
            err: BaseException = exc
            if isinstance(exc, asyncio.CancelledError):
                err = ActivatorClosed("the activator is shutting down")
            elif not isinstance(exc, ActivatorError):
                err = PoolCreationFailed(f"pool creation failed for {version.id}/{service}: {exc}")
                err.__cause__ = exc
            fut.set_exception(err)
            fut.exception()  # retrieved: no "never retrieved" noise when every waiter left
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("pool creation for %s/%s failed: %s", version.id, service, err)
            return
        self._pools[key] = pool
        del self._creating[key]
        # Someone is waiting (a creation only starts for an acquire): start the first sandbox
        # now, so its spawn is queued before the wake-ups of a crowd of callers.
        n = sandboxes_to_start(
            waiting=1,
            pending=0,
            live=0,
            params=pool.params,
            in_backoff=pool.crash.remaining(self._mono()) > 0,
        )
        for _ in range(n):
            self._start_sandbox(pool)
        fut.set_result(pool)

    async def _load_or_create_pool(self, version: AppVersion, service: str) -> _Pool:
        problems = version.spec.problems()
        if problems:
            raise BootFailed(f"version {version.id} cannot run: {'; '.join(problems)}")
        if version.spec.runtime not in self._runtimes:
            raise BootFailed(f"no runtime {version.spec.runtime.value!r} on this node")
        if version.revision > 0:
            # A version read from the store: make sure it was not deleted meanwhile (a request
            # resolved from a stale table), so no pool is created for a version that is gone.
            try:
                await self._store.get(AppVersion, version.id)
            except NotFound:
                raise VersionRemoved(f"version {version.id} no longer exists") from None
        pid = pool_id_for(version.id, service)
        params = PoolParams.for_version(version, service)
        fresh = SandboxPool(
            id=pid,
            app=version.app,
            service=service,
            spec=version.spec,
            ephemeral=version.is_ephemeral,
            referenced_by_versions=(version.id,),
            desired_instances=params.min_instances,
            owner=self._config.node,
            created_at=self._clock.now(),
        )
        stored: SandboxPool | None = None
        for _ in range(3):
            try:
                stored = await self._store.create(fresh)
                self.metrics.pool_creations.inc()
                log.info("created pool %s", pid)
                break
            except Conflict:
                pass  # someone (maybe another node) created it first: use theirs
            try:
                stored = await self._store.get(SandboxPool, pid)
                break
            except NotFound:
                continue  # deleted between our create and get: try again
        if stored is None:
            raise PoolCreationFailed(f"pool {pid} keeps disappearing (deleted concurrently)")
        self._writer.know(stored)
        return _Pool(version, service, stored, self._crash_from_entity(stored))

    def _crash_from_entity(self, entity: SandboxPool) -> CrashState:
        # A restarted node honours a back-off recorded before it went down.
        until = None
        if entity.cooldown_until is not None:
            left = (entity.cooldown_until - self._clock.now()).total_seconds()
            if left > 0:
                until = self._mono() + left
        return CrashState(consecutive=entity.consecutive_crashes, cooldown_until=until)

    async def _wait(self, pool: _Pool) -> Lease:
        if pool.removed:
            raise VersionRemoved(f"version {pool.version.id} was removed")
        if self._closed:
            raise ActivatorClosed("the activator is shutting down")
        backoff = pool.crash.remaining(self._mono())
        if backoff > 0 and not pool.running and not pool.pending:
            raise self._backoff_error(pool, backoff)
        if self._all_down(pool):
            raise self._down_error(pool)
        if len(pool.waiters) >= self._config.max_waiters:
            raise Overloaded(
                f"{len(pool.waiters)} requests already wait for {pool.version.id}/{pool.service}"
            )
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        pool.waiters.append(fut)
        self.metrics.waiters.inc()
        try:
            self._reconcile(pool)
            async with asyncio.timeout(self._config.acquire_timeout):
                return await fut
        except BaseException as exc:
            # Cancelled (client gone) or timed out just after a lease was handed to us: give
            # it back, so no capacity stays taken by a caller that will never use it.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            if isinstance(exc, TimeoutError):
                raise ActivationTimeout(
                    f"no sandbox of {pool.version.id}/{pool.service} was available within "
                    f"{self._config.acquire_timeout:g}s"
                ) from None
            raise
        finally:
            if not fut.done():
                fut.cancel()
            # A resolved future was popped by whoever resolved it; only a cancelled one may
            # still be queued. (deque.remove of a missing item formats the item's repr.)
            if fut.cancelled():
                with contextlib.suppress(ValueError):
                    pool.waiters.remove(fut)
            self.metrics.waiters.dec()

    @staticmethod
    def _all_down(pool: _Pool) -> bool:
        """Nothing of the pool can serve or is booting, and no other instance may start: every
        one of its upstream instances is down."""
        return (
            bool(pool.down)
            and not pool.running
            and not pool.pending
            and len(pool.live) >= pool.params.max_instances
        )

    @staticmethod
    def _down_error(pool: _Pool) -> Unreachable:
        sb = pool.down[-1]
        return Unreachable(
            f"{pool.version.id}/{pool.service}: no instance answers ({sb.url}: {sb.error}); "
            "re-probing",
            sandbox_id=sb.id,
        )

    def _backoff_error(self, pool: _Pool, remaining: float) -> CrashBackoff:
        return CrashBackoff(
            f"{pool.version.id}/{pool.service} crashed {pool.crash.consecutive} time(s) in a row "
            f"shortly after starting; retrying in {remaining:.0f}s",
            retry_after=remaining,
            sandbox_id=pool.finished[-1].id if pool.finished else None,
        )

    # -- the bookkeeping step --------------------------------------------------------------------

    def _reconcile(self, pool: _Pool) -> None:
        """Hand out capacity, then start sandboxes or fail waiters as the policy says."""
        if self._closed or pool.removed:
            return
        self._grant(pool)
        # A cancelled waiter leaves the queue when its task next runs; counting the queue with
        # them is at worst one sandbox early, and keeps this O(1) (it runs once per waiter).
        waiting = len(pool.waiters)
        if not waiting and len(pool.live) >= pool.params.min_instances:
            return
        backoff = pool.crash.remaining(self._mono())
        if waiting and backoff > 0 and not pool.running and not pool.pending:
            self._fail_waiters(pool, self._backoff_error(pool, backoff))
            return
        n = sandboxes_to_start(
            waiting=waiting,
            pending=pool.pending,
            live=len(pool.live),
            params=pool.params,
            in_backoff=backoff > 0,
            saturated=bool(pool.running) and saturated(pool.running, pool.params.target),
        )
        for _ in range(n):
            self._start_sandbox(pool)

    def _grant(self, pool: _Pool) -> None:
        """Give queued waiters, in order, units of work on the sandboxes `capacity.pick`
        chooses (every waiter, when there is no hard cap and a sandbox runs)."""
        waiters = pool.waiters
        params = pool.params
        while waiters:
            fut = waiters[0]
            if fut.done():  # cancelled: its task removes nothing we need
                waiters.popleft()
                continue
            sb = pick(pool.running, params.target, params.hard_cap)
            if sb is None:
                return
            waiters.popleft()
            sb.in_use += 1
            sb.last_used = self._mono()
            fut.set_result(Lease(sb))

    def _fail_waiters(self, pool: _Pool, err: BaseException) -> None:
        while pool.waiters:
            fut = pool.waiters.popleft()
            if not fut.done():
                fut.set_exception(err)

    # -- sandboxes ---------------------------------------------------------------------------------

    def _start_sandbox(self, pool: _Pool) -> None:
        used = {sb.ordinal for sb in pool.live}
        ordinal = next(i for i in range(len(used) + 1) if i not in used)
        sb = _Sandbox(pool, new_id("sb"), ordinal, self._mono(), self._clock)
        if self._config.log_dir is not None:
            sb.log_path = self._config.log_dir / f"{sb.id}.log"
        pool.live.append(sb)
        self._set_limits(pool)
        self._sandboxes[sb.id] = sb
        self.metrics.cold_starts.labels(app=pool.version.app).inc()
        self.metrics.sandbox_state(None, PENDING)
        self._persist_sandbox(sb)
        self._persist_pool(pool)
        log.info("starting %r", sb)
        sb.boot_task = self._spawn(self._boot(sb), f"boot {sb.id}")

    async def _boot(self, sb: _Sandbox) -> None:
        pool = sb.pool
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        runtime = self._runtimes[pool.version.spec.runtime]
        spec = SandboxSpec(
            sandbox_id=sb.id,
            app=pool.version.app,
            version_id=pool.version.id,
            ephemeral_label=pool.version.ephemeral_label,
            service=pool.service,
            spec=pool.version.spec,
            ordinal=sb.ordinal,
            log_path=sb.log_path,
        )
        try:
            handle = await runtime.start(spec)
        except BootFailed as exc:
            self._boot_failed(sb, exc)
            return
        except Exception as exc:
            log.exception("runtime failed to start %s", sb.id)
            self._boot_failed(sb, BootFailed(f"cannot start sandbox: {exc}", sandbox_id=sb.id))
            return
        sb.handle = handle
        sb.host, sb.port, sb.pid = handle.host, handle.port, handle.pid
        sb.addr = (sb.host, sb.port)
        if sb.state is not PENDING:
            # Stopped while spawning (close, version removed): it must not outlive that.
            sb.stop_task = self._spawn(self._stop_handle(sb, 0.0), f"stop {sb.id}")
            return
        self._persist_sandbox(sb)
        sb.exit_task = self._spawn(self._watch_exit(sb), f"exit {sb.id}")
        try:
            async with asyncio.timeout_at(t0 + pool.params.boot_timeout):
                await handle.wait_ready()
        except TimeoutError:
            self._boot_failed(
                sb,
                ActivationTimeout(
                    f"sandbox {sb.id} of {pool.version.id} was not healthy within "
                    f"{pool.params.boot_timeout:g}s",
                    sandbox_id=sb.id,
                ),
            )
            sb.stop_task = self._spawn(self._stop_handle(sb, 1.0), f"stop {sb.id}")
            return
        except Unreachable as exc:
            self._unreachable(sb, str(exc))
            return
        except BootFailed:
            return  # the process ended: the exit watcher reports it
        self._booted(sb, loop.time() - t0)

    def _unreachable(self, sb: _Sandbox, why: str) -> None:
        """An upstream instance does not answer (at boot, or a refused connection later): DOWN,
        its waiters fail at once when nothing else can serve them, and it is re-probed."""
        prev = sb.state
        sb.error = why
        self._set_state(sb, SandboxEvent.UNREACHABLE)
        if sb.state is not DOWN or prev is DOWN:
            return
        pool = sb.pool
        log.warning("%r is down (%s): re-probing", sb, why)
        if self._all_down(pool):
            self._fail_waiters(pool, self._down_error(pool))
        else:
            self._reconcile(pool)  # another instance (the next URL) may serve the waiters
        self._spawn(self._reprobe(sb), f"reprobe {sb.id}")

    async def _reprobe(self, sb: _Sandbox) -> None:
        """Probe a DOWN instance with back-off until it answers, then it serves again."""
        delay = REPROBE_FIRST
        check = getattr(sb.handle, "check", None)
        while check is not None:
            await asyncio.sleep(delay)
            if sb.state is not DOWN or self._closed:
                return
            if await check():
                if sb.state is DOWN:
                    log.info("%r answers again", sb)
                    self._set_state(sb, SandboxEvent.BOOTED)
                    sb.last_used = self._mono()
                    self._reconcile(sb.pool)
                return
            delay = min(delay * 2, REPROBE_MAX)

    async def _watch_exit(self, sb: _Sandbox) -> None:
        assert sb.handle is not None
        rc = await sb.handle.wait_exit()
        self._exited(sb, rc)

    async def _stop_handle(self, sb: _Sandbox, grace: float) -> None:
        if sb.handle is not None:
            await sb.handle.stop(grace)

    def _set_state(self, sb: _Sandbox, event: SandboxEvent) -> SandboxStatus:
        """Apply `event`; returns the previous state (the table decides the new one)."""
        prev = sb.state
        new = transition(prev, event)
        if new is prev:
            return prev
        sb.state = new
        self.metrics.sandbox_state(prev, new)
        pool = sb.pool
        if prev is RUNNING:
            pool.running.remove(sb)
            if self.warm.get(sb.version_id) is sb:
                del self.warm[sb.version_id]  # (hold() trusts that it only holds running ones)
            self._invalidate(sb.id)
        if new is RUNNING:
            pool.running.append(sb)
        if prev is DOWN:
            pool.down.remove(sb)
        if new is DOWN:
            pool.down.append(sb)
        if new in FINAL:
            pool.live.remove(sb)
            self._retain(pool, sb)
            boot = sb.boot_task
            if (
                boot is not None
                and not boot.done()
                and sb.handle is not None  # never cancelled mid-spawn: it would leak the child
                and boot is not asyncio.current_task()
            ):
                boot.cancel()  # it is waiting for the health check
            self._persist_pool(pool)
        if prev is RUNNING or new is RUNNING or new in FINAL:
            self._set_limits(pool)
        self._persist_sandbox(sb)
        return prev

    @staticmethod
    def _set_limits(pool: _Pool) -> None:
        """Every running sandbox's `limit` after the pool's running or live count changed."""
        params = pool.params
        limit = unit_limit(
            target=params.target,
            cap=params.hard_cap,
            running=len(pool.running),
            live=len(pool.live),
            max_instances=params.max_instances,
        )
        for sb in pool.running:
            sb.limit = limit

    def _booted(self, sb: _Sandbox, duration: float) -> None:
        if sb.state is not PENDING:
            return
        self._set_state(sb, SandboxEvent.BOOTED)
        sb.last_used = self._mono()
        self.metrics.cold_start_duration.observe(duration)
        log.info("%r ready after %.3fs", sb, duration)
        self._reconcile(sb.pool)

    def _boot_failed(self, sb: _Sandbox, err: ActivatorError) -> None:
        if sb.state is not PENDING:
            return
        sb.error = str(err)
        self._set_state(sb, SandboxEvent.BOOT_FAILED)
        self._died(sb, err)

    def _exited(self, sb: _Sandbox, rc: int | None) -> None:
        prev = sb.state
        if prev in FINAL:
            return  # we stopped it, or its boot had already failed
        sb.error = f"exited with status {rc}"
        self._set_state(sb, SandboxEvent.EXITED)
        err = None
        if prev is PENDING:
            err = BootFailed(
                f"sandbox {sb.id} of {sb.pool.version.id} exited with status {rc} while booting",
                sandbox_id=sb.id,
            )
        self._died(sb, err)

    def _died(self, sb: _Sandbox, boot_error: ActivatorError | None) -> None:
        pool = sb.pool
        now = self._mono()
        uptime = now - sb.started_mono
        pool.crash = after_death(pool.crash, uptime=uptime, now=now, policy=self._config.crash)
        tail = ""
        if sb.log_path is not None:
            with contextlib.suppress(OSError):
                tail = read_tail(sb.log_path, 1024) or ""
        log.warning(
            "%r died after %.2fs (%s); crash count %d%s",
            sb,
            uptime,
            sb.error,
            pool.crash.consecutive,
            f"; log tail:\n{tail}" if tail else "",
        )
        if boot_error is not None and pool.pending == 0:
            # Nothing else is booting: the callers waiting for this boot fail now, not at
            # their timeout.
            self._fail_waiters(pool, boot_error)
        self._persist_pool(pool)
        self._reconcile(pool)

    def _request_stop(self, sb: _Sandbox, grace: float) -> asyncio.Task[None] | None:
        prev = self._set_state(sb, SandboxEvent.STOP_REQUESTED)
        if prev in FINAL:
            return sb.stop_task
        pool = sb.pool
        pool.crash = after_clean_stop(
            pool.crash, uptime=self._mono() - sb.started_mono, policy=self._config.crash
        )
        log.info("stopping %r", sb)
        if sb.handle is not None:
            sb.stop_task = self._spawn(self._stop_handle(sb, grace), f"stop {sb.id}")
        # else: still spawning; its boot task stops it as soon as the spawn returns
        return sb.stop_task if sb.stop_task is not None else sb.boot_task

    def _retain(self, pool: _Pool, sb: _Sandbox) -> None:
        pool.finished.append(sb)
        while len(pool.finished) > self._config.history:
            self._purge(pool.finished.popleft())

    def _purge(self, sb: _Sandbox) -> None:
        """Forget an ended sandbox: memory, store entity, log file."""
        self._sandboxes.pop(sb.id, None)
        self.metrics.sandbox_state(sb.state, None)
        self._writer.delete(Sandbox, sb.id)
        if sb.log_path is not None:
            for path in (sb.log_path, rotated_path(sb.log_path)):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _invalidate(self, sandbox_id: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(sandbox_id)
            except Exception:
                log.exception("invalidation callback %r failed", callback)

    # -- idle scale-down -------------------------------------------------------------------------

    def sweep(self) -> int:
        """One pass of idle scale-down, min_instances refill and last_activity persistence.

        Runs every `sweep_interval` on its own; tests with a manual clock call it directly.
        Returns how many sandboxes it stopped.
        """
        if self._closed:
            return 0
        now = self._mono()
        stopped = 0
        for pool in list(self._pools.values()):
            victims = idle_victims(
                [IdleCandidate(sb.id, sb.in_use, sb.last_used) for sb in pool.running],
                live=len(pool.live),
                now=now,
                params=pool.params,
            )
            for sid in victims:
                sb = self._sandboxes[sid]
                log.info("%r idle for %.1fs: stopping", sb, now - sb.last_used)
                self._request_stop(sb, self._config.stop_grace)
                stopped += 1
            for sb in pool.running:
                self._check_log(sb)
                if sb.in_use:
                    sb.last_used = now  # busy now (leases do not read the clock)
                if sb.last_used - sb.persisted_activity >= self._config.activity_persist_interval:
                    sb.persisted_activity = sb.last_used
                    self._persist_sandbox(sb)
            if len(pool.live) < pool.params.min_instances:
                self._reconcile(pool)
        return stopped

    def _check_log(self, sb: _Sandbox) -> None:
        """Rotate a sandbox's log once it is past the cap (see miren_activator.logs)."""
        path = sb.log_path
        if path is None or sb.log_rotating or not over_cap(path, self._config.log_max_bytes):
            return
        sb.log_rotating = True
        self._spawn(self._rotate_log(sb, path), f"miren-log-rotate-{sb.id}")

    async def _rotate_log(self, sb: _Sandbox, path: Path) -> None:
        try:
            await asyncio.to_thread(rotate, path)
        except OSError as exc:
            log.warning("%r: cannot rotate its log %s: %s", sb, path, exc)
        finally:
            sb.log_rotating = False

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.sweep_interval)
            try:
                self.sweep()
            except Exception:
                log.exception("activator sweep failed")

    # -- removal (the version was deleted) -------------------------------------------------------

    async def remove_version(self, version_id: str) -> None:
        """Stop the sandboxes of every pool of `version_id` and forget them.

        Waiters fail with VersionRemoved. The pool entities are left to their owner (the GC
        deletes them with the version); the sandbox entities and logs go now.
        """
        stops: list[asyncio.Task[None]] = []
        for key in [k for k in self._pools if k[0] == version_id]:
            pool = self._pools.pop(key)
            pool.removed = True
            self._fail_waiters(pool, VersionRemoved(f"version {version_id} was removed"))
            for sb in list(pool.live):
                task = self._request_stop(sb, self._config.stop_grace)
                if task is not None:
                    stops.append(task)
            for sb in list(pool.finished):
                self._purge(sb)
            pool.finished.clear()
        if stops:
            await asyncio.wait(stops)

    # -- store records ---------------------------------------------------------------------------

    def _persist_sandbox(self, sb: _Sandbox) -> None:
        if sb.id not in self._sandboxes:
            return
        entity = self._sandbox_entity(sb)
        self._writer.put(Sandbox, sb.id, lambda _cur: entity)

    def _persist_pool(self, pool: _Pool) -> None:
        if pool.removed:
            return
        desired = len(pool.live)
        crash = pool.crash
        cooldown = None
        if crash.cooldown_until is not None and crash.remaining(self._mono()) > 0:
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

    def _sandbox_entity(self, sb: _Sandbox) -> Sandbox:
        return Sandbox(
            id=sb.id,
            pool=sb.pool.id,
            app=sb.pool.version.app,
            version=sb.pool.version.id,
            node=self._config.node,
            status=sb.state,
            url=sb.url,
            pid=sb.pid,
            started_at=sb.started_at,
            last_activity=wall_of(self._clock, sb.last_used),
        )

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every state change so far is written to the store (tests, shutdown)."""
        return await self._writer.flush(timeout)

    async def _forget_stale_sandboxes(self) -> None:
        # Sandboxes this node recorded before a restart died with it (PR_SET_PDEATHSIG).
        try:
            stale = [s for s in await self._store.list(Sandbox) if s.node == self._config.node]
        except StoreError as exc:
            log.warning("could not list stale sandboxes: %s", exc)
            return
        for s in stale:
            if s.id not in self._sandboxes:
                self._writer.delete(Sandbox, s.id)

    # -- introspection (admin API, logs, tests) --------------------------------------------------

    def sandboxes(self, app: str | None = None) -> list[Sandbox]:
        """Sandbox records (live, then recently ended) of `app`'s pools on this node."""
        return [
            self._sandbox_entity(sb)
            for pool in self._pools.values()
            if app is None or pool.version.app == app
            for sb in (*pool.live, *pool.finished)
        ]

    def log_path(self, sandbox_id: str) -> Path | None:
        """The log file of a live or recently ended sandbox (None when unknown or not logged)."""
        sb = self._sandboxes.get(sandbox_id)
        return sb.log_path if sb is not None else None

    def tail_log(
        self, sandbox_id: str, lines: int = 200, max_bytes: int = 1 << 20
    ) -> list[str] | None:
        """The last `lines` lines of a sandbox's log (at most `max_bytes` read); None when the
        sandbox is unknown or has no log. A blocking read of a local file: bounded, small."""
        path = self.log_path(sandbox_id)
        if path is None:
            return None
        try:
            out = tail_lines(path, lines, max_bytes)
        except OSError:
            out = None
        return [] if out is None else out  # (nothing written yet, or unreadable)

    def snapshot(self, version_id: str, service: str = WEB) -> PoolSnapshot | None:
        pool = self._pools.get((version_id, service))
        if pool is None:
            return None
        return PoolSnapshot(
            pool_id=pool.id,
            desired=len(pool.live),
            ready=len(pool.running),
            pending=pool.pending,
            waiters=sum(1 for f in pool.waiters if not f.done()),
            crash_count=pool.crash.consecutive,
            backoff_remaining=pool.crash.remaining(self._mono()),
            sandboxes=tuple(
                SandboxInfo(sb.id, sb.state, sb.in_use, pool.params.target, sb.pid, sb.url)
                for sb in (*pool.live, *pool.finished)
            ),
        )

    def describe(self) -> list[str]:
        """One line per pool and per sandbox (reprs), for logs and the admin debug output."""
        lines = [repr(self)]
        for pool in self._pools.values():
            lines.append("  " + repr(pool))
            lines.extend("    " + repr(sb) for sb in (*pool.live, *pool.finished))
        return lines

    def pools(self) -> Iterable[tuple[str, str]]:
        """(version id, service) of every loaded pool."""
        return list(self._pools)

    # -- tasks -------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("activator task %s failed", task.get_name(), exc_info=task.exception())
