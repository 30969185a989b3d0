"""Sandbox log files: a size cap, kept the way logrotate's `copytruncate` keeps one.

A sandbox writes its stdout and stderr straight to its log file (opened O_APPEND; the process
holds the fd), so the file cannot be renamed under it. When it has grown past the cap, its
content is copied to `<name>.1` (replacing the previous copy) and the file is truncated: the
process's next write lands at the new end (O_APPEND), so the file is never left sparse. Bytes
written between the copy and the truncation are lost, the same small window as logrotate's.
On disk a sandbox keeps at most about twice the cap, plus what it writes between two checks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rotated_path(path: Path) -> Path:
    """Where the older part of a log goes."""
    return path.with_name(path.name + ".1")


def over_cap(path: Path, max_bytes: int) -> bool:
    """True when the log exists and is larger than `max_bytes` (0: no cap)."""
    if max_bytes <= 0:
        return False
    try:
        return os.stat(path).st_size > max_bytes
    except OSError:
        return False


def rotate(path: Path) -> None:
    """Copy the log to `<name>.1`, then truncate it (blocking: run it off the event loop)."""
    target = rotated_path(path)
    partial = target.with_name(target.name + ".tmp")
    shutil.copyfile(path, partial)
    os.replace(partial, target)  # a reader never sees a half-copied `.1`
    os.truncate(path, 0)
