"""Two OS processes, each with its own activator, on one real etcd: one pool entity."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from miren_store.backends import open_store
from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import SandboxPool
from tests.activator.conftest import ECHO, ActivatorFactory, make_version

pytest_plugins = ["tests.etcd_fixtures"]
pytestmark = pytest.mark.etcd

ROOT = Path(__file__).resolve().parents[2]

# One node: connect, say "ready", wait for "go", then 100 concurrent first acquires on the same
# cold ephemeral version; report what it saw, and shut down cleanly.
NODE = """
import asyncio, json, sys
from datetime import timedelta
import uvloop
from miren_activator import Activator, ActivatorConfig
from miren_store.backends import open_store
from miren_store.entities import AppVersion, Runtime, SandboxPool, VersionSpec

url, node, echo = sys.argv[1], sys.argv[2], sys.argv[3]

async def main():
    store = open_store(url)
    await store.list(SandboxPool)  # connected before the race starts
    act = Activator(store, config=ActivatorConfig(node=node, stop_grace=2.0))
    await act.start()
    spec = VersionSpec(runtime=Runtime.PROCESS, command=(sys.executable, "-S", echo),
                       health_path="/health", boot_timeout=timedelta(seconds=30))
    version = AppVersion(id="app-v7", app="app", spec=spec, ephemeral_label="pr-7")
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    async def one():
        lease = await act.acquire(version)
        await asyncio.sleep(0)
        act.release(lease)
        return lease
    leases = await asyncio.gather(*(one() for _ in range(100)))
    created = act.metrics.registry.get_sample_value("miren_activator_pool_creations_total")
    print(json.dumps({"leases": len(leases), "sandboxes": len({l.sandbox_id for l in leases}),
                      "created": created}), flush=True)
    await act.close()
    await store.close()

uvloop.run(main())
"""


async def test_two_processes_one_etcd_create_one_pool(etcd_server: EmbeddedEtcd) -> None:
    nodes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            NODE,
            etcd_server.url,
            f"node-{i}",
            str(ECHO),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(2)
    ]
    try:
        for proc in nodes:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        for proc in nodes:  # both start within a few microseconds of each other
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        reports: list[dict[str, Any]] = []
        for proc in nodes:
            assert proc.stdout is not None
            reports.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        for proc in nodes:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [r["leases"] for r in reports] == [100, 100]
    assert [r["sandboxes"] for r in reports] == [1, 1]
    assert sum(r["created"] for r in reports) == 1  # exactly one node created it
    store = open_store(etcd_server.url)
    try:
        pools = await store.list(SandboxPool)
    finally:
        await store.close()
    assert [p.id for p in pools] == ["pool-app-v7-web"]
    assert pools[0].owner in ("node-0", "node-1")


async def test_activator_on_etcd_cold_start_and_records(
    etcd_server: EmbeddedEtcd, make_activator: ActivatorFactory
) -> None:
    store = open_store(etcd_server.url)
    try:
        act = await make_activator(store=store)
        version = make_version("app-v1", label="pr-1", rpi=100)
        leases = await asyncio.gather(*(act.acquire(version) for _ in range(100)))
        assert len({lease.sandbox_id for lease in leases}) == 1
        for lease in leases:
            act.release(lease)
        assert await act.flush(10.0)
        (pool,) = await store.list(SandboxPool)
        assert (pool.id, pool.desired_instances) == ("pool-app-v1-web", 1)
        await act.close()
    finally:
        await store.close()
