"""SIGTERM during load on the embedded store: the listener closes, the requests in flight finish
within the grace, then the sandboxes and the embedded etcd stop and `miren serve` exits 0 with no
process left behind; the steps stop in the reverse order of their start."""

from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.test_startup import STEPS, steps_logged
from tests.support.clients import Response
from tests.support.edge import ECHO_CMD, MirenServer
from tests.support.poll import eventually_sync
from tests.support.procs import is_alive

GRACE = 5.0
SLOW_MS = 2000
IN_FLIGHT = 5
HOST = "load.example.com"


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def test_sigterm_drains_in_flight_requests_and_stops_everything(tmp_path: Path) -> None:
    edge = MirenServer(
        tmp_path,
        store="embedded",
        shutdown_grace=GRACE,
        settings={"activator.stop_grace": "2s"},
    )
    with edge, ThreadPoolExecutor(IN_FLIGHT) as pool:
        edge.cli("app", "create", "load")
        edge.cli("route", "set", HOST, "--app", "load")
        edge.cli("deploy", "--app", "load", "--", *ECHO_CMD)
        version = edge.get_routed(HOST).json()["version"]  # boots the sandbox
        sandboxes = edge.record_sandboxes()
        assert len(sandboxes) == 1, sandboxes
        edge.observe()
        etcd = edge.etcd_pids()
        assert len(etcd) == 1, edge.tracked()

        futures = [
            pool.submit(edge.get, HOST, f"/slow?ms={SLOW_MS}", timeout=GRACE + 10)
            for _ in range(IN_FLIGHT)
        ]
        eventually_sync(
            lambda: edge.metric("miren_ingress_in_flight_requests") == IN_FLIGHT,
            5,
            f"{IN_FLIGHT} requests in flight",
        )
        sent = time.monotonic()
        edge.send_signal(signal.SIGTERM)

        # New connections are refused while the old requests are still being served.
        eventually_sync(
            lambda: refuses_connections(edge.proxy_port), 3, "the proxy to stop accepting"
        )
        assert not all(f.done() for f in futures), "the slow requests finished before the close"

        replies: list[Response] = [f.result() for f in futures]
        assert [r.status for r in replies] == [200] * IN_FLIGHT, replies
        assert {r.json()["version"] for r in replies} == {version}

        rc = edge.wait_exit(timeout=GRACE + 10)
        took = time.monotonic() - sent
        assert rc == 0, edge.log_tail()
        assert took < GRACE + 5, f"exit took {took:.1f}s"
        # Sandboxes and etcd stopped with it (the context exit checks every tracked process too).
        eventually_sync(
            lambda: not any(map(is_alive, edge.tracked())), 5, "sandbox and etcd to stop"
        )
        assert "stopped" in edge.log_tail(5)


def test_sigterm_stops_the_steps_in_reverse_order_of_start(tmp_path: Path) -> None:
    """The shutdown is the start-up stack unwinding: admin listener first, the embedded etcd
    (inside the store step) last, after the sandboxes (inside the activator step)."""
    edge = MirenServer(
        tmp_path,
        store="embedded",
        shutdown_grace=1.0,
        settings={"activator.stop_grace": "2s", "log_level": "debug"},
    )
    with edge:
        edge.cli("app", "create", "order")
        edge.cli("route", "set", "order.example.com", "--app", "order")
        edge.cli("deploy", "--app", "order", "--", *ECHO_CMD)
        assert edge.get_routed("order.example.com").status == 200  # a sandbox runs
        (sandbox,) = edge.record_sandboxes()
        edge.observe()
        edge.send_signal(signal.SIGTERM)
        assert edge.wait_exit(timeout=20) == 0, edge.log_tail()
    log = edge.log_path.read_text()
    assert steps_logged(log, "started") == STEPS, log
    assert steps_logged(log, "stopped") == STEPS[::-1], log
    lines = log.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.endswith("miren: stopping activator"))
    end = next(i for i, line in enumerate(lines) if line.endswith("miren: stopped activator"))
    sandbox_stops = [
        i
        for i, line in enumerate(lines)
        if "miren.activator: stopping <Sandbox" in line and f" pid={sandbox} " in line
    ]
    assert len(sandbox_stops) == 1 and begin < sandbox_stops[0] < end, log
    etcd_log = (edge.data_dir / "etcd" / "etcd.log").read_text()
    assert "received signal; shutting down" in etcd_log and "closed etcd server" in etcd_log
    assert not any(map(is_alive, edge.tracked())), edge.tracked()
