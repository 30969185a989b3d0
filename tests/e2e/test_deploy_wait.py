"""`deploy --wait`: a broken deploy is caught by the deploy, not by the first visitor.

Each case goes through the real `miren` CLI (or the API's `"wait": true`) against a real
`miren serve` subprocess and a real sandbox: a command that exits, one killed by a signal, one
that never listens on `$PORT`, one whose health check fails, a missing file named by a relative
path. The answer names the reason and quotes the log; a normal deploy that fails leaves the
previous version active; `sandbox list` keeps the reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.apps import SANDBOX_PYTHON
from tests.support.edge import ECHO_CMD, TOKEN, MirenServer, base_env, run_cli, table_rows

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    with MirenServer(tmp_path_factory.mktemp("wait"), store="memory", token=TOKEN) as server:
        yield server


def sh(script: str) -> list[str]:
    return ["--", "/bin/sh", "-c", script]


def py(code: str) -> list[str]:
    return ["--", SANDBOX_PYTHON, "-S", "-c", code]


NEVER_LISTENS = py("import time; print('up, but not on $PORT', flush=True); time.sleep(600)")
# Listens on $PORT and answers every request 503: the health check never passes.
UNHEALTHY = py(
    "import os, socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(16)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.recv(4096)\n"
    "    c.sendall(b'HTTP/1.1 503 Service Unavailable\\r\\nContent-Length: 0\\r\\n\\r\\n')\n"
    "    c.close()\n"
)


def new_app(edge: MirenServer, name: str) -> None:
    edge.cli("app", "create", name)
    edge.cli("route", "set", f"{name}.test", "--app", name)


def active_version(edge: MirenServer, app: str) -> str | None:
    reply = edge.admin("GET", f"/v1/apps/{app}")
    assert reply.status == 200, reply
    found: str | None = reply.json()["active_version"]
    return found


def deploy_wait(edge: MirenServer, app: str, *args: str) -> Any:
    return edge.cli("deploy", "--app", app, "--wait", *args, check=False)


def test_a_good_deploy_waits_until_healthy_and_says_so(edge: MirenServer) -> None:
    new_app(edge, "good")
    done = deploy_wait(edge, "good", "--", *ECHO_CMD)
    assert done.returncode == 0, done.stderr
    assert "healthy after" in done.stdout, done.stdout
    # Warm: the sandbox the deploy booted serves the first visitor.
    assert edge.get_routed("good.test").status == 200
    answer = json.loads(
        edge.cli("deploy", "--app", "good", "--wait", "--format", "json", "--", *ECHO_CMD).stdout
    )
    assert answer["status"] == "active"
    assert answer["ready"]["sandbox"].startswith("sb-") and answer["ready"]["seconds"] >= 0
    assert active_version(edge, "good") == answer["version"]["id"]


@pytest.mark.parametrize(
    ("name", "command", "reason", "log_line"),
    [
        ("exits", sh("echo about to fail; echo 'no config found' >&2; exit 3"),
         "exited with status 3", "no config found"),
        ("killed", sh("echo bye; kill -KILL $$"), "SIGKILL", "bye"),
        ("deaf", NEVER_LISTENS, "not healthy within 2s", "up, but not on"),
        ("sick", UNHEALTHY, "answered 503", None),
    ],
)  # fmt: skip
def test_a_broken_deploy_fails_and_the_previous_version_stays(
    edge: MirenServer, name: str, command: list[str], reason: str, log_line: str | None
) -> None:
    app = f"broken-{name}"
    new_app(edge, app)
    assert deploy_wait(edge, app, "--", *ECHO_CMD).returncode == 0
    before = active_version(edge, app)
    assert before is not None

    failed = deploy_wait(edge, app, "--boot-timeout", "2s", *command)
    assert failed.returncode == 1, failed.stdout
    assert reason in failed.stderr, failed.stderr
    if log_line is not None:
        assert log_line in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    assert active_version(edge, app) == before  # nothing switched
    assert edge.get_routed(f"{app}.test").status == 200  # and visitors still get the old one

    # The sandbox record keeps why it ended: `sandbox list` shows it, and the API.
    rows = table_rows(edge.cli("sandbox", "list", "--app", app).stdout)
    assert rows[0] == ["SANDBOX", "VERSION", "STATUS", "REASON", "URL", "PID"], rows
    assert any(reason in " ".join(row) for row in rows[1:]), rows
    records = edge.admin("GET", f"/v1/apps/{app}/sandboxes").json()
    assert any(reason in (r["reason"] or "") for r in records), records


def test_the_api_answers_422_with_the_reason_the_sandbox_and_the_log(edge: MirenServer) -> None:
    new_app(edge, "api-wait")
    spec = {
        "runtime": "process",
        "command": ["/bin/sh", "-c", "echo 'line one'; echo 'line two' >&2; exit 7"],
    }
    reply = edge.admin("POST", "/v1/apps/api-wait/deploys", {"spec": spec, "wait": True})
    assert reply.status == 422, reply
    err = reply.json()["error"]
    assert err["code"] == "boot_failed"
    assert "exited with status 7" in err["message"]
    assert err["details"]["sandbox"].startswith("sb-")
    assert err["details"]["log"][-2:] == ["line one", "line two"]
    assert active_version(edge, "api-wait") is None  # the failed version never became active
    bad = edge.admin("POST", "/v1/apps/api-wait/deploys", {"spec": spec, "wait": "yes"})
    assert bad.status == 400 and "wait" in bad.json()["error"]["message"], bad


def test_a_preview_with_wait_boots_once_and_reports(edge: MirenServer) -> None:
    new_app(edge, "prev-wait")
    ok = deploy_wait(edge, "prev-wait", "--ephemeral", "pr-1", "--", *ECHO_CMD)
    assert ok.returncode == 0 and "healthy after" in ok.stdout, ok.stderr
    bad = deploy_wait(edge, "prev-wait", "--ephemeral", "pr-2", *sh("exit 4"))
    assert bad.returncode == 1 and "exited with status 4" in bad.stderr, bad.stderr


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A directory a confined sandbox (another uid) can enter, as a user's project is (pytest's
    own temporary directories are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="miren-user-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_relative_path_runs_next_to_the_user_and_a_missing_file_is_reported(
    edge: MirenServer, user_dir: Path
) -> None:
    """The CLI sends its directory as the command's cwd: `python3 app.py` finds the app.py
    beside the user; a missing one is reported by the deploy, with the interpreter's words."""
    new_app(edge, "relative")
    tmp_path = user_dir
    (tmp_path / "app.py").write_text((Path(ECHO_CMD[-1])).read_text())
    env = {"MIREN_SERVER": edge.admin_url, "MIREN_ADMIN_TOKEN": TOKEN}

    ran = run_cli(
        "deploy", "--app", "relative", "--wait", "--", SANDBOX_PYTHON, "-S", "app.py",
        env={**base_env(), **env}, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    missing = run_cli(
        "deploy", "--app", "relative", "--wait", "--", SANDBOX_PYTHON, "-S", "nope.py",
        env={**base_env(), **env}, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "exited with status 2" in missing.stderr, missing.stderr
    assert "nope.py" in missing.stderr and "No such file" in missing.stderr, missing.stderr


def test_a_command_that_cannot_start_is_reported(edge: MirenServer) -> None:
    new_app(edge, "nocmd")
    failed = deploy_wait(edge, "nocmd", "--", "/nonexistent/server", "--port", "1")
    assert failed.returncode == 1
    assert "/nonexistent/server" in failed.stderr, failed.stderr


def test_wait_shows_in_the_walkthrough_words(edge: MirenServer) -> None:
    """The README's broken deploy: `miren deploy --wait -- false`."""
    new_app(edge, "readme-false")
    failed = deploy_wait(edge, "readme-false", "--", "false")
    assert failed.returncode == 1
    first = failed.stderr.splitlines()[0]
    assert first.startswith("miren: deploy failed:") and "exited with status 1" in first, first
    assert "was not activated" in failed.stderr, failed.stderr
