"""When a failed request to an upstream is tried again: pure decisions, no I/O.

A request is sent again only when the app cannot have seen it, or cannot have acted on it:
- **connecting failed** (refused, reset while connecting, host or network unreachable, timed
  out): nothing was sent. The sandbox is taken out of service and the request goes to another
  lease (another ready instance, or a fresh boot), once; a second failure is a 502. Any other
  error while connecting (a defect, resources) is a 502 at once.
- **a reused keep-alive connection closed before any response byte** (the stale keep-alive
  race: the app closed it as we reused it), for a request that is complete, has no body and is
  safe to repeat (GET, HEAD, OPTIONS; never an upgrade): sent once more on a new connection to
  the same sandbox (`REPLAY`). If that new connection is reset before any byte too, and the lease
  came from the cache, the sandbox is going away (a killed process's listener can accept for a
  moment): the lease is dropped and the request goes to a fresh one, once (`FRESH_LEASE`).
- anything else after request bytes were written: a 502, never repeated.
"""

from __future__ import annotations

import enum
import errno

# Connecting failed before any request byte was sent. A reset while connecting is a dying
# sandbox's listener (it accepted, then the process went away).
CONNECT_RETRY_ERRNOS = frozenset(
    (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH)
)
REPLAYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS"))


class Next(enum.Enum):
    FAIL = "fail"  # answer the error (502, or close once the response is under way)
    DROP_AND_FAIL = "drop_and_fail"  # drop the lease (its sandbox is out of service), then FAIL
    REPLAY = "replay"  # the same lease, a new connection
    FRESH_LEASE = "fresh_lease"  # drop the lease (its sandbox is out of service), take another


def after_connect_error(exc: OSError | TimeoutError, *, retried: bool) -> Next:
    """Connecting to the lease's address failed with `exc`; `retried`: this request already
    went to a fresh lease once."""
    if not (isinstance(exc, TimeoutError) or exc.errno in CONNECT_RETRY_ERRNOS):
        return Next.FAIL
    return Next.DROP_AND_FAIL if retried else Next.FRESH_LEASE


def after_upstream_lost(
    *,
    reset: bool,
    got_bytes: bool,
    request_complete: bool,
    has_body: bool,
    method: bytes,
    upgrade: bool,
    reused: bool,
    replayed: bool,
    lease_cached: bool,
    retried: bool,
) -> Next:
    """The upstream connection of a request in flight broke. `reset`: it closed or reset (not
    a timeout nor a protocol error); `got_bytes`: some response byte arrived; `reused`: the
    connection served an earlier request; `replayed` / `retried`: this request was already
    sent again on a new connection / on a fresh lease; `lease_cached`: its lease came from the
    router's cache."""
    if (
        not reset
        or got_bytes
        or not request_complete
        or has_body
        or method not in REPLAYABLE
        or upgrade
    ):
        return Next.FAIL
    if reused and not replayed:
        return Next.REPLAY
    if replayed and lease_cached and not retried:
        return Next.FRESH_LEASE
    return Next.FAIL
