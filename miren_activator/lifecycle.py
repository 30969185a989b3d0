"""The sandbox lifecycle as one (state, event) -> state table.

States are the store's `SandboxStatus`. A sandbox is PENDING from spawn until its health check
passes (BOOTED -> RUNNING). It ends STOPPED when the activator asked it to stop (idle, close,
version removed) and DEAD when it ended on its own or never booted (EXITED, BOOT_FAILED). An
upstream instance (a server that runs without us: nothing to restart) that does not answer is
DOWN (UNREACHABLE, at boot or later) and comes back RUNNING when a re-probe passes (BOOTED).
Both end states absorb the events that can still arrive after them (the process exit that follows
a stop request, a second stop), so callers never need to special-case ordering; every other pair
is a bug and raises `IllegalTransition` naming both.
"""

from __future__ import annotations

import enum
import signal

from miren_activator.errors import IllegalTransition
from miren_store.entities import SandboxStatus


class SandboxEvent(enum.StrEnum):
    BOOTED = "booted"  # the health check passed
    BOOT_FAILED = "boot_failed"  # spawn failed or boot_timeout passed
    EXITED = "exited"  # the process ended (or the upstream went away)
    STOP_REQUESTED = "stop_requested"  # idle scale-down, shutdown, version removed
    UNREACHABLE = "unreachable"  # an upstream refused or timed out a connection


P, R, W, S, D = (
    SandboxStatus.PENDING,
    SandboxStatus.RUNNING,
    SandboxStatus.DOWN,
    SandboxStatus.STOPPED,
    SandboxStatus.DEAD,
)
E = SandboxEvent

TRANSITIONS: dict[tuple[SandboxStatus, SandboxEvent], SandboxStatus] = {
    (P, E.BOOTED): R,
    (P, E.BOOT_FAILED): D,
    (P, E.EXITED): D,
    (P, E.STOP_REQUESTED): S,
    (P, E.UNREACHABLE): W,
    (R, E.EXITED): D,
    (R, E.STOP_REQUESTED): S,
    (R, E.UNREACHABLE): W,
    (W, E.BOOTED): R,
    (W, E.UNREACHABLE): W,
    (W, E.EXITED): D,
    (W, E.STOP_REQUESTED): S,
    # End states absorb late events: the exit that follows a stop, a repeated stop, a late
    # report of a refused connection.
    (S, E.EXITED): S,
    (S, E.STOP_REQUESTED): S,
    (S, E.UNREACHABLE): S,
    (D, E.EXITED): D,
    (D, E.STOP_REQUESTED): D,
    (D, E.UNREACHABLE): D,
}

FINAL = frozenset({S, D})


def transition(state: SandboxStatus, event: SandboxEvent) -> SandboxStatus:
    """The state after `event`; IllegalTransition when the table has no such pair."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def exit_reason(status: int | None) -> str:
    """How a sandbox's process ended, in words: `exited with status 3`, `killed by signal
    SIGKILL` (a negative status), and for a status above 128 (what a shell or bubblewrap reports
    for a child a signal ended) the signal it most likely stands for."""
    if status is None:
        return "ended"
    if status < 0:
        return f"killed by signal {_signal_name(-status)}"
    if 128 < status < 128 + 65:
        return f"exited with status {status} ({_signal_name(status - 128)})"
    return f"exited with status {status}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
