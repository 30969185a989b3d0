"""The proxy's state tables, tested directly (every state x event pair), and the check that
holds the hit path's direct stores to the exchange table."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping

import pytest

from miren_ingress.proxy import StaticRouter
from miren_ingress.proxy.states import (
    EXCHANGE,
    INPUT,
    LIFE,
    UPSTREAM,
    Ex,
    ExEvent,
    IllegalTransition,
    Input,
    InputEvent,
    Life,
    LifeEvent,
    Up,
    UpEvent,
    move,
)
from miren_ingress.proxy.testing import Bench, CheckedExchange
from tests.support.hotpath import needs_sources

W, R, S, P, T, D = Ex
E = ExEvent
EXPECTED_EXCHANGE = {
    (W, E.ROUTE): R,
    (W, E.ATTACH): S,
    (R, E.ATTACH): S,
    (S, E.RETRY): R,
    (W, E.HEAD_SENT): P,
    (R, E.HEAD_SENT): P,
    (S, E.HEAD_SENT): P,
    (P, E.SWITCH): T,
    (P, E.FINISH): D,
    (W, E.FINISH): D,
    (W, E.ABORT): D,
    (R, E.ABORT): D,
    (S, E.ABORT): D,
    (P, E.ABORT): D,
    (T, E.ABORT): D,
    (D, E.ABORT): D,
}

OP, ST, L, C, X = Life
LE = LifeEvent
EXPECTED_LIFE = {
    (OP, LE.STOP): ST,
    (ST, LE.STOP): ST,
    (L, LE.STOP): L,
    (C, LE.STOP): C,
    (X, LE.STOP): X,
    (OP, LE.LINGER): L,
    (ST, LE.LINGER): L,
    (OP, LE.CLOSE): C,
    (ST, LE.CLOSE): C,
    (L, LE.CLOSE): L,
    (C, LE.CLOSE): C,
    (X, LE.CLOSE): X,
    (L, LE.LINGER_END): C,
    (OP, LE.LOST): X,
    (ST, LE.LOST): X,
    (L, LE.LOST): X,
    (C, LE.LOST): X,
}

PA, UB, H, TU, DI = Input
IE = InputEvent
EXPECTED_INPUT = {
    (PA, IE.UPGRADE_BODY): UB,
    (PA, IE.UPGRADE_WAIT): H,
    (UB, IE.UPGRADE_WAIT): H,
    (PA, IE.PARSE_ON): PA,
    (UB, IE.PARSE_ON): PA,
    (H, IE.ACCEPTED): TU,
    (H, IE.REFUSED): PA,
    (PA, IE.MALFORMED): DI,
    (UB, IE.MALFORMED): DI,
    (H, IE.MALFORMED): DI,
    (DI, IE.MALFORMED): DI,
    (PA, IE.LINGER): DI,
    (UB, IE.LINGER): DI,
    (H, IE.LINGER): DI,
    (DI, IE.LINGER): DI,
}

EXPECTED_UPSTREAM = {
    (Up.OPEN, UpEvent.UPGRADED): Up.TUNNEL,
    (Up.OPEN, UpEvent.CLOSE): Up.CLOSED,
    (Up.TUNNEL, UpEvent.CLOSE): Up.CLOSED,
    (Up.CLOSED, UpEvent.CLOSE): Up.CLOSED,
}

TABLES: list[tuple[str, Mapping, Mapping, type[enum.Enum], type[enum.Enum]]] = [
    ("exchange", EXCHANGE, EXPECTED_EXCHANGE, Ex, ExEvent),
    ("life", LIFE, EXPECTED_LIFE, Life, LifeEvent),
    ("input", INPUT, EXPECTED_INPUT, Input, InputEvent),
    ("upstream", UPSTREAM, EXPECTED_UPSTREAM, Up, UpEvent),
]
PAIRS = [
    (name, table, expected, state, event)
    for name, table, expected, states, events in TABLES
    for state, event in itertools.product(states, events)
]


@pytest.mark.parametrize(
    ("name", "table", "expected", "state", "event"),
    PAIRS,
    ids=[f"{p[0]}-{p[3].name}-{p[4].name}" for p in PAIRS],
)
def test_every_pair(name, table, expected, state, event) -> None:
    if (state, event) in expected:
        assert move(table, state, event) is expected[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as info:
            move(table, state, event)
        assert (info.value.state, info.value.event) == (state, event)
        assert state.name in str(info.value) and event.name in str(info.value)


@pytest.mark.parametrize(("name", "table", "expected"), [t[:3] for t in TABLES])
def test_each_table_is_exactly_the_expected_one(name, table, expected) -> None:
    assert table == expected


def test_end_states_only_absorb() -> None:
    """Nothing leaves an end state: DONE, CLOSED (both kinds), DISCARD."""
    for table, end in ((EXCHANGE, D), (LIFE, X), (UPSTREAM, Up.CLOSED), (INPUT, DI)):
        assert {new for (old, _), new in table.items() if old is end} == {end}


def test_the_ordered_shortcuts_hold() -> None:
    # The code tests `state >= TUNNEL` (answered and recorded) and `life >= LINGERING` (no
    # more answers): those are exactly these states.
    assert [s for s in Ex if s >= Ex.TUNNEL] == [T, D]
    assert [s for s in Life if s >= Life.LINGERING] == [L, C, X]
    assert Input.PARSE == 0 and Up.OPEN == 0  # (`if self.input:` and `not conn.state`)


@needs_sources
async def test_a_checked_exchange_refuses_a_move_the_table_does_not_have() -> None:
    bench = Bench(StaticRouter({}))
    inbound, _ = bench.client()
    ex = CheckedExchange(inbound, b"GET", b"a", b"", True, False)
    assert ex.state is W
    ex.state = S  # ATTACH from WAITING: the hit path
    ex.state = P  # HEAD_SENT
    with pytest.raises(AssertionError, match="RESPONDING -> RESPONDING"):
        ex.state = P  # (a second HEAD_SENT: no event makes that move)
    with pytest.raises(AssertionError, match="RESPONDING -> ROUTING"):
        ex.state = R
    ex.state = D
    with pytest.raises(AssertionError, match="starts WAITING"):
        fresh = CheckedExchange.__new__(CheckedExchange)
        fresh.state = D
    inbound.connection_lost(None)
