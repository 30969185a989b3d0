"""Does the event loop ever stall under load? `miren serve` with its protocol callbacks timed.

    python benchmarks/loop_gaps.py serve --store memory --listen 127.0.0.1:18600 ...
    kill -USR1 PID    # print the gaps since the last report (or start) to stderr, then reset
    kill -TERM PID    # stop it (prints the gaps first)

Every `data_received` of a client or an upstream connection notes when it returns; the next
one measures the gap since then: the time the loop spent outside our callbacks (epoll, reads,
timers, the GC, other tasks, or the process being preempted). Under saturating load the loop
goes from one callback to the next within a few µs, so a gap past `--min-gap` is either an
idle wait or a stall; the histogram tells them apart by count and size. The wrappers cost
about 0.3 µs per callback: compare gaps, not throughput, with this launcher.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from time import perf_counter_ns
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

BUCKET_NS = 50_000  # histogram bucket width


class Gaps:
    def __init__(self) -> None:
        self.last = perf_counter_ns()
        self.events = 0
        self.buckets: dict[int, int] = {}

    def wrap(self, cls: Any) -> None:
        inner: Callable[[Any, bytes], None] = cls.data_received

        def data_received(proto: Any, data: bytes) -> None:
            gap = perf_counter_ns() - self.last
            if gap >= BUCKET_NS:
                b = gap // BUCKET_NS
                self.buckets[b] = self.buckets.get(b, 0) + 1
            self.events += 1
            try:
                inner(proto, data)
            finally:
                self.last = perf_counter_ns()

        cls.data_received = data_received

    def report(self) -> str:
        lines = [f"callbacks {self.events:,}; gaps >= {BUCKET_NS // 1000} µs:"]
        for b in sorted(self.buckets):
            n = self.buckets[b]
            lines.append(
                f"  {b * BUCKET_NS // 1000:>7} µs  {n:>6}  ({n / max(self.events, 1):.4%})"
            )
        self.events = 0
        self.buckets.clear()
        return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from miren_ingress.proxy.inbound import InboundConnection
    from miren_ingress.proxy.upstream import UpstreamConnection
    from miren_ingress.shell.cli import main as miren

    gaps = Gaps()
    gaps.wrap(InboundConnection)
    gaps.wrap(UpstreamConnection)

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        sys.stderr.write(gaps.report())

    signal.signal(signal.SIGUSR1, on_usr1)
    try:
        return miren(argv)
    finally:
        sys.stderr.write(gaps.report())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
