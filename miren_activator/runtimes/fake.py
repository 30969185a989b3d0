"""An in-memory runtime: sandboxes with no process and no socket, driven by their caller.

`FakeRuntime` is a `SandboxRuntime` whose `start` makes a `FakeSandbox` (the handle the
activator holds) at once. Nothing happens to it on its own: the caller says when it passes its
health check (`ready`), fails it (`fail_health`), refuses connections (`unreachable`) or ends
(`exit`, a crash with a non-zero status), and reads what the activator did to it (`stops`).
With a `ManualClock` this runs the activator's scaling, crash back-off, idle scale-down and
re-probing deterministically, without sockets. It is what tests of the activator, and of
anything built on it, should use unless they test a real runtime.

A sandbox's state as the activator sees it:
- `wait_ready` returns once the sandbox is healthy; raises `Unreachable` when it refuses
  connections (an upstream's first probe), `BootFailed` when it ended (like the process runtime's
  health wait); otherwise it waits, so a sandbox that never gets healthy meets `boot_timeout`.
- `check` (the re-probe of a DOWN instance) is True while it is healthy and answering.
- `wait_exit` returns its status once it ended; `stop(grace)` records the grace and ends it.
- `static` is the runtime's: True makes the sandboxes upstream-like (a refused connection puts
  them DOWN and re-probes them), False process-like (it is dead and replaced).
Hosts are in 192.0.2.0/24 (TEST-NET-1, where nothing answers) and ports count up from 40001.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Final

from miren_activator.errors import BootFailed, Unreachable
from miren_activator.runtimes.base import SandboxSpec

FAKE_HOST: Final = "192.0.2.1"


class _Changes:
    """Wakes every waiter when something changed; a waiter re-checks its condition, so no
    wake-up is lost between a check and a wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()


class FakeSandbox:
    """A sandbox of `FakeRuntime` (see the module docstring): the handle, and its controls."""

    def __init__(self, spec: SandboxSpec, host: str, port: int, *, static: bool) -> None:
        self.spec = spec
        self.static = static
        self.stops: list[float] = []  # the grace of every stop request, in order
        self._host = host
        self._port = port
        self._healthy = False
        self._refusing = False
        self._ended = False
        self._status: int | None = None
        self._changes = _Changes()

    def __repr__(self) -> str:
        if self._ended:
            state = "stopped" if self.stops else f"exited({self._status})"
        elif self._refusing:
            state = "refusing"
        else:
            state = "healthy" if self._healthy else "unhealthy"
        return f"<FakeSandbox {self.spec.sandbox_id} {self._host}:{self._port} {state}>"

    @property
    def sandbox_id(self) -> str:
        return self.spec.sandbox_id

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def exit_status(self) -> int | None:
        return self._status

    # -- driven by the caller ----------------------------------------------------------------------

    def ready(self) -> None:
        """It passes its health check from now on (and answers connections again)."""
        self._healthy, self._refusing = True, False
        self._changes.fire()

    def fail_health(self) -> None:
        """It answers, but fails its health check from now on: a booting sandbox never gets
        ready (the activator's boot_timeout ends it), a re-probe fails."""
        self._healthy = False
        self._changes.fire()

    def unreachable(self) -> None:
        """It refuses connections from now on (until `ready`)."""
        self._healthy, self._refusing = False, True
        self._changes.fire()

    def exit(self, status: int | None = 0) -> None:
        """It ends on its own with `status` (non-zero: a crash). Once only."""
        if self._ended:
            return
        self._ended, self._status = True, status
        self._changes.fire()

    async def wait_stopped(self) -> float:
        """Wait until the activator asked it to stop; the grace it gave."""
        await self._changes.until(lambda: bool(self.stops))
        return self.stops[0]

    # -- the SandboxHandle the activator holds -----------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> None:
        return None  # (no process)

    async def wait_ready(self) -> None:
        await self._changes.until(lambda: self._healthy or self._refusing or self._ended)
        if self._ended:
            raise BootFailed(f"{self.sandbox_id} exited with status {self._status}")
        if self._refusing:
            raise Unreachable(f"{self._host}:{self._port} does not accept connections")

    async def check(self) -> bool:
        return self._healthy and not self._refusing and not self._ended

    async def wait_exit(self) -> int | None:
        await self._changes.until(lambda: self._ended)
        return self._status

    async def stop(self, grace: float) -> None:
        self.stops.append(grace)
        if not self._ended:
            self._ended = True  # (a stopped sandbox has no status of its own)
        self._changes.fire()


class FakeRuntime:
    """A `SandboxRuntime` of `FakeSandbox`es (see the module docstring).

    `ready=True` makes every sandbox healthy as soon as it starts; `static=True` makes them
    upstream-like. `fail_starts` and `hold_starts` act on the spawn step itself.
    """

    def __init__(self, *, static: bool = False, ready: bool = False, host: str = FAKE_HOST) -> None:
        self.static = static
        self.sandboxes: list[FakeSandbox] = []  # started ones, in order
        self.starts: list[SandboxSpec] = []  # every start call (failed and held ones too)
        self._ready = ready
        self._host = host
        self._ports = itertools.count(40001)
        self._failure: str | None = None
        self._held = False
        self._changes = _Changes()

    def __repr__(self) -> str:
        kind = "static" if self.static else "process-like"
        return f"<FakeRuntime {kind} starts={len(self.starts)} sandboxes={len(self.sandboxes)}>"

    def fail_starts(self, message: str | None = "cannot start (fake)") -> None:
        """Later starts raise BootFailed(`message`); None: they succeed again."""
        self._failure = message

    def hold_starts(self) -> None:
        """Later starts wait in their spawn step (a moment no real process can be stopped in
        on cue) until `release_starts`."""
        self._held = True

    def release_starts(self) -> None:
        self._held = False
        self._changes.fire()

    async def called(self, count: int = 1) -> None:
        """Wait until `start` was called `count` times (held and failed calls count)."""
        await self._changes.until(lambda: len(self.starts) >= count)

    async def started(self, count: int = 1) -> FakeSandbox:
        """Wait until `count` sandboxes were started; the `count`-th one (1-based)."""
        await self._changes.until(lambda: len(self.sandboxes) >= count)
        return self.sandboxes[count - 1]

    def get(self, sandbox_id: str) -> FakeSandbox:
        """The sandbox started for `sandbox_id` (KeyError when there is none)."""
        for sb in self.sandboxes:
            if sb.sandbox_id == sandbox_id:
                return sb
        raise KeyError(sandbox_id)

    async def start(self, spec: SandboxSpec) -> FakeSandbox:
        self.starts.append(spec)
        self._changes.fire()
        await self._changes.until(lambda: not self._held)
        if self._failure is not None:
            raise BootFailed(self._failure, sandbox_id=spec.sandbox_id)
        sb = FakeSandbox(spec, self._host, next(self._ports), static=self.static)
        if self._ready:
            sb.ready()
        self.sandboxes.append(sb)
        self._changes.fire()
        return sb
