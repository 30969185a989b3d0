"""pytest-timeout's signal method, made to fire on an idle uvloop (a pytest plugin).

pytest-timeout arms SIGALRM and raises `pytest.fail` from the handler. Python runs a signal
handler between two bytecodes of the main thread. When a test hangs on an idle event loop, the
main thread sits in uvloop's `epoll_wait`, and uvloop runs the handler from a loop callback
that catches every exception and only logs it. The timeout is swallowed and the test hangs for
good: the whole run with it.

This plugin arms the same timer. When it fires:
- with no event loop running (a synchronous test), it does what pytest-timeout does: dump the
  stacks and raise `pytest.fail`;
- inside a running loop, it prints the stacks of the threads and of the loop's tasks. Then, if
  the task the loop is running to completion (the test, or an async fixture's set-up or
  tear-down) is the one executing, blocked in a call, it raises there; otherwise (the loop
  waits for I/O, or runs another task or a callback) it cancels that task. The test fails with
  `CancelledError: Timeout (>Ns) ...`, its `finally` blocks and its fixtures' tear-downs run,
  and the next test starts. With no such task (a bare future), it stops the loop;
- if the test is still not done `GRACE` seconds later (it ignored the cancellation, or the
  exception was swallowed), it prints the main thread's stack and the loop's tasks and falls
  back to pytest-timeout's thread method, which ends the process: a hang must not outlive its
  timeout in CI.
"""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import traceback
from types import FrameType
from typing import Any

import pytest
import pytest_timeout

GRACE = 10.0  # seconds a cancelled test gets to finish before the process is ended


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
    message = pytest_timeout.PYTEST_FAILURE_MESSAGE % settings.timeout

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        loop = asyncio._get_running_loop()
        if fired:  # the first firing did not end the test: show where it is, end the process
            terminal = item.config.get_terminal_writer()
            terminal.sep("+", title=f"Timeout: still running {GRACE}s later; the main thread")
            terminal.write("".join(traceback.format_stack(frame)))
            if loop is not None:
                _dump_tasks(item, loop)
            pytest_timeout.timeout_timer(item, settings)  # (ends the process)
            return
        if loop is None:
            pytest_timeout.timeout_sigalrm(item, settings)  # raises: nothing can swallow it
            return
        if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
            return
        fired.append(True)
        signal.setitimer(signal.ITIMER_REAL, GRACE)  # the fallback, if what follows fails
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title="Timeout")
        pytest_timeout.dump_stacks(terminal)
        _dump_tasks(item, loop)
        task = completing_task(loop)
        if task is None:
            loop.stop()  # run_until_complete then raises: "Event loop stopped before ..."
        elif asyncio.current_task(loop) is task:
            pytest.fail(message)  # its own code is blocked in a call: the exception ends it
        else:
            task.cancel(message)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # read by pytest-timeout
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
