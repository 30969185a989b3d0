"""Suite-wide settings: every async test runs on uvloop, as `miren serve` does, and a test that
hangs on it fails at its timeout (tests/loop_timeout.py) instead of hanging the run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

pytest_plugins = ["tests.etcd_fixtures", "tests.loop_timeout", "tests.support.apps"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
