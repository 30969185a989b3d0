"""HTTPS: miren serve's TLS listener beside nginx terminating TLS, in the same run.

    python benchmarks/tls_bench.py [--seconds 8] [--reps 3] [--issuances 5]

Both on CPU 0, both proxying to one nginx backend (`return 200 "ok"`, CPU 1) with the same
certificate (ECDSA P-256 from a throwaway CA), wrk on CPU 1 at 32 connections. miren serves the
default deploy a user gets (an upstream version, no concurrency setting); wrk sends no SNI (an
IP address), so both answer with their default certificate and route by Host.

- **keep-alive**: HTTPS requests per second, p99, and the server's CPU µs per request;
- **new connections**: every request on a new TLS connection (`Connection: close`): full
  handshakes per second;
- **first request of a name that needs a certificate**: pebble as the ACME server (HTTP-01 on
  miren's plain listener), a new route host per sample, the time from connect to the answer of
  the first HTTPS request (issuance included), then a second request on a new connection.

Runs alternate (nginx, miren, nginx, miren, ...); medians are quoted.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ingress_bench as ib  # noqa: E402  (this directory's sibling module)

from tests.support.clients import free_port  # noqa: E402
from tests.tls.pki import Pebble, TestCA  # noqa: E402

TOKEN = ib.TOKEN  # (the token ingress_bench's admin calls send)
wait_port = ib.wait_port


def admin(port: int, method: str, path: str, body: object | None = None) -> object:
    return ib._call(f"127.0.0.1:{port}", method, path, body)


BACKEND = """worker_processes 1; daemon off; pid {run}/backend.pid; error_log {run}/backend.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 100000000;
  client_body_temp_path {run}/b; proxy_temp_path {run}/p; fastcgi_temp_path {run}/f;
  uwsgi_temp_path {run}/u; scgi_temp_path {run}/s;
  server {{ listen 127.0.0.1:{port} backlog=4096; location = / {{ return 200 "ok"; }} }} }}
"""
TLS_PROXY = """worker_processes 1; daemon off; pid {run}/tls.pid; error_log {run}/tls.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 100000000;
  client_body_temp_path {run}/b2; proxy_temp_path {run}/p2; fastcgi_temp_path {run}/f2;
  uwsgi_temp_path {run}/u2; scgi_temp_path {run}/s2;
  upstream app {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_set_header Host $host; }}
  }} }}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers(master: int) -> list[int]:
    """nginx's worker processes (they do the work; the master only waits)."""
    found = subprocess.run(
        ["pgrep", "-P", str(master)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [int(p) for p in found] or [master]


def wrk(port: int, seconds: int, *extra: str) -> tuple[float, float]:
    """(requests/s, p99 ms) of one wrk run against https://127.0.0.1:port/."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", "--latency",
         "-H", "Host: bench.test", *extra, f"https://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m, out
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return rps, float(m.group(1)) * scale


def start_miren(work: Path, name: str, *settings: str) -> tuple[subprocess.Popen[bytes], int, int]:
    proxy, adm = free_port(), free_port()
    args = [
        "taskset", "-c", "0", sys.executable, "-m", "miren_ingress", "serve", "--store", "memory",
        "--listen", f"127.0.0.1:{proxy}", "--admin-listen", f"127.0.0.1:{adm}",
        "--data-dir", str(work / f"data-{name}"), "--set", "log_level=warning",
    ]  # fmt: skip
    for item in settings:
        args += ["--set", item]
    log = open(work / f"miren-{name}.log", "wb")  # noqa: SIM115  (kept for the process's life)
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MIREN_ADMIN_TOKEN": TOKEN}
    )
    wait_port(adm)
    return proc, proxy, adm


stop = ib.stop_process


def first_requests(work: Path, samples: int) -> tuple[list[float], list[float]]:
    """Seconds to the first HTTPS answer of a new name (issuance included), and of the second
    connection to it."""
    tls_port = free_port()
    first: list[float] = []
    again: list[float] = []
    proxy_port = free_port()
    with Pebble(work / "pebble", http_port=proxy_port, tls_port=tls_port) as pebble:
        args = [
            sys.executable, "-m", "miren_ingress", "serve", "--store", "memory",
            "--listen", f"127.0.0.1:{proxy_port}", "--data-dir", str(work / "data-acme"),
            "--set", f"tls.listen=127.0.0.1:{tls_port}", "--set", "log_level=warning",
            "--set", f"acme.directory={pebble.directory}",
            "--set", f"acme.ca_bundle={pebble.ca.path}",
        ]  # fmt: skip
        adm = free_port()
        args += ["--admin-listen", f"127.0.0.1:{adm}"]
        log = open(work / "miren-acme.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "MIREN_ADMIN_TOKEN": TOKEN},
        )  # fmt: skip
        try:
            wait_port(adm)
            admin(adm, "POST", "/v1/apps", {"name": "web"})
            spec = {"runtime": "upstream", "urls": [f"http://127.0.0.1:{BACKEND_PORT}"]}
            admin(adm, "POST", "/v1/apps/web/deploys", {"spec": spec})
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            for i in range(samples):
                host = f"site{i}.bench.test"
                admin(adm, "PUT", f"/v1/routes/{host}", {"app": "web"})
                time.sleep(0.2)  # (the route reaches the proxy's table through the watch)
                for bucket in (first, again):
                    t0 = time.perf_counter()
                    with (
                        socket.create_connection(("127.0.0.1", tls_port), timeout=60) as raw,
                        ctx.wrap_socket(raw, server_hostname=host) as tls,
                    ):
                        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                        head = tls.recv(4096)
                    bucket.append(time.perf_counter() - t0)
                    assert head.startswith(b"HTTP/1.1 200"), head[:100]
        finally:
            stop(proc)
    return first, again


BACKEND_PORT = free_port()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--issuances", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    ca = TestCA(work / "ca")
    cert, key, _ = ca.issue("bench", "bench.test", ip=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (work / "backend.conf").write_text(BACKEND.format(run=work, port=BACKEND_PORT))
        procs.append(subprocess.Popen(
            ["taskset", "-c", "1", "nginx", "-c", str(work / "backend.conf"), "-p", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        wait_port(BACKEND_PORT)
        nginx_port = free_port()
        (work / "tls.conf").write_text(
            TLS_PROXY.format(run=work, port=nginx_port, backend=BACKEND_PORT, cert=cert, key=key)
        )
        nginx = subprocess.Popen(
            ["taskset", "-c", "0", "nginx", "-c", str(work / "tls.conf"), "-p", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(nginx)
        wait_port(nginx_port)
        tls_port = free_port()
        miren, _, adm = start_miren(
            work, "bench", f"tls.listen=127.0.0.1:{tls_port}", f"tls.certificates={cert}:{key}"
        )
        procs.append(miren)
        wait_port(tls_port)
        admin(adm, "POST", "/v1/apps", {"name": "bench"})
        admin(adm, "PUT", "/v1/routes/bench.test", {"app": "bench"})
        spec = {"runtime": "upstream", "urls": [f"http://127.0.0.1:{BACKEND_PORT}"]}
        admin(adm, "POST", "/v1/apps/bench/deploys", {"spec": spec})
        time.sleep(0.5)
        wrk(tls_port, 2)  # warm both
        wrk(nginx_port, 2)
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for mode, extra in (("keep-alive", ()), ("new connections", ("-H", "Connection: close"))):
            for _ in range(args.reps):
                for name, port, proc in (("nginx", nginx_port, nginx), ("miren", tls_port, miren)):
                    pids = workers(proc.pid) if name == "nginx" else [proc.pid]
                    cpu0 = sum(cpu_seconds(p) for p in pids)
                    rps, p99 = wrk(port, args.seconds, *extra)
                    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
                    rows.setdefault(f"{mode} {name}", []).append(
                        (rps, p99, cpu / (rps * args.seconds) * 1e6)
                    )
        print(f"HTTPS, 32 connections, {args.reps} runs of {args.seconds} s each, medians")
        print("| mode | server | req/s | ratio to nginx | p99 ms | CPU µs/req |")
        print("|---|---|---:|---:|---:|---:|")
        for mode in ("keep-alive", "new connections"):
            base = statistics.median(r[0] for r in rows[f"{mode} nginx"])
            for name in ("nginx", "miren"):
                runs = rows[f"{mode} {name}"]
                rps = statistics.median(r[0] for r in runs)
                print(
                    f"| {mode} | {name} | {rps:,.0f} | {rps / base:.2f} "
                    f"| {statistics.median(r[1] for r in runs):.2f} "
                    f"| {statistics.median(r[2] for r in runs):.1f} |"
                )
        stop(miren)
        procs.remove(miren)
        if args.issuances:
            first, again = first_requests(work, args.issuances)
            print(
                f"\nfirst HTTPS request of a new name (ACME issuance by pebble, HTTP-01), "
                f"{len(first)} names: median {statistics.median(first) * 1e3:.0f} ms "
                f"(max {max(first) * 1e3:.0f}); the next connection: median "
                f"{statistics.median(again) * 1e3:.1f} ms"
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if proc.args[3:4] == ["nginx"] else signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
