"""etcd faults under `miren serve --store etcd://...`, against an etcd the test starts and stops
(`EmbeddedEtcd` from the suite's factory; restarted on the same port and data dir).

- Outage: etcd stopped for `outage_seconds` under load. Warm routes keep answering 200 (zero
  errors); the admin API answers 503 `store_unavailable` (within the 1 s store timeout);
  `/healthz` reports it; after etcd returns the watch resumes (`/healthz` ok again), a deploy made
  right after is routable within 1 s of its answer, and nothing written before is lost.
- Restart with compaction: while the server's watch is cut off (etcd stopped), the same data
  dir is started on another port, changed (a preview added and one deleted, a route removed and
  one added) and compacted past the changes, then etcd comes back on its own port. The watch
  cannot resume from a compacted revision: it must re-list, and the route table must then match
  the store.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from miren_store.deploy.deploys import DeployRequest, delete_label
from miren_store.deploy.deploys import deploy as store_deploy
from miren_store.entities import HttpRoute
from miren_store.etcd import EtcdStore
from tests.etcd_fixtures import EtcdFactory
from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures, percentile
from tests.reliability.load import Load, tally
from tests.support.clients import Response
from tests.support.edge import MirenServer, echo_spec_data, log_errors
from tests.support.poll import eventually
from tests.support.procs import pid_alive

pytestmark = [pytest.mark.reliability, pytest.mark.etcd]

STORE_TIMEOUT = 1.0  # --set store_options.timeout: admin 503s come within it
ROUTABLE_WITHIN = 1.0  # a deploy right after etcd returns must route within this


# A short node lease: every outage here outlasts it, so a node alone that fenced itself when it
# cannot renew (it must not: nobody could take its pools over) would fail these tests.
NODE_LEASE_TTL = 2


def etcd_edge(tmp_path: Path, url: str) -> MirenServer:
    return MirenServer(
        tmp_path / "edge",
        store=url,
        settings={
            "store_options.timeout": f"{STORE_TIMEOUT:g}s",
            "node.lease_ttl": str(NODE_LEASE_TTL),
        },
    )


async def stored_state(edge: MirenServer, app: str) -> dict[str, set[str]]:
    """What the admin API reports: app names, route hosts, version ids of `app`."""
    apps = (await edge.client.admin("GET", "/v1/apps")).json()
    routes = (await edge.client.admin("GET", "/v1/routes")).json()
    versions = (await edge.client.admin("GET", f"/v1/apps/{app}/versions?limit=100")).json()
    return {
        "apps": {a["name"] for a in apps},
        "routes": {r["host"] for r in routes},
        "versions": {v["id"] for v in versions},
    }


def unavailable(reply: Response) -> bool:
    return reply.status == 503 and reply.json()["error"]["code"] == "store_unavailable"


async def healthz(edge: MirenServer) -> Response:
    return await edge.client.admin("GET", "/healthz", timeout=5.0)


@pytest.mark.timeout(BUDGET.outage_seconds + 120)
async def test_outage_under_load(
    tmp_path: Path, etcd_factory: EtcdFactory, figures: Figures
) -> None:
    etcd = etcd_factory()
    await etcd.start()
    app, host = "out", "out.test"
    preview = f"warm.{host}"
    async with etcd_edge(tmp_path, etcd.url) as edge:
        await edge.client.create_app(app, host)
        await edge.client.post_deploy(app, echo_spec_data())
        await edge.client.post_deploy(app, echo_spec_data(), label="warm", ttl="1h")
        await edge.client.wait_status(host, 200)
        await edge.client.wait_status(preview, 200)
        before = await stored_state(edge, app)

        hosts = [host, preview]
        turn = iter(range(1 << 62))
        load = Load(
            edge.proxy_port,
            lambda: ("warm", "GET", hosts[next(turn) % 2], "/"),
            concurrency=4,
            rate=100.0,
        )
        stop = asyncio.Event()
        loader = asyncio.create_task(load.run(stop=stop))
        try:
            await eventually(lambda: len(load.samples) > 50, 10.0, "the load to get going")

            # -- etcd goes away
            await etcd.stop()
            t_down = time.monotonic()
            wall_down = time.time()
            admin_answers: list[tuple[str, Response, float]] = []
            for method, path, body in (
                ("POST", "/v1/apps", {"name": "during"}),
                ("GET", "/v1/apps", None),
                ("GET", f"/v1/apps/{app}/versions", None),
                (
                    "POST",
                    f"/v1/apps/{app}/deploys",
                    {"spec": echo_spec_data(), "ephemeral": {"label": "x"}},
                ),
                ("PUT", "/v1/routes/during.test", {"app": app}),
            ):
                t0 = time.monotonic()
                reply = await edge.client.admin(method, path, body)
                admin_answers.append((f"{method} {path}", reply, time.monotonic() - t0))
            degraded = await eventually(
                lambda: _degraded(edge),
                BUDGET.outage_seconds + 5.0,
                "/healthz to report the outage",
            )
            t_reported = time.monotonic() - t_down
            # Waiting out the outage (a duration): the load runs meanwhile.
            await asyncio.sleep(max(0.0, BUDGET.outage_seconds - (time.monotonic() - t_down)))
            still = await edge.client.admin("GET", "/v1/apps")

            # -- etcd comes back: a deploy right after must route within a second
            wall_up = time.time()
            await etcd.start()
            t_up = time.monotonic()
            answer, deploy_tries = await _deploy_when_back(edge, app)
            t_answer = time.time()
            answered_after = time.monotonic() - t_up
            new_host = f"after.{host}"
            first = await _first_routed(edge, new_host, timeout=10.0)
            routable_after = first - t_answer
            await eventually(lambda: _healthy(edge), 15.0, "/healthz ok again")
            t_healthy = time.monotonic() - t_up
        finally:
            stop.set()
            await loader
        after = await stored_state(edge, app)
        text = edge.log_text()

    samples = load.samples
    counts = tally(samples)
    lat = [s.latency * 1000 for s in samples if s.status == 200]
    figures.add("outage", BUDGET.outage_seconds, "s")
    figures.add("warm requests (whole test)", len(samples))
    figures.add("warm statuses", str(counts.get("warm", {})))
    during = [s for s in samples if wall_down <= s.t0 < wall_up]
    figures.add("warm requests sent while etcd was down", len(during))
    figures.add("warm p50", percentile(lat, 50), "ms")
    figures.add("warm p99", percentile(lat, 99), "ms")
    for what, reply, secs in admin_answers:
        figures.add(f"admin {what} during outage", f"{reply.status} in {secs * 1000:.0f} ms")
    figures.add("healthz reported the outage after", t_reported, "s")
    figures.add(
        "healthz during the outage",
        f"{degraded['status']}: store ok={degraded['store']['ok']}, "
        f"watch ok={degraded['watch']['ok']} ({degraded['watch']['error'] or 'no error'})",
    )
    figures.add("deploy attempts after etcd was healthy again", deploy_tries)
    figures.add("deploy answered after etcd was healthy again", answered_after, "s")
    figures.add("new preview routable after its deploy answer", routable_after, "s")
    figures.add("healthz ok after etcd was healthy again", t_healthy, "s")
    figures.add("log errors", len(log_errors(text)))

    bad = [s for s in samples if s.status != 200]
    assert not bad, f"{len(bad)} warm requests failed, first: {bad[:5]}"
    assert len(during) > 10 * BUDGET.outage_seconds, "too little load during the outage"
    for what, reply, secs in admin_answers:
        assert unavailable(reply), f"{what}: {reply!r}"
        assert secs < STORE_TIMEOUT + 2.0, f"{what} took {secs:.2f}s"
    assert unavailable(still), still
    assert degraded["store"]["ok"] is False, degraded
    assert answer["status"] == "ephemeral"
    assert routable_after <= ROUTABLE_WITHIN, f"routable {routable_after:.3f}s after the deploy"
    assert before["apps"] <= after["apps"] and "during" not in after["apps"]
    assert before["routes"] <= after["routes"] and "during.test" not in after["routes"]
    assert before["versions"] <= after["versions"]
    assert answer["version"]["id"] in after["versions"]
    assert not log_errors(text), log_errors(text)[:20]


async def _degraded(edge: MirenServer) -> dict[str, Any] | None:
    reply = await healthz(edge)
    if reply.status == 503 and reply.json()["store"]["ok"] is False:
        report: dict[str, Any] = reply.json()
        return report
    return None


async def _healthy(edge: MirenServer) -> bool:
    return (await healthz(edge)).status == 200


async def _deploy_when_back(edge: MirenServer, app: str) -> tuple[dict[str, Any], int]:
    """Deploy preview `after`, retrying while the store still answers 503 (its client
    reconnects); returns the answer and the number of attempts."""
    body = {"spec": echo_spec_data(), "ephemeral": {"label": "after", "ttl": "1h"}}
    tries = 0

    async def attempt() -> dict[str, Any] | None:
        nonlocal tries
        tries += 1
        reply = await edge.client.admin("POST", f"/v1/apps/{app}/deploys", body)
        if reply.status == 201:
            answer: dict[str, Any] = reply.json()
            return answer
        assert unavailable(reply), reply
        return None

    answer = await eventually(
        attempt, 10.0, "the deploy to succeed after etcd returned", interval=0.05
    )
    return answer, tries


async def _first_routed(edge: MirenServer, host: str, timeout: float) -> float:
    """The wall-clock send time of the first request the proxy routed (not 404) for `host`."""

    async def routed() -> float | None:
        sent = time.time()
        reply = await edge.client.get(host)
        if reply.status != 404:
            assert reply.status == 200, reply
            return sent
        return None

    return await eventually(routed, timeout, f"{host} to be routed")


@pytest.mark.timeout(120)
async def test_restart_with_compaction_relists(
    tmp_path: Path, etcd_factory: EtcdFactory, figures: Figures
) -> None:
    etcd = etcd_factory()
    await etcd.start()
    app, host = "cmp", "cmp.test"
    async with etcd_edge(tmp_path, etcd.url) as edge:
        await edge.client.create_app(app, host, "gone.test")
        await edge.client.post_deploy(app, echo_spec_data())
        old = await edge.client.post_deploy(app, echo_spec_data(), label="old", ttl="1h")
        await edge.client.wait_status(host, 200)
        await edge.client.wait_status("gone.test", 200)
        old_sandbox = (await edge.client.wait_status(f"old.{host}", 200)).json()["sandbox"]
        old_pid = int((await edge.client.sandbox_record(app, old_sandbox))["pid"])

        # -- cut the server off, change the same data behind its back, compact past it
        await etcd.stop()
        side = etcd_factory(data_dir=etcd.data_dir)  # same data, another client port
        await side.start()
        store = EtcdStore(side.endpoint, timeout=5.0)
        try:
            new = await store_deploy(
                store,
                app,
                DeployRequest.from_data(
                    {"spec": echo_spec_data(), "ephemeral": {"label": "new", "ttl": "1h"}}
                ),
            )
            await delete_label(store, app, "old")
            await store.delete(HttpRoute, "gone.test")
            await store.create(HttpRoute(host="fresh.test", app=app))
            revision = (await store.snapshot([HttpRoute])).revision
            await store.compact(revision)
        finally:
            await store.close()
            await side.stop()

        # -- etcd returns on its own port: the watch must re-list
        t_up = time.monotonic()
        await etcd.start()
        await eventually(lambda: "must re-list" in edge.log_text(), 15.0, "the re-list")
        t_relist = time.monotonic() - t_up
        await eventually(lambda: _healthy(edge), 15.0, "/healthz ok again")
        new_reply = await edge.client.wait_status(f"new.{host}", 200)
        assert new_reply.json()["version"] == new.version.id
        await edge.client.wait_status("fresh.test", 200)
        for gone in (f"old.{host}", "gone.test"):
            assert (await edge.client.get(gone)).status == 404, gone
        report = (await healthz(edge)).json()
        assert report["routes"]["routes"] == 2, report  # cmp.test and fresh.test
        assert report["watch"]["revision"] >= revision, report
        # The deleted preview's sandbox is stopped (its version left the table on the re-list).
        await eventually(
            lambda: not pid_alive(old_pid),
            15.0,
            "the deleted preview's sandbox to stop",
        )
        # ... and its record says so once the activator's write lands: the store writer may
        # still be in its back-off from the outage when the process exits.
        old_running: list[Any] = []

        async def old_recorded_stopped() -> bool:
            boxes = (await edge.client.admin("GET", f"/v1/apps/{app}/sandboxes")).json()
            old_running[:] = [
                b
                for b in boxes
                if b["version"] == old["version"]["id"] and b["status"] == "running"
            ]
            return not old_running

        await eventually(
            old_recorded_stopped,
            15.0,
            lambda: f"the deleted preview's sandbox recorded stopped; running: {old_running}",
            interval=0.1,
        )
        text = edge.log_text()

    figures.add("compacted at revision", revision)
    figures.add("re-list logged after etcd was started (its start included)", t_relist, "s")
    figures.add("log errors", len(log_errors(text)))
    assert not log_errors(text), log_errors(text)[:20]


@pytest.mark.timeout(60)
async def test_healthz_reports_the_watch_down_during_an_outage(
    tmp_path: Path, etcd_factory: EtcdFactory
) -> None:
    etcd = etcd_factory()
    await etcd.start()
    async with etcd_edge(tmp_path, etcd.url) as edge:
        await etcd.stop()
        degraded = await eventually(lambda: _degraded(edge), 10.0, "/healthz to report the outage")
        try:
            await eventually(
                lambda: _watch_down(edge), STORE_TIMEOUT * 3, "/healthz to report the watch down"
            )
        finally:
            await etcd.start()
    assert degraded["store"]["ok"] is False


async def _watch_down(edge: MirenServer) -> bool:
    return (await healthz(edge)).json()["watch"]["ok"] is False
