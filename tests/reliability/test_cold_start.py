"""Cold-start overload: more concurrent first requests than the per-version waiter bound
(`--set ingress.max_waiters=20`) while the only sandbox takes `boot_delay_ms` to listen.

Oracles: the requests beyond the bound get 503 with a `Retry-After` at once (before the sandbox
is up), the admitted ones are all served 200 once it is; nothing else. When every request was
in before the sandbox answered, exactly `max_waiters` are served.

Memory stays bounded: then `overload_big_bursts` bursts of `overload_big_burst` requests (ten
or more times bigger), each on its own cold version, each shedding all but `max_waiters`. The first ones grow the RSS (the allocator's
high-water mark for that many concurrent connections, and cyclic garbage that waits for a full
collection); it must level off: over the last third of those bursts it grows by less than 10 %.
Measured here it levels off after about 3 bursts of 1,000 and 9 of 3,000 (the growth comes in
steps, not per request); a leak of 1 KiB per shed request would add about 9 MiB (> 10 %) over the
last three bursts of 3,000.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures, ProcSampler
from tests.support.clients import raw_exchange
from tests.support.edge import MirenServer, echo_spec_data, log_errors
from tests.support.poll import eventually

pytestmark = pytest.mark.reliability

APP, HOST = "cold", "cold.test"


@dataclass(frozen=True)
class Outcome:
    sent: float  # monotonic, once the request was written
    done: float  # monotonic, once the server closed
    status: int
    retry_after: str | None


async def one(port: int, host: str) -> Outcome:
    payload = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    sent = time.monotonic()
    result = await raw_exchange(port, payload, timeout=60.0)
    retry_after = None
    for line in result.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"retry-after:"):
            retry_after = line.split(b":", 1)[1].strip().decode()
    return Outcome(sent, time.monotonic(), result.status, retry_after)


async def burst(port: int, host: str, n: int) -> list[Outcome]:
    return list(await asyncio.gather(*(one(port, host) for _ in range(n))))


def judge(outcomes: list[Outcome], max_waiters: int) -> list[str]:
    """What is wrong with a burst's outcomes (see the module docstring)."""
    statuses = Counter(o.status for o in outcomes)
    problems = []
    if set(statuses) - {200, 503}:
        problems.append(f"statuses other than 200/503: {dict(statuses)}")
    served = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 503]
    if len(served) < max_waiters:
        problems.append(f"only {len(served)} served, the bound is {max_waiters}")
    if not shed:
        problems.append("nothing was shed")
    first_served = min((o.done for o in served), default=float("inf"))
    late = [o for o in shed if o.done > first_served]
    if late:
        problems.append(f"{len(late)} 503s came after the sandbox was up")
    bad_retry = [o for o in shed if not (o.retry_after or "").isdigit() or o.retry_after == "0"]
    if bad_retry:
        problems.append(f"{len(bad_retry)} 503s without a positive Retry-After")
    if max(o.sent for o in outcomes) < first_served - 0.2 and len(served) != max_waiters:
        problems.append(f"all were waiting, yet {len(served)} != {max_waiters} were served")
    return problems


@pytest.mark.timeout(120)
async def test_waiters_beyond_the_bound_get_503_and_memory_stays_bounded(
    tmp_path: Path, figures: Figures, fd_limit: int
) -> None:
    bound = BUDGET.max_waiters
    spec = echo_spec_data(env={"BOOT_DELAY_MS": str(BUDGET.boot_delay_ms)})
    server = MirenServer(tmp_path, store="memory", settings={"ingress.max_waiters": str(bound)})
    async with server as edge:
        await edge.client.create_app(APP, HOST)
        await edge.client.post_deploy(APP, spec)
        n_big = BUDGET.overload_big_bursts
        for i in range(n_big):
            await edge.client.post_deploy(APP, spec, label=f"big{i}", ttl="1h")
        # All versions are in the route table (no request: their sandboxes must stay cold).
        await _versions_loaded(edge, 1 + n_big)
        sampler = ProcSampler(edge.pid, interval=0.05)
        sampler.sample()
        sampler.start()
        try:
            small = await burst(edge.proxy_port, HOST, BUDGET.overload_burst)
            rss_small = sampler.sample()[1]
            bigs: list[list[Outcome]] = []
            rss_bigs: list[int] = []
            for i in range(n_big):
                bigs.append(
                    await burst(edge.proxy_port, f"big{i}.{HOST}", BUDGET.overload_big_burst)
                )
                rss_bigs.append(sampler.sample()[1])
        finally:
            await sampler.stop()
        text = edge.log_text()

    rss0 = sampler.samples[0][1]
    peak = max(s[1] for s in sampler.samples)
    named = [("burst", small), *((f"big burst {i + 1}", b) for i, b in enumerate(bigs))]
    for label, group in (("burst", [small]), ("big bursts", bigs)):
        each = _each  # "a / b / ...": one value per burst of the group
        figures.add(f"{label}: requests each", each([len(b) for b in group]))
        figures.add(f"{label}: served 200", each([_count(b, 200) for b in group]))
        figures.add(f"{label}: shed 503", each([_count(b, 503) for b in group]))
        retry = sorted({o.retry_after or "" for b in group for o in b if o.status == 503})
        figures.add(f"{label}: Retry-After values", str(retry))
        figures.add(f"{label}: last 503 after (s)", each([_last(b, 503) for b in group]))
        figures.add(f"{label}: first 200 after (s)", each([_first(b, 200) for b in group]))
    figures.add("max_waiters", bound)
    figures.add("RSS before", rss0 / 1024, "MiB")
    figures.add("RSS after the burst", rss_small / 1024, "MiB")
    figures.add("RSS after each big burst (MiB)", " / ".join(f"{r / 1024:.1f}" for r in rss_bigs))
    figures.add("RSS peak", peak / 1024, "MiB")
    figures.add("log errors", len(log_errors(text)))

    for name, outcomes in named:
        assert judge(outcomes, bound) == [], name
    ref = rss_bigs[len(rss_bigs) - 1 - max(1, len(rss_bigs) // 3)]
    assert rss_bigs[-1] < ref * 1.10, f"RSS kept growing: {rss_bigs} KiB"
    assert not log_errors(text), log_errors(text)[:20]


def _each(values: list[object]) -> str:
    return " / ".join(str(v) for v in values)


def _count(outcomes: list[Outcome], status: int) -> int:
    return sum(1 for o in outcomes if o.status == status)


def _last(outcomes: list[Outcome], status: int) -> str:
    t0 = min(o.sent for o in outcomes)
    return f"{max((o.done - t0 for o in outcomes if o.status == status), default=0.0):.2f}"


def _first(outcomes: list[Outcome], status: int) -> str:
    t0 = min(o.sent for o in outcomes)
    return f"{min((o.done - t0 for o in outcomes if o.status == status), default=0.0):.2f}"


async def _versions_loaded(edge: MirenServer, n: int) -> None:
    async def loaded() -> bool:
        report = (await edge.client.admin("GET", "/healthz")).json()
        return bool(report["routes"]["versions"] >= n)

    await eventually(loaded, 10.0, f"{n} versions in the route table")
