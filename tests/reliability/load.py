"""A paced, closed-loop load generator on loopback, bounded in time, and what it recorded.

`Load` runs a fixed number of workers on one aiohttp session, paced to a total rate (or as fast
as they can), until a duration passed or an event is set. Each request is a `Sample`: what was
asked, when (wall clock, `time.time()`, so it compares with the server's own timestamps on this
machine), and what came back. `tally` counts the statuses by kind of request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class Sample:
    """One request of a load: what was asked, when (wall clock, `time.time()`), what came back."""

    kind: str
    method: str
    host: str
    path: str
    t0: float
    t1: float = 0.0
    status: int = 0  # 0: no HTTP answer (see `error`)
    error: str = ""
    note: str = ""  # what `Load.extract` took from the answer (e.g. the sandbox id)
    retry_after: str | None = None

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


Target = tuple[str, str, str, str]  # (kind, method, host, path); a POST sends BODY
BODY = b"x" * 64


@dataclass
class Load:
    """A closed-loop load of `concurrency` workers on one aiohttp session, paced to `rate`
    requests per second in total (None: as fast as they can). `pick()` chooses each request;
    `extract(status, body)` may keep a short note of each answer."""

    port: int
    pick: Callable[[], Target]
    concurrency: int = 8
    rate: float | None = None
    extract: Callable[[int, bytes], str] | None = None
    timeout: float = 30.0
    samples: list[Sample] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<Load :{self.port} c={self.concurrency} rate={self.rate} n={len(self.samples)}>"

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> None:
        """Run until `duration` seconds passed or `stop` is set (at least one must be given)."""
        assert duration is not None or stop is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + duration if duration is not None else float("inf")
        start = loop.time()
        slot = 0
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
        client_timeout = aiohttp.ClientTimeout(total=self.timeout)

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal slot
            while loop.time() < end and not (stop is not None and stop.is_set()):
                if self.rate:
                    due = start + slot / self.rate
                    slot += 1
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())  # pacing: a duration
                    if loop.time() >= end or (stop is not None and stop.is_set()):
                        return
                await self._one(session, *self.pick())

        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            await asyncio.gather(*(worker(session) for _ in range(self.concurrency)))

    async def _one(
        self, session: aiohttp.ClientSession, kind: str, method: str, host: str, path: str
    ) -> None:
        sample = Sample(kind, method, host, path, time.time())
        self.samples.append(sample)
        url = f"http://127.0.0.1:{self.port}{path}"
        body = BODY if method == "POST" else None
        try:
            async with session.request(method, url, headers={"Host": host}, data=body) as resp:
                body = await resp.read()
                sample.status = resp.status
                sample.retry_after = resp.headers.get("Retry-After")
                if self.extract is not None:
                    sample.note = self.extract(resp.status, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        sample.t1 = time.time()


async def request(
    port: int, host: str, path: str = "/", *, method: str = "GET", timeout: float = 10.0
) -> Sample:
    """One request on a fresh connection, as a Sample (status 0 and `error` when no answer
    came within `timeout`)."""
    load = Load(port, lambda: ("one", method, host, path), concurrency=1, timeout=timeout)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await load._one(session, "one", method, host, path)
    return load.samples[0]


def tally(samples: Iterable[Sample]) -> dict[str, dict[int, int]]:
    """{kind: {status: count}} (status 0: transport error)."""
    out: dict[str, Counter[int]] = {}
    for s in samples:
        out.setdefault(s.kind, Counter())[s.status] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def sandbox_note(status: int, body: bytes) -> str:
    """The sandbox id the echo server reports in its JSON answer ("" for anything else). (Not
    its pid: inside bubblewrap's pid namespace the app sees another pid than the host.)"""
    if status != 200:
        return ""
    try:
        return str(json.loads(body)["sandbox"])
    except (ValueError, KeyError, TypeError):
        return ""
