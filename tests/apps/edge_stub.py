"""A stand-in for `miren serve` in the isolation tests: a process that runs one sandbox through
`ProcessRuntime`, so a test can run "the edge" as another user, with a secret in its (initial)
environment, or SIGKILL it.

    python tests/apps/edge_stub.py '{"isolation": {...}, "command": [...], "cwd": ...,
                                     "log": PATH, "undumpable": false}'

`isolation` holds `IsolationConfig` keyword arguments. It prints one JSON line, then waits for
its stdin to close, stops the sandbox and exits:

    {"pid": its pid, "euid": its euid, "isolation": the chosen description,
     "port": the sandbox's port, "leader": the sandbox's pid (the group leader)}
    or {"pid": ..., "euid": ..., "isolation": ..., "error": why the sandbox did not start}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvloop

from miren_activator.errors import BootFailed
from miren_activator.runtimes.base import SandboxSpec
from miren_activator.runtimes.isolation import IsolationConfig, set_undumpable
from miren_activator.runtimes.process import ProcessRuntime
from miren_store.entities import Runtime, VersionSpec


async def main(conf: dict[str, Any]) -> None:
    if conf.get("undumpable"):
        set_undumpable()
    runtime = ProcessRuntime(isolation=IsolationConfig(**conf["isolation"]))
    iso = await runtime.prepare()
    out: dict[str, Any] = {"pid": os.getpid(), "euid": os.geteuid(), "isolation": iso.description}
    spec = SandboxSpec(
        sandbox_id="sb-stub",
        app="app",
        version_id="app-v1",
        ephemeral_label="",
        service="web",
        spec=VersionSpec(
            runtime=Runtime.PROCESS,
            command=tuple(conf["command"]),
            cwd=conf.get("cwd"),
            health_path="/health",
            boot_timeout=timedelta(seconds=30),
        ),
        ordinal=0,
        log_path=Path(conf["log"]),
    )
    try:
        handle = await runtime.start(spec)
    except BootFailed as exc:
        print(json.dumps({**out, "error": str(exc)}), flush=True)
        return
    try:
        await asyncio.wait_for(handle.wait_ready(), 30)
        print(json.dumps({**out, "port": handle.port, "leader": handle.pid}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the test closes our stdin
    finally:
        await handle.stop(2.0)


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
