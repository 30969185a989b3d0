"""Lease accounting: which running sandbox takes the next unit of work, and when a pool needs
another sandbox. Pure: no I/O, no clock; the activator applies it (SPEC §7).

The model. A sandbox's `in_use` counts the units of work it holds now: requests in flight,
upgraded connections (tunnels) and long responses alike. `requests_per_instance` is a scaling
*target*, not a limit: work goes to the first running sandbox below the target (packing the load
onto the first sandboxes lets the others go idle and scale down); when every running sandbox is
at or above it, the least loaded one takes the work anyway (spreading), and the pool is asked for
one more sandbox, up to `max_instances`. So ten open WebSockets on a preview (one instance)
block nobody. Only a *hard cap*, `max_requests_per_instance` (absent: none), stops a sandbox from
taking more: when every running sandbox is at it, the work queues (bounded by `max_waiters`) until
a unit is given back or another sandbox boots. With no running sandbox at all (a cold start) work
always queues until the first one is ready.

`unit_limit` is what lets the hot path take a unit without any decision: a sandbox below its limit
may simply count one more. It is the target while a decision could differ (more than one sandbox
to spread over, or room to scale up), and the hard cap (or no limit) when the pool has one running
sandbox and can have no other, as a preview usually has: then every unit goes to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol, TypeVar

NO_LIMIT: Final = 1 << 62  # (an int, so a comparison on the hot path stays int against int)


class Loaded(Protocol):
    """A running sandbox as the accounting sees it."""

    in_use: int


S = TypeVar("S", bound=Loaded)


def pick(running: Iterable[S], target: int, cap: int | None) -> S | None:
    """The sandbox the next unit of work goes to: the first one below `target`; else the least
    loaded one, unless it is at the hard `cap`; None when work must queue (no sandbox running,
    or every one at the cap)."""
    least: S | None = None
    for sb in running:
        n = sb.in_use
        if n < target:
            return sb
        if least is None or n < least.in_use:
            least = sb
    if least is None or (cap is not None and least.in_use >= cap):
        return None
    return least


def saturated(running: Iterable[Loaded], target: int) -> bool:
    """Every running sandbox is at or above the target (true of none running, too)."""
    return all(sb.in_use >= target for sb in running)


def unit_limit(*, target: int, cap: int | None, running: int, live: int, max_instances: int) -> int:
    """How many units a running sandbox may hold before a unit needs a decision (see the module
    docstring). `running`/`live`: the pool's running sandboxes, and its running plus booting
    ones."""
    if running == 1 and live >= max_instances:
        return cap if cap is not None else NO_LIMIT
    return target
