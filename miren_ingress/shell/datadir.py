"""One `miren serve` per data dir: an advisory lock, taken before anything else is started.

Two servers on one data dir would run two embedded etcds on one member directory and rotate
each other's logs. The second one now stops at once, naming the directory and the pid that holds
it, instead of failing later on etcd's words. The lock is `flock` on `<data_dir>/serve.lock`: the
kernel drops it when its holder exits, however it exits, so a crashed server never leaves a
stale lock; the file holds the holder's pid, for the message only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "serve.lock"


class DataDirInUse(Exception):
    """Another process holds the data dir's lock."""


@contextlib.contextmanager
def hold(data_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the data dir's lock for the block; `DataDirInUse` at once when another holds it."""
    path = Path(data_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"data dir {Path(data_dir).absolute()} is in use by another miren serve "
                f"(pid {holder}); stop that one, or give this one another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # (releases the lock; the file stays: unlinking it would race a newcomer)
