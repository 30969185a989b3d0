"""Child processes: how the edge starts every program it runs (etcd, sandboxes, probes).

Theory of operation
-------------------
No Python runs in a forked child of ours. uvloop's subprocess spawn forks and then runs
CPython's after-fork hooks in the child (the `random` reseed, `threading`, `logging`, and any
library's `os.register_at_fork`) before it execs. In a process with other threads (gRPC's
poller, the default executor) a lock one of them held at the fork stays held in the child: it
spins or blocks before its exec, and `uv_spawn` blocks the event loop until the exec happens.
Seen in this project's suite: the whole process stood still for minutes, the child spinning in
`Random.seed`. `os.posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)` and `execve`) runs no
Python in the child, and costs less than a fork.

What must happen between the fork and the real program (the death signal, dropping to another
uid, closing inherited fds, a umask, a working directory) happens in the trampoline: a fresh
single-threaded interpreter (`python -I -S -c TRAMPOLINE`) that does each step and then execs
the program in place (same pid). In this order it:
1. closes every fd >= 3 (posix_spawn closes only O_CLOEXEC ones; an inheritable fd of ours,
   such as a supervisor's stdout pipe, would otherwise stay open in the child for its life);
2. when asked (a root edge confining a sandbox), drops supplementary groups, switches gid and
   uid, and empties the capability bounding set, so nothing it execs can regain a privilege;
3. sets `PR_SET_PDEATHSIG=SIGKILL` (after the uid switch, which clears it): the kernel kills the
   child when the thread that spawned it exits, however the edge dies (SIGKILL, OOM). asyncio and
   uvloop run on one thread, the one that spawns;
4. checks that its parent is still us (else we died before the prctl, and no signal would come);
5. sets `PR_SET_NO_NEW_PRIVS` when asked, a umask when asked, changes to its working directory,
   and execs the program (searching PATH itself: after a uid switch our interpreter's library
   may be out of reach, e.g. below a 0700 /root, and os.execvp would import a module).
The trampoline costs an interpreter start (about 10 ms here).

Waiting. A child's exit is seen through a pidfd (`os.pidfd_open`, Linux 5.3+) the event loop
watches; it is reaped with `waitpid` then. The edge reaps only its own children, by pid, and
nothing else reaps them (uvloop's and asyncio's watchers only know the children they spawned).
Where pidfds are missing, one thread per child waits instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

TRAMPOLINE: Final = """\
import os, sys
import _ctypes as C
class L(C._SimpleCData):
    _type_ = "L"
class I(C._SimpleCData):
    _type_ = "i"
class F(C.CFuncPtr):
    _flags_ = C.FUNCFLAG_CDECL | C.FUNCFLAG_USE_ERRNO
    _restype_ = I
def fail(code, what):
    sys.stderr.write("miren: %s\\n" % what)
    os._exit(code)
ppid, uid, gid, nnp, mask = (int(a) for a in sys.argv[1:6])
cwd = sys.argv[6]
os.closerange(3, os.sysconf("SC_OPEN_MAX"))
prctl = F(C.dlsym(C.dlopen(None), "prctl"))
try:
    if gid >= 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if uid >= 0:
        for cap in range(64):  # PR_CAPBSET_DROP: nothing exec'd later can regain a capability
            if prctl(L(24), L(cap), L(0), L(0), L(0)) != 0 and C.get_errno() == 22:
                break  # EINVAL: past the kernel's last capability
        os.setresuid(uid, uid, uid)
except OSError as exc:
    fail(126, "cannot switch to uid %d gid %d: %s" % (uid, gid, exc))
if prctl(L(1), L(9), L(0), L(0), L(0)) != 0:  # PR_SET_PDEATHSIG, SIGKILL
    fail(126, "prctl(PR_SET_PDEATHSIG) failed, errno %d" % C.get_errno())
if os.getppid() != ppid:  # our parent died before the prctl took effect
    os._exit(125)
if nnp and prctl(L(38), L(1), L(0), L(0), L(0)) != 0:  # PR_SET_NO_NEW_PRIVS
    fail(126, "prctl(PR_SET_NO_NEW_PRIVS) failed, errno %d" % C.get_errno())
if mask >= 0:
    os.umask(mask)
if cwd:
    try:
        os.chdir(cwd)
    except OSError as exc:
        fail(126, "cannot enter %s: %s" % (cwd, exc.strerror))
cmd = sys.argv[7]
found = None
for d in [""] if "/" in cmd else os.environ.get("PATH", "/usr/bin:/bin").split(":"):
    try:
        os.execv(d + "/" + cmd if d else cmd, sys.argv[7:])
    except OSError as exc:
        if found is None or found.errno in (2, 20):  # prefer EACCES & co. to ENOENT, ENOTDIR
            found = exc
fail(127, "cannot exec %s: %s" % (cmd, found))
"""


@attrs.frozen
class Launch:
    """What the trampoline does before it execs (see the module docstring). `uid`/`gid`: switch
    to them (None: keep ours). `umask`: None keeps ours. `cwd`: None keeps ours."""

    uid: int | None = None
    gid: int | None = None
    no_new_privs: bool = False
    umask: int | None = None
    cwd: str | None = None

    def argv(self, command: Sequence[str]) -> list[str]:
        """The command line that runs `command` through the trampoline."""
        if not sys.platform.startswith("linux"):
            return list(command)  # (no prctl: the orderly shutdown is all there is)
        return [
            sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(os.getpid()),
            str(-1 if self.uid is None else self.uid),
            str(-1 if self.gid is None else self.gid),
            "1" if self.no_new_privs else "0",
            str(-1 if self.umask is None else self.umask),
            self.cwd or "",
            *command,
        ]  # fmt: skip


PLAIN: Final = Launch()


class Child:
    """A process we started: `pid`, `returncode` (None while it runs; -N when signal N ended
    it), `wait()`. It is its own session and process group leader (`new_session`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = -1
            loop.run_in_executor(None, self._wait_blocking, loop)
        else:
            loop.add_reader(self._pidfd, self._reap)

    def __repr__(self) -> str:
        return f"<Child pid={self.pid} rc={self.returncode}>"

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # (reaped by someone else: nothing more to learn)
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return  # (not yet: a spurious wake-up)
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._exited_with(status)

    def _wait_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 255 << 8
        loop.call_soon_threadsafe(self._exited_with, status)

    def _exited_with(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        """The exit status, once the process ended (it is reaped then)."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        """Signal the process (nothing once it was reaped: its pid may be another's by then)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal its whole process group (which outlives it until its last member ends)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: int | None = None,
    stderr: int | None = None,
    new_session: bool = True,
) -> Child:
    """Start `argv` (argv[0] a path, or a name looked up on our PATH) with stdin from /dev/null
    and `stdout`/`stderr` the given fds (None: /dev/null). Raises OSError when it cannot be
    started; the fds stay the caller's to close."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
    ]
    for target, fd in ((1, stdout), (2, stderr)):
        if fd is None:
            actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, os.O_WRONLY, 0))
        else:
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    # (posix_spawn returns once the child has exec'd: vfork, microseconds, nothing to await)
    pid = os.posix_spawnp(  # noqa: ASYNC221
        argv[0],
        list(argv),
        dict(env),
        file_actions=actions,
        setsid=new_session,
        # Python ignores SIGPIPE and SIGXFSZ; a child must not inherit that (or our handlers).
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD),
        setsigmask=(),
    )
    return Child(pid)


async def run(argv: Sequence[str], *, env: Mapping[str, str], timeout: float) -> tuple[int, str]:
    """Run a short helper to its end: (exit status, what it wrote to stdout and stderr);
    (-1, why) when it cannot start or takes longer than `timeout` (then it is killed)."""
    with tempfile.TemporaryFile() as out:
        try:
            child = await spawn(argv, env=env, stdout=out.fileno(), stderr=out.fileno())
        except OSError as exc:
            return -1, str(exc)
        try:
            async with asyncio.timeout(timeout):
                rc = await child.wait()
        except TimeoutError:
            await kill_and_reap(child)
            return -1, f"no answer within {timeout:g}s"
        out.seek(0)
        return rc, out.read().decode("utf-8", "replace")


async def kill_and_reap(child: Child) -> None:
    """SIGKILL the child's process group (it leads it) and wait until the child is reaped."""
    child.signal_group(signal.SIGKILL)
    child.kill()
    await child.wait()


def pick_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (another process may take it before
    ours binds: callers treat 'address in use' as a retry)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
