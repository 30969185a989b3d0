"""No sandbox outlives the process that runs the activator, however that process dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.activator.conftest import ECHO, pid_gone, wait_until

ROOT = Path(__file__).resolve().parents[2]

# The "parent": an activator with two running sandboxes (one ignores SIGTERM) and one still
# booting; it prints their pids, then waits to be killed.
PARENT = """
import asyncio, json, sys
from datetime import timedelta
from miren_activator import Activator, ActivatorConfig, ProcessRuntime
from miren_store.entities import AppVersion, Runtime, VersionSpec
from miren_store.memory import MemoryStore

loop_kind, echo = sys.argv[1], sys.argv[2]

def version(vid, **env):
    cmd = (sys.executable, "-S", echo, "--port", "$PORT")
    spec = VersionSpec(runtime=Runtime.PROCESS, command=cmd, env=env, health_path="/health",
                       boot_timeout=timedelta(seconds=60))
    return AppVersion(id=vid, app="app", spec=spec)

async def main():
    runtimes = {Runtime.PROCESS: ProcessRuntime()}
    act = Activator(MemoryStore(), config=ActivatorConfig(node="child"), runtimes=runtimes)
    await act.start()
    await act.acquire(version("v1"))
    await act.acquire(version("v2", ECHO_IGNORE_SIGTERM="1"))
    booting = asyncio.ensure_future(act.acquire(version("v3", BOOT_DELAY_MS="60000")))
    while not any(s.pid for s in act.sandboxes() if s.version == "v3"):
        await asyncio.sleep(0.005)
    print(json.dumps([s.pid for s in act.sandboxes()]), flush=True)
    await booting

if loop_kind == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_sigkill_of_the_parent_leaves_no_sandbox_behind(loop_kind: str) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARENT,
        loop_kind,
        str(ECHO),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        pids = json.loads(line)
        assert len(pids) == 3 and all(not pid_gone(p) for p in pids)
        parent.kill()
        assert await parent.wait() == -signal.SIGKILL
        await wait_until(lambda: all(pid_gone(p) for p in pids), 5.0, "every sandbox to die")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        for pid in pids:  # never leave one behind, even when the test failed
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if not pid_gone(pid):
                    os.kill(pid, signal.SIGKILL)
