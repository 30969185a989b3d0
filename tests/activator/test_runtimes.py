"""The process and upstream runtimes on their own: real child processes, real sockets."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from miren_activator.errors import BootFailed
from miren_activator.runtimes.base import SandboxSpec, check_health, probe
from miren_activator.runtimes.process import ProcessHandle, ProcessRuntime, expand_port
from miren_activator.runtimes.upstream import UpstreamRuntime
from miren_store.entities import Runtime, VersionSpec
from tests.activator.conftest import ECHO, ECHO_CMD, pid_gone, wait_until
from tests.support.clients import free_port

StartFn = Callable[..., "asyncio.Future[ProcessHandle]"]


def sandbox_spec(
    tmp_path: Path,
    *,
    command: tuple[str, ...] = ECHO_CMD,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    health_path: str | None = "/health",
    urls: tuple[str, ...] = (),
    ordinal: int = 0,
) -> SandboxSpec:
    runtime = Runtime.UPSTREAM if urls else Runtime.PROCESS
    spec = VersionSpec(
        runtime=runtime,
        command=command if not urls else (),
        env=env or {},
        cwd=cwd,
        health_path=health_path,
        boot_timeout=timedelta(seconds=10),
        urls=urls,
    )
    return SandboxSpec(
        sandbox_id="sb-test",
        app="app",
        version_id="app-v1",
        ephemeral_label="pr-1",
        service="web",
        spec=spec,
        ordinal=ordinal,
        log_path=tmp_path / "sb-test.log",
    )


@pytest.fixture
async def handles() -> AsyncIterator[list[ProcessHandle]]:
    """Handles to stop (SIGKILL) at teardown, whatever the test did."""
    made: list[ProcessHandle] = []
    try:
        yield made
    finally:
        for h in made:
            await h.stop(0.0)


async def start(
    runtime: ProcessRuntime, spec: SandboxSpec, handles: list[ProcessHandle]
) -> ProcessHandle:
    handle = await runtime.start(spec)
    handles.append(handle)
    return handle


def test_expand_port() -> None:
    assert expand_port(["a", "--port=$PORT", "${PORT}x", "$P"], 8) == ["a", "--port=8", "8x", "$P"]


async def test_env_argv_cwd_and_log(
    tmp_path: Path, handles: list[ProcessHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIREN_ADMIN_TOKEN", "secret")  # must never reach a sandbox
    work = tmp_path / "work"
    work.mkdir()
    script = (
        'echo "FOO=$FOO TOKEN=${MIREN_ADMIN_TOKEN:-unset} ARG=$1"; '
        'echo "PORTENV=$(printenv PORT)"; pwd; exec "$0" -S "$2" --port "$1"'
    )
    spec = sandbox_spec(
        tmp_path,
        command=("/bin/sh", "-c", script, sys.executable, "$PORT", str(ECHO)),
        env={"FOO": "bar", "PORT": "1"},  # the runtime's PORT wins over the spec's
        cwd=str(work),
    )
    handle = await start(ProcessRuntime(), spec, handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    port = handle.port
    text = (tmp_path / "sb-test.log").read_text()
    assert text.startswith("--- miren: ")
    assert f"FOO=bar TOKEN=unset ARG={port}" in text
    assert f"PORTENV={port}" in text
    assert str(work) in text
    assert f"listening on 127.0.0.1:{port}" in text
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/") as resp,
    ):
        body = await resp.json()
    assert (body["version"], body["app"], body["label"]) == ("app-v1", "app", "pr-1")
    assert (body["service"], body["sandbox"], body["pid"]) == ("web", "sb-test", handle.pid)
    await handle.stop(5.0)
    assert handle.returncode == -15
    assert pid_gone(handle.pid)


async def test_the_launcher_execs_the_command_in_place(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    runtime = ProcessRuntime()
    handle = await start(runtime, sandbox_spec(tmp_path), handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    # The pid we hold is the app's own (the launcher exec'd it), so signals reach the app.
    cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes()
    assert str(ECHO).encode() in cmdline


async def test_probe_http_and_tcp(tmp_path: Path, handles: list[ProcessHandle]) -> None:
    spec = sandbox_spec(tmp_path, env={"ECHO_NEVER_HEALTHY": "1"}, health_path=None)
    handle = await start(ProcessRuntime(), spec, handles)
    await asyncio.wait_for(handle.wait_ready(), 10)  # TCP accept is enough
    assert await probe("127.0.0.1", handle.port, None, 1.0)
    assert not await probe("127.0.0.1", handle.port, "/health", 1.0)  # 503: not ready
    free_port = handle.port
    await handle.stop(1.0)
    assert not await probe("127.0.0.1", free_port, None, 1.0)  # refused


async def test_probe_accepts_any_answer_below_500(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    handle = await start(ProcessRuntime(), sandbox_spec(tmp_path), handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    assert await probe("127.0.0.1", handle.port, "/status/404", 1.0)
    assert await probe("127.0.0.1", handle.port, "/status/302", 1.0)
    assert not await probe("127.0.0.1", handle.port, "/status/500", 1.0)


async def test_a_failed_health_check_says_what_it_saw(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    """The words a boot timeout quotes (deploy --wait): refused, a 5xx, no HTTP at all."""
    handle = await start(ProcessRuntime(), sandbox_spec(tmp_path), handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    assert await check_health("127.0.0.1", handle.port, "/status/404", 1.0) is None
    assert await check_health("127.0.0.1", handle.port, "/status/503", 1.0) == (
        "GET /status/503 answered 503"
    )
    closed = free_port()
    refused = await check_health("127.0.0.1", closed, "/", 1.0)
    assert refused == f"connection refused on port {closed} (nothing listens on $PORT)"

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await check_health("127.0.0.1", port, "/", 1.0) == "GET / got no HTTP answer"
        assert await check_health("127.0.0.1", port, None, 1.0) is None  # TCP: it accepts


async def test_exit_is_seen_at_once_and_fails_wait_ready(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    spec = sandbox_spec(tmp_path, env={"ECHO_FAIL_BOOT": "1"})
    handle = await start(ProcessRuntime(), spec, handles)
    assert await asyncio.wait_for(handle.wait_exit(), 5) == 1
    with pytest.raises(BootFailed, match="status 1"):
        await handle.wait_ready()
    assert "failing at boot" in (tmp_path / "sb-test.log").read_text()


async def test_stop_escalates_to_sigkill_after_grace(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    spec = sandbox_spec(tmp_path, env={"ECHO_IGNORE_SIGTERM": "1"})
    handle = await start(ProcessRuntime(), spec, handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await handle.stop(0.3)
    elapsed = loop.time() - t0
    assert handle.returncode == -9
    assert 0.3 <= elapsed < 3.0
    assert pid_gone(handle.pid)


async def test_stop_kills_the_whole_process_group(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    script = 'sleep 300 & echo "CHILD=$!"; exec "$0" -S "$1" --port "$2"'
    spec = sandbox_spec(
        tmp_path, command=("/bin/sh", "-c", script, sys.executable, str(ECHO), "$PORT")
    )
    handle = await start(ProcessRuntime(), spec, handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    match = re.search(r"CHILD=(\d+)", (tmp_path / "sb-test.log").read_text())
    assert match
    child = int(match.group(1))
    assert not pid_gone(child)
    await handle.stop(2.0)
    await wait_until(lambda: pid_gone(child), 5.0, "the grandchild to die with its group")


async def test_stragglers_die_when_the_leader_exits(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    script = 'sleep 300 & echo "CHILD=$!"; exec "$0" -S "$1" --port "$2"'
    spec = sandbox_spec(
        tmp_path, command=("/bin/sh", "-c", script, sys.executable, str(ECHO), "$PORT")
    )
    handle = await start(ProcessRuntime(), spec, handles)
    await asyncio.wait_for(handle.wait_ready(), 10)
    match = re.search(r"CHILD=(\d+)", (tmp_path / "sb-test.log").read_text())
    assert match
    child = int(match.group(1))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"http://127.0.0.1:{handle.port}/crash")
    assert await asyncio.wait_for(handle.wait_exit(), 5) == 3
    await wait_until(lambda: pid_gone(child), 5.0, "the straggler to be killed")


async def test_spawn_failure_is_boot_failed(tmp_path: Path) -> None:
    spec = sandbox_spec(tmp_path, cwd=str(tmp_path / "missing"))
    with pytest.raises(BootFailed, match="cannot start"):
        await ProcessRuntime().start(spec)


async def test_upstream_runtime_uses_the_url_of_its_ordinal(
    tmp_path: Path, handles: list[ProcessHandle]
) -> None:
    server = await start(ProcessRuntime(), sandbox_spec(tmp_path), handles)
    await asyncio.wait_for(server.wait_ready(), 10)
    urls = ("http://127.0.0.1:9", f"http://127.0.0.1:{server.port}")
    runtime = UpstreamRuntime()
    up = await runtime.start(sandbox_spec(tmp_path, urls=urls, ordinal=1))
    assert (up.host, up.port, up.pid) == ("127.0.0.1", server.port, None)
    await asyncio.wait_for(up.wait_ready(), 5)
    exit_task = asyncio.ensure_future(up.wait_exit())
    await up.stop(1.0)
    await asyncio.wait_for(exit_task, 1)
    assert server.returncode is None  # stopping an upstream never touches the server


@pytest.mark.parametrize(
    "url", ["https://example.com", "http://host:1/base", "http://host:99999", "ftp://x"]
)
async def test_upstream_runtime_rejects_unusable_urls(tmp_path: Path, url: str) -> None:
    with pytest.raises(BootFailed):
        await UpstreamRuntime().start(sandbox_spec(tmp_path, urls=(url,)))
