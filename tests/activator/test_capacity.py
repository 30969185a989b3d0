"""The capacity rule (miren_activator.capacity), as tables: no sockets, no activator."""

from __future__ import annotations

import pytest

from miren_activator.capacity import NO_LIMIT, pick, saturated, unit_limit


class Box:
    def __init__(self, name: str, in_use: int) -> None:
        self.name = name
        self.in_use = in_use

    def __repr__(self) -> str:
        return f"{self.name}:{self.in_use}"


def boxes(*loads: int) -> list[Box]:
    return [Box(chr(ord("a") + i), n) for i, n in enumerate(loads)]


@pytest.mark.parametrize(
    ("loads", "target", "cap", "expected"),
    [
        ((), 10, None, None),  # nothing runs: queue (a cold start)
        ((0,), 10, None, "a"),
        ((3, 0), 10, None, "a"),  # packing: the first below the target, not the least loaded
        ((10, 4), 10, None, "b"),
        ((10, 10), 10, None, "a"),  # all at the target: the least loaded (the first of equals)
        ((12, 11, 30), 10, None, "b"),  # past it: spread to the least loaded
        ((1000,), 10, None, "a"),  # 1,000 tunnels on a preview block nobody without a cap
        ((12, 11), 10, 12, "b"),
        ((12, 12), 10, 12, None),  # every one at the hard cap: queue
        ((4,), 4, 4, None),
        ((3,), 4, 4, "a"),
    ],
)
def test_pick(loads: tuple[int, ...], target: int, cap: int | None, expected: str | None) -> None:
    got = pick(boxes(*loads), target, cap)
    assert (got.name if got is not None else None) == expected


def test_saturated() -> None:
    assert saturated(boxes(10, 12), 10)
    assert not saturated(boxes(10, 9), 10)
    assert saturated([], 10)


@pytest.mark.parametrize(
    ("running", "live", "max_instances", "cap", "expected"),
    [
        (1, 1, 1, None, NO_LIMIT),  # a preview: one sandbox, no other possible
        (1, 1, 1, 50, 50),  # ... with a hard cap: the cap
        (1, 1, 20, None, 10),  # room to scale: past the target needs a decision
        (1, 2, 2, None, NO_LIMIT),  # the other one still boots: this one takes all meanwhile
        (2, 2, 2, None, 10),  # two to spread over
        (0, 1, 1, None, 10),
    ],
)
def test_unit_limit(
    running: int, live: int, max_instances: int, cap: int | None, expected: int
) -> None:
    got = unit_limit(target=10, cap=cap, running=running, live=live, max_instances=max_instances)
    assert got == expected
