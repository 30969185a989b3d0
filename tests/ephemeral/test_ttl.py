"""TTLs: Go durations plus `d`, > 0, <= the maximum (SPEC §5; reference §3, cases 22, 23, R-3)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miren_store.deploy.errors import InvalidTTL
from miren_store.deploy.ttl import DEFAULT_TTL, describe_ttl, parse_ttl, resolve_ttl


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5h", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("30d", timedelta(days=30)),
        ("300ms", timedelta(milliseconds=300)),
    ],
)
def test_accepted(text: str, value: timedelta) -> None:
    assert parse_ttl(text) == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0s", "must be greater than 0"),
        ("-1h", "must be greater than 0"),
        ("0", "must be greater than 0"),
        ("", "empty"),
        ("7", "missing unit"),
        ("1x", "unknown unit"),
        ("31d", "must be at most 30d"),
        ("99999999999999999999d", "must be at most 30d"),
        ("-", "not a duration"),
    ],
)
def test_rejected_with_a_message_naming_the_input(text: str, reason: str) -> None:
    with pytest.raises(InvalidTTL) as info:
        parse_ttl(text)
    assert f"invalid ttl {text!r}" in str(info.value)
    assert reason in str(info.value)
    assert info.value.code == "invalid_ttl"


def test_maximum_is_configurable() -> None:
    assert parse_ttl("31d", maximum=timedelta(days=60)) == timedelta(days=31)
    with pytest.raises(InvalidTTL, match="at most 1h"):
        parse_ttl("2h", maximum=timedelta(hours=1))


def test_absent_ttl_is_the_default_and_stored_as_24h() -> None:
    assert resolve_ttl(None) == (DEFAULT_TTL, "24h")
    assert resolve_ttl(None, default=timedelta(days=2)) == (timedelta(days=2), "2d")
    assert resolve_ttl("1h30m") == (timedelta(minutes=90), "1h30m")  # stored as given


def test_describe_ttl() -> None:
    assert describe_ttl(timedelta(days=30)) == "30d"
    assert describe_ttl(timedelta(minutes=90)) == "1h30m"
    assert describe_ttl(timedelta(days=1)) == "24h"


@given(
    st.integers(min_value=0, max_value=29),
    st.integers(min_value=0, max_value=23),
    st.integers(min_value=0, max_value=59),
    st.integers(min_value=0, max_value=59),
)
def test_composed_durations_parse_to_their_sum(d: int, h: int, m: int, s: int) -> None:
    total = timedelta(days=d, hours=h, minutes=m, seconds=s)
    text = "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n)
    if not text:
        with pytest.raises(InvalidTTL):
            parse_ttl(text)
        return
    assert parse_ttl(text) == total


@given(st.text(max_size=12))
def test_parser_never_raises_anything_but_invalid_ttl(text: str) -> None:
    try:
        value = parse_ttl(text)
    except InvalidTTL as exc:
        assert repr(text) in str(exc)
    else:
        assert timedelta(0) < value <= timedelta(days=30)
