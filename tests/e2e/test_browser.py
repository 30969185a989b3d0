"""A real browser: headless Chromium (Debian's `chromium`) opens a protected preview that is
asleep, logs in on the login page, sees the loading page while the preview boots, and ends on
the app's page. Driven over the DevTools protocol (the `websockets` client); the host names
resolve to the edge through Chromium's `--host-resolver-rules`. The last screenshot is kept in
the test's directory and its path printed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support.clients import free_port
from tests.support.edge import ECHO_CMD, REPO, TOKEN, MirenServer
from tests.support.poll import eventually, eventually_sync

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (install-system-deps)"),
]
PASSWORD = "browser-pass-123"
HOST = "pr-9.web.example.com"


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[MirenServer]:
    with MirenServer(tmp_path / "edge", store="memory", token=TOKEN) as server:
        server.cli("app", "create", "web")
        server.cli("route", "set", "web.example.com", "--app", "web")
        spec = {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO),
                "env": {"BOOT_DELAY_MS": "3000"}}  # fmt: skip
        preview = {"spec": spec, "ephemeral": {"label": "pr-9"}}
        assert server.admin("POST", "/v1/apps/web/deploys", preview).status == 201
        reply = server.admin("PUT", "/v1/apps/web/protection",
                             {"mode": "previews", "password": PASSWORD})  # fmt: skip
        assert reply.status == 200
        eventually_sync(lambda: server.get(HOST).status == 401, 15, "the preview protected")
        yield server


@pytest.fixture
def chromium(edge: MirenServer) -> Iterator[int]:
    assert CHROMIUM is not None
    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="miren-chromium-"))
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP *.example.com 127.0.0.1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        eventually_sync(lambda: _json(port, "/json/version"), 30, "chromium's DevTools")
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def _json(port: int, path: str, method: str = "GET") -> Any:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


class Page:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.n = 0

    async def call(self, method: str, **params: Any) -> Any:
        self.n += 1
        await self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg.get("result")

    async def eval(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")


async def drive(port: int, url: str, shot: Path) -> list[str]:
    target = _json(port, "/json/new?about:blank", method="PUT")
    seen: list[str] = []
    async with connect(target["webSocketDebuggerUrl"], max_size=50 * 2**20) as ws:
        page = Page(ws)
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)

        def keep(body: str) -> None:
            if body and (not seen or seen[-1] != body):
                seen.append(body)

        async def text() -> str | None:
            body = await page.eval("document.body ? document.body.innerText : ''")
            keep(body)
            return body or None

        async def login_form() -> bool:
            # One evaluation reads the text and looks for the form, so the page whose form is
            # seen is the page whose text is kept (two evaluations could straddle a load).
            body, has_form = await page.eval(
                "[document.body ? document.body.innerText : '',"
                " !!document.querySelector('input[name=password]')]"
            )
            keep(body)
            return bool(has_form)

        await eventually(login_form, 30, "the login page", interval=0.1)
        await page.eval(
            f"document.querySelector('input[name=password]').value = {json.dumps(PASSWORD)};"
            "document.forms[0].submit(); true"
        )

        async def on_the_app() -> bool:
            body = await text()
            return bool(body and '"label": "pr-9"' in body.replace('":"', '": "'))

        await eventually(on_the_app, 60, "the app's page", interval=0.2)
        png = await page.call("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(png["data"]))
    return seen


def test_chromium_logs_in_and_lands_on_the_app_after_a_cold_start(
    edge: MirenServer, chromium: int, tmp_path: Path
) -> None:
    shot = tmp_path / "app.png"
    pages = asyncio.run(drive(chromium, f"http://{HOST}:{edge.proxy_port}/", shot))
    assert any("Protected preview" in p for p in pages), pages
    assert any("Starting" in p for p in pages), pages  # the cold start showed the loading page
    assert shot.stat().st_size > 1000
    print(f"screenshot: {shot}")
    # The app saw no credential: its echo of the request's headers has no cookie of ours.
    last = json.loads(pages[-1])
    names = {k.lower() for k, _ in last["headers"]}
    assert "x-miren-bypass" not in names
    assert all("miren_auth" not in v for k, v in last["headers"] if k.lower() == "cookie")
