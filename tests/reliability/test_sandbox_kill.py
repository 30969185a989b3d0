"""A sandbox SIGKILLed under load within its first minute (memory store): its death is a quick
crash, and the first quick crash is replaced at once (miren_activator.policy.CrashPolicy).

The same scenario with a sandbox older than the activator's 60 s crash window, `kills` times in
a row, runs in test_soak.py (`test_sandbox_killed_under_load`), on the soak's server, whose
active sandbox is past that age once the soak is done. (Two deaths within the window are a crash
loop and back off by design; that is not what this checks.)
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures
from tests.reliability.killing import dead_reported, kill_under_load
from tests.support.edge import MirenServer, echo_spec_data, log_errors
from tests.support.poll import eventually

pytestmark = pytest.mark.reliability

APP, HOST = "young", "young.test"


@pytest.mark.timeout(60)
async def test_young_sandbox_killed_under_load(tmp_path: Path, figures: Figures) -> None:
    async with MirenServer(tmp_path, store="memory") as edge:
        await edge.client.create_app(APP, HOST)
        await edge.client.post_deploy(APP, echo_spec_data())
        await edge.client.wait_status(HOST, 200)
        run = await kill_under_load(
            edge, APP, HOST, kills=1, load_seconds=BUDGET.kill_load_seconds, recovery_timeout=5.0
        )
        run.record(figures)
        problems = run.problems()
        assert not problems, f"{len(problems)} problems, first: {problems[:5]}"
        await eventually(
            lambda: dead_reported(edge, APP, run), 10.0, "the admin API to report the kill"
        )
        text = edge.log_text()
    assert not log_errors(text), log_errors(text)[:20]


@pytest.mark.timeout(60)
async def test_crash_back_off_answers_with_retry_after(tmp_path: Path) -> None:
    async with MirenServer(tmp_path, store="memory") as edge:
        await edge.client.create_app(APP, HOST)
        await edge.client.post_deploy(APP, echo_spec_data())
        for _ in range(2):  # two quick crashes in a row: the second starts a 10 s back-off
            sid: str = (await edge.client.wait_status(HOST, 200)).json()["sandbox"]
            await edge.client.kill_sandbox(APP, sid)
            await eventually(functools.partial(_gone, edge, sid), 10.0, "the sandbox to be reaped")
        reply = await edge.client.get(HOST)
    assert reply.status in (502, 503), reply
    assert reply.headers.get("retry-after", "").isdigit(), reply.headers


async def _gone(edge: MirenServer, sandbox_id: str) -> bool:
    boxes = (await edge.client.admin("GET", f"/v1/apps/{APP}/sandboxes")).json()
    return all(b["status"] != "running" or b["id"] != sandbox_id for b in boxes)
