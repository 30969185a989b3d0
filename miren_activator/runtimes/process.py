"""The process runtime: each sandbox is a child process running the version's command.

Start. A free port is picked by binding port 0 on the runtime's host (the socket is closed before
the child binds, so another process could take the port in between; the child then fails to bind
and exits, which the activator sees at once as a boot failure). `$PORT` / `${PORT}` in the argv
are replaced by it, and the child's environment is a small pass-through of ours (PATH, HOME,
locale, ...; never secrets such as MIREN_ADMIN_TOKEN), then what the isolation sets (a private
HOME and TMPDIR), then the spec's `env`, then `PORT`, `MIREN_APP`, `MIREN_VERSION`,
`MIREN_EPHEMERAL_LABEL`, `MIREN_SERVICE` and `MIREN_SANDBOX`, which win over the spec's. stdout
and stderr are appended to the sandbox's log file, which we open and hand over as fds 1 and 2.

Isolation (`miren_activator.runtimes.isolation`). `prepare` decides once how sandboxes are confined: it
reads the host layout, finds bubblewrap and runs the exact sandbox set-up around `true` once as
the uid the sandboxes will get, then `isolation.choose` picks `bwrap`, `user`, `none` or a
refusal (every start then fails with `BootFailed` saying why). `runtime.isolation.description`
says what was chosen. The command lines:

    none:  [setpriv --pdeathsig KILL --]            COMMAND   (or the trampoline, see below)
    user:  python -I -S -c TRAMPOLINE ppid uid gid 1 COMMAND
    bwrap: python -I -S -c TRAMPOLINE ppid uid gid 1 bwrap --unshare-user ... --chdir CWD -- COMMAND

The trampoline is a fresh single-threaded interpreter between our fork and the exec (not a
`preexec_fn`: Python code in the forked child of a threaded process can deadlock on a lock held at
fork time). In this order it:
1. closes every fd >= 3 (uvloop ignores `close_fds`, so the child would otherwise inherit every
   inheritable fd we hold; measured: uvloop's own /dev/null, a dup of the log fd, and whatever
   pipe our supervisor gave us);
2. when the edge is root, switches to `uid`:`gid` with no supplementary groups and an empty
   capability bounding set (-1 keeps our ids);
3. sets `PR_SET_PDEATHSIG=SIGKILL` (after the switch, as a credential change clears it), then
   checks that `getppid()` is still us (else we died before the prctl took effect, and no signal
   would ever come);
4. sets `PR_SET_NO_NEW_PRIVS` (confined sandboxes only) and execs in place (same pid).
So bubblewrap, when used, already runs as the sandbox uid, unprivileged, and builds its
namespaces in a user namespace of that uid. The trampoline costs an interpreter start (about 9 ms
here; prctl is called through `_ctypes`, as the `ctypes` package would add 3 ms). setpriv (about
2 ms) could switch uids and set both prctls, but it cannot close fds, so it serves only `none`,
as before. Measured here, spawn to healthy for the echo app (p50 of 40 interleaved boots):
setpriv 32 ms, the trampoline alone (`user`) 41 ms, trampoline and bubblewrap 49 ms.

No orphans. The child gets its own session (`start_new_session=True`), so it is the leader of
its own process group: `stop` signals the whole group (SIGTERM, SIGKILL after the grace) and a
last SIGKILL to the group after the leader ended clears any stragglers it forked. If we die
without stopping it (SIGKILL, OOM, crash), the kernel kills it through the death signal the
launcher set. The death signal fires when the *thread* that forked the child exits: asyncio and
uvloop spawn from the event loop's thread. Without bubblewrap, grandchildren a sandbox forks are
not covered by the death signal (only by `stop`'s group kill); a sandbox command should exec its
server.

Under bubblewrap the tree is: our child is bwrap's monitor (the group leader, pid we hold), which
forks the sandbox's pid 1 (bwrap's init, in the new pid namespace), which forks the app (pid 2
inside). `--die-with-parent` SIGKILLs init when the monitor dies, and when a pid namespace's init
dies the kernel kills everything in it, so the app and anything it forked or daemonised die with
us too. All three share our process group (no `--new-session`), so SIGKILL to the group ends
them. SIGTERM must spare the monitor, though: it has no handler, would die at once and take the
sandbox down by SIGKILL, so the app would never get its grace period. `stop` therefore sends
SIGTERM to every member of the group but the leader (found in /proc; init ignores it, as the
kernel drops unhandled signals to a namespace's init), the app exits, init reports its status
to the monitor, and the monitor exits with it (128 + signal for a signal death).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs

from miren_activator.errors import BootFailed
from miren_activator.runtimes.base import PollSchedule, SandboxSpec, wait_healthy
from miren_activator.runtimes.isolation import (
    SANDBOX_HOME,
    BwrapStatus,
    HostLayout,
    Isolation,
    IsolationConfig,
    IsolationMode,
    bwrap_argv,
    choose,
    find_bwrap,
    parse_bwrap_version,
    path_refusal,
    read_layout,
    sandbox_env,
)
from miren_store.launch import Child, Launch, pick_port, run, spawn

# The default of `ProcessRuntime(isolation=...)`: the library and its tests run sandboxes as the
# calling user; `miren serve` passes its `sandbox.isolation` config (default "auto").
NO_ISOLATION: Final = IsolationConfig(mode=IsolationMode.NONE)

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

_PROBE_TIMEOUT: Final = 10.0


def expand_port(argv: Sequence[str], port: int) -> list[str]:
    text = str(port)
    return [a.replace("${PORT}", text).replace("$PORT", text) for a in argv]


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes in process group `pgid` (read from /proc, so racy by
    nature; zombies, which wait for their reaper, are left out)."""
    pids: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold anything, so split after its last ')'.
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            pids.append(int(name))
    return pids


class ProcessHandle:
    """One running child process (the leader of its own process group).

    `spare_leader`: the leader is bubblewrap's monitor, which SIGTERM must not reach (see the
    module docstring). `scratch`: the sandbox's private HOME on the host, removed once it ended.
    """

    def __init__(
        self,
        proc: Child,
        *,
        host: str,
        port: int,
        health_path: str | None,
        schedule: PollSchedule,
        probe_timeout: float,
        spare_leader: bool = False,
        scratch: str | None = None,
    ) -> None:
        self._proc = proc
        self._host = host
        self._port = port
        self._health_path = health_path
        self._schedule = schedule
        self._probe_timeout = probe_timeout
        self._spare_leader = spare_leader
        self._scratch = scratch
        self.last_probe = ""  # the last failed health check, in words (for a boot timeout)

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
            seen=self._saw,
        )

    def _saw(self, failure: str) -> None:
        self.last_probe = failure

    def _check_alive(self) -> None:
        if self._proc.returncode is not None:
            raise BootFailed(f"process exited with status {self._proc.returncode}")

    async def wait_exit(self) -> int:
        rc = await self._proc.wait()
        self._proc.signal_group(signal.SIGKILL)  # stragglers the leader left behind
        await self._remove_scratch()
        return rc

    async def stop(self, grace: float) -> None:
        try:
            if self._proc.returncode is None:
                await self._terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._proc.wait()), max(0.0, grace))
        finally:
            # Also on cancellation: whatever is left of the group dies now, and is reaped.
            self._proc.signal_group(signal.SIGKILL)
        if self._proc.returncode is None:
            await self._proc.wait()
        await self._remove_scratch()

    def kill(self) -> None:
        """SIGKILL the whole group now (no wait)."""
        self._proc.signal_group(signal.SIGKILL)

    async def _terminate(self) -> None:
        members: list[int] = []
        if self._spare_leader:
            members = [p for p in await asyncio.to_thread(group_members, self.pid) if p != self.pid]
        if members:
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
        else:  # not bubblewrap, or its sandbox is not up yet: the leader goes, and all with it
            self._proc.signal_group(signal.SIGTERM)
        self._proc.signal_group(signal.SIGCONT)  # a stopped process acts on TERM only if run

    async def _remove_scratch(self) -> None:
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            # rmtree works through directory fds, so links the sandbox left cannot redirect it.
            await asyncio.to_thread(shutil.rmtree, scratch, True)


class ProcessRuntime:
    """Start sandboxes as child processes, confined as `isolation` asks (see the module
    docstring). `launcher` picks how an unconfined child is tied to our lifetime."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        passthrough_env: Sequence[str] = PASSTHROUGH_ENV,
        schedule: PollSchedule | None = None,
        probe_timeout: float = 1.0,
        isolation: IsolationConfig = NO_ISOLATION,
    ) -> None:
        self._host = host
        self._passthrough = tuple(passthrough_env)
        self._schedule = schedule or PollSchedule()
        self._probe_timeout = probe_timeout
        self._linux = sys.platform.startswith("linux")
        self._isolation_config = isolation
        self._isolation: Isolation | None = None  # decided by prepare()
        self._scratch_root: str | None = None  # `user` mode: where each sandbox's HOME goes
        self._preparing = asyncio.Lock()

    def __repr__(self) -> str:
        iso = self._isolation
        if iso is None:
            isolation = f"{self._isolation_config.mode}?"
        else:
            isolation = "refused" if iso.refusal is not None else str(iso.mode)
        return f"<ProcessRuntime host={self._host} isolation={isolation}>"

    @property
    def isolation(self) -> Isolation | None:
        """What `prepare` chose (None before it ran); `.description` is one line for logs."""
        return self._isolation

    async def prepare(self) -> Isolation:
        """Decide the isolation (probing bubblewrap) now, not at the first cold start.
        Idempotent; never raises for a refusal (starts do)."""
        async with self._preparing:
            if self._isolation is None:
                self._isolation = await self._decide_isolation()
            return self._isolation

    async def start(self, spec: SandboxSpec) -> ProcessHandle:
        vspec = spec.spec
        sid = spec.sandbox_id
        if not vspec.command:
            raise BootFailed("the version has no command to run", sandbox_id=sid)
        iso = self._isolation or await self.prepare()
        if iso.refusal is not None:
            raise BootFailed(f"process sandboxes cannot start: {iso.refusal}", sandbox_id=sid)
        cwd = _resolve(vspec.cwd) if iso.confined else vspec.cwd
        refusal = path_refusal(iso, cwd)
        if refusal is not None:
            raise BootFailed(f"cannot confine the sandbox: {refusal}", sandbox_id=sid)
        port = pick_port(self._host)
        argv = expand_port(vspec.command, port)
        scratch = self._make_scratch(iso, sid) if iso.mode is IsolationMode.USER else None
        home = SANDBOX_HOME if iso.mode is IsolationMode.BWRAP else scratch
        env = sandbox_env(iso, self._passthrough_env(), home)
        env.update(vspec.env)
        env.update(
            PORT=str(port),
            MIREN_APP=spec.app,
            MIREN_VERSION=spec.version_id,
            MIREN_EPHEMERAL_LABEL=spec.ephemeral_label,
            MIREN_SERVICE=spec.service,
            MIREN_SANDBOX=sid,
        )
        command, proc_cwd = argv, cwd or scratch
        if iso.mode is IsolationMode.BWRAP:
            command, proc_cwd = bwrap_argv(iso, argv, cwd), "/"  # bwrap's --chdir sets the cwd
        _check_cwd(cwd, argv[0], sid)
        launch = self._launch(iso, proc_cwd)
        try:
            log_fd = self._open_log(spec, argv, iso)
            try:
                proc = await spawn(launch.argv(command), env=env, stdout=log_fd, stderr=log_fd)
            except OSError as exc:
                raise BootFailed(
                    f"cannot start {argv[0]!r}: {exc.strerror or exc}", sandbox_id=sid
                ) from exc
            finally:
                if log_fd is not None:
                    os.close(log_fd)  # the child holds its own copy
        except BaseException:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        return ProcessHandle(
            proc,
            host=self._host,
            port=port,
            health_path=vspec.health_path,
            schedule=self._schedule,
            probe_timeout=self._probe_timeout,
            spare_leader=iso.mode is IsolationMode.BWRAP,
            scratch=scratch,
        )

    def _passthrough_env(self) -> dict[str, str]:
        return {k: os.environ[k] for k in self._passthrough if k in os.environ}

    def _open_log(self, spec: SandboxSpec, argv: list[str], iso: Isolation) -> int | None:
        if spec.log_path is None:
            return None  # (/dev/null)
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
        how = f" (isolation: {iso.mode})" if iso.confined else ""
        os.write(fd, f"--- miren: {stamp} starting {spec.sandbox_id}{how}: {argv}\n".encode())
        return fd

    # -- isolation ---------------------------------------------------------------------------

    @staticmethod
    def _launch(iso: Isolation, cwd: str | None) -> Launch:
        """What the launcher does before it execs a sandbox (see miren_store.launch): the uid
        switch and no-new-privs of a confined sandbox, and its working directory."""
        if not iso.confined:
            return Launch(cwd=cwd)
        return Launch(uid=iso.uid, gid=iso.gid, no_new_privs=True, cwd=cwd)

    async def _decide_isolation(self) -> Isolation:
        config = self._isolation_config
        euid = os.geteuid()
        if config.mode is IsolationMode.NONE or not self._linux:
            return choose(config, euid=euid, bwrap=BwrapStatus(None), linux=self._linux)
        layout = read_layout(config)
        bwrap = BwrapStatus(None, error="not wanted")
        if config.mode is not IsolationMode.USER:
            path = find_bwrap(config)
            if path is None:
                bwrap = BwrapStatus(None, error=f"{config.bwrap or 'bwrap'} not found")
            else:
                bwrap = await self._probe_bwrap(config, euid, BwrapStatus(path), layout)
        iso = choose(config, euid=euid, bwrap=bwrap, layout=layout)
        if iso.mode is IsolationMode.USER and iso.refusal is None:
            try:
                self._scratch_root = root = _make_scratch_root(config.scratch_dir)
                if config.scratch_dir is None:  # ours: gone with the runtime (or at exit)
                    weakref.finalize(self, shutil.rmtree, root, True)
            except OSError as exc:
                return attrs.evolve(iso, refusal=f"cannot create the sandboxes' scratch dir: {exc}")
        return iso

    async def _probe_bwrap(
        self, config: IsolationConfig, euid: int, bwrap: BwrapStatus, layout: HostLayout
    ) -> BwrapStatus:
        """Run the sandbox set-up once around `true`, through the same launcher and as the same
        uid as the real sandboxes: usable only if that works here."""
        path = bwrap.path
        assert path is not None
        rc, out = await _run([path, "--version"], env=None)
        bwrap = attrs.evolve(bwrap, version=parse_bwrap_version(out))
        trial = choose(config, euid=euid, bwrap=bwrap, layout=layout)
        argv = self._launch(trial, "/").argv(bwrap_argv(trial, ["true"], None))
        env = sandbox_env(trial, self._passthrough_env(), SANDBOX_HOME)
        rc, out = await _run(argv, env=env)
        if rc != 0:
            lines = [line for line in out.splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {rc}"
            return attrs.evolve(bwrap, error=f"{Path(path).name} failed here: {why}")
        return bwrap

    def _make_scratch(self, iso: Isolation, sandbox_id: str) -> str:
        """A fresh private HOME for a `user`-mode sandbox, owned by its uid (mode 0700)."""
        assert self._scratch_root is not None and iso.uid is not None and iso.gid is not None
        path = os.path.join(self._scratch_root, sandbox_id.replace("/", "_").lstrip("."))
        try:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path)  # a sandbox id is unique; this is left from a crashed run
            os.mkdir(path, 0o700)
            os.chown(path, iso.uid, iso.gid)
        except OSError as exc:
            raise BootFailed(
                f"cannot create the sandbox's home {path}: {exc.strerror or exc}",
                sandbox_id=sandbox_id,
            ) from exc
        return path


def _check_cwd(cwd: str | None, command: str, sandbox_id: str) -> None:
    """A missing working directory fails the start with its name (a stat: no need to spawn
    the launcher to learn it)."""
    if cwd is not None and not os.path.isdir(cwd):
        raise BootFailed(
            f"cannot start {command!r}: its working directory {cwd} does not exist",
            sandbox_id=sandbox_id,
        )


def _resolve(path: str | None) -> str | None:
    """The real path the sandbox's binds and masks are computed on (a few lstat calls)."""
    return None if path is None else os.path.realpath(path)


def _make_scratch_root(configured: str | None) -> str:
    """The directory `user`-mode homes go in: root's, 0711 (others may enter their own home but
    not list the others')."""
    if configured is None:
        path = tempfile.mkdtemp(prefix="miren-sandboxes-")
    else:
        os.makedirs(configured, mode=0o711, exist_ok=True)
        path = configured
    os.chmod(path, 0o711)
    return path


async def _run(argv: list[str], env: Mapping[str, str] | None) -> tuple[int, str]:
    """Run a short helper to completion: (exit status, stdout and stderr); (-1, why) when it
    cannot run or takes longer than `_PROBE_TIMEOUT`."""
    return await run(argv, env=os.environ if env is None else env, timeout=_PROBE_TIMEOUT)
