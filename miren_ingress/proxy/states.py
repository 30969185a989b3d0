"""The states of the proxy's objects, each as one (state, event) -> state table. Pure.

Three objects have a lifecycle (see engine.py for what each one is):

**An exchange** (one request/response cycle) is WAITING from its parsed head until it is
started (pipelined behind the active one, or its body buffered); ROUTING while a task obtains a
lease and an upstream connection; SENDING once an upstream connection is attached and the
request goes to it; RESPONDING once the final response head went to the client (from then on
an error can only close the connection); DONE when it is finished: recorded, its lease handed
back. A 101 makes it a TUNNEL: answered and recorded, but its lease stays taken until the
tunnel closes. The proxy's own answers (a routing refusal, an error, a reserved path) go to
RESPONDING from wherever the exchange is; a request that cannot be answered at all (HTTP/0.9)
goes from WAITING to DONE. A reused upstream connection that closed before any response byte
sends an exchange back from SENDING to ROUTING, once (see `retry.py`).

**A client connection** has two independent parts. Its *lifecycle*: OPEN while it serves
requests; STOPPING once it must close after the active exchange (graceful shutdown);
LINGERING when it closed its sending side after an early answer and drops what the client still
sends; CLOSING once we closed it; CLOSED once the connection is lost. And what happens to the
bytes it *reads*: PARSE (requests, by llhttp); UPGRADE_BODY (the Content-Length body of an
upgrade request, counted by us: llhttp stops after such a head); HOLD (bytes after an upgrade
request, held until its answer: RFC 9931); TUNNEL (after a 101, written to the upstream as they
are); DISCARD (after a malformed request, or while lingering: dropped).

**An upstream connection** is OPEN (idle in its pool or attached to an exchange: `ex` says
which), a TUNNEL after a 101, and CLOSED once closed, closing or lost: never reused again.

Every pair not in a table is a defect and raises `IllegalTransition`. End states absorb the
events that can still arrive after them (a loss after a close), so callers need not order them.

The per-request moves of an exchange on the hit path (WAITING -> SENDING -> RESPONDING -> DONE)
are stored directly by the code that makes them (each names the event); every other move goes
through `move`. The proxy's tests check every store against the table (tests/proxy: a checked
Exchange is used throughout that suite).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class IllegalTransition(RuntimeError):
    """A (state, event) pair no table has: a defect in the proxy."""

    def __init__(self, state: enum.Enum, event: enum.Enum) -> None:
        super().__init__(f"illegal transition: {state.name} on {event.name}")
        self.state = state
        self.event = event


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


def move(table: Mapping[tuple[S, E], S], state: S, event: E) -> S:
    """The state after `event`; IllegalTransition when the table has no such pair."""
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


# --- an exchange --------------------------------------------------------------------------------


class Ex(enum.IntEnum):
    """An exchange's state. Ordered: `state >= TUNNEL` means answered and recorded."""

    WAITING = 0
    ROUTING = 1
    SENDING = 2
    RESPONDING = 3
    TUNNEL = 4
    DONE = 5


class ExEvent(enum.Enum):
    ROUTE = enum.auto()  # started without a warm lease and parked connection: a task gets them
    ATTACH = enum.auto()  # an upstream connection is attached and the request written to it
    RETRY = enum.auto()  # the upstream connection failed before any response byte: again, once
    HEAD_SENT = enum.auto()  # a final response head went to the client (the app's or ours)
    SWITCH = enum.auto()  # the 101 went to the client: a tunnel
    FINISH = enum.auto()  # the response went out whole (or the proxy ended the exchange)
    ABORT = enum.auto()  # the client connection is gone


_W, _R, _S, _P, _T, _D = Ex
_E = ExEvent

EXCHANGE: dict[tuple[Ex, ExEvent], Ex] = {
    (_W, _E.ROUTE): _R,
    (_W, _E.ATTACH): _S,  # the hit path: a warm lease and a parked connection at once
    (_R, _E.ATTACH): _S,
    (_S, _E.RETRY): _R,
    (_W, _E.HEAD_SENT): _P,  # the proxy's own answers: a refusal, a reserved path
    (_R, _E.HEAD_SENT): _P,  # ... an error while routing
    (_S, _E.HEAD_SENT): _P,  # the app's answer (or the proxy's error before it)
    (_P, _E.SWITCH): _T,
    (_P, _E.FINISH): _D,
    (_W, _E.FINISH): _D,  # nothing to answer (an HTTP/0.9 request): closed
    (_W, _E.ABORT): _D,
    (_R, _E.ABORT): _D,
    (_S, _E.ABORT): _D,
    (_P, _E.ABORT): _D,
    (_T, _E.ABORT): _D,  # either side of the tunnel closed
    (_D, _E.ABORT): _D,
}


# --- a client connection ------------------------------------------------------------------------


class Life(enum.IntEnum):
    """A client connection's lifecycle. Ordered: `>= LINGERING` means no more answers."""

    OPEN = 0
    STOPPING = 1
    LINGERING = 2
    CLOSING = 3
    CLOSED = 4


class LifeEvent(enum.Enum):
    STOP = enum.auto()  # close once the active exchange is done (graceful shutdown)
    LINGER = enum.auto()  # close our side after an early answer; drop what still comes
    CLOSE = enum.auto()  # close the connection (after what is written)
    LINGER_END = enum.auto()  # the client closed, went quiet, or lingered too long
    LOST = enum.auto()  # the connection is gone


_O, _ST, _L, _C, _X = Life
_LE = LifeEvent

LIFE: dict[tuple[Life, LifeEvent], Life] = {
    (_O, _LE.STOP): _ST,
    (_ST, _LE.STOP): _ST,
    (_L, _LE.STOP): _L,
    (_C, _LE.STOP): _C,
    (_X, _LE.STOP): _X,
    (_O, _LE.LINGER): _L,
    (_ST, _LE.LINGER): _L,
    (_O, _LE.CLOSE): _C,
    (_ST, _LE.CLOSE): _C,
    (_L, _LE.CLOSE): _L,  # (already closing its way: see InboundConnection.close)
    (_C, _LE.CLOSE): _C,
    (_X, _LE.CLOSE): _X,
    (_L, _LE.LINGER_END): _C,
    (_O, _LE.LOST): _X,
    (_ST, _LE.LOST): _X,
    (_L, _LE.LOST): _X,
    (_C, _LE.LOST): _X,
}


class Input(enum.IntEnum):
    """What happens to the bytes read from a client. PARSE is 0: `if self.input:` is the
    hot path's one test."""

    PARSE = 0
    UPGRADE_BODY = 1
    HOLD = 2
    TUNNEL = 3
    DISCARD = 4


class InputEvent(enum.Enum):
    UPGRADE_BODY = enum.auto()  # an upgrade request's head with a Content-Length body
    UPGRADE_WAIT = enum.auto()  # an upgrade request read whole: hold the rest until its answer
    PARSE_ON = enum.auto()  # an upgrade request we refuse ourselves (h2c): parse on at once
    ACCEPTED = enum.auto()  # the upstream answered 101
    REFUSED = enum.auto()  # the upstream answered anything else: plain HTTP/1.1 again
    MALFORMED = enum.auto()  # a malformed request: nothing more is parsed
    LINGER = enum.auto()  # the connection lingers: every byte is dropped


_PA, _UB, _H, _TU, _DI = Input
_IE = InputEvent

INPUT: dict[tuple[Input, InputEvent], Input] = {
    (_PA, _IE.UPGRADE_BODY): _UB,
    (_PA, _IE.UPGRADE_WAIT): _H,
    (_UB, _IE.UPGRADE_WAIT): _H,
    (_PA, _IE.PARSE_ON): _PA,
    (_UB, _IE.PARSE_ON): _PA,
    (_H, _IE.ACCEPTED): _TU,
    (_H, _IE.REFUSED): _PA,
    (_PA, _IE.MALFORMED): _DI,
    (_UB, _IE.MALFORMED): _DI,
    (_H, _IE.MALFORMED): _DI,
    (_DI, _IE.MALFORMED): _DI,
    (_PA, _IE.LINGER): _DI,
    (_UB, _IE.LINGER): _DI,
    (_H, _IE.LINGER): _DI,
    (_DI, _IE.LINGER): _DI,
}


# --- an upstream connection ---------------------------------------------------------------------


class Up(enum.IntEnum):
    OPEN = 0
    TUNNEL = 1
    CLOSED = 2


class UpEvent(enum.Enum):
    UPGRADED = enum.auto()  # a 101 was read: raw bytes both ways from now on
    CLOSE = enum.auto()  # closed, aborted, the upstream closed, or the connection was lost


UPSTREAM: dict[tuple[Up, UpEvent], Up] = {
    (Up.OPEN, UpEvent.UPGRADED): Up.TUNNEL,
    (Up.OPEN, UpEvent.CLOSE): Up.CLOSED,
    (Up.TUNNEL, UpEvent.CLOSE): Up.CLOSED,
    (Up.CLOSED, UpEvent.CLOSE): Up.CLOSED,
}
