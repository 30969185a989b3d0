"""The process runtime: each sandbox is a child process running the version's command.

Start. A free port is picked by binding port 0 on the runtime's host (the socket is closed before
the child binds, so another process could take the port in between; the child then fails to bind
and exits, which the activator sees at once as a boot failure). `$PORT` / `${PORT}` in the argv
are replaced by it, and the child's environment is a small pass-through of ours (PATH, HOME,
locale, ...; never secrets such as MIREN_ADMIN_TOKEN) plus the spec's `env`, plus `PORT`,
`MIREN_APP`, `MIREN_VERSION`, `MIREN_EPHEMERAL_LABEL`, `MIREN_SERVICE` and `MIREN_SANDBOX`,
which win over the spec's. stdout and stderr are appended to the sandbox's log file.

No orphans. The child gets its own session (`start_new_session=True`), so it is the leader of
its own process group: `stop` signals the whole group (SIGTERM, SIGKILL after the grace) and a
last SIGKILL to the group after the leader ended clears any stragglers it forked. If we die
without stopping it (SIGKILL, OOM, crash), the kernel kills it: the command is started through a
launcher that sets `PR_SET_PDEATHSIG=SIGKILL` and then execs the command in place (same pid).
As in `miren_store.embedded`, this is not a `preexec_fn` (Python code in the forked child of a
threaded process can deadlock on a lock held at fork time). The launcher is `setpriv
--pdeathsig KILL` from util-linux when present (about 2 ms), else a `python -I -S` trampoline
(about 10 ms) that also checks `getppid()` to close the window where we died before the prctl.
The death signal fires when the *thread* that forked the child exits: asyncio and uvloop spawn
from the event loop's thread. Limitation: grandchildren a sandbox forks are not covered by the
death signal (only by `stop`'s group kill); a sandbox command should exec its server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from miren_activator.errors import BootFailed
from miren_activator.runtime import PollSchedule, SandboxSpec, wait_healthy

# How the child is made to die with us: "auto" (setpriv if usable, else python), or forced.
Launcher = Literal["auto", "setpriv", "python", "none"]

PASSTHROUGH_ENV: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SHELL",
)

_TRAMPOLINE: Final = """\
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
ul = ctypes.c_ulong
if libc.prctl(1, ul(signal.SIGKILL), ul(0), ul(0), ul(0)) != 0:  # PR_SET_PDEATHSIG
    sys.stderr.write("miren: prctl(PR_SET_PDEATHSIG) failed, errno %d\\n" % ctypes.get_errno())
    os._exit(126)
if os.getppid() != int(sys.argv[1]):  # our parent died before the prctl took effect
    os._exit(125)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write("miren: cannot exec %s: %s\\n" % (sys.argv[2], exc))
    os._exit(127)
"""


def pick_port(host: str) -> int:
    """A port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def expand_port(argv: Sequence[str], port: int) -> list[str]:
    text = str(port)
    return [a.replace("${PORT}", text).replace("$PORT", text) for a in argv]


class ProcessHandle:
    """One running child process (the leader of its own process group)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        host: str,
        port: int,
        health_path: str | None,
        schedule: PollSchedule,
        probe_timeout: float,
    ) -> None:
        self._proc = proc
        self._host = host
        self._port = port
        self._health_path = health_path
        self._schedule = schedule
        self._probe_timeout = probe_timeout

    def __repr__(self) -> str:
        return (
            f"<ProcessHandle pid={self._proc.pid} {self._host}:{self._port} "
            f"rc={self._proc.returncode}>"
        )

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait_ready(self) -> None:
        await wait_healthy(
            self._host,
            self._port,
            self._health_path,
            schedule=self._schedule,
            probe_timeout=self._probe_timeout,
            alive=self._check_alive,
        )

    def _check_alive(self) -> None:
        if self._proc.returncode is not None:
            raise BootFailed(f"process exited with status {self._proc.returncode}")

    async def wait_exit(self) -> int:
        rc = await self._proc.wait()
        self._signal_group(signal.SIGKILL)  # stragglers the leader left behind
        return rc

    async def stop(self, grace: float) -> None:
        try:
            if self._proc.returncode is None:
                self._signal_group(signal.SIGTERM)
                self._signal_group(signal.SIGCONT)  # a stopped process acts on TERM only if run
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._proc.wait()), max(0.0, grace))
        finally:
            # Also on cancellation: whatever is left of the group dies now, and is reaped.
            self._signal_group(signal.SIGKILL)
        if self._proc.returncode is None:
            await self._proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole group now (no wait)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        # The child is its own group leader (start_new_session), so its pid is the group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)


class ProcessRuntime:
    """Start sandboxes as child processes (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        passthrough_env: Sequence[str] = PASSTHROUGH_ENV,
        schedule: PollSchedule | None = None,
        probe_timeout: float = 1.0,
        launcher: Launcher = "auto",
    ) -> None:
        self._host = host
        self._passthrough = tuple(passthrough_env)
        self._schedule = schedule or PollSchedule()
        self._probe_timeout = probe_timeout
        if not sys.platform.startswith("linux"):
            launcher = "none"  # PR_SET_PDEATHSIG is Linux-only
        self._launcher_choice = launcher
        self._launcher: list[str] | None = None  # decided at the first start

    def __repr__(self) -> str:
        launcher = Path(self._launcher[0]).name if self._launcher else self._launcher_choice
        return f"<ProcessRuntime host={self._host} launcher={launcher}>"

    async def prepare(self) -> None:
        """Choose the launcher now rather than during the first cold start."""
        await self._launcher_prefix()

    async def start(self, spec: SandboxSpec) -> ProcessHandle:
        vspec = spec.spec
        if not vspec.command:
            raise BootFailed("the version has no command to run", sandbox_id=spec.sandbox_id)
        port = pick_port(self._host)
        argv = expand_port(vspec.command, port)
        env = {k: os.environ[k] for k in self._passthrough if k in os.environ}
        env.update(vspec.env)
        env.update(
            PORT=str(port),
            MIREN_APP=spec.app,
            MIREN_VERSION=spec.version_id,
            MIREN_EPHEMERAL_LABEL=spec.ephemeral_label,
            MIREN_SERVICE=spec.service,
            MIREN_SANDBOX=spec.sandbox_id,
        )
        prefix = await self._launcher_prefix()
        log_fd = self._open_log(spec, argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env=env,
                cwd=vspec.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BootFailed(
                f"cannot start {argv[0]!r}: {exc.strerror or exc}", sandbox_id=spec.sandbox_id
            ) from exc
        finally:
            if log_fd != asyncio.subprocess.DEVNULL:
                os.close(log_fd)  # the child holds its own copy
        return ProcessHandle(
            proc,
            host=self._host,
            port=port,
            health_path=vspec.health_path,
            schedule=self._schedule,
            probe_timeout=self._probe_timeout,
        )

    def _open_log(self, spec: SandboxSpec, argv: list[str]) -> int:
        if spec.log_path is None:
            return asyncio.subprocess.DEVNULL
        try:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            raise BootFailed(
                f"cannot open sandbox log {spec.log_path}: {exc.strerror or exc}",
                sandbox_id=spec.sandbox_id,
            ) from exc
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"--- miren: {stamp} starting {spec.sandbox_id}: {argv}\n".encode())
        return fd

    async def _launcher_prefix(self) -> list[str]:
        if self._launcher is None:
            choice = self._launcher_choice
            if choice == "auto":
                self._launcher = await _find_launcher()
            elif choice == "setpriv":
                self._launcher = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--"]
            elif choice == "python":
                self._launcher = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE]
            else:
                self._launcher = []
        if self._launcher and self._launcher[0] == sys.executable:
            return [*self._launcher, str(os.getpid())]
        return self._launcher


async def _find_launcher() -> list[str]:
    """`setpriv --pdeathsig KILL --` if this machine's setpriv has the option, else the
    Python trampoline."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        with contextlib.suppress(OSError):
            check = await asyncio.create_subprocess_exec(
                setpriv,
                "--pdeathsig",
                "KILL",
                "--",
                setpriv,
                "--version",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await check.wait() == 0:
                return [setpriv, "--pdeathsig", "KILL", "--"]
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE]


def log_tail(path: Path, max_bytes: int = 2048) -> str:
    """The last `max_bytes` of a log file, decoded leniently ('' when unreadable)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
