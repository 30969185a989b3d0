#!/usr/bin/env python3
"""Time to the first 502 for a dead upstream, p50/p99, against nginx in the same run.

    python benchmarks/dead_upstream_bench.py                  # 50 trials, 20 repeats each
    python benchmarks/dead_upstream_bench.py --trials 100 --repeats 20

What runs: `miren serve --store memory --set sandbox.isolation=none` and nginx
(`/usr/sbin/nginx`, one worker, `proxy_pass` to a port nobody listens on; its config, pid file
and logs in a temp dir) both pinned to CPU 0; this script, the client, on CPU 1.

Each trial: a fresh app `dead-N` with route `dead-N.test` and an active version
`{"runtime": "upstream", "urls": ["http://127.0.0.1:<port>"]}` on a port checked to refuse
connections. The route table follows the store through a watch, so the script polls the host
(every 1 ms) until the answer is no longer 404: that first non-404 answer is the timed *first
request* (cold: the pool is created, the boot probe is refused, the instance is marked DOWN,
502). Then `--repeats` more requests (the instance is known DOWN: 502 at once), `--repeats`
requests to an unknown host (miren's own 404: the floor of a locally answered request), and
`--repeats` + 1 requests to nginx (its 502 for the dead port), all in the same trial. The app is
deleted at the end of the trial (and polled until its host is 404 again).

Every request is timed on a new connection: from before `connect` to the last byte of the
response (Content-Length), `Connection: close`, the same for both proxies. The table has p50,
p99 and max; every miren answer must be a 502 (not a 504: the request timeout is 60 s, the
connect timeout 5 s), and the slowest is compared with the 60 s request timeout.

Stops every process it starts by pid (in a finally) and removes its temp dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingress_bench as ib

REPO = Path(__file__).resolve().parents[1]
TOKEN = ib.TOKEN  # (the token ingress_bench's admin calls send)
free_port, wait_port, admin_call = ib.free_port, ib.wait_port, ib._call
REQUEST_TIMEOUT = 60.0  # ingress.request_timeout's default: a dead upstream must be far below
POLL = 0.001  # between polls while the route table has not caught up yet


def dead_port() -> int:
    """A port on which a connect is refused (nobody listens) right now."""
    for _ in range(100):
        port = free_port()
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except ConnectionRefusedError:
            return port
    raise RuntimeError("no dead port found")


def timed_get(port: int, host: str) -> tuple[int, float]:
    """(status, seconds from before connect to the response's last byte), a new connection."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 10) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise RuntimeError(f"{host}: connection closed before a response head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        elapsed = time.perf_counter() - t0
    return int(head.split(b" ", 2)[1]), elapsed


stop = ib.stop_process


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx.err crit;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {run}/tmp-body;
    proxy_temp_path       {run}/tmp-proxy;
    fastcgi_temp_path     {run}/tmp-fcgi;
    uwsgi_temp_path       {run}/tmp-uwsgi;
    scgi_temp_path        {run}/tmp-scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{dead}; }}
    }}
}}
"""


def start_nginx(run: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = run / "nginx.conf"
    conf.write_text(NGINX_CONF.format(run=run, port=port, dead=dead_port()))
    cmd = ["taskset", "-c", "0", "/usr/sbin/nginx", "-c", str(conf), "-p", str(run)]
    proc = subprocess.Popen(cmd)  # daemon off: this pid is nginx's master
    wait_port(port, proc)
    pid_file = int((run / "nginx.pid").read_text())
    if pid_file != proc.pid:
        raise RuntimeError(f"nginx pid file says {pid_file}, started {proc.pid}")
    return proc, port


def start_serve(run: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    proxy_port, admin_port = free_port(), free_port()
    admin = f"127.0.0.1:{admin_port}"
    cmd = [
        "taskset", "-c", "0", sys.executable, "-m", "miren_ingress", "serve",
        "--store", "memory", "--listen", f"127.0.0.1:{proxy_port}", "--admin-listen", admin,
        "--data-dir", str(run / "miren-data"), "--set", "sandbox.isolation=none",
        "--set", "log_level=warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIREN_ADMIN_TOKEN": TOKEN}
    with open(run / "miren-serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_port(proxy_port, proc)
    wait_port(admin_port, proc)
    return proc, proxy_port, admin


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def trial(
    i: int, admin: str, proxy: int, nginx: int, repeats: int, out: dict[str, list[Any]]
) -> None:
    app, host = f"dead-{i}", f"dead-{i}.test"
    spec = {"runtime": "upstream", "urls": [f"http://127.0.0.1:{dead_port()}"]}
    admin_call(admin, "POST", "/v1/apps", {"name": app})
    admin_call(admin, "PUT", f"/v1/routes/{host}", {"app": app})
    admin_call(admin, "POST", f"/v1/apps/{app}/deploys", {"spec": spec})
    polls, deadline = 0, time.monotonic() + 30
    while True:  # until the route table routes it: that answer is the first request
        status, elapsed = timed_get(proxy, host)
        if status != 404:
            break
        polls += 1
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host} still 404 after 30 s")
        time.sleep(POLL)
    out["first"].append((status, elapsed))
    out["polls"].append(polls)
    for _ in range(repeats):
        out["repeat"].append(timed_get(proxy, host))
    for _ in range(repeats):
        out["unknown"].append(timed_get(proxy, f"nope-{i}.test"))
    for _ in range(repeats + 1):
        out["nginx"].append(timed_get(nginx, "localhost"))
    admin_call(admin, "DELETE", f"/v1/apps/{app}")
    deadline = time.monotonic() + 30
    while timed_get(proxy, host)[0] != 404:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host} still routed 30 s after its app was deleted")
        time.sleep(0.01)


def report(args: argparse.Namespace, out: dict[str, list[Any]]) -> bool:
    rows = [
        ("miren: first request (cold: pool, boot probe refused, 502)", "first", 502),
        (f"miren: the next {args.repeats} requests (instance known DOWN)", "repeat", 502),
        ("miren: unknown host, its own 404 (floor)", "unknown", 404),
        ("nginx: proxy_pass to the dead port (baseline)", "nginx", 502),
    ]
    print(
        f"\nmiren serve and nginx on CPU 0, client on CPU 1, {args.trials} trials, a new "
        "connection per request (connect to last byte)\n"
    )
    print("| measurement | n | p50 ms | p99 ms | max ms | statuses |")
    print("|---|---:|---:|---:|---:|---|")
    ok = True
    for label, key, expected in rows:
        samples = out[key]
        times = [t for _, t in samples]
        statuses: dict[int, int] = {}
        for status, _ in samples:
            statuses[status] = statuses.get(status, 0) + 1
        ok &= set(statuses) == {expected}
        shown = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))
        print(
            f"| {label} | {len(times)} | {statistics.median(times) * 1e3:.3f} | "
            f"{pct(times, 99) * 1e3:.3f} | {max(times) * 1e3:.3f} | {shown} |"
        )
    first = statistics.median(t for _, t in out["first"])
    repeat = statistics.median(t for _, t in out["repeat"])
    base = statistics.median(t for _, t in out["nginx"])
    slowest = max(t for key in ("first", "repeat") for _, t in out[key])
    miren = [s for key in ("first", "repeat") for s, _ in out[key]]
    print("\n| vs nginx (p50) | |\n|---|---:|")
    print(f"| miren first 502 / nginx 502 | {first / base:.2f}x |")
    print(f"| miren repeated 502 / nginx 502 | {repeat / base:.2f}x |")
    print(
        f"| every miren answer a 502 (none 504) | {'yes' if set(miren) == {502} else 'NO'} "
        f"({miren.count(502)} of {len(miren)}) |"
    )
    print(
        f"| slowest miren 502 vs the {REQUEST_TIMEOUT:.0f} s request timeout | "
        f"{slowest * 1e3:.1f} ms ({slowest / REQUEST_TIMEOUT:.1e} of it) |"
    )
    print(
        f"| 404 polls before the route table routed a new app (median, max) | "
        f"{statistics.median(out['polls']):.0f}, {max(out['polls'])} |"
    )
    return ok and slowest < REQUEST_TIMEOUT / 10


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=50, help="fresh apps on dead upstreams")
    ap.add_argument("--repeats", type=int, default=20, help="requests after the first, per trial")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the client, away from the proxies on CPU 0
    run = Path(tempfile.mkdtemp(prefix="miren-dead-upstream-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        serve, proxy, admin = start_serve(run)
        procs.append(serve)
        nginx, nginx_port = start_nginx(run)
        procs.append(nginx)
        for _ in range(20):  # warm-up: both proxies, connections and their first answers
            timed_get(proxy, "warm-up.test")
            timed_get(nginx_port, "localhost")
        load = os.getloadavg()
        print(
            f"dead_upstream_bench {time.strftime('%Y-%m-%d %H:%M:%S')}: load {load[0]:.2f} "
            f"{load[1]:.2f} {load[2]:.2f}; miren serve pid {serve.pid}, nginx pid {nginx.pid}",
            file=sys.stderr,
        )
        out: dict[str, list[Any]] = {k: [] for k in ("first", "repeat", "unknown", "nginx")}
        out["polls"] = []
        for i in range(args.trials):
            trial(i, admin, proxy, nginx_port, args.repeats, out)
        ok = report(args, out)
        if serve.poll() is not None:
            raise RuntimeError(f"miren serve exited: {serve.returncode}")
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
