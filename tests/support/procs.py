"""Processes as `/proc` shows them: identity, trees, memory and file descriptors, and an account
of the processes an edge started, so that none outlives its test.

A process is identified by (pid, start time): a recycled pid is never mistaken for the process
recorded under it. A zombie (`Z`) counts as dead, since this container's init may not reap.

`ProcessAccount` is what both harnesses (tests/support/edge.py) use: they `track` every process
of the edge they see while it runs (descendants, sandboxes the admin API reports, the embedded
etcd), and after the edge stopped, `kill_survivors` waits, under a deadline, for each to be gone,
SIGKILLs the ones that are not (by pid, only if it is still the same process) and reports them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.poll import eventually_sync

SURVIVOR_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


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
    what: str  # every command line seen for it, " => " between them (a fork, then its exec)


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


def environ(pid: int) -> str:
    """The process's environment, one `NAME=value` a line ("" when unreadable or gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b"\n").decode(errors="replace")


def pids_naming(fragment: str, table: Mapping[int, ProcInfo]) -> set[int]:
    return {pid for pid in table if fragment in cmdline(pid)}


def is_alive(t: Tracked) -> bool:
    info = read_proc(t.pid)
    return info is not None and info.start == t.start and info.state != "Z"


def pid_alive(pid: int) -> bool:
    """Whatever process has `pid` now is running (not gone, not a zombie)."""
    info = read_proc(pid)
    return info is not None and info.state != "Z"


def status_kib(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM`-style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # (closed meanwhile)
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _connection_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets, not listening, whose local port is `port` (the accepted
    connections of a server listening there)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cells = line.split()
                local, state, inode = cells[1], cells[3], int(cells[9])
                if state != "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(inode)
    return inodes


def client_connection_count(pid: int, port: int) -> int:
    """How many of `pid`'s fds are connections accepted on `port`: the clients' choice (a load
    generator's keep-alive pool), not the server's own resources."""
    return len(_socket_inodes(pid) & _connection_inodes(port))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def host_pid(root: int, needle: str, timeout: float = 10.0) -> int:
    """The host pid of the app under `root` (a sandbox's recorded pid: its launcher, or
    bubblewrap, whose pid namespace gives the app another pid inside): the deepest process of
    the tree whose command line contains `needle` (bubblewrap's and a shell wrapper's name the
    app's command too). Polls until one below `root` exists; at the deadline `root` itself
    will do if it matches."""

    def deepest() -> tuple[int, int]:
        best, best_depth = 0, -1
        todo = [(root, 0)]
        while todo:
            pid, depth = todo.pop()
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle.encode() in f.read() and depth > best_depth:
                        best, best_depth = pid, depth
            except OSError:
                pass
            todo += [(child, depth + 1) for child in _children(pid)]
        return best, best_depth

    with contextlib.suppress(AssertionError):
        return eventually_sync(
            lambda: (found := deepest())[1] > 0 and found[0],
            timeout,
            f"a process matching {needle!r} below pid {root}",
        )
    best, _ = deepest()
    if best:
        return best
    raise AssertionError(f"no process matching {needle!r} under pid {root}")


class ProcessAccount:
    """The processes an edge started, by (pid, start time), to be proven gone at its end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: dict[tuple[int, int], Tracked] = {}

    def __repr__(self) -> str:
        return f"<ProcessAccount tracked={len(self.seen)} alive={len(self.alive())}>"

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def track(self, pid: int, what: str = "") -> None:
        info = read_proc(pid)
        if info is None or info.state == "Z":
            return
        line = what or cmdline(pid)
        with self._lock:
            key = (pid, info.start)
            known = self.seen.get(key)
            if known is None:
                self.seen[key] = Tracked(pid, info.start, line)
            elif line and not known.what.endswith(line):
                # The same process after an exec (a forked launcher becoming etcd): keep both
                # names, so a test looking for the program it became finds it.
                self.seen[key] = Tracked(pid, info.start, f"{known.what} => {line}")

    def track_all(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self.track(pid)

    def tracked(self, fragment: str = "") -> list[Tracked]:
        with self._lock:
            return [t for t in self.seen.values() if fragment in t.what]

    def alive(self) -> list[Tracked]:
        return [t for t in self.tracked() if is_alive(t)]

    def kill_survivors(
        self, timeout: float = SURVIVOR_TIMEOUT, owner: str = "the edge"
    ) -> list[str]:
        """Wait for every tracked process to be gone; SIGKILL and report any that is not."""
        with contextlib.suppress(AssertionError):
            eventually_sync(
                lambda: not self.alive(), timeout, "every process to end", interval=POLL_INTERVAL
            )
        left = self.alive()
        for t in left:
            if is_alive(t):  # same (pid, start): never signal a recycled pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(t.pid, signal.SIGKILL)
        return [f"process survived {owner}: pid {t.pid} ({t.what})" for t in left]
