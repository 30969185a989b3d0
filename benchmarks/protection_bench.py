"""What protection costs a request: a protected host with a valid cookie beside an open one.

    python benchmarks/serve_ab.py backend start    # the nginx backend (CPU 1)
    python benchmarks/protection_bench.py [--seconds 5] [--reps 3]

One `miren serve` (memory store, CPU 0), two apps on the same upstream (the backend), the
default deploy: `open.test` unprotected, `locked.test` protected (`mode all`) and requested with
the cookie its bypass token earned. wrk (CPU 1, 32 connections, keep-alive) alternates between
them; the table gives medians and the ratio. A keep-alive connection proves itself once, so the
steady cost is the check of the connection's cached proof and the stripping of the cookie.
"""

from __future__ import annotations

import argparse
import http.client
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ingress_bench as ib  # noqa: E402
import serve_ab  # noqa: E402

BYPASS = "bench-bypass-token"


def wrk(proxy: str, host: str, seconds: int, *headers: str) -> float:
    args = ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", "-H", f"Host: {host}"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(
        [*args, f"http://{proxy}/"], capture_output=True, text=True, check=True
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{host}: non-2xx answers\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    backend = f"http://127.0.0.1:{serve_ab.BACKEND_PORT}"
    with tempfile.TemporaryDirectory() as work:
        serve = ib.Serve(HERE.parent, Path(work), "protect", 0)
        try:
            serve.wait()
            for app in ("open", "locked"):
                ib._call(serve.admin, "POST", "/v1/apps", {"name": app})
                ib._call(serve.admin, "PUT", f"/v1/routes/{app}.test", {"app": app})
                spec = {"runtime": "upstream", "urls": [backend]}
                ib._call(serve.admin, "POST", f"/v1/apps/{app}/deploys", {"spec": spec})
            ib._call(serve.admin, "PUT", "/v1/apps/locked/protection",
                     {"mode": "all", "bypass_token": BYPASS})  # fmt: skip
            time.sleep(0.5)
            status, _, _ = ib._get(serve.proxy, "locked.test")
            assert status == 401, status

            conn = http.client.HTTPConnection(serve.proxy)
            conn.request("GET", "/", headers={"Host": "locked.test", "X-Miren-Bypass": BYPASS})
            reply = conn.getresponse()
            reply.read()
            cookie = (reply.getheader("Set-Cookie") or "").split(";", 1)[0]
            assert reply.status == 200 and cookie, (reply.status, cookie)
            wrk(serve.proxy, "open.test", 2)
            wrk(serve.proxy, "locked.test", 2, f"Cookie: {cookie}")
            runs: dict[str, list[float]] = {"open": [], "locked": []}
            for _ in range(args.reps):
                runs["open"].append(wrk(serve.proxy, "open.test", args.seconds))
                runs["locked"].append(
                    wrk(serve.proxy, "locked.test", args.seconds, f"Cookie: {cookie}")
                )
        finally:
            serve.stop()
    base = statistics.median(runs["open"])
    print(f"default deploy, 32 connections, {args.reps} runs of {args.seconds} s, medians")
    print("| host | req/s | ratio |")
    print("|---|---:|---:|")
    for name in ("open", "locked"):
        rps = statistics.median(runs[name])
        print(f"| {name} | {rps:,.0f} | {rps / base:.3f} |")


if __name__ == "__main__":
    main()
