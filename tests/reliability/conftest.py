"""Fixtures of the reliability suite: figures, a raised fd limit, the etcd factory (from
`tests.etcd_fixtures`, loaded by the root conftest)."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures, summary_lines


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.name)


@pytest.fixture
def fd_limit() -> Iterator[int]:
    """RLIMIT_NOFILE raised (soft up to hard) for this test; restored after. Yields the soft
    limit now in force. `miren serve` started after this inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = summary_lines()
    if lines:
        profile = "long (MIREN_LONG=1)" if BUDGET.long else "short"
        terminalreporter.section(f"reliability figures, {profile} profile")
        for line in lines:
            terminalreporter.write_line(line)
