"""The sandbox lifecycle table, tested directly: every (state, event) pair."""

from __future__ import annotations

import itertools

import pytest

from miren_activator.errors import IllegalTransition
from miren_activator.lifecycle import TRANSITIONS, SandboxEvent, exit_reason, transition
from miren_store.entities import SandboxStatus as S

E = SandboxEvent

EXPECTED = {
    (S.PENDING, E.BOOTED): S.RUNNING,
    (S.PENDING, E.BOOT_FAILED): S.DEAD,
    (S.PENDING, E.EXITED): S.DEAD,
    (S.PENDING, E.STOP_REQUESTED): S.STOPPED,
    (S.PENDING, E.UNREACHABLE): S.DOWN,  # an upstream that does not accept at boot
    (S.RUNNING, E.EXITED): S.DEAD,
    (S.RUNNING, E.STOP_REQUESTED): S.STOPPED,
    (S.RUNNING, E.UNREACHABLE): S.DOWN,
    (S.DOWN, E.BOOTED): S.RUNNING,  # a re-probe passed
    (S.DOWN, E.UNREACHABLE): S.DOWN,
    (S.DOWN, E.EXITED): S.DEAD,
    (S.DOWN, E.STOP_REQUESTED): S.STOPPED,
    (S.STOPPED, E.EXITED): S.STOPPED,
    (S.STOPPED, E.STOP_REQUESTED): S.STOPPED,
    (S.STOPPED, E.UNREACHABLE): S.STOPPED,
    (S.DEAD, E.EXITED): S.DEAD,
    (S.DEAD, E.STOP_REQUESTED): S.DEAD,
    (S.DEAD, E.UNREACHABLE): S.DEAD,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_pair(state: S, event: SandboxEvent) -> None:
    if (state, event) in EXPECTED:
        assert transition(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as info:
            transition(state, event)
        assert info.value.state is state
        assert info.value.event is event
        assert str(state) in str(info.value) and str(event) in str(info.value)


def test_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED


def test_only_pending_and_down_boot_and_end_states_are_absorbing() -> None:
    assert [s for s in S if (s, E.BOOTED) in TRANSITIONS] == [S.PENDING, S.DOWN]
    for end in (S.STOPPED, S.DEAD):
        assert {TRANSITIONS[(end, e)] for e in E if (end, e) in TRANSITIONS} == {end}


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (0, "exited with status 0"),
        (3, "exited with status 3"),
        (-9, "killed by signal SIGKILL"),
        (-15, "killed by signal SIGTERM"),
        (137, "exited with status 137 (SIGKILL)"),  # a shell's or bubblewrap's way to say it
        (255, "exited with status 255"),
        (None, "ended"),
    ],
)
def test_exit_reason_in_words(status: int | None, words: str) -> None:
    assert exit_reason(status) == words
