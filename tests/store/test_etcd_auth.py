"""etcd with authentication (SPEC §14: a preview must not reach the store unless
authenticated). With several nodes etcd listens on the network, where the previews are too: the
store authenticates as `store_options.etcd_user`, and a client without the password (what a
preview's code could open) can neither read nor write. Real etcd, auth enabled through its own
API; restarted, it forgets every token, and the store authenticates again by itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from miren_store.backends import open_store
from miren_store.entities import App
from miren_store.errors import Conflict, StoreError, StoreUnavailable
from miren_store.store import Store
from tests.support.edge import running_edge
from tests.support.etcd_cluster import EtcdCluster
from tests.support.poll import eventually

pytestmark = pytest.mark.etcd
PASSWORD = "s3cret-etcd-pass"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    # Tokens unused for 1 s expire (etcd's default is 5 min): the store must notice.
    with EtcdCluster(tmp_path / "etcd", size=1, extra=("--auth-token-ttl=1",)) as cluster:
        cluster.enable_auth(PASSWORD)
        yield cluster


async def create_when_back(store: Store, app: App) -> None:
    """Create `app` once the restarted etcd answers again (StoreUnavailable until then)."""

    async def created() -> bool:
        try:
            await store.create(app)
        except StoreUnavailable:
            return False
        except Conflict:  # (an earlier try was applied, its answer lost)
            return True
        return True

    await eventually(created, 20, f"creating {app.name} after the restart", interval=0.1)


async def test_only_the_credentials_open_the_store(etcd: EtcdCluster) -> None:
    url = f"etcd://{etcd.endpoints}/auth"
    store = open_store(url, user="root", password=PASSWORD)
    anonymous = open_store(url)
    wrong = open_store(url, user="root", password="guess")
    try:
        made = await store.create(App(name="web"))
        assert (await store.get(App, "web")) == made
        lease = await store.grant_lease(5)
        assert await store.keep_alive(lease) >= 1
        for intruder in (anonymous, wrong):
            with pytest.raises(StoreUnavailable, match="etcd refused the credentials") as err:
                await intruder.get(App, "web")
            assert "guess" not in str(err.value)  # a password is never echoed
            with pytest.raises(StoreError):
                await intruder.create(App(name="evil"))
        assert [a.name for a in await store.list(App)] == ["web"]
    finally:
        for s in (store, anonymous, wrong):
            await s.close()


async def test_a_restarted_etcd_is_authenticated_again(etcd: EtcdCluster) -> None:
    store = open_store(f"etcd://{etcd.endpoints}/auth", user="root", password=PASSWORD)
    try:
        await store.create(App(name="before"))
        etcd.restart(0)  # (its tokens are gone with it)
        await asyncio.to_thread(etcd.wait_healthy, 0)
        await create_when_back(store, App(name="after"))
        assert [a.name for a in await store.list(App)] == ["after", "before"]
    finally:
        await store.close()


async def test_an_expired_token_is_replaced_without_a_failed_call(etcd: EtcdCluster) -> None:
    store = open_store(f"etcd://{etcd.endpoints}/auth", user="root", password=PASSWORD)
    try:
        await store.create(App(name="first"))
        await asyncio.sleep(2.5)  # (idle past the token's TTL: that is the condition)
        await store.create(App(name="second"))  # re-authenticated inside the one call
        assert [a.name for a in await store.list(App)] == ["first", "second"]
    finally:
        await store.close()


async def test_a_watch_authenticates_again_after_etcd_restarted(etcd: EtcdCluster) -> None:
    """Nothing but the watch uses the store: etcd restarts (its tokens gone); the watch's new
    stream is refused for its stale token, and must authenticate again to see the next write."""
    url = f"etcd://{etcd.endpoints}/auth"
    watcher = open_store(url, user="root", password=PASSWORD)
    writer = open_store(url, user="root", password=PASSWORD)
    seen: list[str] = []
    try:
        start = (await watcher.snapshot([App])).revision

        async def follow() -> None:
            async for change in watcher.watch(start):
                seen.append(change.id)

        task = asyncio.create_task(follow())
        await writer.create(App(name="before"))
        await eventually(lambda: seen == ["before"], 10, "the first change")
        etcd.restart(0)
        await asyncio.to_thread(etcd.wait_healthy, 0)
        await create_when_back(writer, App(name="after"))
        await eventually(lambda: seen == ["before", "after"], 20, "the watch to see it")
        task.cancel()
    finally:
        await watcher.close()
        await writer.close()


async def test_miren_serve_runs_on_an_authenticated_etcd(etcd: EtcdCluster, tmp_path: Path) -> None:
    async with running_edge(
        tmp_path,
        store=f"etcd://{etcd.endpoints}/edge",
        store_options={"etcd_user": "root", "etcd_password": PASSWORD},
    ) as edge:
        await edge.app("web")
        assert [a.name for a in await edge.store.list(App)] == ["web"]
