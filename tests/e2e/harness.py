"""Drive a real `miren serve` subprocess: start it, talk to it, stop it, prove nothing survives.

Theory of operation
-------------------
`MirenServer` runs `python -m miren_ingress serve` on free loopback ports (found by binding
port 0) with its state in a test's tmp dir, output to `<dir>/serve.log`, and waits for
readiness by polling `GET /healthz` under a deadline (a server that exits early fails at once,
with its log). Use it as a context manager: leaving the block stops it, also when the block
raised.

Process accounting. While the server runs, a watcher thread scans `/proc` every 100 ms and
records every descendant of the server (the ppid chain; sandboxes and etcd run in their own
sessions but are still its children) and every process whose command line names the server's
embedded-etcd directory (found even if it were re-parented). Before stopping, the sandboxes the
admin API reports (`/v1/apps/{app}/sandboxes`, `pid`) are recorded too. A process is identified by
(pid, start time) so a recycled pid is never mistaken for a survivor; a zombie (`Z`) counts as
dead (this container's init may not reap). `stop()` sends SIGTERM, waits for the exit within
`ingress.shutdown_grace` plus a margin, SIGKILLs if it must, then waits (with a deadline) for every
recorded process to be gone. A survivor is SIGKILLed, so no test leaves a process behind, and
reported as a failure.

Clients. `cli()` runs the real `miren` CLI in a subprocess with `MIREN_SERVER` (and the token)
in its environment. `admin()` and `get()` are small `http.client` calls against the admin and
proxy listeners (`get()` sets `Host:` as curl's `-H 'Host: …'` does).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.apps import SANDBOX_PYTHON

REPO = Path(__file__).resolve().parents[2]
ECHO_APP = REPO / "tests" / "apps" / "echo_server.py"
# The sandbox command of the README walkthrough (`python3 tests/apps/echo_server.py`), pinned to
# this interpreter and without `site` (the echo server then listens ~20 ms after exec).
ECHO_CMD = (SANDBOX_PYTHON, "-S", str(ECHO_APP))
# An upstream nobody listens on: versions that are deployed but never requested.
DEAD_UPSTREAM = "http://127.0.0.1:9"

TOKEN = "e2e-token-4f1c"
START_TIMEOUT = 20.0
STOP_MARGIN = 10.0  # beyond the configured shutdown grace
SURVIVOR_TIMEOUT = 10.0
WATCH_INTERVAL = 0.1
POLL_INTERVAL = 0.02

_USE_SERVER_TOKEN: Any = object()  # sentinel: "the token the server was started with"


# -- ports and polling --------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, predicate: Any, timeout: float, interval: float = POLL_INTERVAL) -> Any:
    """Poll `predicate()` until it returns a truthy value (returned); AssertionError at the
    deadline, naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def wait_until_equal(what: str, probe: Any, want: Any, timeout: float) -> list[tuple[Any, float]]:
    """Poll `probe()` until it returns `want`. Returns the distinct values seen on the way, in
    order, each with the wall-clock time (`time.time()`) it was first seen, so a test can check
    what came before and when. AssertionError at the deadline, listing them."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[Any, float]] = []
    while True:
        value = probe()
        if not seen or seen[-1][0] != value:
            seen.append((value, time.time()))
        if value == want:
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {what} == {want!r}; "
                f"saw {[v for v, _ in seen]!r}"
            )
        time.sleep(POLL_INTERVAL)


# -- /proc --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    start: int  # start time in clock ticks since boot: with the pid, a unique identity


@dataclass(frozen=True)
class Tracked:
    pid: int
    start: int
    what: str  # command line when first seen, for failure messages


def read_proc(pid: int) -> ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # `comm` is in parentheses and may itself contain spaces or parentheses: split after the last.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return ProcInfo(pid=pid, ppid=int(rest[1]), state=rest[0].decode(), start=int(rest[19]))


def process_table() -> dict[int, ProcInfo]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(root: int, table: Mapping[int, ProcInfo]) -> set[int]:
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def pids_naming(fragment: str, table: Mapping[int, ProcInfo]) -> set[int]:
    return {pid for pid in table if fragment in cmdline(pid)}


def is_alive(t: Tracked) -> bool:
    info = read_proc(t.pid)
    return info is not None and info.start == t.start and info.state != "Z"


# -- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:300]!r}>"


def http_call(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def base_env() -> dict[str, str]:
    """This process's environment without `MIREN_*` settings (a developer's own must not leak in);
    `MIREN_ETCD_BIN` stays, since it only picks the etcd binary."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("MIREN_") or k == "MIREN_ETCD_BIN"
    }


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "miren_ingress", "serve", *args]


# -- the server ---------------------------------------------------------------------------------


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
    seen: dict[tuple[int, int], Tracked] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "serve.log"
        self.proxy_port = self.proxy_port or free_port()
        self.admin_port = self.admin_port or free_port()
        self._lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return (
            f"<MirenServer pid={pid} store={self.store} proxy=:{self.proxy_port} "
            f"admin=:{self.admin_port} tracked={len(self.seen)}>"
        )

    # -- lifecycle --

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

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
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.seen.clear()
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {' '.join(self.argv())}\n".encode())
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO
            )
        try:
            self._wait_healthy(t0 + timeout)
        except BaseException:
            self.stop(check=False)
            raise
        self.ready_seconds = time.monotonic() - t0
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="serve-watch", daemon=True)
        self._watcher.start()
        return self.ready_seconds

    def _wait_healthy(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"miren serve exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_call(self.admin_port, "GET", "/healthz", timeout=1.0).status == 200:
                    self.observe()
                    return
            if time.monotonic() >= deadline:
                raise AssertionError("miren serve not healthy in time:\n" + self.log_tail())
            time.sleep(POLL_INTERVAL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

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
        info = read_proc(pid)
        if info is None or info.state == "Z":
            return
        with self._lock:
            key = (pid, info.start)
            if key not in self.seen:
                self.seen[key] = Tracked(pid, info.start, what or cmdline(pid))

    def observe(self) -> None:
        """Record the server's descendants and any process running from its etcd directory."""
        if self.proc is None:
            return
        table = process_table()
        pids = descendants(self.proc.pid, table)
        pids |= pids_naming(str(self.data_dir / "etcd"), table)
        for pid in pids:
            self.track(pid)

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
        with self._lock:
            return [t for t in self.seen.values() if fragment in t.what]

    def etcd_pids(self) -> list[Tracked]:
        return self.tracked(str(self.data_dir / "etcd"))

    def alive(self) -> list[Tracked]:
        return [t for t in self.tracked() if is_alive(t)]

    def kill_survivors(self, timeout: float = SURVIVOR_TIMEOUT) -> list[str]:
        """Wait for every tracked process to be gone; SIGKILL and report any that is not."""
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        for t in left:
            if is_alive(t):  # same (pid, start): never signal a recycled pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(t.pid, signal.SIGKILL)
        return [f"process survived miren serve: pid {t.pid} ({t.what})" for t in left]

    # -- clients --

    def admin(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: Any = _USE_SERVER_TOKEN,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        hdrs = {"Accept": "application/json", **(headers or {})}
        tok = self.server_token() if token is _USE_SERVER_TOKEN else token
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
    ) -> Reply:
        """A request to the proxy listener for `Host: host`."""
        return http_call(
            self.proxy_port, "GET", path, headers={"Host": host, **(headers or {})}, timeout=timeout
        )

    def get_routed(self, host: str, path: str = "/", timeout: float = 5.0) -> Reply:
        """`get()` once the proxy knows `host`: its route table follows the store through a
        watch, so a deploy reaches it a moment after the API answered (until then: 404)."""
        last: list[Reply] = []

        def routed() -> bool:
            last.append(self.get(host, path))
            return last[-1].status != 404

        wait_for(f"{host} to be routed", routed, timeout)
        return last[-1]

    def cli(
        self,
        *args: str,
        check: bool = True,
        token: Any = _USE_SERVER_TOKEN,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        env = base_env()
        env["MIREN_SERVER"] = self.admin_url
        tok = self.server_token() if token is _USE_SERVER_TOKEN else token
        if tok:
            env["MIREN_ADMIN_TOKEN"] = tok
        return run_cli(*args, env=env, check=check, timeout=timeout)

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric from `/metrics`."""
        text = self.admin("GET", "/metrics").body.decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else None


def run_cli(
    *args: str,
    env: Mapping[str, str],
    check: bool = True,
    timeout: float = 60.0,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
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


# -- parsing CLI output ------------------------------------------------------------------------


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
