"""Shared helpers for the ephemeral-domain tests (memory store unless a test says etcd)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from miren_store.deploy.deploys import DeployRequest, EphemeralRequest
from miren_store.entities import App, AppVersion, HttpRoute, Runtime, SandboxPool, VersionSpec
from miren_store.memory import MemoryStore
from miren_store.store import Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SPEC = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))


class FakeClock:
    """A settable clock: `now()` returns `t`; `advance()` moves it."""

    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)

    def __repr__(self) -> str:
        return f"<FakeClock {self.t.isoformat()}>"


def eph(
    label: str | None = None,
    *,
    ttl: str | None = None,
    branch: str | None = None,
    spec: VersionSpec | None = SPEC,
    from_version: str | None = None,
) -> DeployRequest:
    return DeployRequest(
        spec=spec if from_version is None else None,
        from_version=from_version,
        ephemeral=EphemeralRequest(label=label, branch=branch, ttl=ttl),
    )


def normal(spec: VersionSpec = SPEC) -> DeployRequest:
    return DeployRequest(spec=spec)


async def labelled(store: Store, app: str, label: str) -> list[AppVersion]:
    return await store.list(AppVersion, app=app, ephemeral_label=label)


async def ephemeral_versions(store: Store, app: str) -> list[AppVersion]:
    return [v for v in await store.list(AppVersion, app=app) if v.is_ephemeral]


async def add_pool(store: Store, pool_id: str, *versions: str, app: str = "app") -> SandboxPool:
    return await store.create(
        SandboxPool(id=pool_id, app=app, spec=SPEC, referenced_by_versions=tuple(versions))
    )


async def setup_app(store: Store, name: str = "app", *hosts: str) -> App:
    app = await store.create(App(name=name, created_at=T0))
    for host in hosts:
        await store.create(HttpRoute(host=host, app=name))
    return app


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    st = MemoryStore()
    try:
        yield st
    finally:
        await st.close()
