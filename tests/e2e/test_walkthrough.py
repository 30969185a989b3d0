"""The README's five-minute walkthrough, run through the real CLI against `miren serve` on the
embedded store (with `configs/dev.toml`, as the README does), then a restart on the same ports and
data dir that must keep every app, route and version and serve them again."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support.apps import SANDBOX_PYTHON
from tests.support.edge import ECHO_CMD, REPO, MirenServer, deployed_id, table_rows, url_lines
from tests.support.poll import eventually_sync, transitions_sync

HOST = "app.example.com"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def versions(edge: MirenServer, app: str = "web") -> dict[str, dict[str, Any]]:
    out = edge.cli("app", "versions", "--app", app, "--format", "json").stdout
    return {v["id"]: v for v in json.loads(out)}


def served_version(edge: MirenServer, host: str) -> dict[str, Any]:
    reply = edge.get_routed(host)
    assert reply.status == 200, reply
    info: dict[str, Any] = reply.json()
    return info


def test_readme_walkthrough_and_restart(tmp_path: Path) -> None:
    with MirenServer(
        tmp_path,
        store="embedded",
        config=REPO / "configs" / "dev.toml",
        settings={"gc.sweep_interval": "1s"},
    ) as edge:
        # -- create an app, give it a route, deploy it, then a preview of a branch
        assert edge.cli("app", "create", "web").stdout.strip() == "App web created."
        out = edge.cli("route", "set", HOST, "--app", "web").stdout
        assert out.strip() == f"Route {HOST} -> app web."
        out = edge.cli("deploy", "--app", "web", "--wait", "--", *ECHO_CMD).stdout
        active_id = deployed_id(out)
        assert "  Ready: sandbox sb-" in out, out

        out = edge.cli(
            "deploy", "--app", "web", "--ephemeral", "Feature/Login", "--ttl", "1h", "--", *ECHO_CMD
        ).stdout
        preview_id = deployed_id(out)
        assert preview_id.startswith("web-eph-"), out
        lines = out.splitlines()
        assert "  Label: feature-login" in lines, out
        assert "  TTL:   1h" in lines, out
        # URLs with the scheme and port the proxy serves (this test's free port, not 8080)
        assert url_lines(out) == [f"http://feature-login.{HOST}:{edge.proxy_port}"], out

        # -- a misspelt file: --wait fails the deploy, says why, and the app keeps its version
        broken = edge.cli(
            "deploy", "--app", "web", "--wait", "--", SANDBOX_PYTHON, "-S",
            "tests/apps/echo_servr.py", check=False,
        )  # fmt: skip
        assert broken.returncode == 1, broken
        first = broken.stderr.splitlines()[0]
        assert first.startswith("miren: deploy failed: sandbox sb-"), broken.stderr
        assert "exited with status 2 while booting" in first and "was not activated" in first
        failed_id = first.split("; version ", 1)[1].split(" ", 1)[0]
        assert "echo_servr.py': [Errno 2] No such file or directory" in broken.stderr
        assert edge.admin("GET", "/v1/apps/web").json()["active_version"] == active_id
        dead = [
            row for row in table_rows(edge.cli("sandbox", "list", "--app", "web").stdout)[1:]
            if row[2] == "dead"
        ]  # fmt: skip
        assert [row[3] for row in dead] == ["exited with status 2"], dead

        # -- both hosts answer from their own version; an unknown preview is 404
        main = served_version(edge, HOST)
        assert (main["version"], main["label"], main["app"]) == (active_id, "", "web")
        preview = served_version(edge, f"feature-login.{HOST}")
        assert (preview["version"], preview["label"]) == (preview_id, "feature-login")
        assert preview["sandbox"] != main["sandbox"]
        assert edge.get(f"nope.{HOST}").status == 404

        rows = table_rows(edge.cli("app", "versions", "--app", "web").stdout)
        assert rows[0] == ["VERSION", "STATUS", "CREATED", "LABEL"]
        by_id = {row[0]: row for row in rows[1:]}
        assert by_id[active_id][1] == "active"
        assert by_id[preview_id][1] == "ephemeral"
        # (1h, rounded up to a whole second: "1h" a moment after the deploy, else "59m Ns")
        assert re.fullmatch(r"feature-login \(expires in (59m \d+s|1h)\)", by_id[preview_id][3])
        listed = versions(edge)
        assert {k: v["status"] for k, v in listed.items()} == {
            active_id: "active",
            preview_id: "ephemeral",
            failed_id: "replaced",  # kept, inactive, for its sandbox's log
        }

        # -- a short-lived preview: 200, then 410 from its expiry instant, then 404 once collected
        out = edge.cli(
            "deploy", "--app", "web", "--ephemeral", "pr-7", "--ttl", "3s", "--", *ECHO_CMD
        ).stdout
        pr7_id = deployed_id(out)
        expires = parse_time(versions(edge)[pr7_id]["expires_at"])
        assert edge.get_routed(f"pr-7.{HOST}").status == 200
        seen = transitions_sync(lambda: edge.get(f"pr-7.{HOST}").status, 404, 10, "pr-7's status")
        statuses = [status for status, _ in seen]
        # 410 from the expiry instant until the GC deletes it, gc.expiry_grace (1 s) later.
        assert statuses == [200, 410, 404], statuses
        stopped_serving = seen[1][1]
        assert stopped_serving >= expires.timestamp() - 0.05, (stopped_serving, expires)
        assert seen[-1][1] - expires.timestamp() < 5, "not collected within 5 s of its expiry"
        assert pr7_id not in versions(edge)

        # -- extend moves the expiry; rm deletes a preview now
        before = parse_time(versions(edge)[preview_id]["expires_at"])
        out = edge.cli(
            "ephemeral", "extend", "feature-login", "--app", "web", "--ttl", "48h"
        ).stdout
        assert out.startswith("Preview feature-login now expires at "), out
        extended = versions(edge)[preview_id]
        moved = parse_time(extended["expires_at"]) - before
        assert timedelta(hours=47) <= moved <= timedelta(hours=47, minutes=1), moved
        assert extended["ephemeral_ttl"] == "48h"
        assert extended["status"] == "ephemeral"

        gone_id = deployed_id(
            edge.cli("deploy", "--app", "web", "--ephemeral", "pr-9", "--", *ECHO_CMD).stdout
        )
        assert edge.get_routed(f"pr-9.{HOST}").status == 200
        out = edge.cli("ephemeral", "rm", "pr-9", "--app", "web").stdout
        assert out.strip() == "Preview pr-9 deleted."
        eventually_sync(lambda: edge.get(f"pr-9.{HOST}").status == 404, 5, "pr-9 to answer 404")
        assert gone_id not in versions(edge)

        # -- restart: same ports, same data dir; everything is still there and serves again
        state = _state(edge)
        old_sandboxes = edge.record_sandboxes()
        assert len(old_sandboxes) >= 2
        edge.restart()  # asserts exit status 0 and that no sandbox or etcd survived
        assert _state(edge) == state
        main = served_version(edge, HOST)
        assert main["version"] == active_id
        assert main["pid"] not in old_sandboxes
        preview = served_version(edge, f"feature-login.{HOST}")
        assert (preview["version"], preview["label"]) == (preview_id, "feature-login")
        assert edge.get(f"pr-7.{HOST}").status == 404
        assert edge.get(f"nope.{HOST}").status == 404


def _state(edge: MirenServer) -> dict[str, Any]:
    return {
        "apps": json.loads(edge.cli("app", "list", "--format", "json").stdout),
        "routes": json.loads(edge.cli("route", "list", "--format", "json").stdout),
        "versions": json.loads(
            edge.cli("app", "versions", "--app", "web", "--format", "json").stdout
        ),
    }


def test_expired_preview_answers_410_until_collected(edge: MirenServer) -> None:
    edge.cli("app", "create", "gone410")
    edge.cli("route", "set", "gone410.example.com", "--app", "gone410")
    edge.cli("deploy", "--app", "gone410", "--ephemeral", "pr-410", "--ttl", "2s", "--", *ECHO_CMD)
    host = "pr-410.gone410.example.com"
    assert edge.get_routed(host).status == 200
    seen = transitions_sync(lambda: edge.get(host).status, 404, 10, f"{host}'s status")
    assert [status for status, _ in seen] == [200, 410, 404]
    assert seen[2][1] - seen[1][1] >= 0.5, "the 410 lasted less than 0.5 s"
