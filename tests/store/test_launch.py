"""miren_store.launch: children started with no Python in the forked child, through one
trampoline (fds, uid, death signal, umask, cwd), waited for through a pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from miren_store.launch import Launch, kill_and_reap, run, spawn

ENV = dict(os.environ)


async def test_run_returns_the_status_and_the_output() -> None:
    assert await run(["sh", "-c", "echo out; echo err >&2; exit 3"], env=ENV, timeout=10) == (
        3,
        "out\nerr\n",
    )
    assert (await run(["/nonexistent/x"], env=ENV, timeout=10))[0] == -1


async def test_run_kills_a_helper_past_its_timeout() -> None:
    rc, why = await run(["sleep", "60"], env=ENV, timeout=0.2)
    assert rc == -1 and "no answer" in why


async def test_children_do_not_inherit_ignored_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a child (a shell pipeline, say) must not."""
    _, out = await run(["grep", "^SigIgn", "/proc/self/status"], env=ENV, timeout=10)
    ignored = int(out.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), out


async def test_the_trampoline_closes_fds_sets_umask_and_cwd(tmp_path: Path) -> None:
    keep = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(keep, True)  # an inheritable fd of ours, as a supervisor's pipe is
    try:
        script = f"ls /proc/self/fd; umask; pwd; test -e /proc/self/fd/{keep} && echo LEAK; true"
        argv = Launch(umask=0o077, cwd=str(tmp_path)).argv(["sh", "-c", script])
        rc, out = await run(argv, env=ENV, timeout=10)
    finally:
        os.close(keep)
    lines = out.split()
    assert rc == 0, out
    assert "LEAK" not in lines
    assert "0077" in lines and str(tmp_path) in lines
    assert set(lines[: lines.index("0077")]) <= {"0", "1", "2", "3"}  # (3: ls's own listing)


async def test_a_missing_cwd_or_command_is_reported() -> None:
    rc, out = await run(Launch(cwd="/nonexistent-dir").argv(["true"]), env=ENV, timeout=10)
    assert rc == 126 and "cannot enter /nonexistent-dir" in out
    rc, out = await run(Launch().argv(["no-such-command-here"]), env=ENV, timeout=10)
    assert rc == 127 and "cannot exec no-such-command-here" in out


async def test_wait_and_kill_and_reap() -> None:
    child = await spawn(["sleep", "60"], env=ENV)
    assert child.returncode is None
    await kill_and_reap(child)
    assert child.returncode == -9
    assert await child.wait() == -9
    child.kill()  # (reaped: nothing is signalled any more)


# A process with a thread that holds a lock an after-fork hook needs: a child that ran Python
# after the fork (uvloop's spawn runs the hooks) would block on it before its exec, and the
# parent's loop with it. The script prints the child's exit status, or hangs.
HOOKED = """
import asyncio, os, sys, threading, uvloop
from miren_store.launch import spawn
lock = threading.Lock()
os.register_at_fork(after_in_child=lambda: lock.acquire())
held = threading.Event()
threading.Thread(target=lambda: (lock.acquire(), held.set(), threading.Event().wait()),
                 daemon=True).start()
held.wait()
async def ours():
    child = await spawn(["true"], env=os.environ)
    return await child.wait()
async def uvloops():
    proc = await asyncio.create_subprocess_exec("true")
    return await proc.wait()
which = sys.argv[1]
print(uvloop.run(ours() if which == "ours" else uvloops()), flush=True)
"""


@pytest.mark.parametrize("which", ["ours", "uvloop"])
async def test_no_python_runs_in_the_forked_child(which: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOOKED, which, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 6)
    except TimeoutError:
        out = b"hung"
    finally:  # (the whole group: a child stuck before its exec is in it too)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    if which == "ours":
        assert out.strip() == b"0"
    else:  # the hazard this module exists for: uvloop's spawn blocks in the forked child
        assert out.strip() != b"0"
