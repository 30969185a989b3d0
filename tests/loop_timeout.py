"""pytest-timeout's signal method, made to fire on an idle uvloop (a pytest plugin).

pytest-timeout arms SIGALRM and raises `pytest.fail` from the handler. Python runs a signal
handler between two bytecodes of the main thread. When a test hangs on an idle event loop, the
main thread sits in uvloop's `epoll_wait`, and uvloop runs the handler from a loop callback
that catches every exception and only logs it. The timeout is swallowed and the test hangs for
good: the whole run with it.

This plugin arms the same timer. When it fires:
- inside a running event loop that is waiting for I/O (the frame Python interrupted is
  asyncio's own: `Runner.run` or `run_until_complete`), it prints the stacks of the threads and
  of the loop's tasks, then cancels the task the loop is running to completion (the test, or an
  async fixture's set-up or tear-down). The test fails with `CancelledError: Timeout >Ns`, its
  `finally` blocks and its fixtures' tear-downs run, and the next test starts;
- anywhere else (Python code blocked in a call, a synchronous test, the default asyncio loop)
  it does what pytest-timeout does: dump the stacks and raise `pytest.fail`;
- if a loop was running and the test is still not done `GRACE` seconds later (it ignored the
  cancellation, or a loop entered some other way swallowed the exception), it falls back to
  pytest-timeout's thread method: dump the stacks and end the process (a hang must not outlive
  its timeout in CI).
"""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import threading
from types import FrameType
from typing import Any

import pytest
import pytest_timeout

GRACE = 10.0  # seconds a cancelled test gets to finish before the process is ended
_ASYNCIO_FILES = frozenset(
    sys.modules[name].__file__ for name in ("asyncio.runners", "asyncio.base_events")
)


def loop_is_waiting(frame: FrameType | None) -> bool:
    """True when the interrupted frame is asyncio's own run call: the loop is in its poll."""
    return frame is not None and frame.f_code.co_filename in _ASYNCIO_FILES


def completing_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
    """The task `run_until_complete` is waiting for: the one with its done-callback."""
    for task in asyncio.all_tasks(loop):
        for callback, *_ in getattr(task, "_callbacks", None) or ():
            name = getattr(callback, "__qualname__", "")
            if "run_until_complete" in name:  # uvloop's done_cb, asyncio's _run_until_complete_cb
                return task
    return None


def _dump_tasks(item: pytest.Item, loop: asyncio.AbstractEventLoop) -> None:
    terminal = item.config.get_terminal_writer()
    terminal.sep("+", title="Timeout: the event loop's tasks")
    for task in asyncio.all_tasks(loop):
        out = io.StringIO()
        task.print_stack(file=out)
        terminal.write(out.getvalue())


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own implementation
    fired: list[bool] = []  # (set once the timer fired while a loop was running)

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        if fired:  # the first firing did not end the test: end the process
            pytest_timeout.timeout_timer(item, settings)
            return
        loop = asyncio._get_running_loop()
        if loop is None:
            pytest_timeout.timeout_sigalrm(item, settings)  # raises: nothing can swallow it
            return
        if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
            return
        fired.append(True)
        signal.setitimer(signal.ITIMER_REAL, GRACE)  # the fallback, if what follows fails
        if not loop_is_waiting(frame):
            # Python code blocked in a call under the loop: the exception ends it there. (Or
            # the loop was entered some other way and swallows it: the grace covers that.)
            pytest_timeout.timeout_sigalrm(item, settings)
            return
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title="Timeout")
        pytest_timeout.dump_stacks(terminal)
        _dump_tasks(item, loop)
        task = completing_task(loop)
        if task is None:
            loop.stop()  # run_until_complete then raises: "Event loop stopped before ..."
        else:
            task.cancel(pytest_timeout.PYTEST_FAILURE_MESSAGE % settings.timeout)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # read by pytest-timeout
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
