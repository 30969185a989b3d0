"""`miren serve` on the embedded store: time to ready, and admin-API round trips.

    python benchmarks/serve_bench.py [--starts 5] [--deploys 200]

Ready: from spawning `python -m miren_ingress serve` to the first `GET /healthz` = 200
(polled every 5 ms), over N starts, each on a fresh data dir (a cold etcd) and then once more on
the data dir of the previous start (a warm restart). Round trips: one keep-alive HTTP/1.1
connection to the admin API, sequential calls, wall time per call; `GET /v1/apps` is the baseline
(the cheapest authenticated call that reads the store), measured in the same run.
Targets (issue 6): ready <= 2 s; ephemeral deploy p50 <= 20 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import edge as harness
from tests.support.edge import DEAD_UPSTREAM, MirenServer

harness.POLL_INTERVAL = 0.005  # finer readiness polling than the tests need


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def row(name: str, values: list[float], unit: float = 1e3) -> str:
    return (
        f"| {name:<46} | {len(values):>4} | {statistics.median(values) * unit:>8.2f} "
        f"| {pct(values, 99) * unit:>8.2f} | {max(values) * unit:>8.2f} |"
    )


def ready_time(workdir: Path) -> float:
    server = MirenServer(workdir, store="embedded")
    try:
        return server.start()
    finally:
        server.stop()


def timed_calls(
    conn: http.client.HTTPConnection, calls: list[tuple[str, str, bytes | None]]
) -> list[float]:
    out = []
    for method, path, body in calls:
        headers = {"Content-Type": "application/json"} if body else {}
        t0 = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out.append(time.perf_counter() - t0)
        assert resp.status < 300, (resp.status, data[:200])
    return out


def run(root: Path, starts: int, n: int) -> None:
    cold = [ready_time(root / f"cold-{i}") for i in range(starts)]
    warm = [ready_time(root / f"cold-{i}") for i in range(starts)]  # same dirs: restarts

    spec = {"runtime": "upstream", "urls": [DEAD_UPSTREAM]}
    with MirenServer(root / "api", store="embedded") as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.admin_port, timeout=10)
        timed_calls(conn, [("POST", "/v1/apps", json.dumps({"name": "bench"}).encode())])
        timed_calls(conn, [("GET", "/v1/apps", None)] * 20)  # warm-up
        baseline = timed_calls(conn, [("GET", "/v1/apps", None)] * n)

        def deploys(labels: list[str]) -> list[tuple[str, str, bytes | None]]:
            return [
                (
                    "POST",
                    "/v1/apps/bench/deploys",
                    json.dumps({"spec": spec, "ephemeral": {"label": label, "ttl": "1h"}}).encode(),
                )
                for label in labels
            ]

        replace = timed_calls(conn, deploys([f"pr-{i % 10}" for i in range(n)]))
        fresh = timed_calls(conn, deploys([f"new-{i}" for i in range(n)]))
        listing = timed_calls(conn, [("GET", "/v1/apps/bench/versions", None)] * n)
        conn.close()

    print(
        f"miren serve, embedded etcd, {time.strftime('%Y-%m-%d')}, python {sys.version.split()[0]}"
    )
    print()
    print(
        "| measurement (ms)                               |    n |      p50 |      p99 |      max |"
    )
    print(
        "|------------------------------------------------|------|----------|----------|----------|"
    )
    print(row("ready, fresh data dir (spawn -> /healthz 200)", cold))
    print(row("ready, restart on the same data dir", warm))
    print(row("baseline: GET /v1/apps", baseline))
    print(row("GET /v1/apps/{app}/versions (~11 versions)", listing))
    print(row("ephemeral deploy, label redeployed (replace)", replace))
    print(row("ephemeral deploy, new label (evicts 1)", fresh))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--deploys", type=int, default=200)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        run(root, args.starts, args.deploys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
