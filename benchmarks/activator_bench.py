"""Activator benchmark: warm-path cost and cold-start overhead, with baselines from the same run.

    python benchmarks/activator_bench.py [--ops 200000] [--trials 15] [--store memory|etcd]

1. Warm path: `try_acquire` + `release` on a pool with a running sandbox, each pair timed with
   `perf_counter_ns`; `hold` + `release` (what the ingress calls per request: no Lease object);
   also `await acquire()` (the async entry on a warm pool) + `release`.
   Baselines: the timer alone, and a dict lookup plus a `__slots__` object (the floor of any
   lease lookup that returns an object).
2. Cold start: the time from `acquire()` on a version with no pool to the lease, for 1 caller and
   for 500 concurrent callers (time to the first and to the last lease), against the sandbox's
   own time to become healthy: the same echo server spawned bare, until it prints that it
   listens. Overhead = activator time - bare time (medians). Trials interleave the three
   measurements so machine drift hits all alike.

Targets (issue): warm acquire+release <= 5 us; cold-start overhead <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miren_activator import Activator, ActivatorConfig, Lease  # noqa: E402
from miren_activator.pools import Ref  # noqa: E402
from miren_activator.runtimes.process import pick_port  # noqa: E402
from miren_store.entities import AppVersion, Concurrency, Runtime, VersionSpec  # noqa: E402
from miren_store.memory import MemoryStore  # noqa: E402
from miren_store.store import Store  # noqa: E402

ECHO = ROOT / "tests" / "apps" / "echo_server.py"


def version(vid: str, rpi: int = 10) -> AppVersion:
    spec = VersionSpec(
        runtime=Runtime.PROCESS,
        command=(sys.executable, "-S", str(ECHO), "--port", "$PORT"),
        health_path="/health",
        boot_timeout=timedelta(seconds=30),
        concurrency=Concurrency(requests_per_instance=rpi, max_instances=1),
    )
    return AppVersion(id=vid, app="bench", spec=spec)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, unit: str, values: list[float]) -> str:
    return (
        f"{name:<46} {pct(values, 0.5):>9.2f} {pct(values, 0.99):>9.2f} "
        f"{statistics.fmean(values):>9.2f}  {unit}  (n={len(values)})"
    )


def header() -> str:
    return f"{'measurement':<46} {'p50':>9} {'p99':>9} {'mean':>9}"


# -- warm path -----------------------------------------------------------------------------------


def time_pairs(n: int, op: Callable[[], None]) -> list[float]:
    """Per-call µs of `op`, each call timed on its own (timer cost included)."""
    out = [0.0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        op()
        out[i] = (clock() - t0) / 1000.0
    return out


class _Slot:
    __slots__ = ("a", "b", "c")

    def __init__(self, a: object) -> None:
        self.a = a
        self.b = 1
        self.c = 2


async def bench_warm(act: Activator, ops: int) -> list[str]:
    v = version("warm-v1")
    act.release(await act.acquire(v))
    vid = v.id
    try_acquire, release = act.try_acquire, act.release

    def pair() -> None:
        lease = try_acquire(vid, "web")
        release(lease)  # type: ignore[arg-type]

    hold, ref = act.hold, Ref(vid, "web")

    def held() -> None:  # the ingress's per-request pair
        release(hold(ref))  # type: ignore[arg-type]

    table: dict[str, int] = {"x": 1}

    def floor() -> None:
        _Slot(table.get("x"))

    def nothing() -> None:
        pass

    gc.collect()
    gc.disable()  # measure the code, not the collector's timing
    try:
        for _ in range(3):  # warm up
            time_pairs(10_000, pair)
        timer = time_pairs(ops, nothing)
        base = time_pairs(ops, floor)
        warm = time_pairs(ops, pair)
        warm_held = time_pairs(ops, held)
    finally:
        gc.enable()
    # Bulk rate: no per-call timer.
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        release(try_acquire(vid, "web"))  # type: ignore[arg-type]
    bulk = (time.perf_counter_ns() - t0) / 1000.0 / ops
    async_times: list[float] = []
    for _ in range(min(ops, 50_000)):
        t0 = time.perf_counter_ns()
        lease: Lease = await act.acquire(v)
        act.release(lease)
        async_times.append((time.perf_counter_ns() - t0) / 1000.0)
    return [
        row("baseline: timer only", "us", timer),
        row("baseline: dict.get + __slots__ object", "us", base),
        row("try_acquire + release (warm)", "us", warm),
        row("hold + release (warm, the ingress's pair)", "us", warm_held),
        row("await acquire + release (warm)", "us", async_times),
        f"{'try_acquire + release, bulk loop (no timer)':<46} {bulk:>9.2f} {'':>9} {'':>9}  us",
    ]


# -- cold start ----------------------------------------------------------------------------------


async def bare_boot_ms() -> float:
    """Spawn the echo server bare and time it until it says it listens (a line on its stdout:
    event-driven, so no polling skews it)."""
    port = pick_port("127.0.0.1")
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-S",
        str(ECHO),
        "--port",
        str(port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        assert b"listening" in line, line
        return (time.perf_counter() - t0) * 1000.0
    finally:
        proc.kill()
        await proc.wait()


async def cold_ms(act: Activator, vid: str, callers: int) -> tuple[float, float]:
    """(ms to the first lease, ms to the last lease) for `callers` concurrent first acquires."""
    v = version(vid, rpi=max(10, callers))
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    first: list[float] = []

    async def one() -> Lease:
        lease = await act.acquire(v)
        if not first:
            first.append(time.perf_counter())
        return lease

    leases = await asyncio.gather(*(one() for _ in range(callers)))
    last = time.perf_counter()
    for lease in leases:
        act.release(lease)
    await act.remove_version(vid)  # stop it: the next trial is cold again
    await asyncio.sleep(0)
    del loop
    return (first[0] - t0) * 1000.0, (last - t0) * 1000.0


async def bench_cold(act: Activator, trials: int) -> list[str]:
    bare: list[float] = []
    one: list[float] = []
    crowd_first: list[float] = []
    crowd_last: list[float] = []
    await bare_boot_ms()  # warm the page cache and the launcher choice
    await cold_ms(act, "cold-warmup", 1)
    for i in range(trials):
        bare.append(await bare_boot_ms())
        one.append((await cold_ms(act, f"cold1-{i}", 1))[0])
        f, last = await cold_ms(act, f"cold500-{i}", 500)
        crowd_first.append(f)
        crowd_last.append(last)
    b = statistics.median(bare)
    return [
        row("baseline: bare spawn until it listens", "ms", bare),
        row("cold acquire, 1 caller", "ms", one),
        row("cold acquire, 500 callers: first lease", "ms", crowd_first),
        row("cold acquire, 500 callers: last lease", "ms", crowd_last),
        f"overhead (median - baseline median): 1 caller {statistics.median(one) - b:.1f} ms; "
        f"500 callers first {statistics.median(crowd_first) - b:.1f} ms, "
        f"last {statistics.median(crowd_last) - b:.1f} ms",
    ]


async def open_bench_store(kind: str, tmp: Path) -> tuple[Store, Callable[[], object] | None]:
    if kind == "memory":
        return MemoryStore(), None
    from miren_store.backends import open_store
    from miren_store.embedded import EmbeddedEtcd

    etcd = EmbeddedEtcd(data_dir=tmp / "etcd")
    await etcd.start()
    return open_store(etcd.url), etcd.stop


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--store", choices=["memory", "etcd"], default="memory")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="miren-act-bench-"))
    store, stop_etcd = await open_bench_store(args.store, tmp)
    act = Activator(
        store,
        config=ActivatorConfig(node="bench", log_dir=tmp / "logs", sweep_interval=3600),
    )
    await act.start()
    try:
        print(f"activator benchmark: python {sys.version.split()[0]}, uvloop, store={args.store}")
        print(header())
        for line in await bench_warm(act, args.ops):
            print(line)
        for line in await bench_cold(act, args.trials):
            print(line)
    finally:
        await act.close(grace=2.0)
        await store.close()
        if stop_etcd is not None:
            await stop_etcd()  # type: ignore[misc]
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    uvloop.run(main())
