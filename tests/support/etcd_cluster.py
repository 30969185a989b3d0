"""A real etcd cluster for the multi-node tests: N members of the suite's etcd binary on free
loopback TCP ports (client and peer), each in its own directory and process group.

    with EtcdCluster(tmp_path, size=3) as cluster:
        store = f"etcd://{cluster.endpoints}/prefix"
        cluster.kill(0)  # SIGKILL one member

Every member is SIGKILLed and reaped at exit, also when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.etcd_fixtures import suite_etcd_binary
from tests.support.clients import free_port
from tests.support.poll import eventually_sync

START_TIMEOUT = 20.0


class EtcdCluster:
    def __init__(self, workdir: Path, size: int = 3, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.size = size
        self.extra = extra  # more etcd flags, for every member
        self.client_ports = [free_port() for _ in range(size)]
        self.peer_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size

    def __repr__(self) -> str:
        alive = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        return f"<EtcdCluster {self.endpoints} alive={alive}>"

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def _argv(self, i: int) -> list[str]:
        peers = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(self.peer_ports))
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return [
            str(suite_etcd_binary()),
            f"--name=m{i}",
            f"--data-dir={self.workdir / f'm{i}'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={peers}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=miren-test",
            "--heartbeat-interval=100",  # (etcd's defaults: a busy machine holds no false elections)
            "--election-timeout=1000",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
            *self.extra,
        ]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self._spawn(i)
        for i in range(self.size):
            self.wait_healthy(i)

    def _spawn(self, i: int) -> None:
        with open(self.workdir / f"m{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                self._argv(i), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, i: int) -> None:
        eventually_sync(lambda: self.healthy(i), START_TIMEOUT, f"etcd member m{i} to be healthy")

    def restart(self, i: int) -> None:
        """SIGKILL member i and start it again on its data (and ports)."""
        self.kill(i)
        self._spawn(i)

    def post(self, i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A call to member i's JSON gateway (`/v3/...`)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.client_ports[i]}{path}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5.0) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    def healthy(self, i: int) -> bool:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            raise AssertionError(f"etcd member m{i} is not running: {self.log_tail(i)}")
        try:
            url = f"http://127.0.0.1:{self.client_ports[i]}/health"
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def log_tail(self, i: int, lines: int = 20) -> str:
        path = self.workdir / f"m{i}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def leader(self) -> int | None:
        """The index of the member that leads now (asked of each member's status); None
        while none does (an election)."""
        for i, port in enumerate(self.client_ports):
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                continue
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v3/maintenance/status", data=b"{}", method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=2.0) as resp:
                    status = json.loads(resp.read())
            except (OSError, ValueError):
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return i
        return None

    def wait_leader(self, timeout: float = 20.0) -> int:
        """The leader's index, once there is one."""
        found: int = eventually_sync(
            lambda: (i := self.leader()) is not None and i + 1, timeout, "an etcd leader"
        )
        return found - 1

    def enable_auth(self, password: str) -> None:
        """etcd authentication on, with the user `root` (role root) and `password`."""
        self.post(0, "/v3/auth/role/add", {"name": "root"})
        self.post(0, "/v3/auth/user/add", {"name": "root", "password": password})
        self.post(0, "/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.post(0, "/v3/auth/enable", {})

    def kill(self, i: int) -> None:
        """SIGKILL member i (its group) and reap it."""
        proc = self.procs[i]
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def stop(self) -> None:
        for i in range(self.size):
            self.kill(i)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
