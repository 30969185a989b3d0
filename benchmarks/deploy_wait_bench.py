"""What `deploy --wait` adds to the sandbox's own boot, on the embedded store.

    python benchmarks/deploy_wait_bench.py [--deploys 30]

One `miren serve --store embedded` (a fresh data dir), one app with a route. Each round deploys
the echo app three ways on one keep-alive connection to the admin API, in turn:

- `plain`: a deploy without wait (the version is stored; nothing boots): the baseline;
- `wait`: the same with `"wait": true`: stage, boot one sandbox, wait for its health check,
  activate;
- `boot`: the sandbox's own boot in that same deploy, from the activator's cold-start histogram
  (spawn to health check passed): the part `--wait` cannot avoid.

`overhead` = wait - boot, per deploy: the staging write, pool creation, the activation write and
the answer. The table gives the median, p90 and max of each in ms, and the CLI's
`miren deploy --wait` once per round as a user runs it (its interpreter start included).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.clients import metric
from tests.support.edge import ECHO_CMD, REPO, MirenServer, base_env

APP = "bench"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def call(
    conn: http.client.HTTPConnection, token: str, method: str, path: str, body: object = None
) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, json.loads(raw) if raw else None


def boot_seconds(server: MirenServer) -> float:
    """The sum of the cold-start histogram: the sandboxes' own boot times so far."""
    text = server.admin("GET", "/metrics").body.decode()
    return metric(text, "miren_activator_cold_start_duration_seconds_sum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deploys", type=int, default=30)
    args = ap.parse_args()
    spec = {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO)}
    plain: list[float] = []
    wait: list[float] = []
    boot: list[float] = []
    cli: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, MirenServer(Path(tmp), store="embedded") as server:
        token = server.server_token()
        conn = http.client.HTTPConnection("127.0.0.1", server.admin_port, timeout=120)
        assert call(conn, token, "POST", "/v1/apps", {"name": APP})[0] == 201
        assert call(conn, token, "PUT", f"/v1/routes/{APP}.test", {"app": APP})[0] == 201
        env = {**base_env(), "MIREN_SERVER": server.admin_url, "MIREN_ADMIN_TOKEN": token}
        for _ in range(args.deploys):
            t0 = time.perf_counter()
            status, _ = call(conn, token, "POST", f"/v1/apps/{APP}/deploys", {"spec": spec})
            plain.append(time.perf_counter() - t0)
            assert status == 201, status
            before = boot_seconds(server)
            t0 = time.perf_counter()
            status, answer = call(
                conn, token, "POST", f"/v1/apps/{APP}/deploys", {"spec": spec, "wait": True}
            )
            wait.append(time.perf_counter() - t0)
            assert status == 201, answer
            boot.append(boot_seconds(server) - before)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "miren_ingress", "deploy", "--app", APP, "--wait",
                 "--", *ECHO_CMD],
                env=env, cwd=REPO, check=True, capture_output=True,
            )  # fmt: skip
            cli.append(time.perf_counter() - t0)
    overhead = [w - b for w, b in zip(wait, boot, strict=True)]
    print(f"{args.deploys} deploys of each kind, embedded store, one connection")
    print("| figure | median ms | p90 ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, values in (
        ("deploy, no wait (baseline)", plain),
        ("deploy with wait", wait),
        ("the sandbox's own boot", boot),
        ("wait overhead (wait - boot)", overhead),
        ("`miren deploy --wait` (CLI, whole process)", cli),
    ):
        print(
            f"| {name} | {statistics.median(values) * 1e3:.1f} | {pct(values, 90) * 1e3:.1f} "
            f"| {max(values) * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
