#!/usr/bin/env python3
"""One `miren serve` of a source tree through a fixed number of requests: a whole-process
figure for interleaved before/after comparisons of two checkouts.

    python benchmarks/serve_ab.py backend start          # nginx on 127.0.0.1:18080, CPU 1
    python benchmarks/serve_ab.py run --tree /tmp/base   # one run of that checkout
    python benchmarks/serve_ab.py run --tree .           # ... and of this one
    python benchmarks/serve_ab.py backend stop

A run starts `miren serve --store memory` of `--tree` (its own packages: PYTHONPATH) pinned to
CPU 0, deploys the default spec a user gets (an upstream version on the backend, no
concurrency setting, as `ingress_bench.py deploy --spec default`), warms it, then has wrk
(pinned to CPU 1, `--conns` connections) send `--requests` requests to `--host` (a Lua script
ends wrk when that many 200s came back; any other status fails the run) and stops the server. Everything it starts is its
child and is reaped, so the run's whole-process CPU counts miren serve and wrk, and its wall
time is start-up plus `requests` / throughput: run two trees in turn, A B A B, and compare
the two pair by pair. Each run also prints one line (append with `--out`): req/s and miren
serve's CPU µs per request (utime + stime from /proc over the wrk run), the
figures to quote. (wrk's own summary, latencies included, is lost with its early exit: use
ingress_bench.py for latency.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ingress_bench as ib  # noqa: E402  (this directory's sibling module)

RUN_DIR = Path(tempfile.gettempdir()) / "miren-serve-ab"
BACKEND_PORT = 18080
NGINX_CONF = """worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    client_body_temp_path {run}/b; proxy_temp_path {run}/p; fastcgi_temp_path {run}/f;
    uwsgi_temp_path {run}/u; scgi_temp_path {run}/s;
    server {{ listen 127.0.0.1:{port} backlog=4096; location = / {{ return 200 "ok"; }} }}
}}
"""
# wrk runs for a duration; this ends it at a count (exit 3 on any answer but 200).
STOP_AFTER = """local n = 0
local limit = tonumber(os.getenv("SERVE_AB_REQUESTS"))
response = function(status, headers, body)
  if status ~= 200 then os.exit(3) end
  n = n + 1
  if n >= limit then os.exit(0) end
end
"""


def backend(action: str) -> int:
    pid_file = RUN_DIR / "nginx.pid"
    if action == "stop":
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        return 0
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    conf = RUN_DIR / "nginx.conf"
    conf.write_text(NGINX_CONF.format(run=RUN_DIR, port=BACKEND_PORT))
    subprocess.Popen(
        ["taskset", "-c", "1", "nginx", "-c", str(conf), "-p", str(RUN_DIR)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # (it outlives this command: `backend stop` ends it)
    )
    ib.wait_port(BACKEND_PORT)
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    with tempfile.TemporaryDirectory(prefix="serve-ab-") as work:
        script = Path(work) / "stop.lua"
        script.write_text(STOP_AFTER)
        serve = ib.Serve(tree, Path(work), "ab", 0)
        try:
            serve.wait()
            ib.deploy(serve.admin, serve.proxy, f"http://127.0.0.1:{BACKEND_PORT}", "default")
            cpu0 = _cpu_seconds(serve.proc.pid)
            t0 = time.monotonic()
            wrk = [
                "taskset", "-c", "1", "wrk", "-t1", f"-c{args.conns}", "-d300s",
                "-s", str(script), "-H", f"Host: {args.host}", f"http://{serve.proxy}/",
            ]  # fmt: skip
            subprocess.run(
                wrk,
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "SERVE_AB_REQUESTS": str(args.requests)},
            )
            seconds = time.monotonic() - t0
            cpu = _cpu_seconds(serve.proc.pid) - cpu0
        finally:
            serve.stop()
    done = args.requests
    line = (
        f"{tree} {args.host}: {done / seconds:,.0f} req/s, "
        f"miren serve {cpu / done * 1e6:.1f} µs/req ({done} requests in {seconds:.2f} s)"
    )
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend", help="start or stop the nginx backend (127.0.0.1:18080)")
    b.add_argument("action", choices=["start", "stop"])
    r = sub.add_parser("run", help="one run of a checkout")
    r.add_argument("--tree", default=str(HERE.parent), help="the checkout to serve")
    r.add_argument("--requests", type=int, default=300_000)
    r.add_argument("--conns", type=int, default=32)
    r.add_argument("--host", default=ib.ROUTE_HOST)
    r.add_argument("--out", help="append the run's line to this file")
    args = ap.parse_args()
    if args.cmd == "backend":
        return backend(args.action)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
