"""The CLI's argument handling, without a server: values that start with a dash, where the
global flags may go, and what a table may print of a sandbox's log."""

from __future__ import annotations

import pytest

from miren_ingress.shell.cli import attach_dashed_values, build_parser, printable, value_options

TAKES, EVERY = value_options(build_parser())


def parse(*argv: str) -> dict[str, object]:
    parser = build_parser()
    return vars(parser.parse_args(attach_dashed_values(argv, TAKES, EVERY)))


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["deploy", "--ttl", "-1h"], ["deploy", "--ttl=-1h"]),
        (["app", "versions", "-n", "-5"], ["app", "versions", "-n=-5"]),
        (["deploy", "--ttl", "--wait"], ["deploy", "--ttl", "--wait"]),  # an option, not a value
        (["deploy", "--ttl", "--"], ["deploy", "--ttl", "--"]),
        (
            ["deploy", "--", "sh", "--ttl", "-x"],
            ["deploy", "--", "sh", "--ttl", "-x"],
        ),  # the command
        (["deploy", "--wait", "-x"], ["deploy", "--wait", "-x"]),  # a flag takes no value
    ],
)
def test_dashed_values_are_attached(argv: list[str], want: list[str]) -> None:
    assert attach_dashed_values(argv, TAKES, EVERY) == want


def test_negative_values_parse() -> None:
    args = parse("deploy", "--app", "a", "--ephemeral", "x", "--ttl", "-1h", "--upstream", "u")
    assert args["ttl"] == "-1h"
    assert parse("app", "versions", "--app", "a", "--limit", "-5")["limit"] == -5


def test_global_flags_before_or_after_the_subcommand() -> None:
    before = parse("--server", "http://s:1", "--format", "json", "route", "list")
    after = parse("route", "list", "--server", "http://s:1", "--format", "json")
    for args in (before, after):
        assert (args["server"], args["format"]) == ("http://s:1", "json")
    plain = parse("route", "list")
    assert plain["format"] == "text" and plain["server"]  # the top level's defaults


def test_printable_escapes_what_a_terminal_would_obey() -> None:
    hostile = "ok\x1b]0;owned\x07\x1b[2J\r\tend\x9b"
    assert printable(hostile) == "ok\\x1b]0;owned\\x07\\x1b[2J\\x0d\tend\\x9b"
    assert printable("plain text, ünïcode") == "plain text, ünïcode"
