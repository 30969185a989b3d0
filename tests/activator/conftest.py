"""Fixtures of the activator tests: versions that run the echo server, started activators that
are closed (and whose sandbox processes are checked gone) at teardown."""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from miren_activator import Activator, ActivatorConfig, Lease
from miren_store.entities import AppVersion, Concurrency, Runtime, VersionSpec
from miren_store.memory import MemoryStore
from tests.support.poll import eventually

ECHO = Path(__file__).resolve().parents[1] / "apps" / "echo_server.py"
ECHO_CMD = (sys.executable, "-S", str(ECHO), "--port", "$PORT")


def make_version(
    vid: str = "app-v1",
    *,
    app: str = "app",
    label: str = "",
    env: Mapping[str, str] | None = None,
    rpi: int = 10,
    cap: int | None = None,
    max_instances: int | None = None,
    min_instances: int = 0,
    scale_down: float | None = None,
    boot_timeout: float = 10.0,
    health_path: str | None = "/health",
    command: tuple[str, ...] = ECHO_CMD,
    runtime: Runtime = Runtime.PROCESS,
    urls: tuple[str, ...] = (),
    cwd: str | None = None,
) -> AppVersion:
    spec = VersionSpec(
        runtime=runtime,
        command=command if runtime is Runtime.PROCESS else (),
        env=dict(env or {}),
        cwd=cwd,
        health_path=health_path,
        boot_timeout=timedelta(seconds=boot_timeout),
        urls=urls,
        concurrency=Concurrency(
            requests_per_instance=rpi,
            max_requests_per_instance=cap,
            max_instances=max_instances,
            min_instances=min_instances,
            scale_down_delay=None if scale_down is None else timedelta(seconds=scale_down),
        ),
    )
    return AppVersion(id=vid, app=app, spec=spec, ephemeral_label=label)


def pid_gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # "pid (comm) S ...": the state follows the last ')'.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# Poll every 5 ms until true; fail the test after the timeout (5 s unless given).
wait_until = functools.partial(eventually, interval=0.005)


async def get_json(lease: Lease, path: str = "/") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{lease.url}{path}") as resp,
    ):
        assert resp.status == 200, resp.status
        data: dict[str, Any] = await resp.json()
        return data


def sample(act: Activator, name: str, **labels: str) -> float:
    if name == "miren_activator_sandboxes":
        labels = {"node": act.config.node, **labels}
    value = act.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


ActivatorFactory = Callable[..., Awaitable[Activator]]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def make_activator(tmp_path: Path, store: MemoryStore) -> AsyncIterator[ActivatorFactory]:
    """Start activators on the test's store; at teardown close them and check that every
    sandbox process they ever started is gone."""
    made: list[Activator] = []
    pids: set[int] = set()

    def track(act: Activator) -> None:
        for sb in act.sandboxes():
            if sb.pid is not None:
                pids.add(sb.pid)

    async def make(**kwargs: Any) -> Activator:
        names = {a.name for a in attrs.fields(ActivatorConfig)}
        config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        config_kwargs.setdefault("node", "node-a")
        config_kwargs.setdefault("log_dir", tmp_path / "logs")
        config_kwargs.setdefault("stop_grace", 2.0)
        act = Activator(
            kwargs.pop("store", store), config=ActivatorConfig(**config_kwargs), **kwargs
        )
        await act.start()
        made.append(act)
        return act

    try:
        yield make
    finally:
        for act in made:
            track(act)
            await act.close(grace=2.0)
        for pid in pids:
            await wait_until(lambda pid=pid: pid_gone(pid), 5.0, f"sandbox pid {pid} to end")
