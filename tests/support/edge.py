"""The end-to-end harness: a whole edge on loopback ports, driven through its sockets, and
nothing it started left behind.

Two ways to run the edge, one way to talk to it
-----------------------------------------------
- `MirenServer`: a real `python -m miren_ingress serve` subprocess on free ports, its state in
  the test's tmp dir, its output in `<dir>/serve.log`. `with server:` in a sync test,
  `async with server:` in an async one (start and stop then run in a thread). Restartable on the
  same ports and data dir. Its sync calls (`admin`, `get`, `cli`, `metric`) use `http.client`
  and a `miren` CLI subprocess.
- `running_edge(tmp_path, **settings)`: `miren_ingress.shell.serve.Edge` in a task of the test's
  event loop (memory store unless told otherwise), yielding an `InProcessEdge`: the store for
  set-up without HTTP (`app`, `route`, `deploy`, with a clock for past deploys), the store's
  operation counts, the route table.

Both are reached the same way from async code: an `EdgeClient` (`server.client`, or the
`InProcessEdge` itself) with `admin` (the bearer token added), `get` (a `Host` on the proxy
listener), `wait_status` and `served_by` (polls under a deadline), `metrics`, `create_app` and
`post_deploy` through the admin API, and the sandbox records (`sandbox_record`, and
`kill_sandbox`, the fault the reliability tests inject). Answers are `clients.Response`.

Process accounting
------------------
Leaving the block stops the edge, also when the block raised (then the end of the log is
printed, and pytest shows it with the failure). Every process the edge started is accounted for
by (pid, start time) in a `procs.ProcessAccount`:
- `MirenServer`: a watcher thread scans `/proc` every 100 ms for the server's descendants
  (sandboxes and etcd run in their own sessions but are still its children) and any process
  whose command line names its embedded-etcd directory (found even if re-parented); before
  stopping, the sandboxes the admin API reports are recorded too. `stop()` sends SIGTERM,
  waits for the exit within `ingress.shutdown_grace` plus a margin, SIGKILLs if it must.
- `InProcessEdge`: the sandboxes are children of the test process itself: the watcher records
  every new descendant carrying a `MIREN_SANDBOX` variable. A shutdown that overruns its
  deadline cancels the edge's task.
Then every recorded process must be gone within a deadline; a survivor is SIGKILLed by pid, so
no test leaves a process behind, and reported as a failure (unless the block already failed:
its own error matters more).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from miren_ingress.shell.config import load_config
from miren_ingress.shell.serve import Edge
from miren_store.deploy.deploys import DeployRequest, EphemeralRequest, deploy
from miren_store.entities import App, Concurrency, HttpRoute, Runtime, Sandbox, VersionSpec
from miren_store.store import Store
from tests.support.apps import ECHO, REPO, SANDBOX_PYTHON
from tests.support.clients import Conn, Response, free_port, get, http_call, metric
from tests.support.poll import eventually, eventually_sync
from tests.support.procs import (
    ProcessAccount,
    Tracked,
    descendants,
    environ,
    pids_naming,
    process_table,
)

ECHO_APP = ECHO
# The sandbox command of the README walkthrough (`python3 tests/apps/echo_server.py`), pinned to
# the sandbox interpreter and without `site` (the echo server then listens ~20 ms after exec).
ECHO_CMD = (SANDBOX_PYTHON, "-S", str(ECHO_APP))
# An upstream nobody listens on: versions that are deployed but never requested.
DEAD_UPSTREAM = "http://127.0.0.1:9"

TOKEN = "e2e-token-4f1c"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0  # the in-process edge's whole shutdown
STOP_MARGIN = 10.0  # beyond the configured shutdown grace
WATCH_INTERVAL = 0.1
POLL_INTERVAL = 0.02
LOG_TAIL_LINES = 80


class _ServerToken:
    def __repr__(self) -> str:
        return "USE_SERVER_TOKEN"


USE_SERVER_TOKEN: Any = _ServerToken()  # "the token the edge was started with"


# -- version specs ------------------------------------------------------------------------------


def echo_spec(
    env: Mapping[str, str] | None = None,
    *,
    command: Iterable[str] = ECHO_CMD,
    health_path: str | None = "/health",
    requests_per_instance: int = 10,
) -> VersionSpec:
    """A process version running tests/apps/echo_server.py (for deploys through the store)."""
    return VersionSpec(
        runtime=Runtime.PROCESS,
        command=tuple(command),
        env=dict(env or {}),
        cwd=str(REPO),
        health_path=health_path,
        boot_timeout=timedelta(seconds=20),
        concurrency=Concurrency(requests_per_instance=requests_per_instance),
    )


def echo_spec_data(
    *, env: Mapping[str, str] | None = None, health_path: str = "/health", **concurrency: Any
) -> dict[str, Any]:
    """The same as the admin API's JSON (for deploys through `post_deploy` or the CLI)."""
    spec: dict[str, Any] = {
        "runtime": "process",
        "command": list(ECHO_CMD),
        "cwd": str(REPO),
        "health_path": health_path,
    }
    if env:
        spec["env"] = dict(env)
    if concurrency:
        spec["concurrency"] = concurrency
    return spec


def upstream_spec(url: str) -> VersionSpec:
    # Health by TCP connect: a recording upstream then records only what the proxy forwarded.
    return VersionSpec(runtime=Runtime.UPSTREAM, urls=(url,), health_path=None)


# -- async calls to a running edge ---------------------------------------------------------------


def _pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


class EdgeClient(abc.ABC):
    """Async calls over real sockets to a running edge: its admin API (with the bearer token)
    and its proxy listener (for a `Host`)."""

    @property
    @abc.abstractmethod
    def proxy_port(self) -> int: ...

    @property
    @abc.abstractmethod
    def admin_port(self) -> int: ...

    @abc.abstractmethod
    def admin_token(self) -> str:
        """The token the edge requires."""

    async def admin(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: Any = USE_SERVER_TOKEN,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        """One admin API call on a fresh connection: `body` as JSON (or `raw` bytes), the edge's
        token unless `token` says otherwise ("" for none). A `Host` in `headers` replaces the
        listener's address."""
        fields = [("Accept", "application/json")]
        host = f"127.0.0.1:{self.admin_port}"
        for name, value in _pairs(headers):
            if name.lower() == "host":
                host = value
            else:
                fields.append((name, value))
        tok = self.admin_token() if token is USE_SERVER_TOKEN else token
        if tok:
            fields.append(("Authorization", f"Bearer {tok}"))
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None and not any(n.lower() == "content-type" for n, _ in fields):
            fields.append(("Content-Type", "application/json"))
        fields.append(("Connection", "close"))
        async with await Conn.open(self.admin_port) as conn:
            return await conn.request(method, path, host, fields, data, timeout=timeout)

    async def get(
        self,
        host: str,
        path: str = "/",
        *,
        method: str = "GET",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes | None = None,
        timeout: float = 10.0,
    ) -> Response:
        """One request to the proxy listener for `Host: host`, on a fresh connection."""
        return await get(
            self.proxy_port,
            host,
            path,
            method=method,
            headers=_pairs(headers),
            body=body,
            timeout=timeout,
        )

    async def wait_status(
        self, host: str, want: int, *, path: str = "/", timeout: float = 15.0
    ) -> Response:
        """Poll the proxy for `host` until it answers `want` (a route table change arriving, a
        sandbox booting); returns that answer."""
        seen: list[int] = []

        async def probe() -> Response | None:
            reply = await self.get(host, path, timeout=15.0)
            if not seen or seen[-1] != reply.status:
                seen.append(reply.status)
            return reply if reply.status == want else None

        try:
            return await eventually(
                probe, timeout, f"{host}{path} to answer {want}", interval=POLL_INTERVAL
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; saw {seen}") from None

    async def served_by(self, host: str, version: str, timeout: float = 15.0) -> Response:
        """Poll `GET /` on `host` until the echo app of `version` answers it (the route table
        follows the store through a watch, and the first request cold-starts a sandbox)."""

        async def probe() -> Response | None:
            reply = await self.get(host, "/", timeout=timeout)
            if reply.status == 200 and reply.json().get("version") == version:
                return reply
            return None

        return await eventually(probe, timeout, f"{host} served by {version}")

    async def metrics(self) -> str:
        reply = await self.admin("GET", "/metrics")
        assert reply.status == 200, reply
        return reply.body.decode()

    async def create_app(self, app: str, *hosts: str) -> None:
        """App `app` with a route for each of `hosts`, through the admin API."""
        reply = await self.admin("POST", "/v1/apps", {"name": app})
        assert reply.status == 201, reply
        for host in hosts:
            reply = await self.admin("PUT", f"/v1/routes/{host}", {"app": app})
            assert reply.status in (200, 201), reply

    async def post_deploy(
        self, app: str, spec: Mapping[str, Any], *, label: str | None = None, ttl: str | None = None
    ) -> dict[str, Any]:
        """A deploy through the admin API (activating; a preview with `label`); returns the
        answer."""
        body: dict[str, Any] = {"spec": dict(spec)}
        if label is not None:
            body["ephemeral"] = {"label": label, **({"ttl": ttl} if ttl else {})}
        reply = await self.admin("POST", f"/v1/apps/{app}/deploys", body)
        assert reply.status == 201, reply
        answer: dict[str, Any] = reply.json()
        return answer

    async def sandbox_records(self, app: str) -> list[dict[str, Any]]:
        reply = await self.admin("GET", f"/v1/apps/{app}/sandboxes")
        assert reply.status == 200, reply
        records: list[dict[str, Any]] = reply.json()
        return records

    async def sandbox_record(self, app: str, sandbox_id: str) -> dict[str, Any]:
        """The admin API's record of one sandbox (its `pid` is the process the activator
        started: the launcher or bubblewrap, whose death ends the sandbox)."""
        for box in await self.sandbox_records(app):
            if box["id"] == sandbox_id:
                return box
        raise AssertionError(f"no sandbox {sandbox_id} in {app}")

    async def kill_sandbox(self, app: str, sandbox_id: str) -> float:
        """SIGKILL the process the activator started for the sandbox; returns the wall-clock
        time (`time.time()`) of the kill, taken after the look-up, right before the signal."""
        pid = int((await self.sandbox_record(app, sandbox_id))["pid"])
        at = time.time()
        os.kill(pid, signal.SIGKILL)
        return at


# -- the `miren serve` subprocess ----------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This process's environment without `MIREN_*` settings (a developer's own must not leak in);
    `MIREN_ETCD_BIN` stays, since it only picks the etcd binary."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("MIREN_") or k == "MIREN_ETCD_BIN"
    }


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "miren_ingress", "serve", *args]


def run_cli(
    *args: str,
    env: Mapping[str, str],
    check: bool = True,
    timeout: float = 60.0,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """The real `miren` CLI in a subprocess; with `check`, a non-zero exit is an AssertionError
    showing its output."""
    result = subprocess.run(
        [sys.executable, "-m", "miren_ingress", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"miren {' '.join(args)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


class _ServerClient(EdgeClient):
    def __init__(self, server: MirenServer) -> None:
        self.server = server

    def __repr__(self) -> str:
        return f"<EdgeClient of {self.server!r}>"

    @property
    def proxy_port(self) -> int:
        return self.server.proxy_port

    @property
    def admin_port(self) -> int:
        return self.server.admin_port

    def admin_token(self) -> str:
        return self.server.server_token()


@dataclass
class MirenServer:
    """One `miren serve` subprocess (restartable on the same ports and data dir)."""

    workdir: Path
    store: str = "memory"
    token: str = ""
    settings: Mapping[str, str] = field(default_factory=dict)
    config: Path | None = None
    shutdown_grace: float = 5.0
    admin_host: str = "127.0.0.1"  # the client side always uses loopback

    proxy_port: int = 0
    admin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ready_seconds: float = 0.0
    account: ProcessAccount = field(default_factory=ProcessAccount)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "serve.log"
        self.proxy_port = self.proxy_port or free_port()
        self.admin_port = self.admin_port or free_port()
        self.client: EdgeClient = _ServerClient(self)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return (
            f"<MirenServer pid={pid} store={self.store} proxy=:{self.proxy_port} "
            f"admin=:{self.admin_port} tracked={len(self.account.seen)}>"
        )

    # -- lifecycle --

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        args = [
            "--listen",
            f"127.0.0.1:{self.proxy_port}",
            "--admin-listen",
            f"{self.admin_host}:{self.admin_port}",
            "--store",
            self.store,
            "--data-dir",
            str(self.data_dir),
            "--set",
            f"ingress.shutdown_grace={self.shutdown_grace}s",
        ]
        if self.config is not None:
            args = ["--config", str(self.config), *args]
        for key, value in self.settings.items():
            args += ["--set", f"{key}={value}"]
        return serve_argv(*args)

    def server_token(self) -> str:
        """The token the server requires: the one it was given, else the one it generated
        into its data dir on its first start."""
        if self.token:
            return self.token
        path = self.data_dir / "admin-token"
        return path.read_text().strip() if path.exists() else ""

    def env(self) -> dict[str, str]:
        env = base_env()
        if self.token:
            env["MIREN_ADMIN_TOKEN"] = self.token
        return env

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start and wait until `/healthz` answers 200; returns the seconds that took."""
        assert not self.running(), "already running"
        self.account.clear()
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {' '.join(self.argv())}\n".encode())
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO
            )
        try:
            eventually_sync(
                self._healthy,
                timeout,
                "miren serve to be healthy",
                interval=POLL_INTERVAL,
                ignore=(OSError, http.client.HTTPException),
            )
        except AssertionError as exc:
            self.stop(check=False)
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        except BaseException:
            self.stop(check=False)
            raise
        self.ready_seconds = time.monotonic() - t0
        self.observe()
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="serve-watch", daemon=True)
        self._watcher.start()
        return self.ready_seconds

    def _healthy(self) -> bool:
        """`/healthz` answers 200; an exit before that fails at once."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"miren serve exited with {self.proc.returncode} before it was ready"
            )
        return http_call(self.admin_port, "GET", "/healthz", timeout=1.0).status == 200

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:  # shown by pytest under "Captured stdout" of the failing test
            print(f"---- {self!r}: the end of {self.log_path}\n{self.log_tail()}")
        # A failing block's own error matters more than a teardown complaint about it.
        self.stop(check=exc is None)

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    def stop(self, *, check: bool = True) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; then make sure every tracked process is gone.

        Returns the exit status. With `check`, a slow exit or a survivor is an AssertionError
        (raised after everything was killed anyway)."""
        proc = self.proc
        if proc is None:
            return None
        problems: list[str] = []
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                self.record_sandboxes()
            self.observe()
            proc.send_signal(signal.SIGTERM)
        limit = self.shutdown_grace + STOP_MARGIN
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.observe()
            proc.kill()
            rc = proc.wait()
            problems.append(f"miren serve did not exit within {limit:.0f}s of SIGTERM")
        self._stop_watcher()
        problems += self.kill_survivors()
        if check and problems:
            raise AssertionError("; ".join(problems) + "\n" + self.log_tail())
        return rc

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "server not started"
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def restart(self) -> float:
        rc = self.stop()
        assert rc == 0, f"miren serve exited with {rc}\n{self.log_tail()}"
        return self.start()

    # -- process accounting --

    def _watch(self) -> None:
        while not self._watch_stop.wait(WATCH_INTERVAL):
            self.observe()

    def _stop_watcher(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def track(self, pid: int, what: str = "") -> None:
        self.account.track(pid, what)

    def observe(self) -> None:
        """Record the server's descendants and any process running from its etcd directory."""
        if self.proc is None:
            return
        table = process_table()
        pids = descendants(self.proc.pid, table)
        pids |= pids_naming(str(self.data_dir / "etcd"), table)
        self.account.track_all(pids)

    def record_sandboxes(self) -> list[int]:
        """Record the pids the admin API reports for every app's sandboxes."""
        found = []
        apps = self.admin("GET", "/v1/apps", timeout=2.0)
        for app in apps.json() if apps.status == 200 else []:
            boxes = self.admin("GET", f"/v1/apps/{app['name']}/sandboxes", timeout=2.0)
            for box in boxes.json() if boxes.status == 200 else []:
                if box.get("pid"):
                    self.track(int(box["pid"]), f"sandbox {box['id']} of {app['name']}")
                    found.append(int(box["pid"]))
        return found

    def tracked(self, fragment: str = "") -> list[Tracked]:
        return self.account.tracked(fragment)

    def etcd_pids(self) -> list[Tracked]:
        return self.tracked(str(self.data_dir / "etcd"))

    def alive(self) -> list[Tracked]:
        return self.account.alive()

    def kill_survivors(self, timeout: float | None = None) -> list[str]:
        """Wait for every tracked process to be gone; SIGKILL and report any that is not."""
        kwargs = {} if timeout is None else {"timeout": timeout}
        return self.account.kill_survivors(owner="miren serve", **kwargs)

    # -- sync clients --

    def admin(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: Any = USE_SERVER_TOKEN,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        hdrs = {"Accept": "application/json", **(headers or {})}
        tok = self.server_token() if token is USE_SERVER_TOKEN else token
        if tok:
            hdrs["Authorization"] = f"Bearer {tok}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        return http_call(self.admin_port, method, path, body=data, headers=hdrs, timeout=timeout)

    def get(
        self,
        host: str,
        path: str = "/",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        """A request to the proxy listener for `Host: host` (as curl's `-H 'Host: …'`)."""
        return http_call(
            self.proxy_port, "GET", path, headers={"Host": host, **(headers or {})}, timeout=timeout
        )

    def get_routed(self, host: str, path: str = "/", timeout: float = 5.0) -> Response:
        """`get()` once the proxy knows `host`: its route table follows the store through a
        watch, so a deploy reaches it a moment after the API answered (until then: 404)."""

        def routed() -> Response | None:
            reply = self.get(host, path)
            return reply if reply.status != 404 else None

        return eventually_sync(routed, timeout, f"{host} to be routed", interval=POLL_INTERVAL)

    def cli(
        self,
        *args: str,
        check: bool = True,
        token: Any = USE_SERVER_TOKEN,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        env = base_env()
        env["MIREN_SERVER"] = self.admin_url
        tok = self.server_token() if token is USE_SERVER_TOKEN else token
        if tok:
            env["MIREN_ADMIN_TOKEN"] = tok
        return run_cli(*args, env=env, check=check, timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of `/metrics` (0.0 when absent)."""
        return metric(self.admin("GET", "/metrics").body.decode(), name, **labels)


# -- the edge in this process --------------------------------------------------------------------


class InProcessEdge(EdgeClient):
    """The whole edge running in a task of the test's event loop."""

    def __init__(self, edge: Edge, task: asyncio.Task[None], account: ProcessAccount) -> None:
        self.edge = edge
        self.task = task
        self.account = account

    def __repr__(self) -> str:
        return (
            f"<InProcessEdge proxy={self.edge.proxy_address} admin={self.edge.admin_address} "
            f"{self.account!r}>"
        )

    @property
    def store(self) -> Store:
        assert self.edge.store is not None
        return self.edge.store

    @property
    def proxy_port(self) -> int:
        assert self.edge.proxy_address is not None
        return self.edge.proxy_address[1]

    @property
    def port(self) -> int:
        """The proxy listener's port."""
        return self.proxy_port

    @property
    def admin_port(self) -> int:
        assert self.edge.admin_address is not None
        return self.edge.admin_address[1]

    def admin_token(self) -> str:
        return self.edge.admin_token

    def store_ops(self) -> dict[tuple[str, str], int]:
        return dict(self.edge.stats.counts)

    # -- set-up through the store (what the admin API does, minus HTTP) --

    async def app(self, name: str) -> None:
        await self.store.create(App(name=name))

    async def route(
        self,
        host: str,
        app: str,
        *,
        default: bool = False,
        request_timeout: timedelta | None = None,
    ) -> None:
        await self.store.create(
            HttpRoute(host=host, app=app, default=default, request_timeout=request_timeout)
        )

    async def deploy(
        self,
        app: str,
        spec: VersionSpec | None = None,
        *,
        label: str | None = None,
        ttl: str | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> str:
        """Deploy (a normal, activating deploy; a preview with `label`); returns the version id."""
        request = DeployRequest(
            spec=spec or echo_spec(),
            ephemeral=EphemeralRequest(label=label, ttl=ttl) if label is not None else None,
        )
        kwargs: dict[str, Any] = {} if now is None else {"now": now}
        result = await deploy(self.store, app, request, **kwargs)
        return result.version.id

    async def sandboxes(self, app: str) -> list[Sandbox]:
        return await self.store.list(Sandbox, app=app)


class _SandboxWatch:
    """Records, every `interval` seconds in a thread, each new descendant of this process that
    carries a `MIREN_SANDBOX` variable (a sandbox of the in-process edge or its launcher)."""

    def __init__(self, account: ProcessAccount, interval: float = 0.2) -> None:
        self.account = account
        self.interval = interval
        table = process_table()
        self.before = {(pid, table[pid].start) for pid in descendants(os.getpid(), table)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-watch", daemon=True)

    def scan(self) -> None:
        # A child between fork and exec still shows this process's environment: a new process
        # without the variable is looked at again on the next scan.
        table = process_table()
        for pid in descendants(os.getpid(), table):
            if (pid, table[pid].start) not in self.before and "\nMIREN_SANDBOX=" in (
                "\n" + environ(pid)
            ):
                self.account.track(pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scan()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.scan()


@contextlib.asynccontextmanager
async def running_edge(
    tmp_path: Path, *, store: str = "memory", wait_ready: bool = True, **settings: Any
) -> AsyncIterator[InProcessEdge]:
    """The whole edge in this event loop. `settings` are config overrides by section, e.g.
    `ingress={"request_timeout": "1s"}`. With `wait_ready=False` it yields as soon as the proxy
    listens (the route table may not be loaded yet)."""
    ingress = {"shutdown_grace": "1s", **settings.pop("ingress", {})}
    activator = {"stop_grace": "2s", **settings.pop("activator", {})}
    config = load_config(
        env={},
        overrides={
            "store": store,
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "data"),
            "node_name": "e2e",
            "log_level": "warning",
            "ingress": ingress,
            "activator": activator,
            **settings,
        },
    )
    edge = Edge(config)
    account = ProcessAccount()
    watch = _SandboxWatch(account)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ready(_edge: Edge) -> None:
        if not ready.done():
            ready.set_result(None)

    async def listening() -> bool:
        if task.done():
            return True  # (reported below)
        return edge.proxy_address is not None

    task = asyncio.create_task(edge.run(on_ready=on_ready), name="e2e-edge")
    watch.start()
    failed = True
    try:
        if wait_ready:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        else:
            await eventually(listening, START_TIMEOUT, "the proxy to listen")
        if task.done():
            task.result()  # raises what made it stop
            raise AssertionError("the edge stopped before it was ready")
        yield InProcessEdge(edge, task, account)
        failed = False
    finally:
        edge.request_stop()
        problems: list[str] = []
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            problems.append("the edge did not stop in time")
        except Exception:
            if not failed:
                raise
        finally:
            if not ready.done():
                ready.cancel()
            await asyncio.to_thread(watch.stop)
            problems += await asyncio.to_thread(account.kill_survivors, owner="the edge")
        if problems and not failed:
            raise AssertionError("; ".join(problems))


# -- logs ---------------------------------------------------------------------------------------

_BAD_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def log_errors(text: str) -> list[str]:
    """Lines of a serve log that report an error or a traceback."""
    return [line for line in text.splitlines() if _BAD_LINE.search(line)]


def log_warnings(text: str, allowed: Iterable[str] = ()) -> list[str]:
    """WARNING lines of a serve log that match none of the `allowed` regexes."""
    pats = [re.compile(p) for p in allowed]
    out = []
    for line in text.splitlines():
        m = _LEVEL.match(line)
        if m and m.group(1) == "WARNING" and not any(p.search(line) for p in pats):
            out.append(line)
    return out


# -- the CLI's output ---------------------------------------------------------------------------


def url_lines(stdout: str) -> list[str]:
    """The URLs of the `  URL:   …` lines, in order."""
    return [line.split("URL:", 1)[1].strip() for line in stdout.splitlines() if "URL:" in line]


def table_rows(stdout: str) -> list[list[str]]:
    """A `miren` text table (columns separated by two or more spaces), header first."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


def deployed_id(stdout: str) -> str:
    """The version id from `Deployed version X (active).` / `Ephemeral version X created.`"""
    m = re.search(
        r"^(?:Deployed|Ephemeral) version (\S+?)(?: \(active\)\.| created\.)$", stdout, re.M
    )
    assert m, f"no version id in deploy output:\n{stdout}"
    return m.group(1)
