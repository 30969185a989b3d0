"""The CLI's output through a real server: reference §11.G cases 70-74 and R-17 (with R-1, R-9).

Every test uses its own app names and hosts on the shared server, so they run in any order.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.e2e.conftest import CLUSTER_HOSTNAME
from tests.support.edge import DEAD_UPSTREAM, ECHO_CMD, MirenServer, table_rows, url_lines

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
EPHEMERAL_KEYS = {"ephemeral_label", "ephemeral_ttl", "expires_at"}


def deploy(edge: MirenServer, app: str, *extra: str) -> dict[str, Any]:
    """Deploy through the CLI (`--format json`); a never-requested upstream unless `extra` has
    a source. Returns the deploy answer."""
    source = () if ("--" in extra or "--version" in extra) else ("--upstream", DEAD_UPSTREAM)
    out = edge.cli("deploy", "--app", app, "--format", "json", *extra, *source).stdout
    answer: dict[str, Any] = json.loads(out)
    return answer


def versions_json(edge: MirenServer, app: str, *extra: str) -> list[dict[str, Any]]:
    out = edge.cli("app", "versions", "--app", app, "--format", "json", *extra).stdout
    data: list[dict[str, Any]] = json.loads(out)
    return data


def new_app(edge: MirenServer, name: str, *routes: str) -> None:
    edge.cli("app", "create", name)
    for host in routes:
        edge.cli("route", "set", host, "--app", name)


# -- case 70 ------------------------------------------------------------------------------------


def test_70_statuses_newest_first_and_limit(edge: MirenServer) -> None:
    new_app(edge, "c70")
    first = deploy(edge, "c70")["version"]["id"]
    second = deploy(edge, "c70")["version"]["id"]
    previews = [deploy(edge, "c70", "--ephemeral", f"pr-{i}")["version"]["id"] for i in range(4)]
    newest_first = [*reversed(previews), second, first]

    rows = table_rows(edge.cli("app", "versions", "--app", "c70").stdout)
    assert rows[0] == ["VERSION", "STATUS", "CREATED", "LABEL"]
    assert [r[0] for r in rows[1:]] == newest_first
    assert [r[1] for r in rows[1:]] == ["ephemeral"] * 4 + ["active", "replaced"]

    limited = table_rows(edge.cli("app", "versions", "--app", "c70", "-n", "5").stdout)
    assert [r[0] for r in limited[1:]] == newest_first[:5]
    assert [v["id"] for v in versions_json(edge, "c70", "-n", "5")] == newest_first[:5]
    everything = versions_json(edge, "c70", "-n", "0")  # <= 0: no limit
    assert [v["id"] for v in everything] == newest_first
    stamps = [v["created_at"] for v in everything]
    assert stamps == sorted(stamps, reverse=True)


# -- case 71 ------------------------------------------------------------------------------------


def test_71_ephemeral_listing(edge: MirenServer) -> None:
    new_app(edge, "c71")
    assert edge.cli("app", "versions", "--app", "c71").stdout == "No versions found.\n"
    active = deploy(edge, "c71")["version"]["id"]
    out = edge.cli("app", "versions", "--app", "c71", "--ephemeral").stdout
    assert out == "No ephemeral versions found.\n"

    answer = deploy(edge, "c71", "--ephemeral", "pr-71", "--ttl", "2h")
    rows = table_rows(edge.cli("app", "versions", "--app", "c71", "--ephemeral").stdout)
    assert rows[0] == ["VERSION", "LABEL", "CREATED", "EXPIRES"]
    assert len(rows) == 2, rows
    version_id, label, _created, expires = rows[1]
    assert (version_id, label) == (answer["version"]["id"], "pr-71")
    assert active not in {r[0] for r in rows}
    # One time format for every table and answer: RFC 3339, UTC, whole seconds (issue 18; the
    # reference printed local time without a zone here).
    assert expires == answer["expires_at"]
    assert RFC3339_UTC.match(expires) and "." not in expires, expires


# -- case 72 ------------------------------------------------------------------------------------


def test_72_json_keys_and_timestamps(edge: MirenServer) -> None:
    new_app(edge, "c72")
    assert edge.cli("app", "versions", "--app", "c72", "--format", "json").stdout.strip() == "[]"
    deploy(edge, "c72")
    out = edge.cli("app", "versions", "--app", "c72", "--ephemeral", "--format", "json").stdout
    assert out.strip() == "[]"
    deploy(edge, "c72", "--ephemeral", "pr-72", "--ttl", "90m")

    normal, preview = sorted(versions_json(edge, "c72"), key=lambda v: "ephemeral_label" in v)
    assert normal["status"] == "active"
    assert not EPHEMERAL_KEYS & set(normal), normal
    assert preview["status"] == "ephemeral"
    assert set(preview) >= EPHEMERAL_KEYS
    assert (preview["ephemeral_label"], preview["ephemeral_ttl"]) == ("pr-72", "90m")
    for v in (normal, preview):
        assert RFC3339_UTC.match(v["created_at"]), v["created_at"]
    assert RFC3339_UTC.match(preview["expires_at"]), preview["expires_at"]


# -- case 73 ------------------------------------------------------------------------------------


def test_73_fresh_24h_preview_expires_in_23h(edge: MirenServer) -> None:
    """Floored, as the reference does; with two units (issue 18), so 23h59m is not "23h"."""
    new_app(edge, "c73")
    deploy(edge, "c73")
    answer = deploy(edge, "c73", "--ephemeral", "pr-73")  # the server's default TTL: 24h
    assert answer["version"]["ephemeral_ttl"] == "24h"
    rows = table_rows(edge.cli("app", "versions", "--app", "c73").stdout)
    labels = {r[0]: r[3] for r in rows[1:] if len(r) == 4}
    # (the expiry is rounded up to a whole second: a moment after the deploy it may be 24h0m0.4s)
    assert labels[answer["version"]["id"]] in (
        "pr-73 (expires in 23h 59m)",
        "pr-73 (expires in 1d)",
    )
    assert len(labels) == 1, labels


# -- case 74 ------------------------------------------------------------------------------------


def test_74_branch_is_normalized_and_printed(edge: MirenServer) -> None:
    new_app(edge, "c74", "c74.example.com")
    out = edge.cli("deploy", "--app", "c74", "--ephemeral", "Feature/Login", "--", *ECHO_CMD)
    lines = out.stdout.splitlines()
    assert "  Label: feature-login" in lines, out.stdout
    assert url_lines(out.stdout) == ["https://feature-login.c74.example.com"]
    [preview] = versions_json(edge, "c74", "--ephemeral")
    assert preview["ephemeral_label"] == "feature-login"


def test_74_unusable_branch_is_a_cli_error(edge: MirenServer) -> None:
    new_app(edge, "c74b")
    result = edge.cli(
        "deploy", "--app", "c74b", "--ephemeral", "///", "--upstream", DEAD_UPSTREAM, check=False
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("miren: invalid ephemeral branch"), result.stderr
    assert versions_json(edge, "c74b") == []


# -- R-17 (and) --------------------------------------------------------------------------


def assert_no_double_prefix(stdout: str, label: str) -> None:
    assert f"{label}.{label}." not in stdout, stdout


def test_r17_one_url_line_per_route(edge: MirenServer) -> None:
    new_app(edge, "r17a", "r17a.example.com")
    out = edge.cli("deploy", "--app", "r17a", "--ephemeral", "feat-x", "--", *ECHO_CMD).stdout
    assert url_lines(out) == ["https://feat-x.r17a.example.com"], out
    assert CLUSTER_HOSTNAME not in out  # the fallback only when the app has no routes
    assert_no_double_prefix(out, "feat-x")


def test_r17_plain_and_wildcard_routes(edge: MirenServer) -> None:
    new_app(edge, "r17b", "r17b.example.com", "*.r17b.apps.example.com")
    out = edge.cli("deploy", "--app", "r17b", "--ephemeral", "feat-x", "--", *ECHO_CMD).stdout
    assert sorted(url_lines(out)) == [
        "https://feat-x.r17b.apps.example.com",
        "https://feat-x.r17b.example.com",
    ], out
    assert_no_double_prefix(out, "feat-x")


def test_r1_r9_redeploy_path_clones_and_prints_once(edge: MirenServer) -> None:
    """`deploy --version <active> --ephemeral feat-x`: one URL, verbatim; a clone carries the
    label and the active version is untouched."""
    new_app(edge, "r1", "r1.example.com")
    active = deploy(edge, "r1")["version"]["id"]
    out = edge.cli("deploy", "--app", "r1", "--version", active, "--ephemeral", "feat-x").stdout
    assert url_lines(out) == ["https://feat-x.r1.example.com"], out
    assert_no_double_prefix(out, "feat-x")

    by_id = {v["id"]: v for v in versions_json(edge, "r1")}
    [clone_id] = set(by_id) - {active}
    assert clone_id.startswith("r1-eph-")
    assert by_id[clone_id]["ephemeral_label"] == "feat-x"
    assert by_id[active]["status"] == "active"
    assert not EPHEMERAL_KEYS & set(by_id[active])
    app = json.loads(edge.cli("app", "list", "--format", "json").stdout)
    assert {a["name"]: a["active_version"] for a in app}["r1"] == active


def test_r17_cluster_hostname_fallback_without_routes(edge: MirenServer) -> None:
    new_app(edge, "r17c")
    out = edge.cli("deploy", "--app", "r17c", "--ephemeral", "feat-x", "--", *ECHO_CMD).stdout
    assert url_lines(out) == [f"https://feat-x.{CLUSTER_HOSTNAME}"], out
    assert_no_double_prefix(out, "feat-x")


@pytest.mark.parametrize("path", ["build", "redeploy"])
def test_r17_no_routes_no_cluster_hostname_no_url(bare_edge: MirenServer, path: str) -> None:
    app = f"r17d-{path}"
    new_app(bare_edge, app)
    if path == "build":
        source: tuple[str, ...] = ("--", *ECHO_CMD)
    else:
        active = deploy(bare_edge, app)["version"]["id"]
        source = ("--version", active)
    out = bare_edge.cli("deploy", "--app", app, "--ephemeral", "feat-x", *source).stdout
    assert "Label: feat-x" in out
    assert url_lines(out) == [], out
