"""The harness's process accounting can fail: it sees grandchildren, tells a recycled pid from the
process it recorded, and reports and kills a survivor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.edge import MirenServer
from tests.support.poll import eventually_sync
from tests.support.procs import Tracked, descendants, is_alive, process_table, read_proc

SPAWN_GRANDCHILD = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
    " start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
    "p.wait()\n"
)


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A child that started a grandchild in its own session; both killed at teardown."""
    child = subprocess.Popen(
        [sys.executable, "-c", SPAWN_GRANDCHILD], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    grandchild = 0
    try:
        grandchild = int(child.stdout.readline())
        yield child, grandchild
    finally:
        for pid in (grandchild, child.pid):
            info = read_proc(pid) if pid else None
            if info is not None and info.state != "Z":
                os.kill(pid, signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()


def test_descendants_include_a_grandchild_in_its_own_session(
    tree: tuple[subprocess.Popen[str], int],
) -> None:
    child, grandchild = tree
    assert descendants(child.pid, process_table()) == {grandchild}
    assert grandchild in descendants(os.getpid(), process_table())


def test_a_recycled_pid_is_not_the_recorded_process() -> None:
    me = read_proc(os.getpid())
    assert me is not None
    assert is_alive(Tracked(me.pid, me.start, "me"))
    assert not is_alive(Tracked(me.pid, me.start + 1, "an older process with my pid"))


def test_a_survivor_is_reported_and_killed(
    tmp_path: Path, tree: tuple[subprocess.Popen[str], int]
) -> None:
    _, grandchild = tree
    server = MirenServer(tmp_path)
    server.track(grandchild, "a stubborn sandbox")
    [tracked] = server.tracked()
    assert server.kill_survivors(timeout=0.2) == [
        f"process survived miren serve: pid {grandchild} (a stubborn sandbox)"
    ]
    eventually_sync(lambda: not is_alive(tracked), 5, "the survivor to die")
