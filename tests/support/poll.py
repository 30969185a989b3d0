"""Waiting for a condition: poll under a deadline, fail naming what was awaited.

Every wait in the suite goes through here, so none can hang and none hides behind a fixed
sleep. `eventually` is for the event loop: its probe may be a plain function or return an
awaitable, so the same call works for a predicate (`lambda: pool.ready == 2`) and for a probe
that does I/O (`edge.wait_status`-style requests). `eventually_sync` is the same for code that
waits in a thread or in a synchronous test. Both return the probe's first truthy value, so a
probe can hand back what it found; at the deadline they raise AssertionError with the
description (a string, or a function called then, to show state gathered on the way) and the
probe's last value.

`ignore` lists exceptions that mean "not yet" (a store still reconnecting, a port not yet
listening): the probe is tried again, and at the deadline the last one is chained to the error.
Any other exception, an assertion inside the probe included, propagates at once.

`transitions_sync` records the distinct values a probe goes through until one is reached, each
with the wall-clock time it was first seen, for tests about what came before (200, 410, 404).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
DEFAULT_INTERVAL = 0.01


Description = str | Callable[[], str]


def _failure(
    what: Description, timeout: float, last: Any, error: BaseException | None
) -> AssertionError:
    text = what() if callable(what) else what
    message = f"timed out after {timeout:g}s waiting for {text or 'the condition'}"
    if error is not None:
        message += f"; last error {error!r}"
    else:
        message += f"; last value {last!r}"
    return AssertionError(message)


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    timeout: float = DEFAULT_TIMEOUT,
    what: Description = "",
    *,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `probe()` (awaiting what it returns, if awaitable) every `interval` seconds until
    it returns something truthy, and return that. AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        error: BaseException | None = None
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            error = exc
        else:
            if value:
                return value  # type: ignore[return-value]
            last = value
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last, error) from error
        await asyncio.sleep(interval)


def eventually_sync(
    probe: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    what: Description = "",
    *,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """`eventually` for synchronous code (a thread, a sync test): blocks between tries."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        error: BaseException | None = None
        try:
            value = probe()
        except ignore as exc:
            error = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last, error) from error
        time.sleep(interval)


def transitions_sync(
    probe: Callable[[], T],
    want: T,
    timeout: float,
    what: str = "",
    *,
    interval: float = DEFAULT_INTERVAL,
) -> list[tuple[T, float]]:
    """Poll `probe()` until it returns `want`. Returns the distinct values seen on the way, in
    order, each with the wall-clock time (`time.time()`) it was first seen; at the deadline the
    AssertionError lists them."""
    seen: list[tuple[T, float]] = []

    def reached() -> bool:
        value = probe()
        if not seen or seen[-1][0] != value:
            seen.append((value, time.time()))
        return value == want

    try:
        eventually_sync(reached, timeout, what, interval=interval)
    except AssertionError:
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what} == {want!r}; "
            f"saw {[v for v, _ in seen]!r}"
        ) from None
    return seen
