"""`miren serve` refuses bad start-ups at once, with a message and a non-zero status, and leaves
nothing running; and how long a start takes is measured, not asserted (see the report).

Start-up is one exit stack (`miren_ingress.shell.serve`): when a later step fails (a port taken),
the steps already started stop in reverse order before the error ends the process, and neither a
child process (the embedded etcd, sandboxes) nor a listener is left."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from miren_ingress.shell.config import load_config
from miren_ingress.shell.serve import Edge, ListenError
from tests.support.clients import free_port, http_call
from tests.support.edge import REPO, TOKEN, MirenServer, base_env, serve_argv
from tests.support.poll import eventually_sync
from tests.support.procs import (
    ProcessAccount,
    Tracked,
    cmdline,
    descendants,
    pids_naming,
    process_table,
    read_proc,
)

FAIL_FAST_TIMEOUT = 15.0  # generous: a refusal takes ~0.5 s here (interpreter start + imports)


def serve_once(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `miren serve` expecting it to exit on its own; every listener it could open is on a
    free loopback port, so a wrongly started server cannot collide with anything."""
    defaults = {
        "--listen": f"127.0.0.1:{free_port()}",
        "--admin-listen": f"127.0.0.1:{free_port()}",
        "--store": "memory",
        "--data-dir": str(tmp_path / "data"),
    }
    argv = list(args)
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    return subprocess.run(
        serve_argv(*argv),
        env=env if env is not None else base_env(),
        capture_output=True,
        text=True,
        timeout=FAIL_FAST_TIMEOUT,
        check=False,
    )


def test_non_loopback_admin_listener_without_token_is_refused(tmp_path: Path) -> None:
    port = free_port()
    result = serve_once(tmp_path, "--admin-listen", f"0.0.0.0:{port}")
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "refusing to open the admin API on non-loopback" in result.stderr, result.stderr
    assert "MIREN_ADMIN_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_loopback_admin_listener_with_a_token_starts(tmp_path: Path) -> None:
    """The same listener with MIREN_ADMIN_TOKEN: it starts and demands the token."""
    with MirenServer(tmp_path, token=TOKEN, admin_host="0.0.0.0") as server:
        assert http_call(server.admin_port, "GET", "/v1/apps").status == 401
        assert server.admin("GET", "/v1/apps").status == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "ingress.bogus=1"), "unknown key ingress.bogus"),
        (("--set", "bogus=1"), "unknown key bogus"),
        (("--set", "gc.sweep_interval=soon"), "gc.sweep_interval"),
        (("--store", "postgres://db:5432"), "store: 'postgres://db:5432' is not memory, embedded"),
        (("--listen", "nowhere"), "listen: 'nowhere' is not host:port"),
    ],
    ids=["unknown-section-key", "unknown-key", "bad-duration", "bad-store-scheme", "bad-listen"],
)
def test_bad_configuration_is_refused(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = serve_once(tmp_path, *args)
    assert result.returncode == 2, result
    assert result.stderr.startswith("miren serve: "), result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_in_a_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "miren.toml"
    config.write_text('[ingress]\nshutdown_grace = "5s"\ncolour = "red"\n')
    result = serve_once(tmp_path, "--config", str(config))
    assert result.returncode == 2, result
    assert "unknown key ingress.colour" in result.stderr, result.stderr
    assert str(config) in result.stderr


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("etcd://", "names no endpoint"),
        ("etcd://127.0.0.1:notaport", "invalid etcd endpoint '127.0.0.1:notaport'"),
    ],
)
def test_malformed_etcd_url_is_refused(tmp_path: Path, store: str, message: str) -> None:
    result = serve_once(tmp_path, "--store", store)
    assert result.returncode != 0, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listener", ["--listen", "--admin-listen"])
def test_port_in_use_is_refused_and_leaves_no_etcd(tmp_path: Path, listener: str) -> None:
    """On the embedded store: the etcd it started before binding must be stopped again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_once(tmp_path, listener, f"127.0.0.1:{port}", "--store", "embedded")
    assert result.returncode == 1, result
    assert "address already in use" in result.stderr.lower(), result.stderr
    assert str(port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "data" / "etcd").is_dir()  # it did get as far as starting etcd
    leftovers = pids_naming(str(tmp_path / "data" / "etcd"), process_table())
    alive = [pid for pid in leftovers if (info := process_table().get(pid)) and info.state != "Z"]
    assert alive == [], f"etcd survived a failed start: {alive}"


def test_the_embedded_etcd_listens_only_on_private_unix_sockets(tmp_path: Path) -> None:
    """Issue #15: sandboxes share the host's loopback, so the unauthenticated embedded etcd must
    have no TCP port at all; `miren serve` reaches it through a socket in the 0700 data dir."""
    with MirenServer(tmp_path, store="embedded") as edge:
        edge.cli("app", "create", "private")  # the store works, over the socket
        edge.observe()
        (etcd,) = edge.etcd_pids()
        etcd_dir = edge.data_dir / "etcd"
        assert stat.S_IMODE(etcd_dir.stat().st_mode) == 0o700
        sockets = [p for p in etcd_dir.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
        assert sorted(p.name.partition(":")[0] for p in sockets) == ["client.sock", "peer.sock"]
        assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in sockets)
        held = set()
        for fd in os.listdir(f"/proc/{etcd.pid}/fd"):
            target = os.readlink(f"/proc/{etcd.pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(int(target[len("socket:[") : -1]))
        inet = set()
        for table in ("tcp", "tcp6", "udp", "udp6"):
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            inet |= {int(row.split()[9]) for row in rows}
        assert held and not held & inet, "the embedded etcd holds a TCP or UDP socket"


# -- start-up is one exit stack: a later step failing stops the earlier ones, in reverse ----------

STEPS = [
    "store",
    "activator",
    "route table sync",
    "gc",
    "cluster",
    "proxy listener",
    "admin listener",
]


def steps_logged(log: str, verb: str) -> list[str]:
    """The steps of `miren serve`'s debug lines "started <step>" / "stopped <step>", in order."""
    return [
        line.split(f" miren: {verb} ", 1)[1]
        for line in log.splitlines()
        if f" miren: {verb} " in line
    ]


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    account: ProcessAccount  # every process seen below `miren serve` while it ran

    @property
    def children(self) -> list[Tracked]:
        return self.account.tracked()


def serve_watched(argv: list[str], env: dict[str, str], timeout: float) -> Run:
    """Run `miren serve` to its exit, recording its descendants (the embedded etcd, sandboxes)
    while it runs, so a test can check afterwards that none is left."""
    account = ProcessAccount()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )

    def exited() -> bool:
        account.track_all(descendants(proc.pid, process_table()))
        return proc.poll() is not None

    try:
        eventually_sync(exited, timeout, "miren serve to exit on its own")
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Run(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), account)


def assert_all_gone(run: Run) -> None:
    """Every process seen below `miren serve` ends within 10 s; any that does not is killed
    (never leave one behind, whatever the assertion says) and fails the test."""
    survivors = run.account.kill_survivors(timeout=10.0, owner="a failed start")
    assert survivors == [], survivors


def can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize(
    ("taken", "key", "failed"),
    [
        ("--admin-listen", "admin_listen", "admin listener"),
        ("--listen", "listen", "proxy listener"),
    ],
    ids=["admin-port-taken", "proxy-port-taken"],
)
def test_a_later_step_failing_stops_the_started_ones_in_reverse(
    tmp_path: Path, taken: str, key: str, failed: str
) -> None:
    """Real ports, the embedded store: the step that cannot listen ends `miren serve` with one
    clear line and status 1, after every step before it stopped, last started first stopped;
    the etcd is stopped (SIGTERM, not the parent-death signal), no process and no listener is
    left."""
    ports = {"--listen": free_port(), "--admin-listen": free_port()}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports[taken] = holder.getsockname()[1]
        argv = serve_argv(
            *(arg for flag, port in ports.items() for arg in (flag, f"127.0.0.1:{port}")),
            "--store",
            "embedded",
            "--data-dir",
            str(tmp_path / "data"),
            "--set",
            "log_level=debug",
        )
        run = serve_watched(argv, base_env(), FAIL_FAST_TIMEOUT)
    result = run.result
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert error and error[-1].endswith(
        f"miren serve: {key}: cannot listen on 127.0.0.1:{ports[taken]}: Address already in use"
    ), result.stderr
    started = steps_logged(result.stderr, "started")
    assert started == STEPS[: STEPS.index(failed)], result.stderr
    assert steps_logged(result.stderr, "stopped") == started[::-1], result.stderr
    assert any(str(tmp_path / "data" / "etcd") in t.what for t in run.children), run.children
    etcd_log = (tmp_path / "data" / "etcd" / "etcd.log").read_text()
    assert "received signal; shutting down" in etcd_log and "closed etcd server" in etcd_log
    assert_all_gone(run)
    for flag, port in ports.items():
        if flag != taken:  # the listener that did open is closed again
            assert can_bind(port), f"port {port} ({flag}) is still held"


def test_a_store_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    """The first step failing (an etcd binary that exits at once): nothing else starts."""
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'etcd: cannot start here' >&2\nexit 3\n")
    fake.chmod(0o755)
    env = {**base_env(), "MIREN_ETCD_BIN": str(fake)}
    result = serve_once(tmp_path, "--store", "embedded", "--set", "log_level=debug", env=env)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "miren serve: embedded etcd" in result.stderr, result.stderr
    assert "exited with status 3 before becoming healthy" in result.stderr, result.stderr
    assert "etcd: cannot start here" in result.stderr  # the tail of its log
    assert steps_logged(result.stderr, "started") == []


async def test_in_process_the_stack_stops_what_started_when_the_admin_port_is_taken(
    tmp_path: Path,
) -> None:
    """The same through `Edge.run` in this process (no parent death to clean up after it): the
    error propagates only after the started steps stopped, in reverse, the proxy's port is free
    again, the store is closed and the etcd child is gone."""
    before = descendants(os.getpid(), process_table())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        admin_port = holder.getsockname()[1]
        proxy_port = free_port()
        config = load_config(
            env={},
            overrides={
                "store": "embedded",
                "listen": f"127.0.0.1:{proxy_port}",
                "admin_listen": f"127.0.0.1:{admin_port}",
                "data_dir": str(tmp_path / "data"),
                "log_level": "warning",
                "ingress": {"shutdown_grace": "1s"},
            },
        )
        edge = Edge(config)
        with pytest.raises(
            ListenError, match=f"admin_listen: cannot listen on 127.0.0.1:{admin_port}"
        ):
            async with asyncio.timeout(FAIL_FAST_TIMEOUT):
                await edge.run()
    assert edge.started == STEPS[:-1]
    assert edge.stopped == STEPS[:-1][::-1]
    assert edge.proxy_address is not None and edge.proxy_address[1] == proxy_port
    assert can_bind(proxy_port)
    assert " closed " in repr(edge.store)
    left = descendants(os.getpid(), process_table()) - before
    alive = [pid for pid in left if (info := read_proc(pid)) is not None and info.state != "Z"]
    assert alive == [], [cmdline(pid) for pid in alive]
