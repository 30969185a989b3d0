#!/usr/bin/env python3
"""Benchmark of the ingress hot path engine (miren_ingress.proxy) driven by wrk.

    python benchmarks/proxy_engine_bench.py                  # full run, prints a table
    python benchmarks/proxy_engine_bench.py --conns 32,256 --seconds 10 --reps 3
    python benchmarks/proxy_engine_bench.py serve --listen 127.0.0.1:18500 \\
        --upstream 127.0.0.1:18080                           # the engine alone (for compare.py)
    python benchmarks/proxy_engine_bench.py micro            # pure-Python cost per request

The upstream is nginx answering "ok" (when nginx is installed; else a raw asyncio server),
pinned with wrk to CPU 1; the engine runs in its own process (uvloop, StaticRouter, gc frozen
after start-up) pinned to CPU 0 with os.sched_setaffinity. Reported per connection count:
median req/s, p50/p99 latency, and the engine's CPU microseconds per request (utime+stime from
/proc/PID/stat over the run divided by the requests wrk completed). Needs wrk
(apt-get install -y wrk). Every process it starts is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

from ingress_bench import wait_port

CLK = os.sysconf("SC_CLK_TCK")
NGINX_CONF = """worker_processes 1; daemon off; pid {run}/nginx.pid; error_log {run}/err warn;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_timeout 75s; keepalive_requests 100000000;
  client_body_temp_path {run}/b; proxy_temp_path {run}/p; fastcgi_temp_path {run}/f;
  uwsgi_temp_path {run}/u; scgi_temp_path {run}/s;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 "ok"; }} }} }}
"""


# --- subprocess roles -------------------------------------------------------------------------
def serve(listen: str, upstream: str, cpu: int | None) -> None:
    import uvloop

    from miren_ingress.proxy import ProxyServer, StaticRouter, freeze_gc

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        host, port = listen.rsplit(":", 1)
        server = ProxyServer(StaticRouter({"*": upstream}))
        await server.start(host, int(port))
        freeze_gc()
        print("READY", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await server.close(1.0)

    uvloop.run(main())


def raw_upstream(port: int, cpu: int | None) -> None:
    """A minimal keep-alive HTTP/1.1 server answering "ok" (when nginx is not installed)."""
    import uvloop

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    class Ok(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (i := self.buf.find(b"\r\n\r\n")) >= 0:
                self.buf = self.buf[i + 4 :]
                self.t.write(reply)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Ok, "127.0.0.1", port, backlog=4096)
        print("READY", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def micro(n: int) -> None:
    """The engine's own CPU cost per request with fake transports: no sockets, no syscalls, so
    the number is stable on a busy machine (use it to compare changes to the hot path)."""
    import gc

    import uvloop
    from ingress_bench import RESPONSE as response  # (same folder: the fakes of its micro)
    from ingress_bench import FakeTransport
    from prometheus_client import CollectorRegistry

    from miren_ingress.proxy import ProxyConfig, StaticRouter
    from miren_ingress.proxy.engine import Engine
    from miren_ingress.proxy.inbound import InboundConnection
    from miren_ingress.proxy.metrics import ProxyMetrics
    from miren_ingress.proxy.upstream import UpstreamConnection

    request = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        router = StaticRouter({"*": "127.0.0.1:9"})
        metrics = ProxyMetrics(CollectorRegistry(), lambda: 0.0)
        engine = Engine(router, ProxyConfig(), metrics, lambda: (200, {}), loop)
        client, upstream_transport = FakeTransport(), FakeTransport()
        inbound = InboundConnection(engine)
        inbound.connection_made(client)  # type: ignore[arg-type]
        target = router.resolve(b"bench.test")
        lease = router.cached_lease(target)  # type: ignore[arg-type]
        assert lease is not None
        pool = engine.pool_for(lease)
        conn = UpstreamConnection(pool, engine)
        conn.connection_made(upstream_transport)  # type: ignore[arg-type]
        pool.put(conn)
        gc.collect()
        gc.freeze()
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                inbound.data_received(request)
                conn.data_received(response)
            print(f"{(time.perf_counter() - t0) / n * 1e6:.2f} µs of Python per request")
        assert client.writes == upstream_transport.writes == 3 * n

    uvloop.run(main())


# --- driver -----------------------------------------------------------------------------------
def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wrk(port: int, conns: int, seconds: int) -> dict[str, float]:
    cmd = ["taskset", "-c", "1", "wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds}s",
           "--latency", "-H", "Host: bench.test", f"http://127.0.0.1:{port}/"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def lat(q: str) -> float:
        m = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)\b", out)
        return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)] if m else 0.0

    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if errors:
        print("  wrk:", errors.group(0), file=sys.stderr)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": float(total.group(1)) if total else 0.0,
        "p50": lat("50"),
        "p99": lat("99"),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    run_dir = tempfile.mkdtemp(prefix="miren-proxy-bench-")

    def start(cmd: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
        )
        if nginx and not args.python_upstream:
            with open(os.path.join(run_dir, "nginx.conf"), "w") as f:
                f.write(NGINX_CONF.format(run=run_dir, port=args.upstream_port))
            start(
                [
                    "taskset",
                    "-c",
                    "1",
                    nginx,
                    "-c",
                    os.path.join(run_dir, "nginx.conf"),
                    "-p",
                    run_dir,
                ]
            )
            upstream_kind = "nginx"
        else:
            start(
                [
                    sys.executable,
                    __file__,
                    "upstream",
                    "--port",
                    str(args.upstream_port),
                    "--cpu",
                    "1",
                ]
            )
            upstream_kind = "python raw protocol"
        wait_port(args.upstream_port)
        engine = start([sys.executable, __file__, "serve", "--listen", f"127.0.0.1:{args.port}",
                        "--upstream", f"127.0.0.1:{args.upstream_port}", "--cpu", "0"])  # fmt: skip
        wait_port(args.port)
        rows = []
        for conns in map(int, args.conns.split(",")):
            wrk(args.port, conns, 2)  # warm-up
            results = []
            for _ in range(args.reps):
                t0 = cpu_ticks(engine.pid)
                r = wrk(args.port, conns, args.seconds)
                r["cpu_us"] = (cpu_ticks(engine.pid) - t0) / CLK / max(r["requests"], 1) * 1e6
                results.append(r)
            rows.append((conns, results))
        print(f"\nengine on CPU 0 (uvloop, StaticRouter), wrk + {upstream_kind} upstream on CPU 1,"
              f" 2-byte responses, {args.seconds}s x {args.reps} reps, medians\n")  # fmt: skip
        print("| conns | req/s | p50 | p99 | engine CPU µs/req | non-2xx |")
        print("|---:|---:|---:|---:|---:|---:|")
        for conns, results in rows:
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(f"| {conns} | {med['rps']:,.0f} | {med['p50'] * 1e3:.2f} ms | "
                  f"{med['p99'] * 1e3:.2f} ms | {med['cpu_us']:.1f} | "
                  f"{int(sum(r['non2xx'] for r in results))} |")  # fmt: skip
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="run the engine alone")
    s.add_argument("--listen", default="127.0.0.1:18500")
    s.add_argument("--upstream", default="127.0.0.1:18080")
    s.add_argument("--cpu", type=int, default=None)
    m = sub.add_parser("micro", help="pure-Python cost per request (fake transports)")
    m.add_argument("-n", type=int, default=200_000)
    u = sub.add_parser("upstream", help="run the raw python upstream alone")
    u.add_argument("--port", type=int, default=18590)
    u.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--conns", default="32,256")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=18591, help="engine port")
    ap.add_argument("--upstream-port", type=int, default=18590)
    ap.add_argument("--python-upstream", action="store_true", help="raw python upstream, not nginx")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args.listen, args.upstream, args.cpu)
        return 0
    if args.cmd == "micro":
        micro(args.n)
        return 0
    if args.cmd == "upstream":
        raw_upstream(args.port, args.cpu)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
