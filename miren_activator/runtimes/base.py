"""The runtime interface: how a sandbox is started, checked, and stopped.

The activator never spawns or probes anything itself; it calls a `SandboxRuntime` chosen by the
version's `spec.runtime` (`ProcessRuntime`, `UpstreamRuntime`, or the in-memory `FakeRuntime` of
`fake.py`). A runtime's `start` returns quickly with a `SandboxHandle` once the sandbox exists
(process spawned); the activator then races `wait_ready` against `wait_exit` under the version's
`boot_timeout`.

Health: `probe` asks `GET <health_path>` and counts any answer below 500 as serving (the default
path is `/`, where many apps answer 404: an app that answers HTTP at all is up; a 5xx means up but
not ready). With `health_path=None` an accepted TCP connection is enough. Probes are polled on a
schedule that starts fast (2 ms) and slows down (to 50 ms), so a sandbox that is ready after
100 ms is seen within about 10 ms of it, while a slow one costs few probes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import attrs

from miren_store.entities import VersionSpec


@attrs.frozen
class SandboxSpec:
    """Everything a runtime needs to start one sandbox."""

    sandbox_id: str
    app: str
    version_id: str
    ephemeral_label: str
    service: str
    spec: VersionSpec
    ordinal: int  # lowest free instance number in its pool (the upstream runtime picks a URL)
    log_path: Path | None


class SandboxHandle(Protocol):
    """A started sandbox. `host`/`port` are where leases send requests."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int | None: ...

    async def wait_ready(self) -> None:
        """Return once the sandbox passes its health check (polls until cancelled)."""

    async def wait_exit(self) -> int | None:
        """Return when the sandbox has ended (its exit status; None when there is none)."""

    async def stop(self, grace: float) -> None:
        """Ask it to end (SIGTERM), force it after `grace` seconds (SIGKILL); wait until gone."""


class SandboxRuntime(Protocol):
    async def start(self, spec: SandboxSpec) -> SandboxHandle:
        """Start a sandbox; raise `BootFailed` if it cannot even be started."""


@attrs.frozen
class PollSchedule:
    """Intervals between health probes: `initial`, growing by `factor`, at most `cap` (s)."""

    initial: float = 0.002
    factor: float = 1.2
    cap: float = 0.05

    def next(self, interval: float) -> float:
        return min(self.cap, interval * self.factor)


async def probe(host: str, port: int, path: str | None, timeout: float) -> bool:
    """One health check: True iff the sandbox accepts (TCP) or answers `path` below 500."""
    return await check_health(host, port, path, timeout) is None


async def check_health(host: str, port: int, path: str | None, timeout: float) -> str | None:
    """One health check: None when it passes, else what was seen, in words (`connection
    refused`, `GET /health answered 503`, ...) for the error a failed boot reports."""
    what = f"GET {path}" if path is not None else "a TCP connection"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if path is None:
                    return None
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "User-Agent: miren-health\r\nConnection: close\r\n\r\n".encode()
                )
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"{what} to port {port} timed out after {timeout:g}s"
    except ConnectionRefusedError:
        return f"connection refused on port {port} (nothing listens on $PORT)"
    except OSError as exc:
        return f"{what} to port {port} failed: {exc.strerror or exc}"
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"{what} got no HTTP answer"
    status = int(parts[1])
    if 100 <= status < 500:
        return None
    return f"{what} answered {status}"


async def wait_healthy(
    host: str,
    port: int,
    path: str | None,
    *,
    schedule: PollSchedule = PollSchedule(),
    probe_timeout: float = 1.0,
    alive: Callable[[], None] | None = None,
    seen: Callable[[str], None] | None = None,
) -> None:
    """Poll `check_health` until it passes. Never returns otherwise: the caller bounds it.

    `alive`, called before each probe, raises to abandon the wait (the process ended); `seen`
    is told each failed probe's outcome (the last one explains a boot timeout)."""
    interval = schedule.initial
    while True:
        if alive is not None:
            alive()
        failure = await check_health(host, port, path, probe_timeout)
        if failure is None:
            return
        if seen is not None:
            seen(failure)
        await asyncio.sleep(interval)
        interval = schedule.next(interval)
