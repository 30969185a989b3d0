"""The admin API over a real memory store: auth, the error contract, deploy and preview flows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from miren_ingress.admin.api import AdminContext, make_admin_app
from miren_ingress.shell.config import load_config
from miren_store.entities import App
from miren_store.memory import MemoryStore

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"runtime": "upstream", "urls": ["http://127.0.0.1:9"]}
ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 6, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    yield s
    await s.close()


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, store: MemoryStore, clock: Clock
) -> TestClient[Any, Any]:
    cfg = load_config(env={"MIREN_ADMIN_TOKEN": TOKEN, "MIREN_EPHEMERAL_CLUSTER_HOSTNAME": ""})
    ctx = AdminContext(store=store, config=cfg, registry=CollectorRegistry(), now=clock)
    return await aiohttp_client(make_admin_app(ctx))


async def call(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"headers": AUTH}
    if raw is not None:
        kwargs["data"] = raw
        kwargs["headers"] = {**AUTH, "Content-Type": "application/json"}
    elif body is not None:
        kwargs["json"] = body
    resp = await client.request(method, path, **kwargs)
    text = await resp.text()
    if resp.status >= 400:
        assert resp.content_type == "application/json", text
    import json

    return resp.status, (json.loads(text) if text else None)


async def setup_app(client: TestClient[Any, Any]) -> None:
    assert (await call(client, "POST", "/v1/apps", {"name": "web"}))[0] == 201
    assert (await call(client, "PUT", "/v1/routes/app.example.com", {"app": "web"}))[0] == 201
    assert (await call(client, "PUT", "/v1/routes/*.apps.example.com", {"app": "web"}))[0] == 201


ENDPOINTS = [
    ("POST", "/v1/apps"),
    ("GET", "/v1/apps"),
    ("GET", "/v1/apps/web"),
    ("DELETE", "/v1/apps/web"),
    ("PUT", "/v1/routes/a.example.com"),
    ("GET", "/v1/routes"),
    ("DELETE", "/v1/routes/a.example.com"),
    ("POST", "/v1/apps/web/deploys"),
    ("GET", "/v1/apps/web/versions"),
    ("GET", "/v1/apps/web/versions/x"),
    ("DELETE", "/v1/apps/web/versions/x"),
    ("PATCH", "/v1/apps/web/ephemeral/pr-1"),
    ("DELETE", "/v1/apps/web/ephemeral/pr-1"),
    ("GET", "/v1/apps/web/sandboxes"),
    ("GET", "/v1/sandboxes/sb-1/logs"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic x", TOKEN])
async def test_every_v1_endpoint_needs_the_token(
    client: TestClient[Any, Any], store: MemoryStore, method: str, path: str, header: str | None
) -> None:
    await store.create(App(name="web"))
    headers = {} if header is None else {"Authorization": header}
    resp = await client.request(method, path, headers=headers, json={"name": "x"})
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"
    assert TOKEN not in await resp.text()
    assert (await store.get(App, "web")).name == "web"  # nothing happened


async def test_healthz_and_metrics_need_no_token(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/metrics")
    assert resp.status == 200


async def test_app_lifecycle(client: TestClient[Any, Any]) -> None:
    status, app = await call(client, "POST", "/v1/apps", {"name": "web"})
    assert status == 201 and app["name"] == "web" and app["active_version"] is None
    assert (await call(client, "POST", "/v1/apps", {"name": "web"}))[0] == 409
    status, apps = await call(client, "GET", "/v1/apps")
    assert [a["name"] for a in apps] == ["web"]
    assert (await call(client, "GET", "/v1/apps/web"))[1]["name"] == "web"
    assert (await call(client, "DELETE", "/v1/apps/web"))[0] == 204
    assert (await call(client, "GET", "/v1/apps/web"))[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status", "code"),
    [
        ("POST", "/v1/apps", None, b"{not json", 400, "bad_json"),
        ("POST", "/v1/apps", None, b"[1,2]", 400, "bad_json"),
        ("POST", "/v1/apps", None, b'{"name": ' + b"[" * 33 + b"]" * 33 + b"}", 400, "bad_json"),
        ("POST", "/v1/apps", None, b'{"name": ' + b"[" * 100_000 + b"}", 400, "bad_json"),
        ("POST", "/v1/apps", None, b'{"name": ' + b"{" * 5000, 400, "bad_json"),
        ("POST", "/v1/apps", {"name": 5}, None, 400, "bad_request"),
        ("POST", "/v1/apps", {}, None, 400, "bad_request"),
        ("POST", "/v1/apps", {"name": "web", "x": 1}, None, 400, "bad_request"),
        ("POST", "/v1/apps", {"name": "Not_Valid"}, None, 422, "invalid_name"),
        ("PUT", "/v1/routes/*.com", {"app": "web"}, None, 422, "invalid_host"),
        ("PUT", "/v1/routes/a.example.com", {"app": "nope"}, None, 404, "app_not_found"),
        (
            "PUT",
            "/v1/routes/a.example.com",
            {"app": "web", "default": "yes"},
            None,
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/v1/routes/a.example.com",
            {"app": "web", "request_timeout": "0s"},
            None,
            422,
            "invalid_timeout",
        ),
        ("POST", "/v1/apps/nope/deploys", {"spec": SPEC}, None, 404, "app_not_found"),
        (
            "POST",
            "/v1/apps/web/deploys",
            {"spec": {"runtime": "process"}},
            None,
            422,
            "invalid_spec",
        ),
        ("POST", "/v1/apps/web/deploys", {"spec": {"runtime": 7}}, None, 400, "bad_request"),
        (
            "POST",
            "/v1/apps/web/deploys",
            {"spec": {"runtime": "process", "command": "python app.py"}},
            None,
            400,
            "bad_request",
        ),
        ("POST", "/v1/apps/web/deploys", {"spec": {"runtime": "nope"}}, None, 422, "invalid_spec"),
        (
            "POST",
            "/v1/apps/web/deploys",
            {"spec": SPEC, "ephemeral": {"label": "Feat_X"}},
            None,
            422,
            "invalid_label",
        ),
        (
            "POST",
            "/v1/apps/web/deploys",
            {"spec": SPEC, "ephemeral": {"label": "x", "ttl": "0s"}},
            None,
            422,
            "invalid_ttl",
        ),
        (
            "POST",
            "/v1/apps/web/deploys",
            {"spec": SPEC, "ephemeral": {"label": "x", "ttl": "31d"}},
            None,
            422,
            "invalid_ttl",
        ),
        ("POST", "/v1/apps/web/deploys", {"from_version": "ghost"}, None, 404, "version_not_found"),
        (
            "POST",
            "/v1/apps/web/deploys",
            {"spec": SPEC, "from_version": "x"},
            None,
            422,
            "invalid_request",
        ),
        ("GET", "/v1/apps/web/versions?limit=lots", None, None, 400, "bad_request"),
        ("GET", "/v1/apps/web/versions?ephemeral=maybe", None, None, 400, "bad_request"),
        ("GET", "/v1/apps/nope/versions", None, None, 404, "app_not_found"),
        ("PATCH", "/v1/apps/web/ephemeral/pr-9", {"ttl": "1h"}, None, 404, "label_not_found"),
        ("PATCH", "/v1/apps/web/ephemeral/pr-9", {"ttl": 5}, None, 400, "bad_request"),
        ("DELETE", "/v1/apps/web/ephemeral/pr-9", None, None, 404, "label_not_found"),
        ("GET", "/v1/nothing-here", None, None, 404, "not_found"),
        ("PATCH", "/v1/apps", None, None, 405, "method_not_allowed"),
    ],
)
async def test_bad_input_gets_a_json_4xx(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    body: Any,
    raw: bytes | None,
    status: int,
    code: str,
) -> None:
    await call(client, "POST", "/v1/apps", {"name": "web"})
    got, data = await call(client, method, path, body, raw=raw)
    assert (got, data["error"]["code"]) == (status, code), data
    assert data["error"]["message"]


async def test_deploy_active_then_preview_then_list(
    client: TestClient[Any, Any], clock: Clock
) -> None:
    await setup_app(client)
    status, active = await call(client, "POST", "/v1/apps/web/deploys", {"spec": SPEC})
    assert status == 201 and active["status"] == "active"
    assert sorted(active["urls"]) == ["https://app.example.com"]
    clock.t += timedelta(seconds=1)
    body = {"spec": SPEC, "ephemeral": {"branch": "Feature/Login", "ttl": "1h"}}
    status, pr = await call(client, "POST", "/v1/apps/web/deploys", body)
    assert status == 201 and pr["status"] == "ephemeral"
    assert pr["version"]["ephemeral_label"] == "feature-login"
    assert sorted(pr["urls"]) == [
        "https://feature-login.app.example.com",
        "https://feature-login.apps.example.com",
    ]
    assert pr["expires_at"] == "2026-06-01T01:00:01Z"
    _, versions = await call(client, "GET", "/v1/apps/web/versions")
    assert [v["status"] for v in versions] == ["ephemeral", "active"]
    assert "ephemeral_label" not in versions[1]
    _, only = await call(client, "GET", "/v1/apps/web/versions?ephemeral=true")
    assert [v["id"] for v in only] == [pr["version"]["id"]]
    status, one = await call(client, "GET", f"/v1/apps/web/versions/{pr['version']['id']}")
    assert status == 200 and one["status"] == "ephemeral"
    # delete the active version: refused
    got, err = await call(client, "DELETE", f"/v1/apps/web/versions/{active['version']['id']}")
    assert (got, err["error"]["code"]) == (409, "active_version")


async def test_version_json_shows_the_concurrency_in_force(
    client: TestClient[Any, Any],
) -> None:
    """A version's JSON shows the scaling knobs that apply, defaults resolved: a preview runs one
    instance idle for 15 minutes; an upstream version has at most one instance per URL; no key is
    null (an absent hard cap is no key at all)."""
    await setup_app(client)
    process = {"runtime": "process", "command": ["true"]}
    _, active = await call(client, "POST", "/v1/apps/web/deploys", {"spec": process})
    assert active["version"]["spec"]["concurrency"] == {
        "requests_per_instance": 10,
        "max_instances": 20,
        "min_instances": 0,
        "scale_down_delay": "2m",
    }
    body = {"spec": process, "ephemeral": {"label": "pr-7", "ttl": "1h"}}
    _, pr = await call(client, "POST", "/v1/apps/web/deploys", body)
    assert pr["version"]["spec"]["concurrency"] == {
        "requests_per_instance": 10,
        "max_instances": 1,
        "min_instances": 0,
        "scale_down_delay": "15m",
    }
    two_urls = {
        "runtime": "upstream",
        "urls": ["http://127.0.0.1:9", "http://127.0.0.1:10"],
        "concurrency": {
            "max_instances": 8,
            "requests_per_instance": 50,
            "max_requests_per_instance": 20,
        },
    }
    _, up = await call(client, "POST", "/v1/apps/web/deploys", {"spec": two_urls})
    assert up["version"]["spec"]["concurrency"] == {
        "requests_per_instance": 20,
        "max_requests_per_instance": 20,
        "max_instances": 2,
        "min_instances": 0,
        "scale_down_delay": "2m",
    }
    _, listed = await call(client, "GET", "/v1/apps/web/versions")
    for v in listed:
        assert None not in v["spec"]["concurrency"].values()


async def test_extend_and_delete_preview(client: TestClient[Any, Any], clock: Clock) -> None:
    await setup_app(client)
    body = {"spec": SPEC, "ephemeral": {"label": "pr-1", "ttl": "1h"}}
    await call(client, "POST", "/v1/apps/web/deploys", body)
    clock.t += timedelta(minutes=30)
    status, v = await call(client, "PATCH", "/v1/apps/web/ephemeral/pr-1", {"ttl": "2h"})
    assert (
        status == 200 and v["expires_at"] == "2026-06-01T02:30:00Z" and v["ephemeral_ttl"] == "2h"
    )
    clock.t += timedelta(hours=3)
    got, err = await call(client, "PATCH", "/v1/apps/web/ephemeral/pr-1", {"ttl": "2h"})
    assert (got, err["error"]["code"]) == (404, "label_expired")
    _, versions = await call(client, "GET", "/v1/apps/web/versions")
    assert versions[0]["status"] == "expired"
    status, out = await call(client, "DELETE", "/v1/apps/web/ephemeral/pr-1")
    assert status == 200 and len(out["deleted"]) == 1
    assert (await call(client, "GET", "/v1/apps/web/versions"))[1] == []


async def test_only_one_default_route(client: TestClient[Any, Any]) -> None:
    await call(client, "POST", "/v1/apps", {"name": "web"})
    assert (await call(client, "PUT", "/v1/routes/a.example.com", {"app": "web", "default": True}))[
        0
    ] == 201
    got, err = await call(
        client, "PUT", "/v1/routes/b.example.com", {"app": "web", "default": True}
    )
    assert (got, err["error"]["code"]) == (409, "default_route_exists")
    # re-putting the default route itself is fine (an update)
    assert (await call(client, "PUT", "/v1/routes/a.example.com", {"app": "web", "default": True}))[
        0
    ] == 200


async def test_store_outage_is_503_store_unavailable(
    client: TestClient[Any, Any], store: MemoryStore
) -> None:
    await call(client, "POST", "/v1/apps", {"name": "web"})
    store.unavailable = True
    for method, path, body in [
        ("GET", "/v1/apps", None),
        ("POST", "/v1/apps", {"name": "other"}),
        ("POST", "/v1/apps/web/deploys", {"spec": SPEC, "ephemeral": {"label": "x"}}),
        ("GET", "/v1/apps/web/versions", None),
    ]:
        got, err = await call(client, method, path, body)
        assert (got, err["error"]["code"]) == (503, "store_unavailable"), (path, err)


async def test_sandbox_list_and_logs(
    client: TestClient[Any, Any], store: MemoryStore, tmp_path: Any
) -> None:
    from miren_store.entities import Sandbox, SandboxStatus

    await call(client, "POST", "/v1/apps", {"name": "web"})
    await store.create(
        Sandbox(
            id="sb-1",
            pool="p",
            app="web",
            version="web-1",
            status=SandboxStatus.RUNNING,
            url="http://127.0.0.1:5",
            pid=42,
        )
    )
    status, boxes = await call(client, "GET", "/v1/apps/web/sandboxes")
    assert status == 200 and boxes[0]["id"] == "sb-1" and boxes[0]["status"] == "running"
    assert (await call(client, "GET", "/v1/apps/nope/sandboxes"))[0] == 404
    got, err = await call(client, "GET", "/v1/sandboxes/sb-1/logs")
    assert (got, err["error"]["code"]) == (404, "sandbox_not_found")
    got, err = await call(client, "GET", "/v1/sandboxes/..%2Fetc%2Fpasswd/logs")
    assert got == 404
    assert (await call(client, "GET", "/v1/sandboxes/sb-1/logs?tail=-1"))[0] == 400


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
     "application/jsonp"],
)  # fmt: skip
async def test_a_body_that_is_not_declared_json_is_415(
    client: TestClient[Any, Any], store: MemoryStore, content_type: str | None
) -> None:
    """What a web page can send without a CORS preflight (text/plain, form encodings) never
    reaches a handler, whatever the body holds."""
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = await client.post("/v1/apps", data=b'{"name": "web"}', headers=headers)
    if content_type is None:  # (aiohttp's client labels bytes application/octet-stream)
        assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.status == 415
    assert (await resp.json())["error"]["code"] == "unsupported_media_type"
    assert await store.list(App) == []


async def test_json_with_a_charset_is_accepted(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/v1/apps",
        data=b'{"name": "web"}',
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
    )
    assert resp.status == 201


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff\xfe", b"Bearer t0ken-for-tests\xff", b"\xc3\x28", b"Bearer \x80" * 50],
)
async def test_undecodable_authorization_is_401(
    aiohttp_client: ClientFactory, store: MemoryStore, value: bytes
) -> None:
    """Header bytes that are not UTF-8 (aiohttp passes them through escaped): 401, never 500,
    on every protected route."""
    import asyncio

    cfg = load_config(env={"MIREN_ADMIN_TOKEN": TOKEN})
    client = await aiohttp_client(
        make_admin_app(AdminContext(store=store, config=cfg, registry=CollectorRegistry()))
    )
    port = client.port
    for method, path in ENDPOINTS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b"Authorization: "
            + value
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 401 "), (method, path, data[:200])
        assert b'"unauthorized"' in data


def test_the_admin_app_refuses_to_exist_without_a_token(store: MemoryStore) -> None:
    cfg = load_config(env={})
    assert cfg.admin_token == ""
    with pytest.raises(ValueError, match="token"):
        make_admin_app(AdminContext(store=store, config=cfg, registry=CollectorRegistry()))


async def test_protection_secrets_are_stored_as_hashes(
    client: TestClient[Any, Any], store: MemoryStore
) -> None:
    """What the store holds for a protection: a salted scrypt hash of the password and the
    SHA-256 of the bypass token, never either in clear; the first protection creates the
    cluster's cookie key in the same commit."""
    import hashlib

    from miren_ingress.proxy import guard
    from miren_store.entities import EdgeSecret, Protection

    assert (await call(client, "POST", "/v1/apps", {"name": "web"}))[0] == 201
    body = {"mode": "previews", "password": "hunter2-long", "bypass_token": "ci-token-123"}
    status, shown = await call(client, "PUT", "/v1/apps/web/protection", body)
    assert status == 200 and shown == {
        "app": "web", "mode": "previews", "password_set": True, "bypass_token_set": True
    }  # fmt: skip
    stored = await store.get(Protection, "web")
    assert stored.password_hash.startswith("scrypt$") and "hunter2" not in stored.password_hash
    assert guard.password_ok(stored.password_hash, b"hunter2-long")
    assert stored.bypass_hash == hashlib.sha256(b"ci-token-123").hexdigest()
    assert len((await store.get(EdgeSecret, "cookie-key")).value) == 64
    # Protected with neither secret: nobody could get in, so it is refused.
    assert (await call(client, "POST", "/v1/apps", {"name": "bare"}))[0] == 201
    status, err = await call(client, "PUT", "/v1/apps/bare/protection", {"mode": "all"})
    assert status == 422 and "password or a bypass token" in err["error"]["message"]
