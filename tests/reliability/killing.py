"""Kill a host's sandbox (SIGKILL) under load and judge what the clients saw.

The load alternates GETs and POSTs (with a body) to a slow path, so requests are always in
flight. The proxy resends a GET whose reused upstream connection closed before any response byte
(the stale keep-alive rule), so an in-flight GET usually survives a kill; a POST is never resent
and fails with 502.

The proxy learns of the death from the kernel (its pooled connections to the sandbox see EOF,
the exit watcher reaps it) a few milliseconds after the kill; a request sent in that window can
still be written to a dead pooled connection and fail (a POST is never resent; a GET's one
resend finds the port refused). So "in flight" includes requests sent within NOTICE_GRACE of the
kill; the figures show how many there were and how late.

Oracles (`problems`): every failed request is a 502, in flight at a kill (sent before it, or
within NOTICE_GRACE after it, and answered after it), at most 2 x CONCURRENCY per kill (the
requests in flight plus one per pooled connection); every request sent later than that is
answered 200 by another sandbox (a cold start: another pid), never by the dead one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

from tests.reliability.figures import Figures, percentile
from tests.reliability.load import Load, Sample, sandbox_note, tally
from tests.support.edge import MirenServer
from tests.support.poll import eventually

CONCURRENCY = 8
PATH = "/slow?ms=20"  # keeps requests in flight at any instant
NOTICE_GRACE = 0.5  # seconds after a kill the proxy may still use what it had for the sandbox


@dataclass(frozen=True)
class Kill:
    victim: str  # sandbox id
    at: float  # wall clock of the SIGKILL
    successor: str  # id of the first sandbox that answered after it
    recovered: float  # seconds from the kill to that answer


@dataclass
class KillRun:
    samples: list[Sample] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)

    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200]

    def in_flight(self, s: Sample, k: Kill) -> bool:
        return s.t0 < k.at + NOTICE_GRACE and k.at <= s.t1

    def problems(self) -> list[str]:
        out = []
        for s in self.failures():
            if not (s.status == 502 and any(self.in_flight(s, k) for k in self.kills)):
                out.append(f"not a 502 in flight at a kill: {s}")
        for k in self.kills:
            if not k.successor:
                out.append(f"no new sandbox answered after the kill of {k.victim}")
            n = sum(1 for s in self.failures() if self.in_flight(s, k))
            if n > 2 * CONCURRENCY:
                out.append(f"{n} requests failed at the kill of {k.victim}")
            for s in self.samples:
                if s.t0 > k.at and s.note == k.victim:
                    out.append(f"answered by {k.victim}, sent after its kill: {s}")
        return out

    def record(self, figures: Figures) -> None:
        lat = [s.latency * 1000 for s in self.samples if s.status == 200]
        figures.add("kills", len(self.kills))
        figures.add("requests", len(self.samples))
        for method in ("GET", "POST"):
            statuses = tally(s for s in self.samples if s.method == method).get("kill", {})
            figures.add(f"{method} statuses", str(statuses))
        figures.add("p50", percentile(lat, 50), "ms")
        figures.add("p99", percentile(lat, 99), "ms")
        for i, k in enumerate(self.kills):
            failed = [s for s in self.failures() if self.in_flight(s, k)]
            for method in ("GET", "POST"):
                before = sum(1 for s in failed if s.method == method and s.t0 < k.at)
                after = sum(1 for s in failed if s.method == method and s.t0 >= k.at)
                figures.add(
                    f"kill {i + 1}: failed {method}s sent before / after the kill",
                    f"{before} / {after}",
                )
            late = max((s.t0 - k.at for s in failed), default=0.0)
            figures.add(
                f"kill {i + 1}: latest send of a failed request (from the kill)", late * 1000, "ms"
            )
            figures.add(f"kill {i + 1}: first answer from a new sandbox after", k.recovered, "s")


async def sandbox_age(edge: MirenServer, app: str, sandbox_id: str) -> float:
    box = await edge.client.sandbox_record(app, sandbox_id)
    started = datetime.fromisoformat(box["started_at"].replace("Z", "+00:00"))
    return time.time() - started.timestamp()


async def kill_under_load(
    edge: MirenServer,
    app: str,
    host: str,
    *,
    kills: int,
    load_seconds: float,
    min_age: float = 0.0,
    recovery_timeout: float = 15.0,
) -> KillRun:
    """Load `host` (CONCURRENCY connections, PATH), and `kills` times: let the load run for
    `load_seconds` (and until the serving sandbox is `min_age` seconds old), SIGKILL the sandbox
    that answered last, and wait for an answer from another one (at most `recovery_timeout`;
    when none came, the run stops there and `problems()` says so).
    """
    run = KillRun()
    turn = iter(range(1 << 62))

    def pick() -> tuple[str, str, str, str]:
        method = ("GET", "POST")[next(turn) % 2]
        return ("kill", method, host, PATH)

    load = Load(edge.proxy_port, pick, CONCURRENCY, rate=None, extract=sandbox_note)
    load.samples = run.samples
    stop = asyncio.Event()
    loader = asyncio.create_task(load.run(stop=stop))
    try:
        for _ in range(kills):
            since = time.time()
            await asyncio.sleep(load_seconds)  # load on the current sandbox for a while
            served = [s for s in run.samples if s.status == 200 and s.t0 >= since]
            assert served, "no request was served before the kill"
            victim = served[-1].note
            age = await sandbox_age(edge, app, victim)
            if age < min_age:
                await asyncio.sleep(min_age - age)  # waiting out its age (a duration)
            t_kill = await edge.client.kill_sandbox(app, victim)

            def successor(t_kill: float = t_kill, victim: str = victim) -> Sample | None:
                for s in run.samples:
                    if s.t0 > t_kill and s.status == 200 and s.note != victim:
                        return s
                return None

            try:
                first = await eventually(
                    successor, recovery_timeout, "an answer from a new sandbox"
                )
            except AssertionError:  # judged by `problems()`, with what the clients saw
                run.kills.append(Kill(victim, t_kill, "", float("inf")))
                break
            run.kills.append(Kill(victim, t_kill, first.note, first.t1 - t_kill))
        await asyncio.sleep(load_seconds)  # and some load after the last kill
    finally:
        stop.set()
        await loader
    return run


async def dead_reported(edge: MirenServer, app: str, run: KillRun) -> bool:
    """The admin API reports every killed sandbox dead and only the last successor running."""
    boxes = await edge.client.sandbox_records(app)
    status = {str(b["id"]): b["status"] for b in boxes}
    running_ = [str(b["id"]) for b in boxes if b["status"] == "running"]
    return all(status.get(k.victim, "dead") == "dead" for k in run.kills) and running_ == [
        run.kills[-1].successor
    ]
