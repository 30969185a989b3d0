"""Real app servers as subprocesses on free loopback ports (the echo app, uvicorn, gunicorn).

`AppProcess.start(argv)` runs a command with `$PORT` replaced by a free port, waits (polling,
with a deadline) until the port accepts connections, and `stop()` ends it by pid: SIGTERM to its
process group, SIGKILL after a grace, always reaped. The `app_process` fixture stops every app a
test started, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.clients import free_port
from tests.support.poll import eventually

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "apps"
ECHO = APPS / "echo_server.py"
# The interpreter sandbox commands use. `miren serve` confines sandboxes by default (as root: a
# dedicated uid inside bubblewrap, which binds /usr, /etc and the app's cwd): an interpreter under
# /root (pyenv) is invisible there, the system one is not. Apps run by it use the standard library
# only, or Debian's packages (python3-uvicorn, python3-starlette, gunicorn, python3-flask).
SANDBOX_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


class AppProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, argv: Sequence[str]) -> None:
        self.proc = proc
        self.port = port
        self.argv = list(argv)

    def __repr__(self) -> str:
        return f"<AppProcess pid={self.proc.pid} port={self.port} {self.argv[:3]}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 30.0,
    ) -> AppProcess:
        port = free_port()
        args = [a.replace("$PORT", str(port)) for a in argv]
        full_env = {**os.environ, "PORT": str(port), **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            *args,
            env=full_env,
            cwd=cwd or REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        app = cls(proc, port, args)
        try:
            await app._wait_listening(timeout)
        except BaseException:
            await app.stop()
            raise
        return app

    async def _listening(self) -> bool:
        if self.proc.returncode is not None:
            raise RuntimeError(f"{self!r} exited with {self.proc.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _wait_listening(self, timeout: float) -> None:
        await eventually(self._listening, timeout, f"{self!r} to listen", interval=0.02)

    async def stop(self, grace: float = 5.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


def echo_argv() -> list[str]:
    return [sys.executable, "-S", str(ECHO), "--port", "$PORT"]


StartApp = Callable[..., Awaitable[AppProcess]]


@pytest.fixture
async def app_process() -> AsyncIterator[StartApp]:
    """`await app_process(argv, env=..., cwd=...)`: a started app, stopped at teardown."""
    started: list[AppProcess] = []

    async def start(argv: Sequence[str], **kwargs: object) -> AppProcess:
        app = await AppProcess.start(argv, **kwargs)  # type: ignore[arg-type]
        started.append(app)
        return app

    yield start
    for app in started:
        await app.stop()
