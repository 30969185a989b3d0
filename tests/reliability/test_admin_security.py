"""Admin security against a real `miren serve` with a token (and `log_level=debug`, the most
talkative setting).

- Every `/v1` endpoint (as the served OpenAPI document lists them, checked against the README's
  list) answers 401 without a token and with each kind of wrong one, with a body that carries
  nothing but the error, and changes nothing (the mutating calls are sent with valid bodies
  against real objects: were auth skipped, they would succeed). Path spellings that could slip
  past a prefix check never answer data without the token.
- Neither the token nor a near-miss of it appears in the server's log, the sandboxes' logs and
  environments, `/metrics`, any answer, or the CLI's error output.
- A preview cannot be reached through the admin listener, and the admin API cannot be reached
  through the proxy listener (whatever the Host).
- `miren serve` refuses a non-loopback admin listener without a token.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.figures import Figures
from tests.support.clients import Response, free_port, http_call
from tests.support.edge import (
    REPO,
    MirenServer,
    base_env,
    echo_spec_data,
    log_errors,
    serve_argv,
)
from tests.support.procs import host_pid

pytestmark = pytest.mark.reliability

TOKEN = "rel-7f2c9a41d0e6b38c5a1f"
APP, HOST, LABEL = "sec", "sec.test", "pr"
PREVIEW = f"{LABEL}.{HOST}"

# The README's endpoint table, as (method, path template).
README_ENDPOINTS = {
    ("POST", "/v1/apps"),
    ("GET", "/v1/apps"),
    ("GET", "/v1/apps/{app}"),
    ("DELETE", "/v1/apps/{app}"),
    ("PUT", "/v1/routes/{host}"),
    ("GET", "/v1/routes"),
    ("DELETE", "/v1/routes/{host}"),
    ("POST", "/v1/apps/{app}/deploys"),
    ("GET", "/v1/apps/{app}/versions"),
    ("GET", "/v1/apps/{app}/versions/{id}"),
    ("DELETE", "/v1/apps/{app}/versions/{id}"),
    ("PATCH", "/v1/apps/{app}/ephemeral/{label}"),
    ("DELETE", "/v1/apps/{app}/ephemeral/{label}"),
    ("GET", "/v1/apps/{app}/sandboxes"),
    ("GET", "/v1/sandboxes/{id}/logs"),
    ("PATCH", "/v1/apps/{app}"),
    ("PUT", "/v1/apps/{app}/protection"),
    ("GET", "/v1/apps/{app}/protection"),
    ("PUT", "/v1/apps/{app}/preview-template"),
    ("GET", "/v1/apps/{app}/preview-template"),
    ("DELETE", "/v1/apps/{app}/preview-template"),
}

WRONG: dict[str, dict[str, str]] = {
    "none": {},
    "other token": {"Authorization": "Bearer wrong-token"},
    "empty bearer": {"Authorization": "Bearer "},
    "token plus a char": {"Authorization": f"Bearer {TOKEN}x"},
    "token minus a char": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token without scheme": {"Authorization": TOKEN},
    "basic auth": {
        "Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    },
    "other header": {"X-Admin-Token": TOKEN, "X-Auth-Token": TOKEN},
    "two headers": {"Authorization": "Bearer wrong-token", "authorization": f"Bearer {TOKEN}"},
}
NEAR_MISSES = ["wrong-token", f"{TOKEN}x", TOKEN[:-1]]


def bodies() -> dict[tuple[str, str], Any]:
    """Valid request bodies: with a good token each of these calls would succeed."""
    return {
        ("POST", "/v1/apps"): {"name": "intruder"},
        ("PUT", "/v1/routes/{host}"): {"app": APP},
        ("POST", "/v1/apps/{app}/deploys"): {"spec": echo_spec_data()},
        ("PATCH", "/v1/apps/{app}/ephemeral/{label}"): {"ttl": "5m"},
        ("PATCH", "/v1/apps/{app}"): {"loading_page": "none"},
        ("PUT", "/v1/apps/{app}/protection"): {"mode": "all", "password": "intruder-pass"},
        ("PUT", "/v1/apps/{app}/preview-template"): {
            "spec": echo_spec_data(),
            "webhook_secret": "intruder-secret-123456",
        },
    }


def fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def unauthorized(reply: Response) -> bool:
    if reply.status != 401 or "bearer" not in reply.headers.get("www-authenticate", "").lower():
        return False
    body = reply.json()
    return set(body) == {"error"} and body["error"]["code"] == "unauthorized"


async def state(edge: MirenServer) -> dict[str, Any]:
    apps = (await edge.client.admin("GET", "/v1/apps")).json()
    routes = (await edge.client.admin("GET", "/v1/routes")).json()
    versions = (await edge.client.admin("GET", f"/v1/apps/{APP}/versions")).json()
    return {"apps": apps, "routes": routes, "versions": versions}


async def test_admin_security(tmp_path: Path, figures: Figures) -> None:
    server = MirenServer(tmp_path, store="memory", token=TOKEN, settings={"log_level": "debug"})
    async with server as edge:
        await edge.client.create_app(APP, HOST)
        await edge.client.post_deploy(APP, echo_spec_data())
        preview = await edge.client.post_deploy(APP, echo_spec_data(), label=LABEL, ttl="1h")
        version_id = preview["version"]["id"]
        app_pid = await _app_pid(edge, (await edge.client.wait_status(HOST, 200)).json()["sandbox"])
        preview_pid = await _app_pid(
            edge, (await edge.client.wait_status(PREVIEW, 200)).json()["sandbox"]
        )
        boxes = (await edge.client.admin("GET", f"/v1/apps/{APP}/sandboxes")).json()
        values = {"app": APP, "host": HOST, "label": LABEL, "id": version_id}
        before = await state(edge)

        # -- the endpoint list: the served OpenAPI document against the README
        doc = (await edge.client.admin("GET", "/openapi.json", token="")).json()
        endpoints = {
            (method.upper(), path)
            for path, ops in doc["paths"].items()
            if path.startswith("/v1/")
            for method in ops
            if method != "parameters"
        }
        assert endpoints == README_ENDPOINTS

        # -- no token / wrong tokens: 401 everywhere, nothing changed
        valid = bodies()
        not_401: list[str] = []
        calls = 0
        for method, template in sorted(endpoints):
            path = fill(template, values)
            if template == "/v1/sandboxes/{id}/logs":
                path = fill(template, {"id": boxes[0]["id"]})
            for name, headers in WRONG.items():
                reply = await edge.client.admin(
                    method, path, valid.get((method, template)), token="", headers=headers
                )
                calls += 1
                if not unauthorized(reply):
                    not_401.append(f"{method} {path} [{name}]: {reply!r}")
            # With the good token a read answers (so the 401s above were about the token).
            if method == "GET":
                # (an app without a template: its 404 is an answer past the token check too)
                ok = (200, 404) if template.endswith("/preview-template") else (200,)
                assert (await edge.client.admin(method, path)).status in ok, path
        after = await state(edge)

        # -- spellings of a /v1 path, without a token: never data
        leaks: list[str] = []
        for path in (
            "/v1/apps/",
            "//v1/apps",
            "/v1//apps",
            "/./v1/apps",
            "/v1/./apps",
            "/x/../v1/apps",
            "/v1/apps?x=1",
            "/v1/apps;x=1",
            "/V1/apps",
            "/v1/%61pps",
            "/%76%31/apps",
            "/v1%2fapps",
            "/v1/apps%00",
            "/v1/apps/../apps",
        ):
            for method in ("GET", "HEAD", "OPTIONS"):
                reply = await edge.client.admin(method, path, token="")
                calls += 1
                if reply.status < 400 or APP.encode() in reply.body:
                    leaks.append(f"{method} {path}: {reply!r}")

        # -- a preview is not reachable through the admin listener
        via_admin = []
        for path in ("/", "/health", "/echo", f"http://{PREVIEW}/"):
            reply = await _admin_as_host(edge, PREVIEW, path)
            via_admin.append(reply)
        # -- the admin API is not reachable through the proxy listener
        via_proxy: list[tuple[str, str, Response]] = []
        for host in (f"127.0.0.1:{edge.admin_port}", "localhost", "admin.invalid", HOST, PREVIEW):
            for path in ("/v1/apps", "/healthz", "/metrics", "/openapi.json"):
                headers = {"Host": host, "Authorization": f"Bearer {TOKEN}"}
                reply = http_call(edge.proxy_port, "GET", path, headers=headers)
                via_proxy.append((host, path, reply))

        # -- where the token must not appear
        metrics = (await edge.client.admin("GET", "/metrics")).body.decode()
        cli = edge.cli("app", "list", token="wrong-token", check=False)
        environ = {pid: _environ(pid) for pid in (app_pid, preview_pid)}
        sandbox_logs = "".join(
            p.read_text(errors="replace") for p in edge.data_dir.glob("**/*.log") if p.is_file()
        )
        text = edge.log_text()

    figures.add("unauthorized calls", calls)
    figures.add("/v1 endpoints", len(endpoints))
    figures.add("wrong-credential kinds", len(WRONG))
    figures.add("answers other than 401", len(not_401))
    figures.add("data leaked through path spellings", len(leaks))

    assert not not_401, not_401[:10]
    assert before == after, "an unauthorized call changed something"
    assert not leaks, leaks[:10]
    for reply in via_admin:
        assert reply.status == 404 and reply.json()["error"]["code"] == "not_found", reply
    for host, path, reply in via_proxy:
        body = reply.body.decode(errors="replace")
        assert "miren_ingress_requests_total" not in body and '"openapi"' not in body, (host, reply)
        if host in (HOST, PREVIEW):  # routed to the app itself, which echoes the request
            assert reply.status == 200 and json.loads(body)["path"] == path, (host, reply)
        else:
            assert reply.status == 404, (host, path, reply)
    secrets = [TOKEN, TOKEN[4:16], *NEAR_MISSES]
    for where, content in (
        ("serve log", text),
        ("sandbox logs", sandbox_logs),
        ("metrics", metrics),
        ("CLI output", cli.stdout + cli.stderr),
        *((f"environment of sandbox {pid}", env) for pid, env in environ.items()),
    ):
        found = [s for s in secrets if s in content]
        assert not found, f"{found} in the {where}"
    assert cli.returncode != 0
    assert "echo_server pid=" in sandbox_logs, "the sandbox logs were not found"
    assert not log_errors(text), log_errors(text)[:20]


async def _admin_as_host(edge: MirenServer, host: str, path: str) -> Response:
    return await edge.client.admin("GET", path, token="", headers={"Host": host})


async def _app_pid(edge: MirenServer, sandbox_id: str) -> int:
    """The echo server's host pid (bubblewrap's pid namespace gives it another inside)."""
    box = await edge.client.sandbox_record(APP, sandbox_id)
    return host_pid(int(box["pid"]), "echo_server.py")


def test_serve_refuses_a_public_admin_listener_without_a_token(tmp_path: Path) -> None:
    argv = serve_argv(
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-listen",
        f"0.0.0.0:{free_port()}",
        "--store",
        "memory",
        "--data-dir",
        str(tmp_path),
    )
    env = base_env()
    env.pop("MIREN_ADMIN_TOKEN", None)
    done = subprocess.run(
        argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0
    assert "admin_listen" in done.stderr and "token" in done.stderr, done.stderr


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
