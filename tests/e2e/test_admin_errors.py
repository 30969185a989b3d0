"""The admin API's error contract through the real server, with a token set by MIREN_ADMIN_TOKEN:
every `/v1` endpoint answers 401 without it; bad input is 400/404/409/413/422 with a JSON error,
never a 500; the CLI turns each into a message on stderr and a non-zero exit status.
(tests/admin/test_admin_api.py covers the same in-process, in depth; this is a sample.)"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.clients import Response, free_port, http_call
from tests.support.edge import DEAD_UPSTREAM, TOKEN, MirenServer, base_env, run_cli

APP = "errs"
UPSTREAM_SPEC = {"runtime": "upstream", "urls": [DEAD_UPSTREAM]}
PATH_VALUES = {"app": APP, "host": "errs.example.com", "label": "pr-1", "id": "nope"}


@pytest.fixture(scope="module")
def errs_app(edge: MirenServer) -> Iterator[dict[str, str]]:
    """App `errs` with an active version and a preview `pr-1`."""
    assert edge.admin("POST", "/v1/apps", {"name": APP}).status == 201
    active = edge.admin("POST", f"/v1/apps/{APP}/deploys", {"spec": UPSTREAM_SPEC})
    assert active.status == 201, active
    preview = edge.admin(
        "POST",
        f"/v1/apps/{APP}/deploys",
        {"spec": UPSTREAM_SPEC, "ephemeral": {"label": "pr-1", "ttl": "1h"}},
    )
    assert preview.status == 201, preview
    yield {"active": active.json()["version"]["id"], "preview": preview.json()["version"]["id"]}


def assert_json_error(reply: Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    err: dict[str, Any] = reply.json()["error"]
    assert isinstance(err["code"], str) and err["code"], err
    assert isinstance(err["message"], str) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def v1_operations(edge: MirenServer) -> list[tuple[str, str]]:
    """(METHOD, concrete path) for every `/v1` operation of the served OpenAPI document."""
    doc = edge.admin("GET", "/openapi.json", token="").json()
    ops = []
    for template, item in doc["paths"].items():
        if not template.startswith("/v1/"):
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], template)
        ops += [(method.upper(), path) for method in item if method != "parameters"]
    return ops


def test_every_v1_endpoint_needs_the_token(edge: MirenServer, errs_app: dict[str, str]) -> None:
    ops = v1_operations(edge)
    assert len(ops) >= 15, ops
    before = edge.admin("GET", f"/v1/apps/{APP}/versions").json()
    for method, path in ops:
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            reply = edge.admin(method, path, raw=body, token="", headers=auth)
            err = assert_json_error(reply, 401)
            assert reply.headers.get("www-authenticate", "").startswith("Bearer"), (method, path)
            assert TOKEN not in err["message"]
    # Nothing was changed by the refused calls.
    assert edge.admin("GET", f"/v1/apps/{APP}/versions").json() == before


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/openapi.json"])
def test_open_endpoints_need_no_token(edge: MirenServer, path: str) -> None:
    assert edge.admin("GET", path, token="").status == 200


BAD_INPUT: list[tuple[str, str, str, Any, int, str | None]] = [
    # (id, method, path, body: JSON value or raw bytes, status, code)
    ("malformed-json", "POST", "/v1/apps", b'{"name": ', 400, "bad_json"),
    ("not-an-object", "POST", "/v1/apps", b"[1, 2]", 400, "bad_json"),
    ("empty-body", "POST", "/v1/apps", b"", 400, "bad_json"),
    ("wrong-type", "POST", "/v1/apps", {"name": 5}, 400, None),
    ("unknown-field", "POST", "/v1/apps", {"name": "x1", "color": "red"}, 400, None),
    ("invalid-app-name", "POST", "/v1/apps", {"name": "Bad_Name"}, 422, "invalid_name"),
    ("duplicate-app", "POST", "/v1/apps", {"name": APP}, 409, "app_exists"),
    ("unknown-app", "GET", "/v1/apps/no-such-app", None, 404, "app_not_found"),
    (
        "deploy-unknown-app",
        "POST",
        "/v1/apps/no-such-app/deploys",
        {"spec": UPSTREAM_SPEC},
        404,
        None,
    ),
    (
        "invalid-label",
        "POST",
        f"/v1/apps/{APP}/deploys",
        {"spec": UPSTREAM_SPEC, "ephemeral": {"label": "Feature/Login"}},
        422,
        "invalid_label",
    ),
    (
        "ttl-0s",
        "POST",
        f"/v1/apps/{APP}/deploys",
        {"spec": UPSTREAM_SPEC, "ephemeral": {"label": "pr-2", "ttl": "0s"}},
        422,
        None,
    ),
    (
        "spec-and-from-version",
        "POST",
        f"/v1/apps/{APP}/deploys",
        {"spec": UPSTREAM_SPEC, "from_version": "x"},
        422,
        None,
    ),
    ("extend-ttl-0s", "PATCH", f"/v1/apps/{APP}/ephemeral/pr-1", {"ttl": "0s"}, 422, None),
    ("extend-ttl-number", "PATCH", f"/v1/apps/{APP}/ephemeral/pr-1", {"ttl": 5}, 400, None),
    ("extend-unknown-label", "PATCH", f"/v1/apps/{APP}/ephemeral/pr-9", {"ttl": "1h"}, 404, None),
    ("bad-route-host", "PUT", "/v1/routes/bad_host!", {"app": APP}, 422, "invalid_host"),
    ("route-unknown-app", "PUT", "/v1/routes/x.example.com", {"app": "no-such-app"}, 404, None),
    (
        "route-default-type",
        "PUT",
        "/v1/routes/x.example.com",
        {"app": APP, "default": "y"},
        400,
        None,
    ),
    ("versions-limit-type", "GET", f"/v1/apps/{APP}/versions?limit=abc", None, 400, None),
    ("logs-tail-range", "GET", "/v1/sandboxes/sb-x/logs?tail=-1", None, 400, None),
    ("unknown-version", "GET", f"/v1/apps/{APP}/versions/nope", None, 404, None),
    ("unknown-endpoint", "GET", "/v1/nope", None, 404, "not_found"),
    ("wrong-method", "PUT", "/v1/apps", {"name": "x"}, 405, "method_not_allowed"),
    ("too-large", "POST", "/v1/apps", b"{" + b" " * (2 << 20) + b"}", 413, None),
]


# Deploy bodies are structured strictly (miren_store/codec.py): a wrong JSON type is never coerced
# (a string `command` is not split into characters, 5 is not "5"), and shape errors are 400.
_PREVIEW = {"spec": UPSTREAM_SPEC, "ephemeral": {"label": "wt"}}
WRONG_DEPLOY_TYPES: list[tuple[str, dict[str, Any]]] = [
    ("ttl-number", {**_PREVIEW, "ephemeral": {"label": "wt", "ttl": 60}}),
    ("label-number", {**_PREVIEW, "ephemeral": {"label": 5}}),
    ("ephemeral-string", {**_PREVIEW, "ephemeral": "wt"}),
    ("command-string", {**_PREVIEW, "spec": {"runtime": "process", "command": "python app.py"}}),
    (
        "max-instances-bool",
        {**_PREVIEW, "spec": {**UPSTREAM_SPEC, "concurrency": {"max_instances": True}}},
    ),
    ("source-branch-number", {**_PREVIEW, "source": {"branch": 5}}),
    ("unknown-field", {**_PREVIEW, "colour": "red"}),
]


def _bad_input_params() -> list[Any]:
    params = [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT]
    for name, body in WRONG_DEPLOY_TYPES:
        params.append(
            pytest.param(
                "POST",
                f"/v1/apps/{APP}/deploys",
                body,
                400,
                None,
                id=f"deploy-{name}",
            )
        )
    return params


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), _bad_input_params())
def test_bad_input_is_a_json_error(
    edge: MirenServer,
    errs_app: dict[str, str],
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str | None,
) -> None:
    if isinstance(body, bytes):
        reply = edge.admin(method, path, raw=body)
    else:
        reply = edge.admin(method, path, body)
    assert_json_error(reply, status, code)


def test_deleting_the_active_version_is_409(edge: MirenServer, errs_app: dict[str, str]) -> None:
    reply = edge.admin("DELETE", f"/v1/apps/{APP}/versions/{errs_app['active']}")
    assert_json_error(reply, 409)
    assert edge.admin("GET", f"/v1/apps/{APP}/versions/{errs_app['active']}").status == 200


def test_ttl_0s_changes_nothing(edge: MirenServer, errs_app: dict[str, str]) -> None:
    before = edge.admin("GET", f"/v1/apps/{APP}/versions").json()
    reply = edge.admin(
        "POST",
        f"/v1/apps/{APP}/deploys",
        {"spec": UPSTREAM_SPEC, "ephemeral": {"label": "pr-1", "ttl": "0s"}},
    )
    err = assert_json_error(reply, 422)
    assert "greater than 0" in err["message"]
    assert edge.admin("GET", f"/v1/apps/{APP}/versions").json() == before


def test_a_chunked_body_is_read_like_any_other(edge: MirenServer) -> None:
    """No Content-Length: the chunked body `{}` is parsed, and lacks `name` (400, not a 500)."""
    with socket.create_connection(("127.0.0.1", edge.admin_port), timeout=5) as s:
        s.sendall(
            b"POST /v1/apps HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n"
        )
        head, _, body = s.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b'"bad_request"' in body or b"name" in body, body
    assert http_call(edge.admin_port, "GET", "/healthz").status == 200


# -- the CLI turns these into messages and exit statuses ----------------------------------------


def test_cli_reports_server_errors(edge: MirenServer, errs_app: dict[str, str]) -> None:
    missing = edge.cli("app", "versions", "--app", "no-such-app", check=False)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("miren: ") and "HTTP 404" in missing.stderr, missing.stderr

    zero = edge.cli(
        "deploy",
        "--app",
        APP,
        "--ephemeral",
        "pr-3",
        "--ttl",
        "0s",
        "--upstream",
        DEAD_UPSTREAM,
        check=False,
    )
    assert zero.returncode == 1
    assert "greater than 0" in zero.stderr and "HTTP 422" in zero.stderr, zero.stderr

    no_token = edge.cli("app", "list", token="", check=False)
    assert no_token.returncode == 1
    assert "HTTP 401" in no_token.stderr, no_token.stderr


def test_cli_reports_an_unreachable_server() -> None:
    env = {**base_env(), "MIREN_SERVER": f"http://127.0.0.1:{free_port()}"}
    result = run_cli("app", "list", env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("miren: cannot reach the miren server at"), result.stderr
