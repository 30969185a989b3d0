"""The clock the activator's policies read (idle time, crash back-off), injected for tests.

Only decisions read it; waits that must really pass (boot_timeout, stop grace) use the event
loop's own time, so a test can jump a `ManualClock` across a 15 minute scale-down delay while
processes and sockets keep real time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (the policies' `now`)."""

    def now(self) -> datetime:
        """Wall time (UTC), for what is written to the store and shown to people."""


class SystemClock:
    """The real clocks: `time.monotonic` and `datetime.now(UTC)`."""

    monotonic = staticmethod(time.monotonic)

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "<SystemClock>"


class ManualClock:
    """A clock that moves only when told to (`advance`)."""

    def __init__(self, start: float = 1000.0, wall: datetime | None = None) -> None:
        self._mono = start
        self._wall = wall or datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)

    def __repr__(self) -> str:
        return f"<ManualClock t={self._mono:.3f}>"


def wall_of(clock: Clock, mono: float) -> datetime:
    """The wall time at which `clock.monotonic()` read `mono`."""
    return clock.now() - timedelta(seconds=clock.monotonic() - mono)
