"""The traps a new user fell into, each through the real `miren` CLI against a real `miren serve`.

A second server on a used data dir, a route taken from another app, a silent eviction, `--ttl`
without `--ephemeral`, negative values, global flags after the subcommand, `--version`, broken
pipes, messages that name the setting to fix, one time format, one JSON error shape, and preview
URLs with the scheme and port the edge serves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from miren_ingress.shell.cli import build_parser, human_delta
from tests.support.apps import REPO
from tests.support.edge import (
    DEAD_UPSTREAM,
    TOKEN,
    MirenServer,
    base_env,
    run_cli,
    serve_argv,
    table_rows,
    url_lines,
)

pytestmark = pytest.mark.timeout(120)

WHOLE_SECONDS_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    with MirenServer(
        tmp_path_factory.mktemp("traps"),
        store="memory",
        token=TOKEN,
        settings={"ephemeral.max_per_app": "2"},
    ) as server:
        yield server


def upstream(edge: MirenServer, app: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return edge.cli("deploy", "--app", app, "--upstream", DEAD_UPSTREAM, *extra, check=False)


# -- the data dir -------------------------------------------------------------------------------


def test_a_second_serve_on_the_same_data_dir_exits_naming_it_and_the_holder(
    tmp_path: Path,
) -> None:
    with MirenServer(tmp_path / "one", store="embedded") as first:
        env = base_env()
        t0 = time.monotonic()
        second = subprocess.run(
            serve_argv("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                       "--store", "embedded", "--data-dir", str(first.data_dir)),
            env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
        )  # fmt: skip
        took = time.monotonic() - t0
        assert second.returncode == 1, second.stderr
        assert str(first.data_dir) in second.stderr, second.stderr
        assert f"pid {first.pid}" in second.stderr, second.stderr
        assert "etcd" not in second.stderr.lower(), second.stderr  # never blamed on etcd
        assert first.admin("GET", "/v1/apps").status == 200  # the first one is untouched
        print(f"second serve exited after {took:.2f}s")


# -- destructive changes say so -----------------------------------------------------------------


def test_route_set_on_another_apps_host_needs_force(edge: MirenServer) -> None:
    edge.cli("app", "create", "owner")
    edge.cli("app", "create", "taker")
    edge.cli("route", "set", "owned.test", "--app", "owner")
    taken = edge.cli("route", "set", "owned.test", "--app", "taker", check=False)
    assert taken.returncode == 1
    assert "owner" in taken.stderr and "--force" in taken.stderr, taken.stderr
    routes = json.loads(edge.cli("route", "list", "--format", "json").stdout)
    assert {"owned.test": "owner"}.items() <= {r["host"]: r["app"] for r in routes}.items()
    # Setting it again for its own app is not a takeover; --force moves it.
    edge.cli("route", "set", "owned.test", "--app", "owner", "--timeout", "30s")
    moved = edge.cli("route", "set", "owned.test", "--app", "taker", "--force")
    assert "taken from app owner" in moved.stdout, moved.stdout
    routes = json.loads(edge.cli("route", "list", "--format", "json").stdout)
    assert {r["host"]: r["app"] for r in routes}["owned.test"] == "taker"


def test_the_deploy_says_what_it_evicted(edge: MirenServer) -> None:
    edge.cli("app", "create", "evict")
    ids = []
    for label in ("pr-1", "pr-2"):
        out = upstream(edge, "evict", "--ephemeral", label, "--format", "json")
        assert out.returncode == 0, out.stderr
        ids.append(json.loads(out.stdout)["version"]["id"])
    third = upstream(edge, "evict", "--ephemeral", "pr-3")
    assert third.returncode == 0, third.stderr
    assert re.search(rf"Evicted: +{ids[0]} \(pr-1\)", third.stdout), third.stdout
    fourth = json.loads(upstream(edge, "evict", "--ephemeral", "pr-4", "--format", "json").stdout)
    assert fourth["evicted"] == [{"id": ids[1], "label": "pr-2"}], fourth


def test_ttl_without_ephemeral_is_an_error(edge: MirenServer) -> None:
    edge.cli("app", "create", "ttl-only")
    out = upstream(edge, "ttl-only", "--ttl", "2h")
    assert out.returncode == 2
    assert "--ttl" in out.stderr and "--ephemeral" in out.stderr, out.stderr
    assert edge.admin("GET", "/v1/apps/ttl-only").json()["active_version"] is None


# -- values and flags ---------------------------------------------------------------------------


def test_negative_values_reach_the_servers_validation(edge: MirenServer) -> None:
    edge.cli("app", "create", "neg")
    ttl = upstream(edge, "neg", "--ephemeral", "pr-1", "--ttl", "-1h")
    assert ttl.returncode == 1, ttl.stderr
    assert "ttl" in ttl.stderr and "HTTP 4" in ttl.stderr, ttl.stderr
    limit = edge.cli("app", "versions", "--app", "neg", "--limit", "-5", check=False)
    assert limit.returncode == 1 and "limit" in limit.stderr and "HTTP 400" in limit.stderr


def test_global_flags_anywhere(edge: MirenServer) -> None:
    env = {**base_env(), "MIREN_ADMIN_TOKEN": TOKEN}  # no MIREN_SERVER: the flag must carry it
    for args in (
        ("--server", edge.admin_url, "app", "list", "--format", "json"),
        ("app", "list", "--server", edge.admin_url, "--format", "json"),
        ("--format", "json", "app", "list", "--server", edge.admin_url),
    ):
        out = run_cli(*args, env=env)
        assert isinstance(json.loads(out.stdout), list), args


def test_version_flag() -> None:
    out = run_cli("--version", env=base_env())
    assert re.fullmatch(r"miren \d+\.\d+\.\d+\S*\n", out.stdout), out.stdout


def test_every_subcommand_and_flag_has_a_description() -> None:
    import argparse

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "miren")
    assert missing == []


def test_a_broken_pipe_ends_quietly(edge: MirenServer) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the CLI writes (as `| head -1` after a line)
    env = {**base_env(), "MIREN_SERVER": edge.admin_url, "MIREN_ADMIN_TOKEN": TOKEN}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "miren_ingress", "app", "list", "--format", "json"],
            env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO,
            check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr == "", done.stderr
    assert done.returncode == 141  # 128 + SIGPIPE, as a C tool piped to head ends


def test_messages_name_the_setting_to_fix(edge: MirenServer) -> None:
    unauth = edge.cli("app", "list", token="wrong", check=False)
    assert unauth.returncode == 1 and "MIREN_ADMIN_TOKEN" in unauth.stderr, unauth.stderr
    env = {**base_env(), "MIREN_SERVER": "http://127.0.0.1:9"}
    away = run_cli("app", "list", env=env, check=False)
    assert away.returncode == 1 and "MIREN_SERVER" in away.stderr, away.stderr


# -- one time format, one error shape -----------------------------------------------------------


def test_times_are_rfc3339_utc_whole_seconds_and_durations_have_two_units(
    edge: MirenServer,
) -> None:
    edge.cli("app", "create", "times")
    # 47h59m: what is left a moment later is 1d 23h whatever the rounding of the expiry up
    # to a whole second (48h could read "2d" for the first half second).
    answer = json.loads(
        upstream(edge, "times", "--ephemeral", "pr-1", "--ttl", "47h59m", "--format", "json").stdout
    )
    assert WHOLE_SECONDS_UTC.match(answer["expires_at"]), answer
    assert WHOLE_SECONDS_UTC.match(answer["version"]["created_at"]), answer
    rows = table_rows(edge.cli("app", "versions", "--app", "times", "--ephemeral").stdout)
    assert rows[0] == ["VERSION", "LABEL", "CREATED", "EXPIRES"]
    assert WHOLE_SECONDS_UTC.match(rows[1][3]), rows
    listed = table_rows(edge.cli("app", "versions", "--app", "times").stdout)
    assert re.fullmatch(r"pr-1 \(expires in 1d 23h\)", listed[1][3]), listed
    boxes = json.loads(edge.cli("app", "list", "--format", "json").stdout)
    assert all(WHOLE_SECONDS_UTC.match(a["created_at"]) for a in boxes), boxes


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (65, "1m 5s"), (3600, "1h"), (3660, "1h 1m"), (86399, "23h 59m"),
     (86400, "1d"), (47 * 3600 + 59 * 60, "1d 23h"), (30 * 86400 + 7200, "30d 2h")],
)  # fmt: skip
def test_durations(seconds: int, text: str) -> None:
    assert human_delta(seconds) == text


def test_the_proxy_and_the_admin_api_share_one_error_shape(edge: MirenServer) -> None:
    proxy = edge.get("nobody.test", headers={"Accept": "application/json"})
    admin = edge.admin("GET", "/v1/apps/nobody")
    for reply in (proxy, admin):
        assert reply.status == 404
        body = reply.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["message"], body


# -- URLs ---------------------------------------------------------------------------------------


def test_preview_urls_use_the_scheme_and_port_the_edge_serves(tmp_path: Path) -> None:
    """No config at all (the README's first command): plain HTTP on the proxy listener's port."""
    with MirenServer(tmp_path, store="memory", token=TOKEN) as bare:
        bare.cli("app", "create", "urls")
        bare.cli("route", "set", "urls.test", "--app", "urls")
        out = bare.cli(
            "deploy", "--app", "urls", "--ephemeral", "pr-1", "--upstream", DEAD_UPSTREAM
        ).stdout
        assert url_lines(out) == [f"http://pr-1.urls.test:{bare.proxy_port}"], out
        active = bare.cli("deploy", "--app", "urls", "--upstream", DEAD_UPSTREAM).stdout
        assert url_lines(active) == [f"http://urls.test:{bare.proxy_port}"], active
