"""Protected previews through a real `miren serve`: the login page for a stranger, 401 for a
wrong password, the app after the right one or with the bypass header, and the app never sees
the cookie, the bypass header or the password; the active version stays public."""

from __future__ import annotations

import json
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import Response, http_call
from tests.support.edge import ECHO_CMD, REPO, TOKEN, MirenServer
from tests.support.poll import eventually_sync

pytestmark = pytest.mark.timeout(120)

PASSWORD = "correct horse battery"
BYPASS = "ci-bypass-token-123"
PREVIEW = "pr-1.web.example.com"
LOGIN = "/.well-known/miren/login"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    with MirenServer(tmp_path_factory.mktemp("protect"), store="memory", token=TOKEN) as server:
        server.cli("app", "create", "web")
        server.cli("route", "set", "web.example.com", "--app", "web")
        spec = {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO)}
        assert server.admin("POST", "/v1/apps/web/deploys", {"spec": spec}).status == 201
        preview = {"spec": spec, "ephemeral": {"label": "pr-1"}}
        assert server.admin("POST", "/v1/apps/web/deploys", preview).status == 201
        secrets = server.workdir / "password"
        secrets.write_text(PASSWORD + "\n")
        out = server.cli(
            "app", "protect", "web", "--mode", "previews", "--password-file", str(secrets)
        ).stdout
        assert "protection previews (password set, bypass token not set)" in out, out
        reply = server.admin(
            "PUT", "/v1/apps/web/protection",
            {"mode": "previews", "bypass_token": BYPASS},
        )  # fmt: skip
        assert reply.status == 200 and reply.json()["password_set"], reply
        # The table follows the store: wait until the preview is protected.
        eventually_sync(lambda: server.get(PREVIEW).status == 401, 15, "the preview protected")
        yield server


def seen_headers(reply: Response) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(reply.body)["headers"]}


def login(edge: MirenServer, password: str, next_path: str = "/after?x=1") -> Response:
    body = urllib.parse.urlencode({"password": password}).encode()
    return http_call(
        edge.proxy_port, "POST", f"{LOGIN}?next={urllib.parse.quote(next_path)}", body=body,
        headers={"Host": PREVIEW, "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip


def cookie_of(reply: Response) -> str:
    line = reply.header("set-cookie") or ""
    assert line.startswith("miren_auth="), reply
    return line.split(";", 1)[0]


def test_a_stranger_gets_the_login_page(edge: MirenServer) -> None:
    page = edge.get(PREVIEW, "/secret", headers={"Accept": "text/html"})
    assert page.status == 401
    assert (page.header("content-type") or "").startswith("text/html")
    assert b'<form method="post"' in page.body and b"next=/secret" in page.body
    assert page.header("cache-control") == "no-store"


def test_a_wrong_password_is_401_and_the_right_one_sets_the_cookie(edge: MirenServer) -> None:
    wrong = login(edge, "not the password")
    assert wrong.status == 401 and b"Wrong password." in wrong.body
    assert wrong.header("set-cookie") is None
    right = login(edge, PASSWORD)
    assert right.status == 303 and right.header("location") == "/after?x=1", right
    flags = (right.header("set-cookie") or "").lower()
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    assert "max-age=86400" in flags and "secure" not in flags  # 24 h; plain HTTP: not Secure
    cookie = cookie_of(right)
    app = edge.get(PREVIEW, "/after", headers={"Cookie": f"theme=dark; {cookie}; lang=en"})
    assert app.status == 200, app
    seen = seen_headers(app)
    assert seen["cookie"] == "theme=dark; lang=en"  # ours removed, the app's own kept
    assert PASSWORD not in app.body.decode()
    # A cookie of this host opens no other host.
    other = edge.get("pr-2.web.example.com", headers={"Cookie": cookie})
    assert other.status in (401, 404)


def test_the_bypass_header_opens_and_never_reaches_the_app(edge: MirenServer) -> None:
    app = edge.get(PREVIEW, headers={"X-Miren-Bypass": BYPASS})
    assert app.status == 200, app
    assert "x-miren-bypass" not in seen_headers(app)
    assert (app.header("set-cookie") or "").startswith("miren_auth=")  # the same cookie
    assert edge.get(PREVIEW, headers={"X-Miren-Bypass": "wrong-token-xx"}).status == 401


def test_the_active_version_is_public_under_previews_mode(edge: MirenServer) -> None:
    assert edge.get("web.example.com").status == 200


def test_an_upgrade_is_checked_like_any_request(edge: MirenServer) -> None:
    with socket.create_connection(("127.0.0.1", edge.proxy_port), timeout=10) as sock:
        sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: {PREVIEW}\r\nConnection: Upgrade\r\nUpgrade: websocket"
            "\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            .encode()
        )  # fmt: skip
        assert sock.recv(200).startswith(b"HTTP/1.1 401")


def test_secrets_are_stored_hashed(edge: MirenServer) -> None:
    shown: dict[str, Any] = edge.admin("GET", "/v1/apps/web/protection").json()
    assert shown == {"app": "web", "mode": "previews", "password_set": True,
                     "bypass_token_set": True}  # fmt: skip
    assert PASSWORD not in edge.log_text() and BYPASS not in edge.log_text()


def test_login_attempts_are_rate_limited(tmp_path: Path) -> None:
    """Ten attempts a minute per client address, then 429 (its own server: the limit is
    per edge and would otherwise depend on the order of the tests)."""
    with MirenServer(tmp_path, store="memory", token=TOKEN) as own:
        own.cli("app", "create", "web")
        own.cli("route", "set", "web.example.com", "--app", "web")
        upstream = {"runtime": "upstream", "urls": ["http://127.0.0.1:9"]}
        assert own.admin("POST", "/v1/apps/web/deploys", {"spec": upstream}).status == 201
        reply = own.admin("PUT", "/v1/apps/web/protection", {"mode": "all", "password": PASSWORD})
        assert reply.status == 200
        eventually_sync(lambda: own.get("web.example.com").status == 401, 15, "protected")
        body = urllib.parse.urlencode({"password": "guess"}).encode()
        headers = {"Host": "web.example.com", "Content-Type": "application/x-www-form-urlencoded"}
        statuses = [
            http_call(own.proxy_port, "POST", LOGIN, body=body, headers=headers).status
            for _ in range(11)
        ]
        assert statuses == [401] * 10 + [429], statuses


def test_changing_the_password_revokes_cookies_and_tokens_are_rate_limited(
    tmp_path: Path,
) -> None:
    with MirenServer(tmp_path, store="memory", token=TOKEN) as own:
        own.cli("app", "create", "web")
        own.cli("route", "set", "web.example.com", "--app", "web")
        spec = {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO)}
        assert own.admin("POST", "/v1/apps/web/deploys", {"spec": spec}).status == 201
        preview = {"spec": spec, "ephemeral": {"label": "pr-1"}}
        assert own.admin("POST", "/v1/apps/web/deploys", preview).status == 201
        body = {"mode": "previews", "password": PASSWORD, "bypass_token": BYPASS}
        assert own.admin("PUT", "/v1/apps/web/protection", body).status == 200
        eventually_sync(lambda: own.get(PREVIEW).status == 401, 15, "the preview protected")
        cookie = cookie_of(own.get(PREVIEW, headers={"X-Miren-Bypass": BYPASS}))
        assert own.get(PREVIEW, headers={"Cookie": cookie}).status == 200

        # The public version of a protected app never sees the app's credentials either.
        public = own.get("web.example.com", headers={"X-Miren-Bypass": BYPASS, "Cookie": cookie})
        assert public.status == 200
        assert not {"x-miren-bypass", "cookie"} & set(seen_headers(public)), seen_headers(public)

        # A new password revokes every cookie granted before it.
        body = {"mode": "previews", "password": "another password"}
        assert own.admin("PUT", "/v1/apps/web/protection", body).status == 200
        eventually_sync(
            lambda: own.get(PREVIEW, headers={"Cookie": cookie}).status == 401,
            15, "the old cookie to be refused",
        )  # fmt: skip

        # Guessing bypass tokens is limited like guessing passwords.
        statuses = [
            own.get(PREVIEW, headers={"X-Miren-Bypass": f"guess-{i:04d}"}).status for i in range(11)
        ]
        assert statuses == [401] * 10 + [429], statuses
