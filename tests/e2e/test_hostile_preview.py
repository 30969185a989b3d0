"""A hostile preview against a real `miren serve`: it hunts for the edge's secrets and finds
nothing.

The preview runs tests/apps/hostile.py (a pull request's code, deployed through the admin API
like any other). From inside its sandbox it looks for the admin token in every readable
`/proc/*/environ` and in the edge's own, lists the data dir and reads the token file, scans every
loopback TCP port for an etcd (its JSON gateway) or an admin API that answers without
credentials, and tries every unix socket it can name. Under the default isolation (root:
bubblewrap as uid 65532) every hunt comes back empty. The control, `sandbox.isolation = "none"`,
shows the same app does find the token when nothing confines it: the test can fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.support.apps import APPS, SANDBOX_PYTHON
from tests.support.clients import Response
from tests.support.edge import MirenServer
from tests.support.poll import eventually_sync

TOKEN = "hostile-hunt-token-5e8a1c"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the isolation under test is root's")


def hunt(edge: MirenServer, store: str) -> dict[str, object]:
    assert edge.admin("POST", "/v1/apps", {"name": "web"}).status == 201
    assert edge.admin("PUT", "/v1/routes/app.example.com", {"app": "web"}).status == 201
    spec = {
        "runtime": "process",
        "command": [SANDBOX_PYTHON, "-S", "hostile.py"],
        "cwd": str(APPS),
        "health_path": "/health",
    }
    reply = edge.admin(
        "POST", "/v1/apps/web/deploys", {"spec": spec, "ephemeral": {"label": "pr-666"}}
    )
    assert reply.status == 201, reply
    query = urlencode(
        {
            "marker": TOKEN,
            "dir": str(edge.data_dir),
            "file": str(edge.data_dir / "admin-token"),
            "pid": str(edge.pid),
            "scan": "1",
            "sockdirs": f"{edge.data_dir},{edge.data_dir / 'etcd'}",
        }
    )

    def answered() -> Response | None:
        reply = edge.get("pr-666.app.example.com", f"/?{query}", timeout=30)
        return reply if reply.status == 200 else None

    reply = eventually_sync(answered, 60, "the hostile preview to answer")
    report: dict[str, object] = json.loads(reply.body)
    report["store"] = store
    return report


@pytest.mark.parametrize("store", ["embedded", "memory"])
def test_a_hostile_preview_finds_no_secret(tmp_path: Path, store: str) -> None:
    with MirenServer(tmp_path, store=store, token=TOKEN) as edge:
        report = hunt(edge, store)
        admin_port = edge.admin_port
    assert report["uid"] == 65532 and report["euid"] == 65532, report
    assert report["marker_in"] == [], report  # the token in no readable environment
    assert report["pid_environ"] == {"error": "FileNotFoundError"}  # the edge is not even there
    assert "error" in report["dir"]  # type: ignore[operator]
    assert "error" in report["file"]  # type: ignore[operator]
    scan = report["scan"]
    assert isinstance(scan, dict)
    assert admin_port in scan["open"]  # the admin API is reachable (loopback is shared) ...
    assert scan["unauthenticated"] == []  # ... and answers nothing without the token
    assert scan["etcd"] == []  # no etcd on any TCP port
    assert scan["unix_sockets"] == []  # and its unix sockets are out of sight


def test_the_control_without_isolation_finds_the_token(tmp_path: Path) -> None:
    with MirenServer(
        tmp_path, store="embedded", token=TOKEN, settings={"sandbox.isolation": "none"}
    ) as edge:
        report = hunt(edge, "embedded")
        edge_pid = edge.pid
    assert report["uid"] == 0
    assert edge_pid in report["marker_in"]  # type: ignore[operator]
    assert report["pid_environ"] == {"ok": True}
    assert "entries" in report["dir"]  # type: ignore[operator]
    assert report["scan"]["unix_sockets"]  # type: ignore[index]  # the embedded etcd's
