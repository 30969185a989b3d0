"""Soak: paced load on mixed hosts (the active version, live and expiring previews, unknown
hosts) while previews are deployed and expire every few seconds, against `miren serve` on its
default embedded etcd.

Oracles (wall clock on one machine, so the client's and the proxy's clocks agree):
- the active host only answers 200, unknown hosts only 404;
- a preview answers 200 only to requests sent before its expiry instant, 410/404 only after it;
  a 5xx on a preview is "expected" only for a request still in flight at its expiry (its sandbox
  is stopped when the GC deletes it) and is counted as such; any other answer is a failure;
- no ERROR or traceback in the server's log;
- RSS and open fds of the server do not grow by 10 % or more from just after the warm-up to the
  end of the load (samples every 0.5 s over a window at each end, a quarter of the run after the
  warm-up but at most 60 s; RSS by its medians, fds by their floor, the window minimum, since
  transient sockets swing the count while a leak raises the floor). The fds are the server's
  own: the client connections accepted on the proxy port are left out (how many of them stay
  open is the load generator's keep-alive pool's business, 1 to 8 here);
- once the load stops and the last preview expired, exactly one sandbox process (the active
  version's) is left.

The module's server is shared with `test_sandbox_killed_under_load`, which runs after the soak:
it kills the active version's sandbox under load, `kills` times in a row, each victim older than
the activator's 60 s crash window (two deaths within it are a crash loop, which backs off by
design); the soak's minute gives the first victim that age for free.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import pytest

from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures, ProcSampler, median_of, percentile
from tests.reliability.killing import dead_reported, kill_under_load
from tests.reliability.load import Load, Sample, tally
from tests.support.clients import Response
from tests.support.edge import MirenServer, echo_spec_data, log_errors, log_warnings
from tests.support.poll import eventually
from tests.support.procs import cmdline, descendants, process_table

pytestmark = pytest.mark.reliability

APP = "soak"
HOST = "soak.test"
RECENT = 8.0  # seconds after its expiry a preview is still requested (to see 410, then 404)
IN_FLIGHT_SLACK = 1.0  # a 5xx counts as expected if the request ended this close to expiry


@dataclass(frozen=True)
class Preview:
    label: str
    host: str
    deployed: float  # wall clock of the deploy answer
    expires: float  # wall clock of its expiry (from the deploy answer)


class Previews:
    """Previews the load may request: live ones and those that expired less than RECENT ago."""

    def __init__(self) -> None:
        self.by_host: dict[str, Preview] = {}
        self.recent: list[Preview] = []

    def __repr__(self) -> str:
        return f"<Previews total={len(self.by_host)} recent={len(self.recent)}>"

    def add(self, p: Preview) -> None:
        self.by_host[p.host] = p
        self.recent.append(p)

    def candidates(self, now: float) -> list[Preview]:
        self.recent = [p for p in self.recent if p.expires + RECENT > now]
        return self.recent


def expect(reply: Response, *statuses: int) -> Response:
    assert reply.status in statuses, f"expected {statuses}, got {reply!r}"
    return reply


def judge_preview(s: Sample, p: Preview) -> str:
    """'ok', 'expected_5xx' or a description of what is wrong with this answer."""
    if s.status == 200:
        return "ok" if s.t0 < p.expires else f"200 sent {s.t0 - p.expires:.3f}s after expiry"
    if s.status in (404, 410):
        return "ok" if s.t1 >= p.expires else f"{s.status} {p.expires - s.t1:.3f}s before expiry"
    if s.status in (502, 503, 504) and s.t1 >= p.expires - IN_FLIGHT_SLACK:
        return "expected_5xx"
    return f"status {s.status} {s.error} at {s.t0 - p.expires:+.3f}s from expiry"


def sandbox_processes(edge: MirenServer) -> list[int]:
    """The echo servers alive under the edge (not their launchers: bubblewrap's command line
    names the app's command too)."""
    table = process_table()
    found = []
    for pid in descendants(edge.pid, table):
        line = cmdline(pid)  # read once: the process may end between two reads ("" then)
        if "echo_server.py" in line and "bwrap" not in line.split()[0] and table[pid].state != "Z":
            found.append(pid)
    return found


async def churn(edge: MirenServer, previews: Previews, stop: asyncio.Event) -> int:
    """Deploy a new preview every `preview_every` seconds until `stop`; each joins the load
    once the proxy routes it (its first request also boots its sandbox)."""
    spec = echo_spec_data()
    n = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        n += 1
        label = f"p{n}"
        answer = await edge.client.post_deploy(
            APP, spec, label=label, ttl=f"{BUDGET.preview_ttl:g}s"
        )
        expires = datetime.fromisoformat(answer["expires_at"].replace("Z", "+00:00"))
        host = f"{label}.{HOST}"
        await edge.client.wait_status(host, 200, timeout=BUDGET.preview_ttl)
        previews.add(Preview(label, host, time.time(), expires.timestamp()))
        next_at += BUDGET.preview_every
        # Waiting out the deploy cadence (a duration, not a condition).
        with_stop = asyncio.create_task(stop.wait())
        await asyncio.wait([with_stop], timeout=max(0.0, next_at - loop.time()))
        with_stop.cancel()
    return n


@pytest.fixture(scope="module")
def soak_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    """`miren serve` on its embedded etcd with app `soak` at HOST and an active echo version
    whose sandbox is booted."""
    with MirenServer(tmp_path_factory.mktemp("soak"), store="embedded") as edge:
        expect(edge.admin("POST", "/v1/apps", {"name": APP}), 201)
        expect(edge.admin("PUT", f"/v1/routes/{HOST}", {"app": APP}), 200, 201)
        expect(edge.admin("POST", f"/v1/apps/{APP}/deploys", {"spec": echo_spec_data()}), 201)
        expect(edge.get_routed(HOST), 200)
        yield edge


@pytest.mark.timeout(BUDGET.soak_seconds + 180)
async def test_soak_mixed_hosts_with_expiring_previews(
    soak_edge: MirenServer, figures: Figures
) -> None:
    rng = random.Random(7)
    previews = Previews()

    def pick() -> tuple[str, str, str, str]:
        r = rng.random()
        if r < 0.5:
            return ("active", "GET", HOST, "/")
        live = previews.candidates(time.time())
        if r < 0.8 and live:
            return ("preview", "GET", rng.choice(live).host, "/")
        unknown = rng.choice(
            [f"nope{rng.randrange(1000)}.{HOST}", f"h{rng.randrange(1000)}.unknown.test", "x.test"]
        )
        return ("unknown", "GET", unknown, "/")

    edge = soak_edge
    sampler = ProcSampler(edge.pid, interval=0.5, client_port=edge.proxy_port)
    load = Load(edge.proxy_port, pick, BUDGET.soak_concurrency, BUDGET.soak_rate)
    stop = asyncio.Event()
    t_start = time.monotonic()
    sampler.start()
    churner = asyncio.create_task(churn(edge, previews, stop))
    try:
        await load.run(BUDGET.soak_seconds)
    finally:
        stop.set()
        deployed = await churner
        await sampler.stop()
    t_end = time.monotonic()

    # Every preview expires and is collected: only the active sandbox is left.
    last = max((p.expires for p in previews.by_host.values()), default=time.time())
    await eventually(
        lambda: len(sandbox_processes(edge)) == 1,
        max(0.0, last - time.time()) + 20.0,
        "only the active version's sandbox to be left",
    )
    text = edge.log_text()

    # -- the answers
    problems: list[str] = []
    expected_5xx = 0
    for s in load.samples:
        if s.kind == "active" and s.status != 200:
            problems.append(f"active {s.status} {s.error}")
        elif s.kind == "unknown" and s.status != 404:
            problems.append(f"unknown {s.host} {s.status} {s.error}")
        elif s.kind == "preview":
            verdict = judge_preview(s, previews.by_host[s.host])
            if verdict == "expected_5xx":
                expected_5xx += 1
            elif verdict != "ok":
                problems.append(f"{s.host}: {verdict}")

    # -- RSS and fds over a window just after the warm-up and over the last window (a quarter
    # of the run after the warm-up, 60 s at most). RSS moves smoothly: medians. The fds
    # compared are the server's own: all of them minus the client connections, whose number is
    # the load generator's choice (its keep-alive pool holds 1 to `soak_concurrency` of them,
    # as its workers overlapped recently). Those still swing with the proxy's pooled upstream
    # connections (one per concurrent request to a sandbox alive at the instant), while a leak
    # raises their floor for good: the window minima are compared.
    span = t_end - t_start
    window = min(60.0, (span - BUDGET.soak_warmup) / 4)
    base = sampler.window(t_start + BUDGET.soak_warmup, t_start + BUDGET.soak_warmup + window)
    end = sampler.window(t_end - window, t_end)
    rss0, rss1 = median_of(base, 1), median_of(end, 1)
    fds0, fds1 = float(min(x[2] - x[3] for x in base)), float(min(x[2] - x[3] for x in end))

    counts = tally(load.samples)
    figures.add("duration", span, "s")
    figures.add("requests", len(load.samples))
    figures.add("throughput", len(load.samples) / span, "req/s")
    for kind, statuses in counts.items():
        lat = [s.latency * 1000 for s in load.samples if s.kind == kind and s.status]
        figures.add(f"{kind} statuses", str(statuses))
        figures.add(f"{kind} p50", percentile(lat, 50), "ms")
        figures.add(f"{kind} p99", percentile(lat, 99), "ms")
    figures.add("previews deployed", deployed)
    figures.add("previews requested", len(previews.by_host))
    figures.add("expected 5xx (in flight at a preview's expiry)", expected_5xx)
    figures.add("unexpected answers", len(problems))
    figures.add("RSS after warm-up", rss0 / 1024, "MiB")
    figures.add("RSS at end", rss1 / 1024, "MiB")
    figures.add("RSS max", max(s[1] for s in sampler.samples) / 1024, "MiB")
    figures.add("RSS growth", 100 * (rss1 - rss0) / rss0, "%")
    figures.add("own fds floor after warm-up", fds0)
    figures.add("own fds floor at end", fds1)
    figures.add("own fds floor growth", 100 * (fds1 - fds0) / fds0, "%")
    figures.add(
        "all fds median after warm-up / at end", f"{median_of(base, 2)} / {median_of(end, 2)}"
    )
    figures.add("client connections median after warm-up / at end",
                f"{median_of(base, 3)} / {median_of(end, 3)}")  # fmt: skip
    figures.add("all fds max", max(s[2] for s in sampler.samples))
    figures.add("growth windows", window, "s")
    figures.add("log errors", len(log_errors(text)))
    figures.add("log warnings", len(log_warnings(text)))

    assert not problems, f"{len(problems)} unexpected answers, first: {problems[:10]}"
    assert counts.get("active", {}).get(200, 0) > 0 and counts.get("unknown", {}).get(404, 0) > 0
    assert len(previews.by_host) >= 2, "the churn never got a preview into the load"
    assert not log_errors(text), log_errors(text)[:20]
    assert rss1 < rss0 * 1.10, f"RSS grew from {rss0} KiB to {rss1} KiB"
    assert fds1 < fds0 * 1.10, f"the server's own open fds grew from {fds0} to {fds1}"


CRASH_WINDOW = 60.0  # miren_activator.policy.CrashPolicy.window: younger deaths are crashes


@pytest.mark.timeout(60 + BUDGET.kills * (BUDGET.kill_load_seconds + CRASH_WINDOW + 20))
async def test_sandbox_killed_under_load(soak_edge: MirenServer, figures: Figures) -> None:
    """SIGKILL the active sandbox under load (`kills` times, each victim past the crash window):
    at most the in-flight requests fail (502), later ones cold-start a new sandbox, and the
    admin API reports the dead ones dead and only the new one running."""
    edge = soak_edge
    run = await kill_under_load(
        edge,
        APP,
        HOST,
        kills=BUDGET.kills,
        load_seconds=BUDGET.kill_load_seconds,
        min_age=CRASH_WINDOW + 1.0,
    )
    run.record(figures)
    problems = run.problems()
    assert not problems, f"{len(problems)} problems, first: {problems[:5]}"
    await eventually(
        lambda: dead_reported(edge, APP, run), 10.0, "the admin API to report the kills"
    )
    text = edge.log_text()
    assert not log_errors(text), log_errors(text)[:20]
