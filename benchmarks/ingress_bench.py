#!/usr/bin/env python3
"""The ingress hot path through the real stack (`miren serve`: EdgeRouter + activator leases),
measured against nginx, in the same run, with the shared anchor script.

    python benchmarks/ingress_bench.py                    # full run: / and /1k, 32 and 256 conns
    python benchmarks/ingress_bench.py --paths / --conns 32 --reps 3 --seconds 10
    python benchmarks/ingress_bench.py micro              # pure-Python µs/request, fake transports
    python benchmarks/ingress_bench.py micro --profile    # ... with a cProfile of the loop
    python benchmarks/ingress_bench.py micro --opcodes    # ... bytecodes per request, by function

Full run: starts `miren serve --store memory` (its own process, pinned to CPU 0 with taskset),
then runs `/work/shared/bench/anchors/compare.py` once per path. compare.py
starts the nginx backend (127.0.0.1:18080, "/" -> "ok", "/1k" -> 1 KiB) pinned with wrk to CPU 1
and nginx-proxy on CPU 0; once the backend listens, its `--setup` hook runs this script's
`deploy` step against the admin API: app `bench`, route `bench.test`, an active upstream version
on the backend and an ephemeral version labelled `pr-1` (served at `pr-1.bench.test`), both
deployed as a user deploys them, with no concurrency setting (`--spec tuned`: requests_per_instance
4096, the figure the first six sessions published), and
one request to each host so both leases are warm. Targets: `route` (Host: bench.test) and
`preview` (Host: pr-1.bench.test). The table has medians of --reps runs, the ratio to
nginx-proxy measured in the same run, and CPU µs per request (from /proc, miren serve's process).
`--gc-threshold N` runs miren serve with gc.set_threshold(N, 50, 100) after its start-up
freeze (to measure that setting). Output is also appended to --out (default under --work).
Stops everything it starts, by pid.

Micro: the same stack in one process (MemoryStore, RouteTable, Activator with an upstream
version whose health check hits a throwaway local listener, EdgeRouter, the engine) with fake
transports: no syscalls, so the figure is stable on a busy machine. Use it while iterating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout, installed or not
COMPARE = Path("/work/shared/bench/anchors/compare.py")
BACKEND = "http://127.0.0.1:18080"
CAPACITY = 4096  # requests_per_instance of the bench versions
ROUTE_HOST = "bench.test"
PREVIEW_HOST = "pr-1.bench.test"


# --- deploy step (compare.py --setup) ---------------------------------------------------------
# The admin token the bench's `miren serve` processes get:
TOKEN = os.environ.get("MIREN_ADMIN_TOKEN", "ingress-bench-token")


def _call(admin: str, method: str, path: str, body: Any | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{admin}{path}", data=data, method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _get(proxy: str, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = socket.create_connection(tuple_addr(proxy), timeout=30)
    try:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    finally:
        conn.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def tuple_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def deploy(admin: str, proxy: str, backend: str, kind: str = "tuned") -> None:
    """App `bench`, route bench.test, an active and a `pr-1` preview version on `backend`;
    one request to each host, so both pools have a running sandbox and a warm lease path.
    `kind`: "default" deploys the spec a user gets (no concurrency setting), "tuned" sets
    `requests_per_instance` to CAPACITY."""
    spec: dict[str, Any] = {"runtime": "upstream", "urls": [backend]}
    if kind == "tuned":
        spec["concurrency"] = {"requests_per_instance": CAPACITY}
    _call(admin, "POST", "/v1/apps", {"name": "bench"})
    _call(admin, "PUT", f"/v1/routes/{ROUTE_HOST}", {"app": "bench"})
    _call(admin, "POST", "/v1/apps/bench/deploys", {"spec": spec})
    _call(admin, "POST", "/v1/apps/bench/deploys",
          {"spec": spec, "ephemeral": {"label": "pr-1", "ttl": "24h"}})  # fmt: skip
    deadline = time.monotonic() + 30
    for host in (ROUTE_HOST, PREVIEW_HOST):
        while True:  # the route table follows the store by a watch: poll until it routes
            status, headers, body = _get(proxy, host)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host}: {status} {body[:200]!r}")
            time.sleep(0.05)
        robots = headers.get("x-robots-tag")
        assert (robots is not None) == (host == PREVIEW_HOST), (host, headers)
    print(f"deployed and warmed {ROUTE_HOST} and {PREVIEW_HOST}", file=sys.stderr)


# --- micro: the real stack in one process, fake transports -----------------------------------
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 02:15:09 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)
# What wrk -H 'Host: ...' sends, plus the User-Agent and Accept of real clients:
REQUEST = "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
BATCH = 16  # requests per loop iteration in `micro` (deferred writes are flushed once per batch)


def count_opcodes(step: Any, n: int, per_step: int = 1) -> None:
    """Python bytecodes executed per request, by function: a deterministic cost figure (the
    same on a busy machine), with the number of Python calls. `step` serves `per_step`
    requests."""
    import collections

    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{Path(code.co_filename).name}:{code.co_firstlineno}:{code.co_name}"
        if event == "call":
            calls[key] += 1
        elif event == "opcode":
            ops[key] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            step()
    finally:
        sys.settrace(None)
    n *= per_step
    total = sum(c for key, c in ops.items() if not key.endswith(":step"))  # (not the driver)
    print(f"  {total / n:.0f} bytecodes, {sum(calls.values()) / n:.0f} Python calls per request")
    for key, count in ops.most_common(40):
        print(f"  {count / n:7.1f} ops {calls[key] / n:4.1f} calls  {key}")


def micro(
    n: int, profile: bool, gc_threshold: int, opcodes: bool = False, tuned: bool = False
) -> None:
    import gc
    from datetime import UTC, datetime, timedelta

    import uvloop
    from prometheus_client import CollectorRegistry

    from miren_activator.activator import Activator
    from miren_ingress.proxy import HOT_PATH, ProxyConfig
    from miren_ingress.proxy.engine import Engine
    from miren_ingress.proxy.inbound import InboundConnection
    from miren_ingress.proxy.metrics import ProxyMetrics
    from miren_ingress.proxy.testing import FakeTransport
    from miren_ingress.proxy.upstream import UpstreamConnection
    from miren_ingress.routing.router import EdgeRouter
    from miren_ingress.routing.routes import RouteTable
    from miren_store.entities import (
        App,
        AppVersion,
        Concurrency,
        HttpRoute,
        Runtime,
        VersionSpec,
    )
    from miren_store.memory import MemoryStore

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # A listener for the upstream runtime's health check only (no request reaches it).
        health = await asyncio.start_server(_answer_ok, "127.0.0.1", 0)
        port = health.sockets[0].getsockname()[1]
        spec = VersionSpec(  # the default spec a user gets, as the full run's default
            runtime=Runtime.UPSTREAM,
            urls=(f"http://127.0.0.1:{port}",),
            concurrency=Concurrency(requests_per_instance=CAPACITY) if tuned else Concurrency(),
        )
        store = MemoryStore()
        expires = datetime.now(UTC) + timedelta(hours=24)
        preview = AppVersion(
            id="v2", app="bench", spec=spec, ephemeral_label="pr-1", ephemeral_ttl="24h",
            ephemeral_expires_at=expires,
        )  # fmt: skip
        ents = [
            await store.create(App(name="bench", active_version="v1")),
            await store.create(AppVersion(id="v1", app="bench", spec=spec)),
            await store.create(preview),
            await store.create(HttpRoute(host=ROUTE_HOST, app="bench")),
        ]
        table = RouteTable()
        table.load(ents, revision=1)
        activator = Activator(store, registry=CollectorRegistry())
        await activator.start()
        router = EdgeRouter(table, activator)
        metrics = ProxyMetrics(CollectorRegistry(), lambda: 0.0)
        engine = Engine(router, ProxyConfig(), metrics, lambda: (200, {}), loop)
        try:
            for host in (ROUTE_HOST, PREVIEW_HOST):
                target = router.resolve(host.encode())
                lease = await router.acquire(target)  # type: ignore[arg-type]  # boots the pool
                pool = engine.pool_for(lease)
                conn = UpstreamConnection(pool, engine)
                conn.connection_made(FakeTransport(record=False))  # type: ignore[arg-type]
                pool.put(conn)
                # The lease stays out while the loop runs: another request in flight, as under
                # any load (at 32 connections the sandbox is idle for 0.7 % of releases).
                run_host(engine, conn, host, [RESPONSE], n, profile)
                if host == ROUTE_HOST:
                    # An upstream whose response heads never repeat (a request id in each):
                    # every head is parsed (UpstreamPool.known never matches).
                    novel = [
                        RESPONSE.replace(b"\r\n\r\n", b"\r\nX-Id: %04d\r\n\r\n" % i)
                        for i in range(1000)
                    ]
                    run_host(engine, conn, host + " (novel heads)", novel, n, profile)
                router.release(lease)
        finally:
            await activator.close()
            health.close()
            await health.wait_closed()

    def run_host(
        engine: Engine,
        conn: UpstreamConnection,
        label: str,
        responses: list[bytes],
        n: int,
        prof: bool,
    ) -> None:
        host = label.split(maxsplit=1)[0]
        cycle = len(responses)
        client = FakeTransport(record=False)
        inbound = InboundConnection(engine)
        inbound.connection_made(client)  # type: ignore[arg-type]
        request = REQUEST.format(host=host).encode()
        upstream_transport = conn.transport
        before = upstream_transport.writes  # type: ignore[attr-defined]
        gc.collect()
        gc.freeze()
        if gc_threshold:
            gc.set_threshold(gc_threshold, 50, 100)
        # The loaded case: the hit path's writes wait for the end of the loop iteration
        # (Engine.later; `busy_gap` inf: always busy): flushed here every BATCH requests, about
        # what one iteration handles at 32 connections. The flush the loop would schedule is
        # not (`later_armed`): this loop never yields to it.
        flush = engine.flush_writes
        engine.busy_gap = float("inf")
        engine.later_armed = True
        for i in range(n // 10):  # warm-up
            inbound.data_received(request)
            conn.data_received(responses[i % cycle])
        flush()
        results = []
        rounds = n // BATCH
        for _ in range(5):  # CPU time of this thread: preemption by other processes is not in it
            t0 = time.thread_time()
            i = 0
            for _ in range(rounds):
                for _ in range(BATCH):
                    inbound.data_received(request)
                    conn.data_received(responses[i % cycle])
                    i += 1
                flush()
            results.append((time.thread_time() - t0) / (rounds * BATCH) * 1e6)
        total = n // 10 + 5 * rounds * BATCH
        assert client.writes == total, (client.writes, total)
        assert upstream_transport.writes - before == total  # type: ignore[attr-defined]
        print(
            f"{label:31} min {min(results):.2f}  median {statistics.median(results):.2f} µs of"
            f" Python per request (CPU time, fake transports; hot path {HOT_PATH.describe()})"
        )
        if opcodes:

            def step() -> None:
                for _ in range(BATCH):
                    inbound.data_received(request)
                    conn.data_received(responses[0])
                flush()

            count_opcodes(step, 1000 // BATCH, BATCH)
        if prof:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for i in range(n):
                inbound.data_received(request)
                conn.data_received(responses[i % cycle])
                if i % BATCH == 0:
                    flush()
            pr.disable()
            flush()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        inbound.connection_lost(None)

    uvloop.run(main())


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


# --- full run ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    """Until something accepts on 127.0.0.1:`port` (failing early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    """Stop one process we started, by its pid: `sig`, then SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class Serve:
    """One `miren serve --store memory` of a source tree, pinned to CPU 0 from its start."""

    def __init__(
        self, tree: Path, work: Path, name: str, gc_threshold: int, pure: bool = False
    ) -> None:
        self.tree = tree
        self.name = name
        self.proxy_port, self.admin_port = free_port(), free_port()
        self.proxy, self.admin = f"127.0.0.1:{self.proxy_port}", f"127.0.0.1:{self.admin_port}"
        data_dir = work / f"miren-data-{name}"
        data_dir.mkdir(parents=True, exist_ok=True)
        # The `miren` command of the tree that runs (a baseline may predate the shell package).
        cli = "shell.cli" if (tree / "miren_ingress" / "shell" / "cli.py").exists() else "cli"
        code = f"import gc, sys\nfrom miren_ingress.{cli} import main\n"
        if gc_threshold:
            # To measure a gen0 threshold for `miren serve` (set once start-up is frozen).
            code += (
                "freeze = gc.freeze\n"
                f"gc.freeze = lambda: (freeze(), gc.set_threshold({gc_threshold}, 50, 100))\n"
            )
        launcher = ["-c", code + "sys.exit(main(sys.argv[1:]))"]
        cmd = [
            "taskset", "-c", "0",  # pinned to CPU 0 from its start (compare.py pins it again)
            sys.executable, *launcher, "serve", "--store", "memory",
            "--listen", self.proxy, "--admin-listen", self.admin, "--data-dir", str(data_dir),
            "--set", "log_level=warning",
        ]  # fmt: skip
        # The tree's own packages (a baseline checkout, or this one), not the installed ones.
        env = {**os.environ, "PYTHONPATH": str(tree), "MIREN_ADMIN_TOKEN": TOKEN}
        if pure:  # the hot path from its Python sources, compiled or not (hotpath.py)
            env["MIREN_PURE_PYTHON"] = "1"
        with open(work / f"miren-serve-{name}.log", "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def wait(self) -> None:
        wait_port(self.proxy_port, self.proc)
        wait_port(self.admin_port, self.proc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def full(args: argparse.Namespace) -> int:
    if not COMPARE.exists():
        print(f"{COMPARE} is missing", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    serves = [Serve(REPO, work, "now", args.gc_threshold)]
    if args.baseline is not None:
        # The same deploy on another checkout (e.g. `git worktree add /tmp/base <commit>`):
        # its rows are `route-base` and `preview-base`, interleaved with ours in the same run.
        serves.append(Serve(args.baseline.resolve(), work, "base", args.gc_threshold))
    if args.pure:
        # This tree again, its hot path run from the Python sources: `route-pure`, `preview-pure`.
        serves.append(Serve(REPO, work, "pure", args.gc_threshold, pure=True))
    floor: subprocess.Popen[bytes] | None = None
    floor_port = free_port()
    if args.floor:
        floor_cmd = [
            "taskset", "-c", "0", sys.executable, str(REPO / "benchmarks" / "floor_proxy.py"),
            str(floor_port), "--upstream", BACKEND.removeprefix("http://"),
        ]  # fmt: skip
        floor = subprocess.Popen(floor_cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    out = []
    try:
        for serve in serves:
            serve.wait()
        if floor is not None:
            wait_port(floor_port, floor)
        load = os.getloadavg()
        gc_note = f"; gc threshold {args.gc_threshold}" if args.gc_threshold else ""
        base_note = f"; baseline tree {args.baseline}" if args.baseline is not None else ""
        base_note += "; -pure: MIREN_PURE_PYTHON=1" if args.pure else ""
        header = (
            f"\n## ingress_bench {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"(load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; miren serve pid "
            f"{serves[0].proc.pid}{gc_note}{base_note}; spec {args.spec})\n"
        )
        print(header)
        out.append(header)
        setups = [
            f"{sys.executable} {Path(__file__).resolve()} deploy --admin {s.admin} "
            f"--proxy {s.proxy} --backend {BACKEND} --spec {args.spec}"
            for s in serves
        ]
        for i, path in enumerate(args.paths.split(",")):
            compare = [sys.executable, str(COMPARE)]
            for serve in serves:
                suffix = "" if serve.name == "now" else f"-{serve.name}"
                compare += [
                    "--target", f"route{suffix}={serve.proxy_port}:{ROUTE_HOST}",
                    "--target", f"preview{suffix}={serve.proxy_port}:{PREVIEW_HOST}",
                    "--pin-pid", str(serve.proc.pid),
                ]  # fmt: skip
            compare += [
                "--conns", args.conns, "--path", path, "--seconds", str(args.seconds),
                "--reps", str(args.reps), "--skip", args.skip,
            ]  # fmt: skip
            if floor is not None:
                compare += [
                    "--target",
                    f"floor={floor_port}:{ROUTE_HOST}",
                    "--pin-pid",
                    str(floor.pid),
                ]
            # The first run deploys; later ones reuse the versions (compare.py restarts its
            # backend per run: the pools stay warm, the warm-up requests reopen connections).
            step = " && ".join(setups if i == 0 else [f"{c} --warm-only" for c in setups])
            compare += ["--setup", step]
            res = subprocess.run(compare, cwd=REPO, capture_output=True, text=True, check=False)
            sys.stderr.write(res.stderr)
            table = _foreign_cpu_unknown(res.stdout)
            print(table)
            out.append(table)
            if res.returncode != 0:
                return res.returncode
            for serve in serves:
                if serve.proc.poll() is not None:
                    raise RuntimeError(
                        f"miren serve ({serve.name}) exited: {serve.proc.returncode}"
                    )
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(10)
        for serve in serves:
            serve.stop()
        with open(args.out, "a") as f:
            f.write("".join(out))
    return 0


def _foreign_cpu_unknown(table: str) -> str:
    """compare.py charges every --target's CPU to the first --pin-pid (this tree's miren
    serve): the floor's, the baseline's and the pure rows would show its idle CPU. Blank them."""
    lines = []
    for line in table.splitlines():
        cells = line.split("|")
        if line.startswith(
            (
                "| floor |",
                "| route-base |",
                "| preview-base |",
                "| route-pure |",
                "| preview-pure |",
            )
        ):
            cells[7] = " - "
        lines.append("|".join(cells))
    return "\n".join(lines)


def plot(results: Path, out: Path, before: Path | None) -> None:
    """A bar chart of the ratio to nginx-proxy per path, connection count and target, from the
    tables a full run appended to `results` (the last table per path counts); `before`: the same
    from a run of the previous code, drawn as outlines. Needs matplotlib (not a dependency)."""
    import importlib

    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    def read(path: Path) -> dict[tuple[str, str, int], float]:
        ratios: dict[tuple[str, str, int], float] = {}
        current = ""
        for line in path.read_text().splitlines():
            if line.startswith("proxy on CPU 0"):
                current = line.split("path ", 1)[1].split(",", 1)[0]
            elif line.startswith("| ") and not line.startswith(("| target", "|---")):
                cells = [c.strip() for c in line.strip("|").split("|")]
                ratios[current, cells[0], int(cells[1])] = float(cells[3])
        return ratios

    now = read(results)
    old = read(before) if before is not None else {}
    groups = sorted({(p, c) for p, _, c in now}, key=lambda g: (g[0] != "/", g[1]))
    fig, ax = plt.subplots(figsize=(8.8, 3.6), dpi=100)
    names = [n for n in ("route", "preview", "floor") if any(k[1] == n for k in now)]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [now.get((p, name, c), 0.0) for p, c in groups], width, label=name)
        if old:
            ax.bar(xs, [old.get((p, name, c), 0.0) for p, c in groups], width, fill=False,
                   edgecolor="black", linestyle="--", label="before" if i == 0 else None)  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(0.75, color="red", linewidth=0.8, linestyle=":", label="target 0.75")
    ax.set_xticks(range(len(groups)), [f"{p} ({'2 B' if p == '/' else '1 KiB'})\n{c} conns"
                                       for p, c in groups])  # fmt: skip
    ax.set_ylabel("req/s ratio to nginx-proxy")
    ax.set_title("miren serve and the floor proxy vs nginx-proxy, same run")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    m = sub.add_parser("micro", help="pure-Python cost per request, real stack, fake transports")
    m.add_argument("-n", type=int, default=100_000)
    m.add_argument("--profile", action="store_true")
    m.add_argument("--gc-threshold", type=int, default=0, help="gen0 threshold (0: default)")
    m.add_argument("--opcodes", action="store_true", help="count bytecodes per request")
    m.add_argument(
        "--tuned", action="store_true", help=f"requests_per_instance {CAPACITY} (default: none)"
    )
    d = sub.add_parser("deploy", help="(compare.py --setup) deploy and warm the bench app")
    d.add_argument("--admin", required=True)
    d.add_argument("--proxy", required=True)
    d.add_argument("--backend", default=BACKEND)
    d.add_argument("--warm-only", action="store_true")
    d.add_argument("--spec", choices=["default", "tuned"], default="default")
    pl = sub.add_parser("plot", help="draw ratios from a results file (needs matplotlib)")
    pl.add_argument("results", type=Path)
    pl.add_argument("-o", "--output", type=Path, default=REPO / "benchmarks" / "proxy.png")
    pl.add_argument("--before", type=Path, default=None, help="results of the previous code")
    ap.add_argument("--paths", default="/,/1k", help="comma-separated: '/' (2 bytes), '/1k'")
    ap.add_argument("--conns", default="32,256")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="caddy,aiohttp", help="compare.py anchors to skip")
    ap.add_argument("--work", default="/tmp/miren-ingress-bench")
    ap.add_argument(
        "--gc-threshold", type=int, default=0, help="run miren serve with this gen0 threshold"
    )
    ap.add_argument(
        "--no-floor", dest="floor", action="store_false",
        help="skip the floor target (benchmarks/floor_proxy.py: uvloop + httptools, no features)",
    )  # fmt: skip
    ap.add_argument("--out", default="", help="append the tables here (default: WORK/results.md)")
    ap.add_argument(
        "--baseline", type=Path, default=None,
        help="another source tree (a checkout of an earlier commit) measured in the same run",
    )  # fmt: skip
    ap.add_argument(
        "--pure", action="store_true",
        help="also serve this tree with its hot path from the Python sources (MIREN_PURE_PYTHON)",
    )  # fmt: skip
    ap.add_argument(
        "--spec", choices=["default", "tuned"], default="default",
        help="the deployed version's concurrency: what a user gets (default), or "
        f"requests_per_instance {CAPACITY} (tuned)",
    )  # fmt: skip
    args = ap.parse_args()
    if not args.out:
        args.out = str(Path(args.work) / "results.md")
    if args.cmd == "micro":
        micro(args.n, args.profile, args.gc_threshold, args.opcodes, args.tuned)
        return 0
    if args.cmd == "plot":
        plot(args.results, args.output, args.before)
        return 0
    if args.cmd == "deploy":
        if not args.warm_only:
            deploy(args.admin, args.proxy, args.backend, args.spec)
        else:
            warm(args.proxy)
        return 0
    return full(args)


def warm(proxy: str) -> None:
    for host in (ROUTE_HOST, PREVIEW_HOST):
        status, _, body = _get(proxy, host)
        if status != 200:
            raise RuntimeError(f"{host}: {status} {body[:200]!r}")


if __name__ == "__main__":
    sys.exit(main())
