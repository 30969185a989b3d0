"""Activator errors, grouped by how the caller (the ingress) reacts.

Every error the activator raises to a caller derives from `ActivatorError` and carries the HTTP
status the proxy should answer with (`http_status`), so the mapping lives next to the error, as
h11 does it. Foreign exceptions (OSError from spawning, store errors during pool creation) are
translated into these at the boundary; the original is kept as `__cause__`.

- The version cannot serve right now (502): `BootFailed`, and its subclass `CrashBackoff`.
- Nothing became ready in time (504): `ActivationTimeout`.
- Shed load, try again later (503 + Retry-After): `Overloaded`, `ActivatorClosed`, `NotOwner`,
  `PoolCreationFailed`.
- The version is gone (404): `VersionRemoved`.
- A bug in the activator itself: `IllegalTransition` (never expected in production).
"""

from __future__ import annotations


class ActivatorError(Exception):
    """Base of every error the activator raises."""

    http_status: int = 500


class BootFailed(ActivatorError):
    """A sandbox of the version died or failed while booting (exit during boot, spawn error).

    `sandbox_id` names the sandbox whose log explains why, when there is one.
    """

    http_status = 502

    def __init__(self, message: str, *, sandbox_id: str | None = None) -> None:
        super().__init__(message)
        self.sandbox_id = sandbox_id


class Unreachable(BootFailed):
    """An upstream instance refused the connection or did not accept it in time (its server
    is down): the instance is DOWN and re-probed until it answers; callers fail fast."""


class CrashBackoff(BootFailed):
    """The version crashed quickly, repeatedly: acquires fail fast until `retry_after` passes."""

    def __init__(self, message: str, *, retry_after: float, sandbox_id: str | None = None) -> None:
        super().__init__(message, sandbox_id=sandbox_id)
        self.retry_after = retry_after


class ActivationTimeout(ActivatorError):
    """No sandbox became ready (or had capacity) within the allowed time."""

    http_status = 504

    def __init__(self, message: str, *, sandbox_id: str | None = None) -> None:
        super().__init__(message)
        self.sandbox_id = sandbox_id


class Overloaded(ActivatorError):
    """Too many requests are already waiting for this version (the cold-start queue is full)."""

    http_status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ActivatorClosed(Overloaded):
    """The activator is shutting down; no new leases."""


class PoolCreationFailed(ActivatorError):
    """Creating or loading the version's pool failed (usually the store); the next call retries.

    One instance is shared by every caller that waited on the same creation.
    """

    http_status = 503


class NotOwner(Overloaded):
    """This node may not serve the pool now: it cannot prove its cluster membership (joining,
    or its lease lapsed: fenced), or a forwarded request reached a node that does not own the
    pool. 503 + Retry-After: the next try finds the owner."""


class VersionRemoved(ActivatorError):
    """The version's pools were removed (the version was deleted) while the caller waited."""

    http_status = 404


class IllegalTransition(ActivatorError):
    """A sandbox lifecycle event that the transition table does not allow in the current state."""

    def __init__(self, state: object, event: object) -> None:
        super().__init__(f"illegal sandbox transition: event {event} in state {state}")
        self.state = state
        self.event = event
