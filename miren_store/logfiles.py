"""The end of a log file: the one reader behind every "last lines" the edge shows.

Sandbox logs (the admin API's logs endpoint, a dying sandbox's warning) and the embedded etcd's
log (its start-up failure) are read the same way. A log may be large and still growing, and its
end is what explains a failure, so the reader:
- reads at most `max_bytes` from the end, never before `start` (the part of the file written by
  the present run), so the cost does not depend on the file's size;
- drops the first line when the window begins in the middle of it (the byte before the window
  is not a line end), unless that partial line is all the window holds;
- cuts at a line end before decoding, then decodes UTF-8 with replacement characters: a log is
  written by programs we do not control, and a bad byte must not hide the rest;
- answers None for a file that does not exist (a sandbox that wrote nothing yet, a purged log);
  other OSErrors (a directory, no permission) are the caller's to report.
It blocks on a local file: call it off the event loop (`asyncio.to_thread`) unless the read is
small and rare.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_tail(path: Path, max_bytes: int, *, start: int = 0) -> str | None:
    """The end of `path`: its last `max_bytes` bytes, not before offset `start`, from the first
    line that starts in them (see the module docstring); None when the file does not exist."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        begin = max(start, size - max(0, max_bytes), 0)
        if begin >= size:
            return ""
        cut = False
        if begin > start:  # inside the region: was the byte before the window a line end?
            f.seek(begin - 1)
            cut = f.read(1) != b"\n"
        else:
            f.seek(begin)
        data = f.read(size - begin)  # (bounded: what is appended meanwhile waits for next time)
    if cut:
        end = data.find(b"\n")
        if 0 <= end < len(data) - 1:  # a whole line follows the partial one
            data = data[end + 1 :]
    return data.decode("utf-8", "replace")


def tail_lines(path: Path, lines: int, max_bytes: int, *, start: int = 0) -> list[str] | None:
    """The last `lines` lines of `path` (see `read_tail`; none for `lines <= 0`); None when the
    file does not exist."""
    text = read_tail(path, max_bytes, start=start)
    if text is None:
        return None
    return text.splitlines()[-lines:] if lines > 0 else []
