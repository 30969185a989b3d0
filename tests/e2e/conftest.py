"""Fixtures for the end-to-end tests: real `miren serve` subprocesses (see tests/support/edge.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.edge import TOKEN, MirenServer

CLUSTER_HOSTNAME = "c.miren.systems"


@pytest.fixture(scope="package")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    """One shared server for the CLI-output and admin-error tests: memory store (the store does
    not matter there), a token from `MIREN_ADMIN_TOKEN`, and a cluster hostname for previews of
    apps without routes. Tests stay independent by each using its own app names and hosts."""
    with MirenServer(
        tmp_path_factory.mktemp("edge"),
        store="memory",
        token=TOKEN,
        # The reference's URL cases (§11.G) print https URLs: as behind a TLS terminator.
        settings={"ephemeral.cluster_hostname": CLUSTER_HOSTNAME, "ephemeral.url_scheme": "https"},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def bare_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    """A server with neither a token nor a cluster hostname (memory store)."""
    with MirenServer(tmp_path_factory.mktemp("bare"), store="memory") as server:
        yield server
