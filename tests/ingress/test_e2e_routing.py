"""Host resolution end to end: the whole edge (store, route-table watch, EdgeRouter, activator,
real echo sandboxes, the proxy engine), driven through its sockets.

Covers reference §11.D cases 36-51 as adapted by SPEC §6 (the proxy-behaviour ones, 49-51, are
in `test_e2e_proxy.py`), R-6, R-10, R-14, R-15 and the Host edge cases of issue 5. Every
sandbox is the echo app, which answers with its `MIREN_VERSION`, so "served by" is checked
against the version id the deploy returned.

Not applicable here (the reference's feature does not exist in this product):
- 45 (store errors during resolution ⇒ 500): resolution reads only the in-memory route table, never
  the store (`test_e2e_proxy.py` counts zero store operations over 10,000 requests); the remaining
  failure mode, a table that never loaded, is R-14 below (503, never the default route).
- 46 (a preview inherits the route's auth): there is no route auth feature.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest
import pytest_asyncio

from miren_store.backends import open_store
from miren_store.deploy.deploys import DeployRequest, deploy
from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import App, HttpRoute, SandboxPool
from tests.support.clients import Conn, Response, get, raw_exchange
from tests.support.edge import InProcessEdge, echo_spec, running_edge
from tests.support.poll import eventually

SHARED = pytest.mark.asyncio(loop_scope="module")  # tests on the module's one edge

L63 = "p" * 63


def host_of(total: int) -> str:
    """A valid host name of exactly `total` characters (labels of at most 63) under
    example.com, two labels deeper than any route: it can only fall to the default route."""
    head = ["a" * 63, "b" * 63, "c" * 63]
    last = total - len(".".join(head)) - len("..example.com")
    assert 1 <= last <= 63
    return ".".join([*head, "d" * last, "example.com"])


H253 = host_of(253)
H254 = host_of(254)


def past() -> datetime:
    return datetime.now(UTC) - timedelta(hours=1)


def answered_by_proxy(reply: Response) -> bool:
    """An error page of the proxy, not an app's answer (the echo app always sends JSON with
    its `version`; the proxy's error pages carry `Cache-Control: no-store`)."""
    return reply.header("cache-control") == "no-store" and b'"version"' not in reply.body


@attrs.define
class World:
    """One edge with the routes and versions the reference cases talk about."""

    edge: InProcessEdge
    v: dict[str, str]  # "app" / "app:label" -> version id

    @property
    def port(self) -> int:
        return self.edge.port


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    # No GC sweep during the module: the expired previews deployed below must stay in the store
    # (routing alone must refuse them: R-6).
    async with running_edge(
        tmp_path_factory.mktemp("routing"), gc={"sweep_interval": "1h"}
    ) as edge:
        v: dict[str, str] = {}
        for app in ("main", "other", "tenant", "fallback", "idle"):
            await edge.app(app)
        await edge.route("app.example.com", "main")  # plain
        await edge.route("feat-x.app.example.com", "other")  # exact, shadows main's feat-x
        await edge.route("*.example.com", "tenant")  # wildcard, multi-tenant
        await edge.route("fallback.test", "fallback", default=True)
        await edge.route("idle.example.org", "idle")  # an app with no active version
        v["main"] = await edge.deploy("main")
        for label in ("feat-x", "feat-y", L63, "cold"):
            v[f"main:{label}"] = await edge.deploy("main", label=label, ttl="1h")
        v["main:old"] = await edge.deploy("main", label="old", ttl="1m", now=past)
        v["other"] = await edge.deploy("other")
        v["tenant"] = await edge.deploy("tenant")
        v["tenant:pr-1"] = await edge.deploy("tenant", label="pr-1", ttl="1h")
        v["tenant:gone"] = await edge.deploy("tenant", label="gone", ttl="1m", now=past)
        v["fallback"] = await edge.deploy("fallback")
        v["idle:live"] = await edge.deploy("idle", label="live", ttl="1h")
        # The table follows the store through a watch: wait for the last write to arrive.
        await edge.served_by("live.idle.example.org", v["idle:live"])
        yield World(edge, v)


def check(world: World, reply: Response, want: str | int) -> None:
    """`want`: a version key of the world (served by it, 200) or an error status (answered by
    the proxy itself: neither the default route nor any app was used)."""
    if isinstance(want, str):
        assert reply.status == 200, reply
        assert reply.json()["version"] == world.v[want], (want, reply)
        # Preview answers carry X-Robots-Tag, answers of an active version do not.
        assert (reply.header("x-robots-tag") == "noindex") == (":" in want), reply.headers
    else:
        assert reply.status == want, reply
        assert answered_by_proxy(reply), reply


# -- reference §11.D cases 36-44, R-6, R-15 -----------------------------------------------------

REFERENCE = [
    ("36-exact-beats-preview", "feat-x.app.example.com", "other"),
    ("37-plain-route-preview", "feat-y.app.example.com", "main:feat-y"),
    ("37-plain-route-active", "app.example.com", "main"),
    ("38-plain-unknown-label-404-not-default", "nope.app.example.com", 404),
    ("R-6-plain-expired-label-410", "old.app.example.com", 410),
    ("39-two-labels-default", "a.b.app.example.com", "fallback"),
    ("40-wildcard-of-base-preview", "pr-1.foo.example.com", "tenant:pr-1"),
    ("40-wildcard-of-base-active", "pr-2.foo.example.com", "tenant"),
    ("41-port", "feat-y.app.example.com:8080", "main:feat-y"),
    ("42-mixed-case", "FEAT-Y.App.Example.com", "main:feat-y"),
    ("43-no-dot-default", "localhost", "fallback"),
    ("44-no-active-version-404", "idle.example.org", 404),
    ("44-preview-before-first-deploy", "live.idle.example.org", "idle:live"),
    ("R-15-wildcard-unknown-label-active", "tenant1.example.com", "tenant"),
    ("R-15-wildcard-preview", "pr-1.example.com", "tenant:pr-1"),
    ("R-15-wildcard-expired-label-active", "gone.example.com", "tenant"),
    ("default-route-own-host", "fallback.test", "fallback"),
]


@SHARED
@pytest.mark.parametrize(
    ("host", "want"), [c[1:] for c in REFERENCE], ids=[c[0] for c in REFERENCE]
)
async def test_reference_resolution(world: World, host: str, want: str | int) -> None:
    check(world, await get(world.port, host), want)


@SHARED
async def test_refusal_messages_name_the_reason(world: World) -> None:
    expect = {
        "nope.app.example.com": (404, "This preview does not exist."),
        "old.app.example.com": (410, "This preview has expired."),
        "idle.example.org": (404, "This application has no active version."),
    }
    for host, (status, message) in expect.items():
        reply = await get(world.port, host, headers=[("Accept", "application/json")])
        assert reply.status == status, reply
        assert reply.json()["error"]["message"] == message


# -- Host edge cases --------------------------------------------------------------------------

HOSTS: list[tuple[str, bytes, str | int]] = [
    ("port", b"app.example.com:8080", "main"),
    ("trailing-dot", b"app.example.com.", "main"),
    ("trailing-dot-and-port", b"app.example.com.:8080", "main"),
    ("upper-case", b"APP.EXAMPLE.COM", "main"),
    ("upper-case-preview", b"FEAT-Y.APP.EXAMPLE.COM", "main:feat-y"),
    # IP literals are valid hosts that no route names: the default route answers them.
    ("ipv4", b"127.0.0.1", "fallback"),
    ("ipv4-port", b"127.0.0.1:8080", "fallback"),
    ("ipv6", b"[::1]", "fallback"),
    ("ipv6-port", b"[::1]:8080", "fallback"),
    ("ipv6-unclosed", b"[::1", 400),
    ("ipv6-bad-char", b"[::g]", 400),
    ("ipv6-bad-port", b"[::1]x", 400),
    ("empty", b"", 400),
    ("blank", b"   ", 400),
    ("label-63", f"{L63}.app.example.com".encode(), f"main:{L63}"),
    ("label-64", b"a" * 64 + b".app.example.com", 400),
    ("total-253", H253.encode(), "fallback"),
    ("total-253-plus-trailing-dot", H253.encode() + b".", "fallback"),
    ("total-254", H254.encode(), 400),
    ("non-ascii-utf8", "ñ.app.example.com".encode(), 400),
    ("non-ascii-latin1", b"\xe9.app.example.com", 400),
    ("punycode-is-ascii", b"xn--ol-yja.app.example.com", 404),  # a valid, unknown label
    ("underscore", b"app_example.com", 400),
    ("empty-label", b"app..example.com", 400),
    ("leading-hyphen", b"-x.app.example.com", 400),
    ("two-trailing-dots", b"app.example.com..", 400),
    ("bad-port", b"app.example.com:http", 400),
    ("userinfo", b"user@app.example.com", 400),
    ("path", b"app.example.com/x", 400),
    ("inner-space", b"app example.com", 400),
]


@SHARED
@pytest.mark.parametrize(("host", "want"), [c[1:] for c in HOSTS], ids=[c[0] for c in HOSTS])
async def test_host_edge_cases(world: World, host: bytes, want: str | int) -> None:
    check(world, await get(world.port, host), want)


@SHARED
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nHost: fallback.test\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0 without Host: nothing to route on
    ],
    ids=["missing", "duplicate", "http10-missing"],
)
async def test_missing_or_duplicate_host_is_400(world: World, request_bytes: bytes) -> None:
    result = await raw_exchange(world.port, request_bytes)
    assert result.closed, result
    data = result.data
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert b'"version"' not in data  # neither the default route nor any app answered


# -- reserved paths (cases 47, 48) --------------------------------------------------------------


@SHARED
async def test_47_health_on_a_preview_host_is_the_platform_health(world: World) -> None:
    for host in ("cold.app.example.com", "feat-y.app.example.com", "unknown.invalid"):
        reply = await get(world.port, host, "/.well-known/miren/health")
        assert reply.status == 200, (host, reply)
        body = reply.json()
        assert body["status"] == "ok" and body["routes"]["loaded"] is True, body
        assert "version" not in body  # not the app's answer
    # Answered before routing: the never-requested preview got no pool, so no sandbox either.
    pools = await world.edge.store.list(SandboxPool, app="main")
    assert all(world.v["main:cold"] not in p.referenced_by_versions for p in pools), pools
    assert all(not p.id.startswith(f"pool-{world.v['main:cold']}") for p in pools), pools


@SHARED
@pytest.mark.parametrize(
    "host", ["app.example.com", "feat-y.app.example.com", "tenant9.example.com", "unrouted.invalid"]
)
@pytest.mark.parametrize("path", ["/.well-known/miren/admin", "/.well-known/miren/admin/apps"])
async def test_48_admin_path_is_404_on_every_host(world: World, host: str, path: str) -> None:
    reply = await get(world.port, host, path)
    assert reply.status == 404, reply
    assert answered_by_proxy(reply), reply


# -- a route and its preview never share a sandbox ------------------------------------------


@SHARED
async def test_r10_interleaved_requests_reach_their_own_version(world: World) -> None:
    hosts = {"app.example.com": world.v["main"], "feat-y.app.example.com": world.v["main:feat-y"]}
    sandboxes: dict[str, set[str]] = {h: set() for h in hosts}

    async def client(n: int) -> None:
        conn = await Conn.open(world.port)
        try:
            for i in range(n):
                host = list(hosts)[i % 2]  # alternate on one keep-alive connection
                reply = await conn.request("GET", f"/r10/{i}", host)
                assert reply.status == 200, reply
                info = reply.json()
                assert info["version"] == hosts[host], (host, info)
                sandboxes[host].add(info["sandbox"])
        finally:
            conn.close()

    await asyncio.gather(*(client(60) for _ in range(6)))
    assert not sandboxes["app.example.com"] & sandboxes["feat-y.app.example.com"]


async def test_r10_replacing_a_preview_switches_every_later_request(tmp_path: Path) -> None:
    """Leases are scoped by version id: after a redeploy of the label (and of the active
    version) no request reaches the replaced version once the new one answered."""
    async with running_edge(tmp_path) as edge:
        await edge.app("web")
        await edge.route("web.example.com", "web")
        active1 = await edge.deploy("web")
        prev1 = await edge.deploy("web", label="pr", ttl="1h")
        await edge.served_by("web.example.com", active1)
        await edge.served_by("pr.web.example.com", prev1)
        conn = await Conn.open(edge.port)  # a warm keep-alive connection, leases in use
        try:
            for host, version in (("web.example.com", active1), ("pr.web.example.com", prev1)):
                assert (await conn.request("GET", "/", host)).json()["version"] == version

            prev2 = await edge.deploy("web", label="pr", ttl="1h", spec=echo_spec({"N": "2"}))
            await edge.served_by("pr.web.example.com", prev2)
            for _ in range(20):
                for host, version in (("pr.web.example.com", prev2), ("web.example.com", active1)):
                    reply = await conn.request("GET", "/", host)
                    assert reply.json()["version"] == version, (host, reply)

            active2 = await edge.deploy("web", spec=echo_spec({"N": "3"}))
            await edge.served_by("web.example.com", active2)
            for _ in range(20):
                for host, version in (("web.example.com", active2), ("pr.web.example.com", prev2)):
                    reply = await conn.request("GET", "/", host)
                    assert reply.json()["version"] == version, (host, reply)
        finally:
            conn.close()


# -- a preview stops routing at its expiry instant -------------------------------------------


async def test_r6_preview_stops_at_its_expiry_instant(tmp_path: Path) -> None:
    async with running_edge(tmp_path, gc={"sweep_interval": "1h"}) as edge:
        await edge.app("web")
        await edge.route("web.example.com", "web")
        await edge.deploy("web")
        version = await edge.deploy("web", label="soon", ttl="2s")
        await edge.served_by("soon.web.example.com", version)
        expires_at = edge.edge.table.versions[version].ephemeral_expires_at
        assert expires_at is not None
        deadline = expires_at.timestamp()
        conn = await Conn.open(edge.port)  # one keep-alive connection: the router's host cache
        try:
            statuses: list[int] = []

            async def sent_after_expiry() -> bool:
                sent = time.time()
                reply = await conn.request("GET", "/", "soon.web.example.com")
                statuses.append(reply.status)
                if sent > deadline:
                    # Resolved after the expiry instant: never served, whatever was cached.
                    assert reply.status == 410, (sent - deadline, reply)
                    assert answered_by_proxy(reply)
                    return True
                assert reply.status in (200, 410), reply
                return False

            await eventually(
                sent_after_expiry,
                deadline + 10 - time.time(),
                "a request sent after the expiry instant",
                interval=0.05,
            )
            assert statuses[0] == 200
        finally:
            conn.close()
        # The route itself keeps serving the active version.
        assert (await get(edge.port, "web.example.com")).status == 200


# -- default route: only when nothing else matches; its removal gives 404 -----------------------


async def test_without_a_default_route_unmatched_hosts_are_404(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as edge:
        for app in ("main", "fallback"):
            await edge.app(app)
        await edge.route("app.example.com", "main")
        await edge.deploy("main")
        await edge.route("fallback.test", "fallback", default=True)
        fallback = await edge.deploy("fallback")
        unmatched = ["localhost", "a.b.app.example.com", "127.0.0.1", "[::1]", "x.unknown.test"]
        for host in unmatched:
            await edge.served_by(host, fallback)
        reply = await edge.admin("DELETE", "/v1/routes/fallback.test")
        assert reply.status == 204, reply
        await edge.wait_status("localhost", 404, timeout=10.0)
        for host in unmatched:
            reply = await get(edge.port, host, headers=[("Accept", "application/json")])
            assert reply.status == 404, (host, reply)
            assert reply.json()["error"]["message"] == "No application is configured for this host."
        assert (await get(edge.port, "app.example.com")).status == 200


# -- no route table yet => 503, never the default route ------------------------------------


@pytest.mark.etcd
async def test_r14_unloaded_table_is_503_never_the_default_route(
    tmp_path: Path, etcd_server: EmbeddedEtcd
) -> None:
    setup = open_store(etcd_server.url, timeout=5.0)
    try:
        await setup.create(App(name="fallback"))
        result = await deploy(setup, "fallback", DeployRequest(spec=echo_spec()))
        await setup.create(HttpRoute(host="fallback.test", app="fallback", default=True))
    finally:
        await setup.close()
    etcd_server.freeze()  # the edge starts while the store answers nothing
    try:
        async with running_edge(
            tmp_path,
            store=etcd_server.url,
            wait_ready=False,
            store_options={"timeout": "0.5s"},
        ) as edge:
            for host in ("localhost", "fallback.test", "anything.example.com"):
                reply = await get(edge.port, host)
                assert reply.status == 503, (host, reply)
                assert reply.header("retry-after") is not None, reply.headers
                assert answered_by_proxy(reply), reply
            assert not edge.edge.table.loaded
            etcd_server.thaw()
            await edge.served_by("localhost", result.version.id, timeout=20.0)
            await edge.served_by("fallback.test", result.version.id)
    finally:
        etcd_server.thaw()  # idempotent; the fixture stops it
