"""The admin API's trust boundary through a real `miren serve`: it always authenticates, bodies
are JSON only, and no malformed header value is ever echoed or logged.

The API deploys commands, so an unauthenticated call is remote code execution for any local
process (every sandbox) and any web page (a no-cors `fetch` with `text/plain`, or DNS rebinding
with another `Host`).
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from tests.support.edge import REPO, MirenServer, base_env, run_cli

UPSTREAM_SPEC = {"runtime": "upstream", "urls": ["http://127.0.0.1:9"]}


def raw_admin(edge: MirenServer, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", edge.admin_port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_tokenless_server_generates_a_token_and_requires_it(tmp_path: Path) -> None:
    with MirenServer(tmp_path, store="memory", token="") as edge:
        path = edge.data_dir / "admin-token"
        token = path.read_text().strip()
        assert len(token) >= 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(edge.data_dir.stat().st_mode) == 0o700
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"}):
            reply = edge.admin("POST", "/v1/apps", {"name": "web"}, token="", headers=headers)
            assert reply.status == 401, reply
            assert "MIREN_ADMIN_TOKEN" in reply.json()["error"]["message"]
            deploy = edge.admin(
                "POST", "/v1/apps/web/deploys", {"spec": UPSTREAM_SPEC}, token="", headers=headers
            )
            assert deploy.status == 401
        assert edge.admin("GET", "/v1/apps", token="").status == 401
        assert edge.admin("POST", "/v1/apps", {"name": "web"}, token=token).status == 201
        assert token not in edge.log_path.read_text()
    # A restart keeps the token.
    with MirenServer(tmp_path, store="memory", token="") as edge:
        assert (edge.data_dir / "admin-token").read_text().strip() == token
        assert edge.admin("GET", "/v1/apps", token=token).status == 200


def test_the_cli_finds_the_generated_token(tmp_path: Path) -> None:
    """`miren serve` run in a directory writes `.miren/admin-token` there; the CLI run from the
    same directory uses it with no setup (the README walkthrough); `--token-file` elsewhere."""
    edge = MirenServer(tmp_path, store="memory", token="")
    edge.data_dir = tmp_path / ".miren"
    with edge:
        env = {**base_env(), "MIREN_SERVER": edge.admin_url}
        made = run_cli("app", "create", "web", env=env, cwd=tmp_path, check=False)
        assert made.returncode == 0, made.stderr
        elsewhere = run_cli("app", "list", env=env, cwd=tmp_path / ".miren", check=False)
        assert elsewhere.returncode == 1 and "MIREN_ADMIN_TOKEN" in elsewhere.stderr
        by_file = run_cli(
            "--token-file",
            str(edge.data_dir / "admin-token"),
            "app",
            "list",
            env=env,
            cwd=REPO,
            check=False,
        )
        assert by_file.returncode == 0 and "web" in by_file.stdout, by_file.stderr


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer {token}\x01",
        b"Bearer \x01{token}",
        b"Bearer {token}\x7f",
        b"Bearer {token}\x00x",
        b"Bearer {token}\r x",
    ],
)
def test_a_malformed_authorization_is_never_echoed_or_logged(tmp_path: Path, value: bytes) -> None:
    with MirenServer(tmp_path, store="memory", token="") as edge:
        token = edge.server_token()
        header = value.replace(b"{token}", token.encode())
        answer = raw_admin(
            edge,
            b"POST /v1/apps HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"401"), answer[:200]
        assert b"application/json" in head
        assert b'"error"' in body and b'"code"' in body, body
        assert token.encode() not in answer
        # The server goes on, and its log holds neither the token nor a traceback.
        assert edge.admin("GET", "/v1/apps").status == 200
        log = edge.log_path.read_text(errors="replace")
        assert token not in log
        assert "Traceback" not in log


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_what_a_web_page_can_send_is_refused(tmp_path: Path, content_type: str) -> None:
    """A no-cors fetch (text/plain or a form, no preflight) with a rebound Host: even with the
    token it would be 415; without it, 401. Nothing is created."""
    with MirenServer(tmp_path, store="memory", token="") as edge:
        for token in ("", edge.server_token()):
            reply = edge.admin(
                "POST",
                "/v1/apps",
                raw=b'{"name": "evil"}',
                token=token,
                headers={
                    "Content-Type": content_type,
                    "Host": "attacker.example",
                    "Origin": "http://attacker.example",
                },
            )
            assert reply.status == (415 if token else 401), reply
        assert edge.admin("GET", "/v1/apps").json() == []
