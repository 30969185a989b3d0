"""Several `miren serve` nodes on one real 3-member etcd cluster (loopback TCP ports): every node
routes every host, a preview runs once in the cluster, a dead owner's pools are taken over, a
frozen owner resumed after its lease does not serve what it lost, one etcd member down changes
nothing, one GC runs at a time.

The nodes run with `node.lease_ttl = 4` (the default is 10 s) so a takeover fits a test; what
is asserted holds for any TTL. Timings are printed (the benchmark in benchmarks/ measures them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support.clients import Response
from tests.support.edge import ECHO_CMD, REPO, TOKEN, MirenServer
from tests.support.etcd_cluster import EtcdCluster
from tests.support.poll import eventually_sync

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(180)]

TTL = 4
APP = "web"
ROUTE = "web.example.com"
SPEC = {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO)}
# A takeover: the lease runs out (TTL), the watch reports it, a request takes the pool over and
# boots a sandbox. Generous for a loaded 2-core CI machine.
TAKEOVER_LIMIT = TTL + 15.0


ETCD_PASSWORD = "cluster-etcd-pass"  # the etcd has authentication on, as the README advises


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=3) as cluster:
        cluster.enable_auth(ETCD_PASSWORD)
        yield cluster


def node(workdir: Path, name: str, store: str, ttl: int = TTL) -> MirenServer:
    return MirenServer(
        workdir / name,
        store=store,
        token=TOKEN,
        settings={
            "node_name": name,
            "node.lease_ttl": str(ttl),
            "store_options.etcd_user": "root",
            "store_options.etcd_password": ETCD_PASSWORD,
        },
    )


@pytest.fixture
def nodes(etcd: EtcdCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[
    list[MirenServer]
]:  # fmt: skip
    """Nodes a and b on their own key prefix of the shared cluster (stopped at the end)."""
    store = f"etcd://{etcd.endpoints}/t-{request.node.name[:40]}"
    started: list[MirenServer] = []
    try:
        for name in ("a", "b"):
            server = node(tmp_path, name, store)
            server.start()
            started.append(server)
        yield started
    finally:
        for server in reversed(started):
            server.stop(check=False)
            assert server.kill_survivors() == []


def setup_app(server: MirenServer) -> None:
    assert server.admin("POST", "/v1/apps", {"name": APP}).status == 201
    assert server.admin("PUT", f"/v1/routes/{ROUTE}", {"app": APP}).status in (200, 201)


def deploy_preview(server: MirenServer, label: str, *, retry_503: float = 0.0) -> str:
    """Deploy the preview `label` through `server`. With `retry_503`, a 503 (the store busy,
    e.g. electing a leader) is retried for that many seconds, as a CI client does."""

    def deployed() -> bool:
        reply = server.admin(
            "POST", f"/v1/apps/{APP}/deploys", {"spec": SPEC, "ephemeral": {"label": label}}
        )
        if reply.status == 503 and retry_503:
            return False
        assert reply.status == 201, reply
        return True

    if retry_503:
        eventually_sync(deployed, retry_503, f"the deploy of {label}", interval=0.2)
    else:
        deployed()
    return f"{label}.{ROUTE}"


def echo(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, (resp.status, resp.body[:300])
    found: dict[str, Any] = json.loads(resp.body)
    return found


def running(server: MirenServer) -> float:
    return server.metric("miren_activator_sandboxes", state="running")


def health(server: MirenServer) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(server.admin("GET", "/healthz").body)["node"]
    return found


def test_a_deploy_through_one_node_is_served_by_the_other(nodes: list[MirenServer]) -> None:
    a, b = nodes
    eventually_sync(lambda: health(a)["nodes"] == ["a", "b"], 10, "both nodes listed")
    setup_app(a)
    reply = a.admin("POST", f"/v1/apps/{APP}/deploys", {"spec": SPEC})
    assert reply.status == 201, reply
    t0 = time.monotonic()
    # Routable on b: its table has the version (anything but 404), within a second.
    eventually_sync(lambda: b.get(ROUTE, timeout=10).status != 404, 5, "b to route the deploy")
    routable = time.monotonic() - t0
    body = echo(eventually_sync(lambda: (r := b.get(ROUTE, timeout=15)).status == 200 and r, 20,
                                "b to serve the deploy"))  # fmt: skip
    print(f"deploy through a routable on b after {routable * 1000:.0f} ms (serving incl. boot: "
          f"{(time.monotonic() - t0) * 1000:.0f} ms)")  # fmt: skip
    assert body["app"] == APP
    assert routable < 5


def test_a_preview_requested_through_both_nodes_runs_once(nodes: list[MirenServer]) -> None:
    a, b = nodes
    setup_app(a)
    host = deploy_preview(a, "pr-1")
    eventually_sync(lambda: b.get(host).status != 404, 5, "b to route the preview")
    seen: list[dict[str, Any]] = []
    for i in range(20):
        server = (a, b)[i % 2]
        seen.append(echo(server.get(host, timeout=20)))
    assert len({s["sandbox"] for s in seen}) == 1, {s["sandbox"] for s in seen}
    assert running(a) + running(b) == 1  # one sandbox in the whole cluster
    # Forwarded by the other node: the app sees the client's X-Forwarded-* (not the node's),
    # and never the internal-hop header.
    for s in seen:
        headers = {k.lower(): v for k, v in s["headers"]}
        assert headers["x-forwarded-for"] == "127.0.0.1", headers
        assert headers["x-forwarded-host"] == host
        assert headers["x-forwarded-proto"] == "http"
        assert "x-miren-hop" not in headers

    # A WebSocket through b: upgraded by the owner, tunnelled through both nodes.
    async def websocket() -> None:
        url = f"ws://{host}:{b.proxy_port}/ws"
        async with connect(url, host="127.0.0.1", port=b.proxy_port, open_timeout=20) as ws:
            for text in ("one", "two"):
                await ws.send(text)
                assert await ws.recv() == text

    asyncio.run(websocket())
    # A protected preview: b admits the bypass token and strips it; a (the owner) serves the
    # forwarded request without asking again. A forged hop header gets the login answer.
    protect = {"mode": "previews", "password": "cluster-pass-1", "bypass_token": "ci-token-123"}
    assert a.admin("PUT", f"/v1/apps/{APP}/protection", protect).status == 200
    eventually_sync(lambda: b.get(host).status == 401, 10, "b to protect the preview")
    through_b = b.get(host, headers={"X-Miren-Bypass": "ci-token-123"})
    headers = {k.lower(): v for k, v in echo(through_b)["headers"]}
    assert "x-miren-bypass" not in headers and echo(through_b)["sandbox"] == seen[0]["sandbox"]
    forged_hop = b.get(host, headers={"X-Miren-Hop": f"{int(time.time())}.{'0' * 64}"})
    assert forged_hop.status == 401
    assert a.admin("PUT", f"/v1/apps/{APP}/protection", {"mode": "none"}).status == 200
    eventually_sync(lambda: b.get(host).status == 200, 10, "b to open the preview again")
    # A client forging the hop header is an ordinary client: its X-Forwarded-* are not trusted.
    forged = echo(b.get(host, headers={"X-Miren-Hop": "forged", "X-Forwarded-Host": "evil",
                                       "X-Forwarded-For": "6.6.6.6"}))  # fmt: skip
    headers = {k.lower(): v for k, v in forged["headers"]}
    assert headers["x-forwarded-host"] == host
    assert headers["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert "x-miren-hop" not in headers


class Load(threading.Thread):
    """GETs to one node in a loop: (monotonic time, status, sandbox id or "")."""

    def __init__(self, server: MirenServer, host: str) -> None:
        super().__init__(daemon=True)
        self.server, self.host = server, host
        self.results: list[tuple[float, int, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                resp = self.server.get(self.host, timeout=10)
            except OSError:
                self.results.append((time.monotonic(), 0, ""))
                continue
            sandbox = json.loads(resp.body)["sandbox"] if resp.status == 200 else ""
            self.results.append((time.monotonic(), resp.status, sandbox))
            if resp.status != 200:
                time.sleep(0.05)


def test_kill_9_of_the_owner_under_load_is_taken_over(nodes: list[MirenServer]) -> None:
    a, b = nodes
    setup_app(a)
    host = deploy_preview(a, "pr-2")
    first = echo(a.get(host, timeout=20))["sandbox"]  # a boots it: a owns the pool
    assert running(a) == 1
    eventually_sync(lambda: echo(b.get(host))["sandbox"] == first, 10, "b forwarding to a")
    leaders = [h["name"] for h in map(health, (a, b)) if h["gc_leader"]]
    assert len(leaders) == 1, leaders  # one GC at a time
    load = Load(b, host)
    load.start()
    try:
        eventually_sync(lambda: len(load.results) >= 5, 10, "load through b")
        killed = time.monotonic()
        a.send_signal(signal.SIGKILL)
        a.wait_exit(10)

        def new_sandbox() -> bool:
            return any(t > killed and s not in ("", first) for t, _, s in load.results)

        eventually_sync(new_sandbox, TAKEOVER_LIMIT, "b to serve from a new sandbox")
        back = min(t for t, _, s in load.results if t > killed and s not in ("", first))
        time.sleep(0.3)  # (a few more requests on the new owner)
    finally:
        load.stop.set()
        load.join(15)
    print(f"takeover after kill -9: 200 again after {back - killed:.2f} s (lease TTL {TTL} s)")
    assert back - killed < TAKEOVER_LIMIT
    # Never served by two owners at once: the old sandbox until the kill, then only the new one.
    order = [s for _, status, s in load.results if status == 200]
    switch = order.index(next(s for s in order if s != first))
    assert set(order[:switch]) == {first} and len(set(order[switch:])) == 1, order
    assert running(b) == 1
    eventually_sync(lambda: health(b)["gc_leader"], 3 * TTL + 5, "b to lead the GC")
    assert health(b)["nodes"] == ["b"]


def test_a_frozen_owner_resumed_after_its_lease_does_not_serve_the_pool_it_lost(
    nodes: list[MirenServer],
) -> None:
    a, b = nodes
    setup_app(a)
    host = deploy_preview(a, "pr-3")
    old = echo(a.get(host, timeout=20))["sandbox"]
    a.send_signal(signal.SIGSTOP)
    try:
        eventually_sync(lambda: health(b)["nodes"] == ["b"], 3 * TTL + 5, "a's lease to lapse")
        new = echo(eventually_sync(lambda: (r := b.get(host, timeout=20)).status == 200 and r,
                                   TAKEOVER_LIMIT, "b to take over"))["sandbox"]  # fmt: skip
        assert new != old
    finally:
        a.send_signal(signal.SIGCONT)
    # Resumed: a fences itself before serving anything, re-joins, and forwards to b.
    answers = [a.get(host, timeout=20) for _ in range(10)]
    served = [echo(r)["sandbox"] for r in answers if r.status == 200]
    assert all(r.status in (200, 503) for r in answers), [r.status for r in answers]
    assert old not in served, served

    def forwards() -> bool:
        r = a.get(host)  # (503 until a has joined again)
        return r.status == 200 and echo(r)["sandbox"] == new

    eventually_sync(forwards, 3 * TTL + 5, "a to forward to b")
    eventually_sync(lambda: running(a) == 0, 15, "a's old sandbox to stop")
    assert health(a)["member"] and sorted(health(b)["nodes"]) == ["a", "b"]


def test_with_one_etcd_member_down_the_nodes_work_on(tmp_path: Path) -> None:
    """The member killed is the leader (the harder case: an election follows)."""
    with EtcdCluster(tmp_path / "etcd", size=3) as cluster:
        cluster.enable_auth(ETCD_PASSWORD)
        store = f"etcd://{cluster.endpoints}/one-down"
        # The default lease TTL (10 s): a renewal may take the store's whole timeout (2 s)
        # while the members elect, and the proof must outlast it (the short test TTL does not).
        a, b = node(tmp_path, "a", store, ttl=10), node(tmp_path, "b", store, ttl=10)
        with a, b:
            setup_app(a)
            host = deploy_preview(a, "pr-4")
            sandbox = echo(b.get(host, timeout=20))["sandbox"]
            cluster.kill(cluster.wait_leader())
            # (the two members left elect a new leader: a second or so in which the store
            # answers 503 store_unavailable, as it should)
            cluster.wait_leader()
            # Everything still works: deploys, routing on the other node, the same sandbox.
            host2 = deploy_preview(a, "pr-5", retry_503=20)  # (503 while a call hits the gap)
            eventually_sync(lambda: b.get(host2, timeout=20).status == 200, 20, "pr-5 on b")
            assert echo(a.get(host))["sandbox"] == sandbox
            time.sleep(8)  # (several renewals: both memberships hold without the leader)
            assert health(a)["member"] and health(b)["member"]
            assert sorted(health(a)["nodes"]) == ["a", "b"]
            assert echo(b.get(host))["sandbox"] == sandbox
        for server in (a, b):
            assert server.kill_survivors() == []
    assert all(not os.path.exists(f"/proc/{pid}") for pid in cluster.pids())
