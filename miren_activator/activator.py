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

The parts: `pools.py` holds the in-memory records (pools, sandboxes, leases) and the bookkeeping
on them; `supervisor.py` starts, boots, watches and stops sandboxes and owns every background
task; `persist.py` writes pool and sandbox records to the store; `capacity.py`, `policy.py`
and `lifecycle.py` make the pure decisions. This module is the facade the ingress and the admin
API use:

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
  when nothing could ever serve them (crash back-off with no sandbox). The supervisor calls it
  whenever a pool's capacity changed (a boot, a death, an instance back up).
- **Idle.** A sweep (every `sweep_interval`) stops running sandboxes that held no lease for the
  pool's `scale_down_delay` (never one with an in-flight lease, never below `min_instances`);
  a pool can reach zero sandboxes and the next acquire cold-starts one. The same sweep checks
  the logs' size and writes `last_activity` (at most every `activity_persist_interval`).
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

Multi-node (with a `Membership`, see `cluster.py`): a pool belongs to one node, the one its
entity names with that node's membership lease. The miss path decides (`cluster.decide`) from
the stored pool and the owner's stored `Node`: this node's pool is loaded as above; another live
node's becomes a `RemoteRecord` (requests are forwarded to that node, whose activator applies
the capacity rules for the whole cluster); a pool whose owner is gone is taken over in one
transaction conditioned on the old owner's `Node` (`cluster.takeover_check`). A node that can no
longer prove its membership is fenced (`fence`): it drops every pool, stops their sandboxes,
and takes no lease until it has joined again. Without a Membership every pool is local.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
from prometheus_client import CollectorRegistry

from miren_activator.capacity import pick, saturated
from miren_activator.clock import Clock, SystemClock
from miren_activator.cluster import Membership, NotMember, Ownership, decide, takeover_check
from miren_activator.config import ActivatorConfig
from miren_activator.errors import (
    ActivationTimeout,
    ActivatorClosed,
    ActivatorError,
    BootFailed,
    NotOwner,
    Overloaded,
    PoolCreationFailed,
    VersionRemoved,
)
from miren_activator.metrics import ActivatorMetrics
from miren_activator.persist import Recorder, crash_from_entity, new_pool_entity
from miren_activator.policy import WEB, IdleCandidate, idle_victims, sandboxes_to_start
from miren_activator.pools import (
    BootReport,
    Held,
    Lease,
    PoolRecord,
    PoolSnapshot,
    Ref,
    RemoteRecord,
    SandboxInfo,
    SandboxRecord,
    VersionRef,
    sandbox_of,
)
from miren_activator.runtimes.base import SandboxRuntime
from miren_activator.runtimes.process import ProcessRuntime
from miren_activator.runtimes.upstream import UpstreamRuntime
from miren_activator.supervisor import Supervisor
from miren_store.entities import AppVersion, Node, Runtime, Sandbox, SandboxPool, SandboxStatus
from miren_store.errors import Conflict, NotFound
from miren_store.logfiles import tail_lines
from miren_store.store import Store, Update

__all__ = ["Activator", "BootReport", "Held", "Lease", "PoolSnapshot", "SandboxInfo", "VersionRef"]

log = logging.getLogger("miren.activator")

RUNNING: Final = SandboxStatus.RUNNING
BOOT_CHECK_SLACK = 10.0  # seconds boot_check waits past boot_timeout: the spawn, a busy store


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
        membership: Membership | None = None,
    ) -> None:
        self._store = store
        self.membership = membership
        self._config = config or ActivatorConfig()
        self._clock = clock or SystemClock()
        self._mono = self._clock.monotonic
        self.metrics = ActivatorMetrics(registry, node=self._config.node)
        self._recorder = Recorder(store, node=self._config.node, clock=self._clock)
        self._supervisor = Supervisor(
            runtimes=runtimes
            or {Runtime.PROCESS: ProcessRuntime(), Runtime.UPSTREAM: UpstreamRuntime()},
            config=self._config,
            clock=self._clock,
            metrics=self.metrics,
            recorder=self._recorder,
            reconcile=self._reconcile,
            left_running=self._left_running,
        )
        self._pools: dict[tuple[str, str], PoolRecord] = {}
        self._remote: dict[tuple[str, str], RemoteRecord] = {}  # pools other nodes own
        # hold(): the sandbox found last per version id; running ones only (_left_running).
        self.warm: dict[str, SandboxRecord | RemoteRecord] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[PoolRecord | RemoteRecord]] = {}
        self._creators: set[asyncio.Task[Any]] = set()  # pool creations in flight
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._fences = 0  # times this node was fenced: a creation spanning one is void
        if membership is not None:
            membership.on_lost.append(self.fence)
            membership.on_peer_gone.append(self.forget_node)

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
        await self._supervisor.prepare()  # e.g. the process runtime picks its launcher, now
        self._recorder.start()
        self._sweeper = self._supervisor.spawn(self._sweep_loop(), "miren-activator-sweep")
        self._supervisor.spawn(
            self._recorder.forget_stale(lambda sid: self._supervisor.get(sid) is not None),
            "miren-activator-recover",
        )

    async def close(self, grace: float | None = None) -> None:
        """Fail waiters, stop every sandbox (SIGTERM, SIGKILL after `grace`), await all tasks."""
        if self._closed:
            return
        self._closed = True
        grace = self._config.stop_grace if grace is None else grace
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._creators:
            task.cancel()  # their callers get ActivatorClosed
        closed = ActivatorClosed("the activator is shutting down")
        for pool in self._pools.values():
            pool.fail_waiters(closed)
        self._pools.clear()
        self._remote.clear()
        self.warm.clear()
        await self._supervisor.close(grace)
        await self._recorder.close(self._config.store_flush_timeout)

    async def __aenter__(self) -> Activator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _left_running(self, sb: SandboxRecord) -> None:
        """The supervisor's news that `sb` left RUNNING (synchronously, as it happens)."""
        if self.warm.get(sb.version_id) is sb:
            del self.warm[sb.version_id]  # (hold() trusts that it only holds running ones)

    # -- the warm path (no await; see SandboxRecord.last_used for why no clock is read) -------

    def try_acquire(self, version_id: str, service: str = WEB) -> Lease | None:
        """A lease on a running sandbox with spare capacity, or None (then call `acquire`)."""
        sb = self._take(Ref(version_id, service))
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

    def _take(self, ref: VersionRef) -> SandboxRecord | None:
        """One unit of work on the sandbox `capacity.pick` chooses, unless anyone waits; a unit
        past the target on every sandbox asks for one more sandbox."""
        key = (ref.version, ref.service)
        pool = self._pools.get(key)
        if pool is None:
            remote = self._remote.get(key)
            if remote is not None:
                remote.in_use += 1
            return remote  # type: ignore[return-value]  # (a Held like a sandbox: see hold)
        if pool.waiters:
            return None
        params = pool.params
        sb = pick(pool.running, params.target, params.hard_cap)
        if sb is None:
            return None
        sb.in_use += 1
        if sb.in_use > params.target:  # (pick spreads only when every sandbox is at the target)
            self._scale_up(pool)
        return sb

    def _scale_up(self, pool: PoolRecord) -> None:
        """Every running sandbox is past the target: start one more if the policy says so."""
        if pool.pending or len(pool.live) >= pool.params.max_instances or self._closed:
            return  # (the common case under load, decided without the policy call)
        if self.membership is not None and not self.membership.proven():
            return  # (the next request fences; nothing starts meanwhile)
        n = sandboxes_to_start(
            waiting=len(pool.waiters),
            pending=pool.pending,
            live=len(pool.live),
            params=pool.params,
            in_backoff=pool.crash.remaining(self._mono()) > 0,
            saturated=True,
        )
        for _ in range(n):
            self._supervisor.start(pool)

    def release(self, lease: Lease | Held) -> None:
        """Give a lease's capacity back (hands it to the next waiter, if any); a `Held` from
        `hold` too."""
        if isinstance(lease, Lease):
            if lease.released:
                return
            lease.released = True
            sb = lease.record
        else:
            sb = lease  # type: ignore[assignment]  # (a Held is its SandboxRecord: see hold)
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
        sb = sandbox_of(lease)
        if sb.remote:  # the owner node did not answer: ask the store again next time
            self._drop_remote((sb.version_id, sb.service))
            return
        self._supervisor.refused(sb)

    def touch(self, lease: Lease) -> bool:
        """Mark activity on a held lease; False when its sandbox is no longer running."""
        sb = lease.record
        sb.last_used = self._mono()
        return sb.state is RUNNING and not lease.released

    # -- the miss path ---------------------------------------------------------------------------

    async def acquire(
        self,
        version: AppVersion,
        service: str = WEB,
        *,
        timeout: float | None = None,
        local: bool = False,
    ) -> Lease:
        """A lease on a sandbox of (version, service), creating the pool and booting a sandbox if
        needed, within `timeout` (default `acquire_timeout`). Raises an `ActivatorError` (see
        `errors.py` for how each maps to HTTP). The lease may be on another node (`remote`):
        its address is that node's proxy. With `local` (a request another node forwarded here)
        it is never remote: a pool this node does not own is NotOwner."""
        membership = self.membership
        if membership is not None and not membership.proven():
            membership.check(membership.proven_until)  # (fences, once)
            raise NotOwner(f"node {membership.name} is not a proven cluster member right now")
        key = (version.id, service)
        if local and key in self._remote:
            self._drop_remote(key)  # the sender thinks this node owns it: ask the store again
        lease = self.try_acquire(version.id, service)
        if lease is not None:
            return lease
        if self._closed:
            raise ActivatorClosed("the activator is shutting down")
        if not self._started:
            await self.start()
        pool = self._pools.get(key)
        if pool is None:
            found = await self._pool_for(version, service)
            if isinstance(found, RemoteRecord):
                if local:
                    raise NotOwner(f"pool of {version.id}/{service} belongs to node {found.owner}")
                found.in_use += 1
                return Lease(found)  # type: ignore[arg-type]  # (Held-compatible, see hold)
            pool = found
        return await self._wait(pool, timeout)

    async def boot_check(self, version: AppVersion, service: str = WEB) -> BootReport:
        """Have one sandbox of `version` healthy (booting it if none runs) and report it: what
        `deploy --wait` answers. Waits up to the version's `boot_timeout` (and a little more for
        the spawn); raises the boot's `ActivatorError`, whose `sandbox_id` names the sandbox
        whose log explains it. The sandbox stays up, warm for the first visitor."""
        t0 = self._mono()
        limit = version.spec.boot_timeout.total_seconds() + BOOT_CHECK_SLACK
        lease = await self.acquire(version, service, timeout=limit)
        try:
            return BootReport(sandbox_id=lease.sandbox_id, seconds=self._mono() - t0)
        finally:
            self.release(lease)

    async def _pool_for(self, version: AppVersion, service: str) -> PoolRecord | RemoteRecord:
        key = (version.id, service)
        remote = self._remote.get(key)
        if remote is not None:
            return remote
        fut = self._creating.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._creating[key] = fut
            task = self._supervisor.spawn(
                self._create_pool(key, version, service, fut), f"pool {key}"
            )
            self._creators.add(task)
            task.add_done_callback(self._creators.discard)
        # shield: a caller that goes away does not cancel the creation others wait on.
        return await asyncio.shield(fut)

    async def _create_pool(
        self,
        key: tuple[str, str],
        version: AppVersion,
        service: str,
        fut: asyncio.Future[PoolRecord | RemoteRecord],
    ) -> None:
        fences = self._fences
        try:
            pool = await self._load_or_create_pool(version, service)
            if self._closed:
                raise ActivatorClosed("the activator is shutting down")
            self._check_still_valid(pool, fences)
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
        del self._creating[key]
        if isinstance(pool, RemoteRecord):
            self._remote[key] = pool
            fut.set_result(pool)
            return
        self._pools[key] = pool
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
            self._supervisor.start(pool)
        fut.set_result(pool)

    async def _load_or_create_pool(
        self, version: AppVersion, service: str
    ) -> PoolRecord | RemoteRecord:
        problems = version.spec.problems()
        if problems:
            raise BootFailed(f"version {version.id} cannot run: {'; '.join(problems)}")
        if not self._supervisor.has_runtime(version.spec.runtime):
            raise BootFailed(f"no runtime {version.spec.runtime.value!r} on this node")
        if version.revision > 0:
            # A version read from the store: make sure it was not deleted meanwhile (a request
            # resolved from a stale table), so no pool is created for a version that is gone.
            try:
                await self._store.get(AppVersion, version.id)
            except NotFound:
                raise VersionRemoved(f"version {version.id} no longer exists") from None
        me = self._me()
        fresh = new_pool_entity(version, service, node=self._config.node, clock=self._clock)
        if me is not None:
            fresh = attrs.evolve(fresh, owner=me.id, owner_lease=me.lease)
        stored, created = await self._recorder.create_pool(fresh)
        if created:
            self.metrics.pool_creations.inc()
            log.info("created pool %s", stored.id)
        elif me is not None:
            found = await self._owned(version, service, stored, me)
            if isinstance(found, RemoteRecord):
                return found
            stored = found
        return PoolRecord(version, service, stored, crash_from_entity(stored, self._clock))

    def _check_still_valid(self, pool: PoolRecord | RemoteRecord, fences: int) -> None:
        """After the awaits of a pool creation, in the step that inserts it: this node is still
        the member it was (no fence meanwhile, its lease proven and the one the pool names), and
        a remote owner did not leave meanwhile. Else NotOwner (the caller retries)."""
        m = self.membership
        if m is None:
            return
        node = m.node
        if self._fences != fences or node is None or not m.proven():
            raise NotOwner("this node lost its cluster membership while loading the pool")
        if isinstance(pool, RemoteRecord):
            if pool.owner_lease in m.departed:
                raise NotOwner(f"node {pool.owner} left while its pool was being read")
        elif pool.entity.owner_lease != node.lease:
            raise NotOwner("the pool was taken under a membership that has ended")

    def _me(self) -> Node | None:
        """This node's membership (None without a Membership); NotOwner when not proven."""
        if self.membership is None:
            return None
        try:
            return self.membership.me()
        except NotMember as exc:
            raise NotOwner(str(exc)) from None

    async def _owned(
        self, version: AppVersion, service: str, stored: SandboxPool, me: Node
    ) -> SandboxPool | RemoteRecord:
        """The stored pool as this node's (taking it over when its owner is gone), or the
        RemoteRecord of the live node that owns it."""
        for _ in range(5):
            owner: Node | None = None
            if stored.owner:
                try:
                    owner = await self._store.get(Node, stored.owner)
                except NotFound:
                    owner = None
            verdict = decide(stored, me, owner)
            if verdict is Ownership.LOCAL:
                return stored
            if verdict is Ownership.REMOTE:
                assert owner is not None
                return RemoteRecord(version.id, service, owner.id, owner.lease, owner.advertise)
            mine = attrs.evolve(stored, owner=me.id, owner_lease=me.lease)
            try:
                rev = await self._store.commit([Update(mine), takeover_check(stored, owner)])
            except (Conflict, NotFound):
                try:
                    stored = await self._store.get(SandboxPool, stored.id)
                except NotFound:
                    raise PoolCreationFailed(f"pool {stored.id} was deleted meanwhile") from None
                continue
            if not self.membership or not self.membership.proven():
                raise NotOwner("the membership lapsed during the takeover")
            taken = attrs.evolve(mine, revision=rev)
            self._recorder.know(taken)
            self.metrics.takeovers.inc()
            log.info("took over pool %s from node %s", stored.id, stored.owner or "(none)")
            return taken
        raise PoolCreationFailed(f"pool {stored.id}: ownership kept changing")

    # -- cluster news -----------------------------------------------------------------------------

    def _drop_remote(self, key: tuple[str, str]) -> None:
        remote = self._remote.pop(key, None)
        if remote is not None and self.warm.get(key[0]) is remote:
            del self.warm[key[0]]

    def forget_node(self, old: Node) -> None:
        """A node left (or re-joined under another lease): the pools it owned under `old` are
        asked for again (and taken over) on their next request."""
        for key in [k for k, r in self._remote.items() if r.owner_lease == old.lease]:
            self._drop_remote(key)

    def fence(self) -> None:
        """This node lost its membership: give up every pool (fail its waiters, stop its
        sandboxes) and every remote record; nothing is served from them any more."""
        if not self._pools and not self._remote:
            self._fences += 1
            return
        log.warning("fenced: dropping %d pools and their sandboxes", len(self._pools))
        self._fences += 1
        lost = NotOwner("this node lost its cluster membership")
        pools = list(self._pools.values())
        self._pools.clear()
        self._remote.clear()
        self.warm.clear()
        for pool in pools:
            pool.removed = True
            pool.fail_waiters(lost)
            stops = [
                task
                for sb in list(pool.live)
                if (task := self._supervisor.request_stop(sb, self._config.stop_grace))
            ]
            self._supervisor.spawn(self._purge_after(pool, stops), f"purge {pool.id}")

    async def _purge_after(self, pool: PoolRecord, stops: list[asyncio.Task[None]]) -> None:
        """Once a dropped pool's sandboxes stopped, forget them (records, entities, logs)."""
        if stops:
            await asyncio.wait(stops)
        self._supervisor.purge_finished(pool)

    async def _wait(self, pool: PoolRecord, timeout: float | None = None) -> Lease:
        if pool.removed:
            raise VersionRemoved(f"version {pool.version.id} was removed")
        if self._closed:
            raise ActivatorClosed("the activator is shutting down")
        backoff = pool.crash.remaining(self._mono())
        if backoff > 0 and not pool.running and not pool.pending:
            raise pool.backoff_error(backoff)
        if pool.all_down():
            raise pool.down_error()
        if len(pool.waiters) >= self._config.max_waiters:
            raise Overloaded(
                f"{len(pool.waiters)} requests already wait for {pool.version.id}/{pool.service}"
            )
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        pool.waiters.append(fut)
        self.metrics.waiters.inc()
        try:
            self._reconcile(pool)
            limit = self._config.acquire_timeout if timeout is None else timeout
            async with asyncio.timeout(limit):
                return await fut
        except BaseException as exc:
            # Cancelled (client gone) or timed out just after a lease was handed to us: give
            # it back, so no capacity stays taken by a caller that will never use it.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            if isinstance(exc, TimeoutError):
                raise ActivationTimeout(
                    f"no sandbox of {pool.version.id}/{pool.service} was available within "
                    f"{limit:g}s"
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

    # -- the bookkeeping step --------------------------------------------------------------------

    def _reconcile(self, pool: PoolRecord) -> None:
        """Hand out capacity, then start sandboxes or fail waiters as the policy says."""
        if self._closed or pool.removed:
            return
        m = self.membership
        if m is not None and not m.proven():
            m.check(m.proven_until)  # (fences: nothing starts on a pool this node may lose)
            return
        self._grant(pool)
        if pool.removed:  # (a fence inside _grant)
            return
        # A cancelled waiter leaves the queue when its task next runs; counting the queue with
        # them is at worst one sandbox early, and keeps this O(1) (it runs once per waiter).
        waiting = len(pool.waiters)
        if not waiting and len(pool.live) >= pool.params.min_instances:
            return
        backoff = pool.crash.remaining(self._mono())
        if waiting and backoff > 0 and not pool.running and not pool.pending:
            pool.fail_waiters(pool.backoff_error(backoff))
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
            self._supervisor.start(pool)

    def _grant(self, pool: PoolRecord) -> None:
        """Give queued waiters, in order, units of work on the sandboxes `capacity.pick`
        chooses (every waiter, when there is no hard cap and a sandbox runs). Never while this
        node cannot prove its membership (waiters queued before a lapse: it fences instead)."""
        waiters = pool.waiters
        if not waiters:
            return
        m = self.membership
        if m is not None and not m.proven():
            m.check(m.proven_until)  # (fences: the waiters fail with NotOwner)
            return
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
                sb = self._supervisor.get(sid)
                assert sb is not None  # (a running sandbox of the pool)
                log.info("%r idle for %.1fs: stopping", sb, now - sb.last_used)
                self._supervisor.request_stop(sb, self._config.stop_grace)
                stopped += 1
            for sb in pool.running:
                self._supervisor.check_log(sb)
                if sb.in_use:
                    sb.last_used = now  # busy now (leases do not read the clock)
                if sb.last_used - sb.persisted_activity >= self._config.activity_persist_interval:
                    sb.persisted_activity = sb.last_used
                    self._recorder.sandbox(sb)
            if len(pool.live) < pool.params.min_instances:
                self._reconcile(pool)
        return stopped

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
        for key in [k for k in self._remote if k[0] == version_id]:
            self._drop_remote(key)
        for key in [k for k in self._pools if k[0] == version_id]:
            pool = self._pools.pop(key)
            pool.removed = True
            pool.fail_waiters(VersionRemoved(f"version {version_id} was removed"))
            for sb in list(pool.live):
                task = self._supervisor.request_stop(sb, self._config.stop_grace)
                if task is not None:
                    stops.append(task)
            self._supervisor.purge_finished(pool)
        if stops:
            await asyncio.wait(stops)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every state change so far is written to the store (tests, shutdown)."""
        return await self._recorder.flush(timeout)

    # -- introspection (admin API, logs, tests) --------------------------------------------------

    def sandboxes(self, app: str | None = None) -> list[Sandbox]:
        """Sandbox records (live, then recently ended) of `app`'s pools on this node."""
        return [
            self._recorder.sandbox_entity(sb)
            for pool in self._pools.values()
            if app is None or pool.version.app == app
            for sb in (*pool.live, *pool.finished)
        ]

    def log_path(self, sandbox_id: str) -> Path | None:
        """The log file of a live or recently ended sandbox (None when unknown or not logged)."""
        sb = self._supervisor.get(sandbox_id)
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
        return None if pool is None else pool.snapshot(self._mono())

    def pools(self) -> Iterable[tuple[str, str]]:
        """(version id, service) of every loaded pool."""
        return list(self._pools)
