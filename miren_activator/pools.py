"""The activator's in-memory records: pools, their sandboxes, leases, and views of them.

Pure: no I/O, no clock read, no task. The activator and its supervisor change these records
between two awaits, so no other task sees a change half done.

- **Pools.** One `PoolRecord` per (version id, service), holding its sandboxes and a FIFO of
  waiting acquires. Its store entity has the deterministic id `pool-<version id>-<service>`, so
  every version gets a private pool (normal versions do not share pools here; an identical spec
  would only save a sandbox, and private pools keep deletion trivial).
- **Its lists.** `live` holds the pending, running and down sandboxes in start order; `running`
  and `down` are the RUNNING and DOWN subsets (the warm path scans `running` only); `finished`
  the ended ones, newest last, kept for the admin API until the supervisor purges them. A state
  change goes through `PoolRecord.move`, the one place these lists change.
- **Limits.** Every running sandbox carries its `limit` (`capacity.unit_limit`): while it holds
  fewer units, the warm path takes one more without a decision. `move` and `add` recompute it
  whenever the pool's running or live count changes.
- **Units of work.** A `Lease` is one unit on a sandbox, as an object of its own (`acquire`,
  `try_acquire`); the ingress's per-request unit is the sandbox record itself, seen through the
  `Held` protocol (see `Activator.hold`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Final, NamedTuple, Protocol, cast

import attrs

from miren_activator.capacity import unit_limit
from miren_activator.errors import CrashBackoff, Unreachable
from miren_activator.lifecycle import FINAL
from miren_activator.policy import CrashState, PoolParams
from miren_activator.runtimes.base import SandboxHandle
from miren_store.entities import AppVersion, SandboxPool, SandboxStatus

PENDING: Final = SandboxStatus.PENDING
RUNNING: Final = SandboxStatus.RUNNING
DOWN: Final = SandboxStatus.DOWN


class VersionRef(Protocol):
    """What `Activator.hold` reads: a (version id, service) pair."""

    @property
    def version(self) -> str: ...

    @property
    def service(self) -> str: ...


class Ref(NamedTuple):
    """A VersionRef from plain ids (`try_acquire`; not the proxy's hot path)."""

    version: str
    service: str


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
    # sandbox, whose id, version and service never change. `record` and `released` are the
    # activator's to use (read them, never set them).
    __slots__ = ("addr", "record", "released")

    def __init__(self, record: SandboxRecord) -> None:
        self.record = record
        self.released = False
        self.addr = record.addr  # (host, port): the ingress's key for its connection pools

    @property
    def host(self) -> str:
        return self.addr[0]

    @property
    def port(self) -> int:
        return self.addr[1]

    @property
    def sandbox_id(self) -> str:
        return self.record.id

    @property
    def remote(self) -> bool:
        """On another node's pool: `addr` is that node's proxy (see RemoteRecord)."""
        return self.record.remote

    @property
    def peer(self) -> str:
        """The node whose proxy `addr` is ("" for a sandbox)."""
        return self.record.peer if isinstance(self.record, RemoteRecord) else ""

    @property
    def version_id(self) -> str:
        return self.record.version_id

    @property
    def service(self) -> str:
        return self.record.service

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        """False once its sandbox left RUNNING (the ingress should drop it)."""
        return self.record.state is RUNNING

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return (
            f"<Lease {self.sandbox_id} {self.host}:{self.port} v={self.version_id} "
            f"svc={self.service} {state}>"
        )


def sandbox_of(unit: Lease | Held) -> SandboxRecord:
    """The sandbox behind a Lease, or a Held (the sandbox itself: see `Activator.hold`)."""
    return unit.record if isinstance(unit, Lease) else cast(SandboxRecord, unit)


class _NoQueue:
    """The `pool` of a RemoteRecord: nobody ever queues here (the owner node queues)."""

    __slots__ = ()
    waiters: tuple[()] = ()


class RemoteRecord:
    """A pool another node owns, seen through the `Held` protocol: every unit of work on it
    is a request forwarded to the owner's proxy at `addr`, without a limit here (the owner
    applies the pool's capacity rules, cluster-wide). `hold` and `release` treat it as a
    running sandbox that is never full; `owner`/`owner_lease` identify the membership it
    belongs to (dropped when that node leaves or re-joins)."""

    __slots__ = (
        "addr", "host", "id", "in_use", "last_used", "limit", "owner", "owner_lease", "peer",
        "pool", "port", "remote", "service", "state", "version_id",
    )  # fmt: skip

    def __init__(
        self, version_id: str, service: str, owner: str, owner_lease: int, address: str
    ) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.addr = (self.host, self.port)
        self.id = f"node:{owner}"
        self.version_id = version_id
        self.service = service
        self.owner = owner
        self.peer = owner  # (the Lease property of the same name: the node `addr` is)
        self.owner_lease = owner_lease
        self.in_use = 0
        self.limit = 1 << 62  # (never full here: the owner decides)
        self.last_used = 0.0
        self.pool = _NoQueue()
        self.state = RUNNING
        self.remote = True

    def __repr__(self) -> str:
        return (
            f"<RemoteRecord {self.version_id}/{self.service} at {self.owner} in_use={self.in_use}>"
        )


class SandboxRecord:
    """One sandbox of a pool: its state, its load, and what its supervisor keeps of it."""

    remote = False  # (a RemoteRecord says True: the proxy forwards to another node)

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

    def __init__(
        self,
        pool: PoolRecord,
        sid: str,
        ordinal: int,
        *,
        now: float,
        started_at: datetime,
        log_path: Path | None = None,
    ) -> None:
        self.pool = pool
        self.id = sid
        self.version_id = pool.version.id
        self.service = pool.service
        self.ordinal = ordinal
        self.state = PENDING
        self.limit = pool.params.target  # (capacity.unit_limit: set by PoolRecord.set_limits)
        self.in_use = 0
        # `last_used` matters only while the sandbox holds no unit (the idle policy never stops
        # one that does): it is set when the last unit is given back, so a busy sandbox costs
        # no clock read per request; the sweep refreshes it on busy ones for `last_activity`.
        self.last_used = now
        self.persisted_activity = now
        self.started_mono = now
        self.started_at = started_at
        self.host = ""
        self.port = 0
        self.addr = ("", 0)  # (host, port), set with them
        self.pid: int | None = None
        self.handle: SandboxHandle | None = None
        self.log_path = log_path
        self.log_rotating = False
        self.boot_task: asyncio.Task[None] | None = None
        self.exit_task: asyncio.Task[None] | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.error = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}" if self.port else ""

    def spawned(self, handle: SandboxHandle) -> None:
        """The runtime started it: where it listens, and its pid."""
        self.handle = handle
        self.host, self.port, self.pid = handle.host, handle.port, handle.pid
        self.addr = (self.host, self.port)

    def __repr__(self) -> str:
        return (
            f"<Sandbox {self.id} v={self.pool.version.id} svc={self.pool.service} "
            f"{self.state.value} pid={self.pid} in_use={self.in_use}/{self.pool.params.target} "
            f"url={self.url or '-'}>"
        )


class PoolRecord:
    """The sandboxes and waiters of one (version id, service) on this node."""

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
        self.entity = entity  # as last written (see persist.Recorder.pool)
        self.live: list[SandboxRecord] = []  # pending + running + down, in start order
        self.running: list[SandboxRecord] = []  # the RUNNING subset, in boot order
        self.down: list[SandboxRecord] = []  # the DOWN subset (upstreams being re-probed)
        self.finished: deque[SandboxRecord] = deque()  # ended, newest last
        self.waiters: deque[asyncio.Future[Lease]] = deque()
        self.crash = crash
        self.removed = False

    @property
    def pending(self) -> int:
        """Sandboxes booting now."""
        return len(self.live) - len(self.running) - len(self.down)

    def next_ordinal(self) -> int:
        """The lowest instance number no live sandbox has (the upstream runtime's URL index)."""
        used = {sb.ordinal for sb in self.live}
        return next(i for i in range(len(used) + 1) if i not in used)

    def add(self, sb: SandboxRecord) -> None:
        """A new (pending) sandbox of this pool."""
        self.live.append(sb)
        self.set_limits()

    def move(self, sb: SandboxRecord, new: SandboxStatus) -> None:
        """Record `sb`'s change of state to `new`: the pool's lists, then the limits."""
        prev = sb.state
        sb.state = new
        if prev is RUNNING:
            self.running.remove(sb)
        if new is RUNNING:
            self.running.append(sb)
        if prev is DOWN:
            self.down.remove(sb)
        if new is DOWN:
            self.down.append(sb)
        if new in FINAL:
            self.live.remove(sb)
            self.finished.append(sb)
        if prev is RUNNING or new is RUNNING or new in FINAL:
            self.set_limits()

    def trim_finished(self, keep: int) -> list[SandboxRecord]:
        """Drop the oldest ended sandboxes beyond `keep`; returns them (to purge)."""
        dropped = []
        while len(self.finished) > keep:
            dropped.append(self.finished.popleft())
        return dropped

    def set_limits(self) -> None:
        """Every running sandbox's `limit` after the pool's running or live count changed."""
        params = self.params
        limit = unit_limit(
            target=params.target,
            cap=params.hard_cap,
            running=len(self.running),
            live=len(self.live),
            max_instances=params.max_instances,
        )
        for sb in self.running:
            sb.limit = limit

    def fail_waiters(self, err: BaseException) -> None:
        """Every queued acquire fails with `err`."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(err)

    def all_down(self) -> bool:
        """Nothing of the pool can serve or is booting, and no other instance may start: every
        one of its upstream instances is down."""
        return (
            bool(self.down)
            and not self.running
            and not self.pending
            and len(self.live) >= self.params.max_instances
        )

    def down_error(self) -> Unreachable:
        sb = self.down[-1]
        return Unreachable(
            f"{self.version.id}/{self.service}: no instance answers ({sb.url}: {sb.error}); "
            "re-probing",
            sandbox_id=sb.id,
        )

    def backoff_error(self, remaining: float) -> CrashBackoff:
        return CrashBackoff(
            f"{self.version.id}/{self.service} crashed {self.crash.consecutive} time(s) in a row "
            f"shortly after starting; retrying in {remaining:.0f}s",
            retry_after=remaining,
            sandbox_id=self.finished[-1].id if self.finished else None,
        )

    def snapshot(self, now: float) -> PoolSnapshot:
        """A view of the pool at monotonic time `now`."""
        target = self.params.target
        return PoolSnapshot(
            pool_id=self.id,
            desired=len(self.live),
            ready=len(self.running),
            pending=self.pending,
            waiters=sum(1 for f in self.waiters if not f.done()),
            crash_count=self.crash.consecutive,
            backoff_remaining=self.crash.remaining(now),
            sandboxes=tuple(
                SandboxInfo(sb.id, sb.state, sb.in_use, target, sb.pid, sb.url)
                for sb in (*self.live, *self.finished)
            ),
        )

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


@attrs.frozen
class BootReport:
    """A sandbox that passed its health check for `Activator.boot_check` (deploy --wait)."""

    sandbox_id: str
    seconds: float  # from the check's start until the sandbox was healthy (0 when one ran)
