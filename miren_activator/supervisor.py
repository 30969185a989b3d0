"""Sandbox supervision: start, boot, watch, stop, re-probe, retain and purge sandboxes.

The activator decides *when* a pool gets another sandbox or loses one; the `Supervisor` carries
it out and reports back. It owns every background task of the activator (boots, exit watchers,
stops, re-probes, log rotations, and the tasks the activator spawns through it), so shutdown
awaits them all in one place.

- **Sandboxes** change state only through `lifecycle.transition` (pending -> running | dead |
  stopped; running -> dead | stopped; an upstream's running <-> down). `PoolRecord.move` keeps
  the pool's lists and limits in step. A boot task spawns through the version's runtime and
  waits for the health check under `boot_timeout`; an exit watcher awaits the process's end from
  the moment it exists, so a sandbox that dies while booting fails its waiters at once (not at
  the timeout). A sandbox that leaves RUNNING is reported to the activator synchronously
  (`left_running`: it drops it from the warm cache, no queue that could lose the news); a pool
  whose capacity changed (a boot, a death, an instance back up) is handed to the activator's
  `reconcile`, which serves waiters and decides on more sandboxes.
- **Crashes.** A sandbox that dies within `crash.window` of its start is a quick crash. The
  first is replaced at once; the n-th in a row (n >= 2) blocks starts for 10 s * 2^(n-2), at
  most 15 min (`policy.CrashPolicy`). During it an acquire that finds no running sandbox fails
  fast with `CrashBackoff`.
- **Down.** An upstream instance (a `static` handle: nothing could restart it) that refuses a
  connection is DOWN, not dead: its waiters fail at once when nothing else can serve them, and
  it is probed again after 0.25 s, doubling to 4 s, until it answers and serves again.
- **Stops.** SIGTERM, SIGKILL after the grace (the runtime's `stop`). A stop requested while the
  runtime is still spawning is carried out by the boot task as soon as the spawn returns, so no
  sandbox outlives the request; a boot is never cancelled mid-spawn (that would leak the child).
- **Logs.** A sandbox's stdout and stderr go to `<log_dir>/<sandbox id>.log`; the sweep asks
  `check_log` to rotate a log past `log_max_bytes` to `<name>.1` (copy, then truncate:
  `logs.py`), and the files go when the ended sandbox leaves the history.
- **History.** Ended sandboxes stay visible (admin API, logs) up to `history` per pool; older
  ones are purged: memory, store entity, log files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final

from miren_activator.clock import Clock
from miren_activator.config import ActivatorConfig
from miren_activator.errors import ActivationTimeout, ActivatorError, BootFailed, Unreachable
from miren_activator.lifecycle import FINAL, SandboxEvent, exit_reason, transition
from miren_activator.logs import over_cap, rotate, rotated_path
from miren_activator.metrics import ActivatorMetrics
from miren_activator.persist import Recorder
from miren_activator.policy import after_clean_stop, after_death
from miren_activator.pools import PoolRecord, SandboxRecord
from miren_activator.runtimes.base import SandboxRuntime, SandboxSpec
from miren_store.entities import Runtime, SandboxStatus, new_id
from miren_store.logfiles import read_tail

log = logging.getLogger("miren.activator")

PENDING: Final = SandboxStatus.PENDING
RUNNING: Final = SandboxStatus.RUNNING
DOWN: Final = SandboxStatus.DOWN

REPROBE_FIRST = 0.25  # seconds before a DOWN upstream is probed again; doubling ...
REPROBE_MAX = 4.0  # ... up to this: back within seconds of coming back
DEATH_LOG_BYTES = 1024  # of a dead sandbox's log, quoted in the warning


class Supervisor:
    """Runs the sandboxes of the activator's pools (see the module docstring).

    `reconcile(pool)` is called when a pool's capacity changed; `left_running(sandbox)` at once
    when a sandbox leaves RUNNING. Both run synchronously and must not raise.
    """

    def __init__(
        self,
        *,
        runtimes: Mapping[Runtime, SandboxRuntime],
        config: ActivatorConfig,
        clock: Clock,
        metrics: ActivatorMetrics,
        recorder: Recorder,
        reconcile: Callable[[PoolRecord], None],
        left_running: Callable[[SandboxRecord], None],
    ) -> None:
        self._runtimes = runtimes
        self._config = config
        self._clock = clock
        self._mono = clock.monotonic
        self._metrics = metrics
        self._recorder = recorder
        self._reconcile = reconcile
        self._left_running = left_running
        self._sandboxes: dict[str, SandboxRecord] = {}  # live and retained ended ones
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def __repr__(self) -> str:
        live = sum(1 for sb in self._sandboxes.values() if sb.state not in FINAL)
        return (
            f"<Supervisor sandboxes={live} retained={len(self._sandboxes) - live} "
            f"tasks={len(self._tasks)}{' closing' if self._closing else ''}>"
        )

    def has_runtime(self, runtime: Runtime) -> bool:
        return runtime in self._runtimes

    async def prepare(self) -> None:
        """Let each runtime make its one-time choices now (the process runtime picks its
        launcher and isolation)."""
        for runtime in self._runtimes.values():
            prepare = getattr(runtime, "prepare", None)
            if prepare is not None:
                await prepare()

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        """A live or retained ended sandbox."""
        return self._sandboxes.get(sandbox_id)

    # -- tasks -------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` as a task that `close` awaits (a failure is logged)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("activator task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self, grace: float) -> None:
        """Stop every live sandbox (SIGTERM, SIGKILL after `grace`) and await every task; the
        ones still running after the grace and 5 s more are cancelled."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + 5.0
        for sb in [sb for sb in self._sandboxes.values() if sb.state not in FINAL]:
            self.request_stop(sb, grace)
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

    # -- start and boot ----------------------------------------------------------------------------

    def start(self, pool: PoolRecord) -> None:
        """Start one more sandbox of `pool` (its boot runs in a task of its own)."""
        sid = new_id("sb")
        log_dir = self._config.log_dir
        sb = SandboxRecord(
            pool,
            sid,
            pool.next_ordinal(),
            now=self._mono(),
            started_at=self._clock.now(),
            log_path=None if log_dir is None else log_dir / f"{sid}.log",
        )
        pool.add(sb)
        self._sandboxes[sid] = sb
        self._metrics.cold_starts.labels(app=pool.version.app).inc()
        self._metrics.sandbox_state(None, PENDING)
        self._record(sb)
        self._recorder.pool(pool)
        log.info("starting %r", sb)
        sb.boot_task = self.spawn(self._boot(sb), f"boot {sid}")

    async def _boot(self, sb: SandboxRecord) -> None:
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
        sb.spawned(handle)
        if sb.state is not PENDING:
            # Stopped while spawning (close, version removed): it must not outlive that.
            sb.stop_task = self.spawn(self._stop_handle(sb, 0.0), f"stop {sb.id}")
            return
        self._record(sb)
        sb.exit_task = self.spawn(self._watch_exit(sb), f"exit {sb.id}")
        try:
            async with asyncio.timeout_at(t0 + pool.params.boot_timeout):
                await handle.wait_ready()
        except TimeoutError:
            last = getattr(handle, "last_probe", "")
            self._boot_failed(
                sb,
                ActivationTimeout(
                    f"sandbox {sb.id} of {pool.version.id} was not healthy within "
                    f"{pool.params.boot_timeout:g}s"
                    + (f" (last health check: {last})" if last else ""),
                    sandbox_id=sb.id,
                ),
            )
            sb.stop_task = self.spawn(self._stop_handle(sb, 1.0), f"stop {sb.id}")
            return
        except Unreachable as exc:
            self._unreachable(sb, str(exc))
            return
        except BootFailed:
            return  # the process ended: the exit watcher reports it
        self._booted(sb, loop.time() - t0)

    def _booted(self, sb: SandboxRecord, duration: float) -> None:
        if sb.state is not PENDING:
            return
        self._set_state(sb, SandboxEvent.BOOTED)
        sb.last_used = self._mono()
        self._metrics.cold_start_duration.observe(duration)
        log.info("%r ready after %.3fs", sb, duration)
        self._reconcile(sb.pool)

    def _boot_failed(self, sb: SandboxRecord, err: ActivatorError) -> None:
        if sb.state is not PENDING:
            return
        sb.error = str(err)
        self._set_state(sb, SandboxEvent.BOOT_FAILED)
        self._died(sb, err)

    # -- unreachable and down ----------------------------------------------------------------------

    def refused(self, sb: SandboxRecord) -> None:
        """The ingress could not connect to a running sandbox: take it out of service now. A
        process sandbox is marked dead and stopped (usually its process just died and its exit
        watcher has not run yet); an upstream instance is DOWN and re-probed."""
        if sb.state is not RUNNING:
            return
        if getattr(sb.handle, "static", False):  # an upstream: down until it answers again
            self._unreachable(sb, "refused or timed out a connection")
            return
        sb.error = "refused connections"
        self._set_state(sb, SandboxEvent.EXITED)
        if sb.handle is not None and sb.stop_task is None:
            sb.stop_task = self.spawn(self._stop_handle(sb, 0.0), f"stop {sb.id}")
        self._died(sb, None)

    def _unreachable(self, sb: SandboxRecord, why: str) -> None:
        """An upstream instance does not answer (at boot, or a refused connection later): DOWN,
        its waiters fail at once when nothing else can serve them, and it is re-probed."""
        prev = sb.state
        sb.error = why
        self._set_state(sb, SandboxEvent.UNREACHABLE)
        if sb.state is not DOWN or prev is DOWN:
            return
        pool = sb.pool
        log.warning("%r is down (%s): re-probing", sb, why)
        if pool.all_down():
            pool.fail_waiters(pool.down_error())
        else:
            self._reconcile(pool)  # another instance (the next URL) may serve the waiters
        self.spawn(self._reprobe(sb), f"reprobe {sb.id}")

    async def _reprobe(self, sb: SandboxRecord) -> None:
        """Probe a DOWN instance with back-off until it answers, then it serves again."""
        delay = REPROBE_FIRST
        check = getattr(sb.handle, "check", None)
        while check is not None:
            await asyncio.sleep(delay)
            if sb.state is not DOWN or self._closing:
                return
            if await check():
                if sb.state is DOWN:
                    log.info("%r answers again", sb)
                    sb.error = ""
                    self._set_state(sb, SandboxEvent.BOOTED)
                    sb.last_used = self._mono()
                    self._reconcile(sb.pool)
                return
            delay = min(delay * 2, REPROBE_MAX)

    # -- exits and stops ---------------------------------------------------------------------------

    async def _watch_exit(self, sb: SandboxRecord) -> None:
        assert sb.handle is not None
        rc = await sb.handle.wait_exit()
        self._exited(sb, rc)

    def _exited(self, sb: SandboxRecord, rc: int | None) -> None:
        prev = sb.state
        if prev in FINAL:
            return  # we stopped it, or its boot had already failed
        sb.error = exit_reason(rc)
        self._set_state(sb, SandboxEvent.EXITED)
        err = None
        if prev is PENDING:
            err = BootFailed(
                f"sandbox {sb.id} of {sb.pool.version.id} {sb.error} while booting",
                sandbox_id=sb.id,
            )
        self._died(sb, err)

    def _died(self, sb: SandboxRecord, boot_error: ActivatorError | None) -> None:
        """Crash accounting for a sandbox that ended on its own, then the pool is reconciled."""
        pool = sb.pool
        now = self._mono()
        uptime = now - sb.started_mono
        pool.crash = after_death(pool.crash, uptime=uptime, now=now, policy=self._config.crash)
        tail = ""
        if sb.log_path is not None:
            with contextlib.suppress(OSError):
                tail = read_tail(sb.log_path, DEATH_LOG_BYTES) or ""
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
            pool.fail_waiters(boot_error)
        self._recorder.pool(pool)
        self._reconcile(pool)

    def request_stop(self, sb: SandboxRecord, grace: float) -> asyncio.Task[None] | None:
        """Stop a sandbox (idle, removed, shutting down); returns the task that ends when it is
        gone (None when there is nothing to wait for)."""
        prev = self._set_state(sb, SandboxEvent.STOP_REQUESTED)
        if prev in FINAL:
            return sb.stop_task
        pool = sb.pool
        pool.crash = after_clean_stop(
            pool.crash, uptime=self._mono() - sb.started_mono, policy=self._config.crash
        )
        log.info("stopping %r", sb)
        if sb.handle is not None:
            sb.stop_task = self.spawn(self._stop_handle(sb, grace), f"stop {sb.id}")
        # else: still spawning; its boot task stops it as soon as the spawn returns
        return sb.stop_task if sb.stop_task is not None else sb.boot_task

    async def _stop_handle(self, sb: SandboxRecord, grace: float) -> None:
        if sb.handle is not None:
            await sb.handle.stop(grace)

    # -- state -------------------------------------------------------------------------------------

    def _set_state(self, sb: SandboxRecord, event: SandboxEvent) -> SandboxStatus:
        """Apply `event`; returns the previous state (the table decides the new one)."""
        prev = sb.state
        new = transition(prev, event)
        if new is prev:
            return prev
        pool = sb.pool
        pool.move(sb, new)
        self._metrics.sandbox_state(prev, new)
        if prev is RUNNING:
            self._left_running(sb)
        if new in FINAL:
            for old in pool.trim_finished(self._config.history):
                self._purge(old)
            boot = sb.boot_task
            if (
                boot is not None
                and not boot.done()
                and sb.handle is not None  # never cancelled mid-spawn: it would leak the child
                and boot is not asyncio.current_task()
            ):
                boot.cancel()  # it is waiting for the health check
            self._recorder.pool(pool)
        self._record(sb)
        return prev

    def _record(self, sb: SandboxRecord) -> None:
        if sb.id in self._sandboxes:  # (a purged sandbox's entity is gone for good)
            self._recorder.sandbox(sb)

    # -- history -----------------------------------------------------------------------------------

    def purge_finished(self, pool: PoolRecord) -> None:
        """Forget every ended sandbox of a pool (its version was removed)."""
        for sb in pool.trim_finished(0):
            self._purge(sb)

    def _purge(self, sb: SandboxRecord) -> None:
        """Forget an ended sandbox: memory, store entity, log files."""
        self._sandboxes.pop(sb.id, None)
        self._metrics.sandbox_state(sb.state, None)
        self._recorder.forget(sb.id)
        if sb.log_path is not None:
            for path in (sb.log_path, rotated_path(sb.log_path)):
                with contextlib.suppress(OSError):
                    path.unlink()

    # -- logs --------------------------------------------------------------------------------------

    def check_log(self, sb: SandboxRecord) -> None:
        """Rotate a sandbox's log once it is past the cap (see miren_activator.logs)."""
        path = sb.log_path
        if path is None or sb.log_rotating or not over_cap(path, self._config.log_max_bytes):
            return
        sb.log_rotating = True
        self.spawn(self._rotate_log(sb, path), f"miren-log-rotate-{sb.id}")

    async def _rotate_log(self, sb: SandboxRecord, path: Path) -> None:
        try:
            await asyncio.to_thread(rotate, path)
        except OSError as exc:
            log.warning("%r: cannot rotate its log %s: %s", sb, path, exc)
        finally:
            sb.log_rotating = False
