"""Host resolution with a large table: 100,000 routes and 10,000 ephemeral versions.

    python benchmarks/resolve_bench.py [--routes 100000] [--previews 10000] [--n 200000]

Prints p50/p99 of one resolution (ns) for each kind of host, on the pure `RouteTable.resolve`
(normalised host) and on the router's cached path (`EdgeRouter.resolve`, raw Host bytes, what
the proxy calls per request), beside a baseline measured in the same run: one dict lookup plus
`time.perf_counter_ns()`. Also the RSS the loaded table adds. Target: resolution <= 5 µs p99;
table RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout

from miren_ingress.routing.routes import RouteTable
from miren_store.entities import App, AppVersion, HttpRoute, Runtime, VersionSpec


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(n_routes: int, n_previews: int) -> list[Any]:
    now = datetime.now(UTC)
    spec = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))
    n_apps = max(1, n_routes // 10)
    ents: list[Any] = []
    for a in range(n_apps):
        ents.append(App(name=f"app{a}", active_version=f"app{a}-v1"))
        ents.append(AppVersion(id=f"app{a}-v1", app=f"app{a}", spec=spec))
    for r in range(n_routes):
        app = f"app{r % n_apps}"
        host = f"*.t{r}.example.com" if r % 10 == 9 else f"h{r}.example.com"
        ents.append(HttpRoute(host=host, app=app))
    for p in range(n_previews):
        app = p % n_apps
        ents.append(
            AppVersion(
                id=f"app{app}-pr{p}",
                app=f"app{app}",
                spec=spec,
                ephemeral_label=f"pr-{p}",
                ephemeral_expires_at=now + timedelta(hours=1),
            )
        )
    return ents


def measure(fn: Callable[[Any], object], hosts: list[Any], n: int) -> tuple[float, float]:
    samples = []
    clock = time.perf_counter_ns
    for i in range(n):
        h = hosts[i % len(hosts)]
        t0 = clock()
        fn(h)
        samples.append(clock() - t0)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--routes", type=int, default=100_000)
    ap.add_argument("--previews", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()

    gc.collect()
    before = rss_mb()
    ents = build(args.routes, args.previews)
    table = RouteTable()
    t0 = time.perf_counter()
    table.load(ents, revision=1)
    load_s = time.perf_counter() - t0
    del ents
    gc.collect()
    gc.freeze()
    table_mb = rss_mb() - before

    n_apps = max(1, args.routes // 10)
    rnd = random.Random(7)
    kinds: dict[str, list[str]] = {
        "exact route": [
            f"h{r}.example.com" for r in rnd.sample(range(args.routes), 1000) if r % 10 != 9
        ],
        "wildcard route": [f"tenant.t{r}.example.com" for r in range(9, args.routes, 10)][:1000],
        "preview (plain route)": [
            f"pr-{p}.h{p % n_apps}.example.com"
            for p in range(args.previews)
            if (p % n_apps) % 10 != 9
        ][:1000],
        "unknown host (404)": [f"nope{i}.other.org" for i in range(1000)],
    }
    now = datetime.now(UTC)

    from miren_ingress.routing.router import EdgeRouter

    router = EdgeRouter(table, activator=None)  # type: ignore[arg-type]  # resolve only
    baseline_dict = {h: 1 for hs in kinds.values() for h in hs}

    rows = []
    base = measure(lambda h: (baseline_dict.get(h), time.time()), list(baseline_dict), args.n)
    rows.append(("baseline: dict.get + time.time()", *base))
    for name, hosts in kinds.items():
        pure = measure(lambda h: table.resolve(h, now), hosts, args.n)
        rows.append((f"RouteTable.resolve: {name}", *pure))
        raw = [h.encode() for h in hosts]
        for h in raw:
            router.resolve(h)  # warm the per-host cache
        cached = measure(router.resolve, raw, args.n)
        rows.append((f"EdgeRouter.resolve (cached): {name}", *cached))

    print(f"table: {args.routes:,} routes, {args.previews:,} previews, {n_apps:,} apps")
    print(f"load {load_s:.2f} s, table RSS {table_mb:.0f} MB (target <= 300 MB)\n")
    print(f"{'operation':58} {'p50 ns':>8} {'p99 ns':>8}")
    for name, p50, p99 in rows:
        print(f"{name:58} {p50:8.0f} {p99:8.0f}")


if __name__ == "__main__":
    main()
