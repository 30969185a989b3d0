"""Pure decisions of the activator: scaling, idle scale-down, crash back-off. No I/O, no clock.

Every function takes the facts it needs (counts, `now` as a monotonic float) and returns a
number or a list; the activator carries the result out. Tests exercise them without sockets.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from miren_store.entities import AppVersion

WEB = "web"


def pool_id_for(version_id: str, service: str) -> str:
    """The deterministic id of the private pool of (version, service).

    Every node derives the same id, so `Store.create` of it is the cross-process create-if-absent
    that makes concurrent first requests on several nodes end with one pool entity.
    """
    return f"pool-{version_id}-{service}"


@attrs.frozen
class PoolParams:
    """The scaling knobs of one (version, service), resolved from its spec once."""

    target: int  # in-flight work per sandbox before another starts (requests_per_instance)
    hard_cap: int | None  # in-flight work one sandbox never exceeds (max_requests_per_instance)
    max_instances: int
    min_instances: int
    scale_down_delay: float  # seconds idle before a sandbox is stopped
    boot_timeout: float  # seconds

    @classmethod
    def for_version(cls, version: AppVersion, service: str) -> PoolParams:
        # The ephemeral defaults (max 1, 15m idle) apply to a preview's web service; its other
        # services scale like a normal version's. An explicit setting wins either way.
        spec = version.spec
        conc = spec.effective_concurrency(version.is_ephemeral and service == WEB)
        assert conc.max_instances is not None and conc.scale_down_delay is not None
        return cls(
            target=conc.requests_per_instance,
            hard_cap=conc.max_requests_per_instance,
            max_instances=conc.max_instances,
            min_instances=conc.min_instances,
            scale_down_delay=conc.scale_down_delay.total_seconds(),
            boot_timeout=spec.boot_timeout.total_seconds(),
        )


def sandboxes_to_start(
    *,
    waiting: int,
    pending: int,
    live: int,
    params: PoolParams,
    in_backoff: bool,
    saturated: bool = False,
) -> int:
    """How many sandboxes to start now.

    `live` counts pending + running sandboxes. Below `min_instances` the pool is filled up to it.
    Otherwise one more starts when callers are still waiting after every running sandbox took
    what it may, or when every running sandbox is at or above the target (`saturated`: the work
    is spread over them meanwhile), and no sandbox is already booting (waiting on a booting
    sandbox is cheaper than starting another), never past `max_instances`. Nothing starts during
    a crash back-off.
    """
    if in_backoff:
        return 0
    room = params.max_instances - live
    if room <= 0:
        return 0
    below_min = params.min_instances - live
    if below_min > 0:
        return min(below_min, room)
    if (waiting > 0 or saturated) and pending == 0:
        return 1
    return 0


@attrs.frozen
class IdleCandidate:
    """A RUNNING sandbox as the scale-down decision sees it."""

    id: str
    in_use: int
    last_used: float  # monotonic seconds of its last acquire or release (or boot)


def idle_victims(
    running: Sequence[IdleCandidate], *, live: int, now: float, params: PoolParams
) -> list[str]:
    """Ids of running sandboxes to stop: idle (no in-flight lease) for `scale_down_delay`.

    Longest-idle first, and never so many that fewer than `min_instances` stay live. A sandbox
    with an in-flight lease is never chosen, however old its last activity.
    """
    spare = live - params.min_instances
    if spare <= 0:
        return []
    idle = [c for c in running if c.in_use == 0 and now - c.last_used >= params.scale_down_delay]
    idle.sort(key=lambda c: c.last_used)
    return [c.id for c in idle[:spare]]


@attrs.frozen
class CrashPolicy:
    """Quick-crash back-off: a sandbox that dies within `window` seconds of its start is a quick
    crash. The first one is replaced at once (a sandbox killed or lost once, or a stale lease
    reported unreachable, must not take its version down); the n-th consecutive one (n >= 2)
    blocks new sandboxes for `base * 2**(n-2)` seconds, at most `cap`: 0, 10 s, 20 s, ... 15 min.
    A sandbox that dies or is stopped after living at least `window` resets the count."""

    window: float = 60.0
    base: float = 10.0
    cap: float = 900.0

    def backoff(self, consecutive: int) -> float:
        if consecutive <= 1:
            return 0.0
        # Bounded exponent: 2**60 would be a float overflow hazard for nothing.
        return min(self.cap, self.base * 2.0 ** min(consecutive - 2, 40))


@attrs.frozen
class CrashState:
    consecutive: int = 0
    cooldown_until: float | None = None  # monotonic

    def remaining(self, now: float) -> float:
        """Seconds of back-off left at `now` (0 when none)."""
        if self.cooldown_until is None:
            return 0.0
        return max(0.0, self.cooldown_until - now)


def after_death(state: CrashState, *, uptime: float, now: float, policy: CrashPolicy) -> CrashState:
    """The crash state after a sandbox died on its own (exit or failed boot) `uptime` s old."""
    if uptime >= policy.window:
        return CrashState()
    n = state.consecutive + 1
    return CrashState(consecutive=n, cooldown_until=now + policy.backoff(n))


def after_clean_stop(state: CrashState, *, uptime: float, policy: CrashPolicy) -> CrashState:
    """A sandbox we stopped after it lived `window` seconds proves the version can run."""
    if uptime >= policy.window:
        return CrashState()
    return state
