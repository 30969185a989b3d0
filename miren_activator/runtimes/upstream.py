"""The upstream runtime: a "sandbox" is one of the version's static `urls`, already running.

Starting one spawns nothing; it is ready once its health check passes (same probe as the process
runtime), and it ends only when stopped. Nothing can restart it, so an upstream that does not
accept a connection is not waited for: `wait_ready` raises `Unreachable` when the first probe
cannot connect (the activator marks it DOWN, answers 502 at once and re-probes it with `check`
until it answers); one that accepts but is not healthy yet is polled like a booting sandbox. Sandbox ordinal `i` uses `urls[i % len(urls)]`; the
activator caps an upstream pool at one sandbox per URL, so each URL is one sandbox whose capacity
is `requests_per_instance`.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from miren_activator.errors import BootFailed, Unreachable
from miren_activator.runtimes.base import PollSchedule, SandboxSpec, probe, wait_healthy


class UpstreamHandle:
    def __init__(
        self,
        host: str,
        port: int,
        health_path: str | None,
        schedule: PollSchedule,
        probe_timeout: float,
    ) -> None:
        self._host = host
        self._port = port
        self._health_path = health_path
        self._schedule = schedule
        self._probe_timeout = probe_timeout
        self._stopped = asyncio.Event()
        self.last_probe = ""  # the last failed health check, in words (for a boot timeout)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "up"
        return f"<UpstreamHandle {self._host}:{self._port} {state}>"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> None:
        return None

    static = True  # the activator cannot restart it: unreachable means down, not dead

    async def wait_ready(self) -> None:
        if not await probe(self._host, self._port, None, self._probe_timeout):
            raise Unreachable(f"{self._host}:{self._port} does not accept connections")
        await wait_healthy(
            self._host,
            self._port,
            self._health_path,
            schedule=self._schedule,
            probe_timeout=self._probe_timeout,
            seen=self._saw,
        )

    def _saw(self, failure: str) -> None:
        self.last_probe = failure

    async def check(self) -> bool:
        """One health check (a re-probe of a DOWN instance)."""
        return await probe(self._host, self._port, self._health_path, self._probe_timeout)

    async def wait_exit(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float) -> None:
        self._stopped.set()


class UpstreamRuntime:
    def __init__(self, *, schedule: PollSchedule | None = None, probe_timeout: float = 1.0) -> None:
        self._schedule = schedule or PollSchedule(initial=0.01, factor=1.5, cap=0.5)
        self._probe_timeout = probe_timeout

    def __repr__(self) -> str:
        return "<UpstreamRuntime>"

    async def start(self, spec: SandboxSpec) -> UpstreamHandle:
        urls = spec.spec.urls
        if not urls:
            raise BootFailed("the version has no upstream URL", sandbox_id=spec.sandbox_id)
        url = urls[spec.ordinal % len(urls)]
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise BootFailed(
                f"unsupported upstream URL {url!r}: expected http://host[:port]",
                sandbox_id=spec.sandbox_id,
            )
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise BootFailed(
                f"bad port in upstream URL {url!r}", sandbox_id=spec.sandbox_id
            ) from exc
        return UpstreamHandle(
            parts.hostname, port, spec.spec.health_path, self._schedule, self._probe_timeout
        )
