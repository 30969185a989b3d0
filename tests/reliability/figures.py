"""The figures a reliability run produces (counts, percentiles, RSS, fds, durations), and the
measurements they come from (`percentile`, `median_of`, `ProcSampler`).

Tests call `Figures.add(name, value, unit)` through the `figures` fixture; every figure is printed
in a table at the end of the run (`pytest_terminal_summary` in conftest.py) and, when
`MIREN_RELIABILITY_FIGURES=<path>` is set, appended to that file as one JSON object per line
(`{"profile", "test", "name", "value", "unit"}`), which is what RELIABILITY.md is written from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.reliability.budget import BUDGET, FIGURES_VAR
from tests.support.procs import client_connection_count, fd_count, status_kib


@dataclass(frozen=True)
class Figure:
    profile: str
    test: str
    name: str
    value: float | int | str
    unit: str


RECORDED: list[Figure] = []


class Figures:
    """The figures of one test."""

    def __init__(self, test: str) -> None:
        self.test = test

    def __repr__(self) -> str:
        return f"<Figures {self.test} n={sum(1 for f in RECORDED if f.test == self.test)}>"

    def add(self, name: str, value: float | int | str, unit: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 4)
        fig = Figure("long" if BUDGET.long else "short", self.test, name, value, unit)
        RECORDED.append(fig)
        path = os.environ.get(FIGURES_VAR)
        if path:
            with Path(path).open("a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(fig)) + "\n")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median_of(samples: Sequence[tuple[float, ...]], index: int) -> float:
    assert samples, "no samples in the window"
    return float(statistics.median(s[index] for s in samples))


@dataclass
class ProcSampler:
    """Samples a process's RSS (KiB) and open fds every `interval` seconds while running; with
    `client_port`, also how many of those fds are client connections accepted on that port.
    A sample is (monotonic, rss, fds, client connections)."""

    pid: int
    interval: float = 1.0
    client_port: int | None = None
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<ProcSampler pid={self.pid} n={len(self.samples)}>"

    def sample(self) -> tuple[float, int, int, int]:
        clients = 0
        if self.client_port is not None:
            clients = client_connection_count(self.pid, self.client_port)
        s = (time.monotonic(), status_kib(self.pid, "VmRSS"), fd_count(self.pid), clients)
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)  # the sampling period, not a wait

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def window(self, start: float, end: float) -> list[tuple[float, int, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def summary_lines() -> list[str]:
    if not RECORDED:
        return []
    width = max(len(f"{f.test} {f.name}") for f in RECORDED)
    lines = []
    for f in RECORDED:
        key = f"{f.test} {f.name}"
        lines.append(f"{key:<{width}}  {f.value} {f.unit}".rstrip())
    return lines


def load_jsonl(path: str | Path) -> list[Figure]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(Figure(**json.loads(line)))
    return out


def markdown(figures: list[Figure]) -> str:
    """One table per test: figure | short | long (a profile that was not run shows `-`)."""
    tests: dict[str, dict[str, dict[str, str]]] = {}
    for f in figures:
        cell = f"{f.value} {f.unit}".strip()
        tests.setdefault(f.test, {}).setdefault(f.name, {})[f.profile] = cell
    out = []
    for test, names in tests.items():
        out.append(f"`{test}`\n")
        out.append("| figure | short (CI) | long |")
        out.append("|---|---|---|")
        for name, cells in names.items():
            value = " | ".join(cells.get(p, "-").replace("|", "/") for p in ("short", "long"))
            out.append(f"| {name} | {value} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # python -m tests.reliability.figures short.jsonl long.jsonl
    import sys

    print(markdown([f for path in sys.argv[1:] for f in load_jsonl(path)]))
