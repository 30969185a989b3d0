"""The retry rule (retry.py), without sockets: every combination of its inputs."""

from __future__ import annotations

import errno
import itertools

import pytest

from miren_ingress.proxy.retry import Next, after_connect_error, after_upstream_lost

FLAGS = (
    "reset",
    "got_bytes",
    "request_complete",
    "has_body",
    "upgrade",
    "reused",
    "replayed",
    "lease_cached",
    "retried",
)


def expected(method: bytes, f: dict[str, bool]) -> Next:
    """The rule as the module docstring states it, written out case by case."""
    safe = (
        f["reset"]
        and not f["got_bytes"]
        and f["request_complete"]
        and not f["has_body"]
        and method in (b"GET", b"HEAD", b"OPTIONS")
        and not f["upgrade"]
    )
    if not safe:
        return Next.FAIL
    if f["reused"] and not f["replayed"]:
        return Next.REPLAY  # the stale keep-alive race
    if f["replayed"] and f["lease_cached"] and not f["retried"]:
        return Next.FRESH_LEASE  # reset again on a new connection: the sandbox is going away
    return Next.FAIL


CASES = [
    (method, dict(zip(FLAGS, values, strict=True)))
    for method in (b"GET", b"HEAD", b"OPTIONS", b"POST", b"PUT", b"DELETE")
    for values in itertools.product((False, True), repeat=len(FLAGS))
]


def test_after_upstream_lost_for_every_combination() -> None:
    seen = set()
    for method, flags in CASES:
        got = after_upstream_lost(method=method, **flags)
        assert got is expected(method, flags), (method, flags)
        seen.add(got)
    assert seen == {Next.FAIL, Next.REPLAY, Next.FRESH_LEASE}


def test_the_two_retries_need_exactly_their_conditions() -> None:
    base = dict.fromkeys(FLAGS, False) | {"reset": True, "request_complete": True}
    assert after_upstream_lost(method=b"GET", **base | {"reused": True}) is Next.REPLAY
    fresh = base | {"replayed": True, "lease_cached": True}
    assert after_upstream_lost(method=b"GET", **fresh) is Next.FRESH_LEASE
    for unsafe in ({"reset": False}, {"got_bytes": True}, {"request_complete": False},
                   {"has_body": True}, {"upgrade": True}):  # fmt: skip
        assert after_upstream_lost(method=b"GET", **base | {"reused": True} | unsafe) is Next.FAIL
    assert after_upstream_lost(method=b"POST", **base | {"reused": True}) is Next.FAIL
    assert after_upstream_lost(method=b"GET", **fresh | {"retried": True}) is Next.FAIL
    assert after_upstream_lost(method=b"GET", **fresh | {"lease_cached": False}) is Next.FAIL


@pytest.mark.parametrize(
    "code", [errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH]
)
def test_a_refused_connect_goes_to_a_fresh_lease_once(code: int) -> None:
    exc = OSError(code, "refused")
    assert after_connect_error(exc, retried=False) is Next.FRESH_LEASE
    assert after_connect_error(exc, retried=True) is Next.DROP_AND_FAIL


def test_a_connect_timeout_is_retried_like_a_refusal() -> None:
    assert after_connect_error(TimeoutError(), retried=False) is Next.FRESH_LEASE
    assert after_connect_error(TimeoutError(), retried=True) is Next.DROP_AND_FAIL


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EACCES, errno.EADDRNOTAVAIL])
def test_other_connect_errors_fail_at_once_and_keep_the_sandbox(code: int) -> None:
    for retried in (False, True):
        assert after_connect_error(OSError(code, "x"), retried=retried) is Next.FAIL
