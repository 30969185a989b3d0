#!/usr/bin/env python3
"""1,000 idle WebSockets open on a preview: the request rate on the same preview against the
rate with none, and memory per tunnel.

    python benchmarks/tunnels_bench.py                       # 4 pairs of 8 s, 1,000 tunnels
    python benchmarks/tunnels_bench.py --pairs 3 --seconds 8 --tunnels 1000
    python benchmarks/tunnels_bench.py --backend aiohttp     # one aiohttp process as backend

What runs: `miren serve --store memory --set sandbox.isolation=none` pinned to CPU 0 (taskset
from its start); a backend on CPU 1 with wrk; app `bench`, route `bench.test` and an ephemeral
version labelled `pr-1` (the default spec a user gets, no concurrency setting:
`{"runtime": "upstream", "urls": [backend]}`), so the preview is `pr-1.bench.test`.

The backend (`--backend nginx`, the default): nginx answers `GET /` with `ok` itself and
proxies WebSocket upgrades at `/ws` to a small `websockets` server of this script (idle
connections: no pings, no compression). The script checks that the backend alone (wrk straight
at it, both on CPU 1) does clearly more req/s than through the proxy, so the proxy is the
bottleneck; the per-run table also shows how busy miren serve's CPU was (near 100 %: the proxy
is the bottleneck). `--backend aiohttp` serves both from one aiohttp process on uvloop instead:
sharing CPU 1 with wrk it did about 25k req/s alone, and through the proxy it capped the run
at about 21k with miren serve far from busy, so it measures the backend, not the proxy.

Measured, interleaved (A B A B ..., `--pairs` pairs of `--seconds` each, after a `--warm-up`
run and 10 upgrades opened and closed, so the first tunnels' one-time costs are not counted):
`taskset -c 1 wrk -t1 -c32 -d8s --latency -H 'Host: pr-1.bench.test' http://127.0.0.1:PORT/`
with no tunnel open (A), and with `--tunnels` idle WebSockets open on the same preview (B),
opened before the run by a helper process of this script (pinned to CPU 1; the `websockets`
library; it keeps them open, idle, until told to close) and closed after it. Before and after
each B run the proxy's `miren_ingress_open_tunnels` gauge (admin `/metrics`) must read
`--tunnels`, and 0 again before the next A run. Per run: req/s, wrk's p50 and p99, CPU µs per
request of the miren serve process (utime + stime from /proc/<pid>/stat over the run, divided by
wrk's request count). The summary has medians and the ratio with / without tunnels (goal
>= 0.9x), also as the median of the per-pair ratios (steadier on a shared machine).

Memory per tunnel: miren serve's RSS (VmRSS; RssAnon beside it) with the tunnels open minus
just before they were opened, divided by their number, from the first B phase (later phases
reuse memory the allocator kept). The kernel's part is not in RSS: the script reads the slab
caches a socket uses (TCP, sock_inode_cache, filp, dentry, eventpoll_*) and the TCP buffer
pages (/proc/net/sockstat `mem`) before and after opening, divides the slab growth by the
number of TCP sockets that appeared (all processes: client, proxy, backend), and charges miren
two sockets per tunnel (the client's and the upstream's; its fd count is reported beside it: a
little under 2, as the first upgrades take upstream connections wrk's requests left pooled).

Stops every process it starts by pid (in a finally) and removes its temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingress_bench as ib

REPO = Path(__file__).resolve().parents[1]
TOKEN = ib.TOKEN  # (the token ingress_bench's admin calls send)
free_port, wait_port, admin_call = ib.free_port, ib.wait_port, ib._call
ROUTE_HOST = "bench.test"
PREVIEW_HOST = "pr-1.bench.test"
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq")
OPEN_CONCURRENCY = 50  # upgrades in flight at once while the helper opens its tunnels


# --- helpers ----------------------------------------------------------------------------------


def get_status(port: int, host: str, path: str = "/") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def open_tunnels(admin: str) -> int:
    """The proxy's `miren_ingress_open_tunnels` gauge."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^miren_ingress_open_tunnels ([\d.e+]+)$", text, re.M)
    if m is None:
        raise RuntimeError("no miren_ingress_open_tunnels in /metrics")
    return int(float(m.group(1)))


def wait_tunnels(admin: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (seen := open_tunnels(admin)) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"miren_ingress_open_tunnels reads {seen}, expected {n}")
        time.sleep(0.1)


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def kernel_socket_memory() -> dict[str, int]:
    """System-wide: bytes in the slab caches a TCP socket uses, TCP sockets in use, TCP buffer
    bytes (sockstat `mem`, pages)."""
    slab = 0
    with open("/proc/slabinfo") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in SOCKET_SLABS:
                slab += int(parts[1]) * int(parts[3])  # active objects * object size
    with open("/proc/net/sockstat") as f:
        tcp = next(line.split() for line in f if line.startswith("TCP:"))
    fields = dict(zip(tcp[1::2], map(int, tcp[2::2]), strict=True))
    return {"slab": slab, "sockets": fields["alloc"], "buffers": fields["mem"] * PAGE}


stop = ib.stop_process


def run_wrk(port: int, host: str, seconds: int, conns: int) -> dict[str, float]:
    cmd = [
        "taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
        "-H", f"Host: {host}", f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"wrk output without {pattern!r}:\n{out}")
        return m

    def latency(q: str) -> float:
        m = find(rf"\s{q}%\s+([\d.]+)(us|ms|s)\b")
        return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(find(r"Requests/sec:\s+([\d.]+)").group(1)),
        "requests": int(find(r"(\d+) requests in").group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "bad": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(map(int, errors.groups())) if errors else 0),
    }


# --- processes this script runs as subcommands ------------------------------------------------
def ws_server(port: int) -> None:
    """The WebSocket end behind nginx: accepts at any path and keeps each connection idle until
    the client closes it."""
    import uvloop
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async def main() -> None:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        async with serve(
            handler, "127.0.0.1", port, compression=None, ping_interval=None, backlog=4096
        ):
            await stopping.wait()

    uvloop.run(main())


def aiohttp_backend(port: int) -> None:
    """`GET /` -> 200 "ok"; `/ws` -> an idle WebSocket (closed when the client closes)."""
    import uvloop
    from aiohttp import web

    async def root(request: web.Request) -> web.Response:
        return web.Response(body=b"ok", content_type="text/plain")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(autoping=True, heartbeat=None)
        await sock.prepare(request)
        async for _ in sock:
            pass
        return sock

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_get("/ws", ws)
    web.run_app(
        app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096,
        loop=uvloop.new_event_loop(),
    )  # fmt: skip


def clients(port: int, host: str, n: int) -> None:
    """The helper: reads commands on stdin. `open` opens `n` WebSockets to ws://`host`/ws through
    127.0.0.1:`port` (`open K`: K of them) and answers `open N` (N open now); `check` answers
    `open N`; `close` closes them all and answers `closed`; EOF closes and exits."""
    import uvloop
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.protocol import State

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        sockets: list[ClientConnection] = []
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one() -> ClientConnection:
            async with gate:
                return await connect(
                    f"ws://{host}:{port}/ws", host="127.0.0.1", port=port, compression=None,
                    ping_interval=None, open_timeout=30,
                )  # fmt: skip

        def answer(text: str) -> None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

        def still_open() -> int:
            return sum(ws.state is State.OPEN for ws in sockets)

        async def close_all() -> None:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
            sockets.clear()

        while line := (await reader.readline()).decode().strip():
            if line.startswith("open"):
                count = int(line.split()[1]) if " " in line else n
                sockets.extend(await asyncio.gather(*(one() for _ in range(count))))
                answer(f"open {still_open()}")
            elif line == "check":
                answer(f"open {still_open()}")
            elif line == "close":
                await close_all()
                answer("closed")
        await close_all()

    uvloop.run(main())


class Helper:
    """The client helper process (pinned to CPU 1), driven over its stdin."""

    def __init__(self, port: int, n: int) -> None:
        cmd = [
            "taskset", "-c", "1", sys.executable, str(Path(__file__).resolve()), "clients",
            "--port", str(port), "--host", PREVIEW_HOST, "--tunnels", str(n),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"the client helper exited ({self.proc.wait()})")
        return line

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # EOF: it closes its WebSockets and exits
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            stop(self.proc)


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx.err warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_body_temp_path {run}/tmp-body;
    proxy_temp_path       {run}/tmp-proxy;
    fastcgi_temp_path     {run}/tmp-fcgi;
    uwsgi_temp_path       {run}/tmp-uwsgi;
    scgi_temp_path        {run}/tmp-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ default_type text/plain; return 200 "ok"; }}
        location = /ws {{
            proxy_pass http://127.0.0.1:{ws_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1d;
            proxy_send_timeout 1d;
        }}
    }}
}}
"""


def start_backend(kind: str, run: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    """Start the backend on CPU 1; its port. Every process goes into `procs` (stopped by pid)."""
    port = free_port()
    me = str(Path(__file__).resolve())
    if kind == "aiohttp":
        cmd = ["taskset", "-c", "1", sys.executable, me, "aiohttp-backend", "--port", str(port)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        wait_port(port, procs[-1])
        return port
    ws_port = free_port()
    cmd = ["taskset", "-c", "1", sys.executable, me, "ws-server", "--port", str(ws_port)]
    procs.append(subprocess.Popen(cmd))
    wait_port(ws_port, procs[-1])
    conf = run / "nginx.conf"
    conf.write_text(NGINX_CONF.format(run=run, port=port, ws_port=ws_port))
    cmd = ["taskset", "-c", "1", "/usr/sbin/nginx", "-c", str(conf), "-p", str(run)]
    procs.append(subprocess.Popen(cmd))  # daemon off: this pid is nginx's master
    wait_port(port, procs[-1])
    return port


def start_serve(run: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    proxy_port, admin_port = free_port(), free_port()
    admin = f"127.0.0.1:{admin_port}"
    data_dir = run / "miren-data"
    cmd = [
        "taskset", "-c", "0", sys.executable, "-m", "miren_ingress", "serve",
        "--store", "memory", "--listen", f"127.0.0.1:{proxy_port}", "--admin-listen", admin,
        "--data-dir", str(data_dir), "--set", "sandbox.isolation=none",
        "--set", "log_level=warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIREN_ADMIN_TOKEN": TOKEN}
    with open(run / "miren-serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_port(proxy_port, proc)
    wait_port(admin_port, proc)
    return proc, proxy_port, admin


def deploy(admin: str, proxy_port: int, backend: str) -> None:
    """App `bench`, route bench.test, a `pr-1` preview with the default spec; polled until the
    preview answers 200 (the route table follows the store by a watch; this also boots the
    preview's pool)."""
    spec = {"runtime": "upstream", "urls": [backend]}
    admin_call(admin, "POST", "/v1/apps", {"name": "bench"})
    admin_call(admin, "PUT", f"/v1/routes/{ROUTE_HOST}", {"app": "bench"})
    admin_call(admin, "POST", "/v1/apps/bench/deploys",
               {"spec": spec, "ephemeral": {"label": "pr-1", "ttl": "24h"}})  # fmt: skip
    deadline = time.monotonic() + 30
    while (status := get_status(proxy_port, PREVIEW_HOST)) != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{PREVIEW_HOST}: {status}")
        time.sleep(0.05)


# --- the run ----------------------------------------------------------------------------------
def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def measure(args: argparse.Namespace) -> int:
    run = Path(tempfile.mkdtemp(prefix="miren-tunnels-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    helper: Helper | None = None
    serve: subprocess.Popen[bytes] | None = None
    try:
        backend_port = start_backend(args.backend, run, procs)
        serve, proxy_port, admin = start_serve(run)
        deploy(admin, proxy_port, f"http://127.0.0.1:{backend_port}")
        load = os.getloadavg()
        print(
            f"tunnels_bench {time.strftime('%Y-%m-%d %H:%M:%S')}: load {load[0]:.2f} "
            f"{load[1]:.2f} {load[2]:.2f}; miren serve pid {serve.pid} on CPU 0; backend "
            f"{args.backend} + wrk + client helper on CPU 1; {args.pairs} pairs of "
            f"{args.seconds} s, wrk -c{args.conns}",
            file=sys.stderr,
        )
        backend_alone = run_wrk(backend_port, PREVIEW_HOST, args.check_seconds, args.conns)
        run_wrk(proxy_port, PREVIEW_HOST, args.warm_up, args.conns)
        helper = Helper(proxy_port, args.tunnels)
        # The upgrade path's one-time costs (first calls, caches) before any memory is read:
        if helper.ask("open 10") != "open 10" or helper.ask("close") != "closed":
            raise RuntimeError("client helper: the warm-up upgrades failed")
        results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        memory: list[dict[str, float]] = []
        pid = serve.pid
        for pair in range(args.pairs):
            for phase in "AB":
                mem: dict[str, float] = {}
                if phase == "B":
                    wait_tunnels(admin, 0)
                    time.sleep(0.5)  # (the A run's connections are gone from the counters)
                    before, kbefore, fds = status_kib(pid), kernel_socket_memory(), fd_count(pid)
                    t0 = time.monotonic()
                    reply = helper.ask("open")
                    opened = time.monotonic() - t0
                    if reply != f"open {args.tunnels}":
                        raise RuntimeError(f"client helper: {reply!r}")
                    wait_tunnels(admin, args.tunnels)
                    time.sleep(0.5)  # (let the slab counters settle)
                    after, kafter = status_kib(pid), kernel_socket_memory()
                    mem = {
                        "open_s": opened,
                        "rss_before": before["VmRSS"],
                        "rss_with": after["VmRSS"],
                        "anon_before": before["RssAnon"],
                        "anon_with": after["RssAnon"],
                        "fds": fd_count(pid) - fds,
                        "slab": kafter["slab"] - kbefore["slab"],
                        "sockets": kafter["sockets"] - kbefore["sockets"],
                        "buffers": kafter["buffers"] - kbefore["buffers"],
                    }
                t0, w0 = cpu_ticks(pid), time.monotonic()
                r = run_wrk(proxy_port, PREVIEW_HOST, args.seconds, args.conns)
                cpu = (cpu_ticks(pid) - t0) / CLK
                r["cpu_us"] = cpu / max(r["requests"], 1) * 1e6
                r["busy"] = cpu / (time.monotonic() - w0)
                r["pair"] = pair + 1
                results[phase].append(r)
                if phase == "B":
                    seen = open_tunnels(admin)
                    reply = helper.ask("check")
                    if seen != args.tunnels or reply != f"open {args.tunnels}":
                        raise RuntimeError(f"after wrk: gauge {seen}, helper {reply!r}")
                    if helper.ask("close") != "closed":
                        raise RuntimeError("client helper did not close")
                    wait_tunnels(admin, 0)
                    mem["rss_after_close"] = status_kib(pid)["VmRSS"]
                    memory.append(mem)
                print(
                    f"  pair {pair + 1} {phase}: {r['rps']:,.0f} req/s, p50 "
                    f"{fmt_ms(r['p50'])}, p99 {fmt_ms(r['p99'])}, {r['cpu_us']:.1f} µs/req, "
                    f"miren serve busy {r['busy']:.0%}",
                    file=sys.stderr,
                )
        report(args, results, memory, backend_alone)
        bad = sum(r["bad"] for rs in results.values() for r in rs)
        if bad:
            print(f"\n{bad} non-2xx responses or socket errors", file=sys.stderr)
            return 1
        return 0
    finally:
        if helper is not None:
            helper.stop()
        if serve is not None:
            stop(serve)
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(run, ignore_errors=True)


def report(
    args: argparse.Namespace,
    results: dict[str, list[dict[str, float]]],
    memory: list[dict[str, float]],
    backend_alone: dict[str, float],
) -> None:
    n = args.tunnels
    med = statistics.median
    a, b = results["A"], results["B"]
    print(
        f"\npr-1.bench.test (default spec), miren serve on CPU 0, wrk -t1 -c{args.conns} + "
        f"backend ({args.backend}) on CPU 1, {args.pairs} interleaved pairs of {args.seconds} s\n"
    )
    print(
        "| pair | tunnels open | req/s | p50 | p99 | CPU µs/req | miren serve CPU busy "
        "| non-2xx + errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ra, rb in zip(a, b, strict=True):
        for r, t in ((ra, 0), (rb, n)):
            print(
                f"| {r['pair']:.0f} | {t:,} | {r['rps']:,.0f} | {fmt_ms(r['p50'])} | "
                f"{fmt_ms(r['p99'])} | {r['cpu_us']:.1f} | {r['busy']:.0%} | {r['bad']:.0f} |"
            )
    pair_ratios = [rb["rps"] / ra["rps"] for ra, rb in zip(a, b, strict=True)]
    print(f"\n| medians | 0 tunnels | {n:,} tunnels | with / without |")
    print("|---|---:|---:|---:|")
    for key, label in (("rps", "req/s"), ("p50", "p50"), ("p99", "p99"), ("cpu_us", "CPU µs/req")):
        va, vb = med(r[key] for r in a), med(r[key] for r in b)
        shown = (
            (f"{va:,.0f}", f"{vb:,.0f}")
            if key == "rps"
            else (f"{va:.1f}", f"{vb:.1f}")
            if key == "cpu_us"
            else (fmt_ms(va), fmt_ms(vb))
        )
        print(f"| {label} | {shown[0]} | {shown[1]} | {vb / va:.2f}x |")
    print(
        f"| req/s, median of the per-pair ratios | | | **{med(pair_ratios):.2f}x** "
        f"({', '.join(f'{x:.2f}' for x in pair_ratios)}) |"
    )
    proxy_rps = med(r["rps"] for r in a)
    print(
        f"| backend alone (wrk straight at it, {args.check_seconds} s) | "
        f"{backend_alone['rps']:,.0f} | | {backend_alone['rps'] / proxy_rps:.2f}x the proxy |"
    )
    busy = med(r["busy"] for r in a + b)
    if backend_alone["rps"] < 1.2 * proxy_rps or busy < 0.9:
        print(
            f"\n**Warning**: the proxy may not be the bottleneck (backend alone "
            f"{backend_alone['rps'] / proxy_rps:.2f}x, miren serve busy {busy:.0%} of the time)"
        )
    first = memory[0]
    per_sock = first["slab"] / first["sockets"] if first["sockets"] else float("nan")
    miren_socks = 2  # a tunnel holds a client socket and an upstream one
    print(f"\n| memory, {n:,} tunnels (first B phase) | |")
    print("|---|---:|")
    print(
        f"| miren serve VmRSS before / with tunnels / after closing | "
        f"{first['rss_before'] / 1024:.1f} / {first['rss_with'] / 1024:.1f} / "
        f"{first['rss_after_close'] / 1024:.1f} MiB |"
    )
    print(
        f"| **process: RSS per tunnel** (RssAnon per tunnel) | "
        f"**{(first['rss_with'] - first['rss_before']) / n:.1f} KiB** "
        f"({(first['anon_with'] - first['anon_before']) / n:.1f} KiB) |"
    )
    later = ", ".join(f"{(m['rss_with'] - m['rss_before']) / n:.1f}" for m in memory[1:])
    print(f"| RSS per tunnel in the later B phases (memory the allocator kept) | {later} KiB |")
    print(
        f"| miren serve fds per tunnel (below 2: upgrades took pooled upstream connections "
        f"left by wrk) | {first['fds'] / n:.2f} |"
    )
    print(
        f"| kernel: TCP sockets that appeared (all processes) / slab growth per socket | "
        f"{first['sockets']:.0f} / {per_sock / 1024:.2f} KiB |"
    )
    print(
        f"| **kernel: miren's sockets' slab per tunnel** ({miren_socks} x per socket) | "
        f"**{per_sock * miren_socks / 1024:.1f} KiB** |"
    )
    print(
        f"| kernel: TCP buffer memory growth (sockstat mem, all sockets) per tunnel | "
        f"{first['buffers'] / n / 1024:.2f} KiB |"
    )
    print(f"| time to open the {n:,} tunnels (first B phase) | {first['open_s']:.2f} s |")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("ws-server", help="(internal) the idle WebSocket server behind nginx")
    w.add_argument("--port", type=int, required=True)
    h = sub.add_parser("aiohttp-backend", help="(internal) GET / and /ws in one aiohttp process")
    h.add_argument("--port", type=int, required=True)
    c = sub.add_parser("clients", help="(internal) the helper that holds the WebSockets open")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--host", required=True)
    c.add_argument("--tunnels", type=int, required=True)
    ap.add_argument("--pairs", type=int, default=4, help="A B pairs (at least 3)")
    ap.add_argument("--seconds", type=int, default=8, help="per wrk run")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections")
    ap.add_argument("--tunnels", type=int, default=1000, help="idle WebSockets in the B phases")
    ap.add_argument("--check-seconds", type=int, default=5, help="wrk straight at the backend")
    ap.add_argument("--warm-up", type=int, default=5, help="seconds of wrk before the pairs")
    ap.add_argument("--backend", choices=["nginx", "aiohttp"], default="nginx")
    args = ap.parse_args()
    if args.cmd == "ws-server":
        ws_server(args.port)
        return 0
    if args.cmd == "aiohttp-backend":
        aiohttp_backend(args.port)
        return 0
    if args.cmd == "clients":
        clients(args.port, args.host, args.tunnels)
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
