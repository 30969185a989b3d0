"""A test that hangs on uvloop fails at its timeout, cleans up, and the run goes on.

Each case runs a small pytest session in a subprocess (pytester) with the suite's uvloop
factory and tests/loop_timeout.py, and checks its outcome. Without the plugin, the first case
hangs until the subprocess is killed (pytest-timeout's exception is swallowed by uvloop).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
CONFTEST = """
import uvloop

pytest_plugins = ["tests.loop_timeout"]


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}
"""
CONFTEST_SHORT_GRACE = CONFTEST + "\nimport tests.loop_timeout\n\ntests.loop_timeout.GRACE = 1.0\n"
LIMIT = 30  # seconds: the subprocess must end well within this, or the plugin failed


@pytest.fixture
def session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    return pytester


def run(session: pytest.Pytester, *args: str) -> pytest.RunResult:
    return session.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=LIMIT)


def test_idle_loop_hang_fails_and_cleans_up(session: pytest.Pytester, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    session.makepyfile(
        f"""
        import asyncio
        import pytest

        MARKS = {str(marks)!r}

        def mark(what):
            with open(MARKS, "a") as f:
                f.write(what + "\\n")

        @pytest.fixture
        async def resource():
            yield
            mark("fixture torn down")

        @pytest.mark.timeout(1)
        async def test_hangs(resource):
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                mark("test finally")

        async def test_next():
            mark("next test ran")
        """
    )
    result = run(session)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*CancelledError: Timeout (>1.0s) from pytest-timeout.",
            "*+ Timeout: the event loop's tasks +*",  # then each task's stack
            "*in test_hangs",
            "*create_future()",
        ]
    )
    assert marks.read_text().splitlines() == ["test finally", "fixture torn down", "next test ran"]


def test_hang_in_async_fixture_setup_fails(session: pytest.Pytester) -> None:
    session.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.fixture
        async def stuck():
            await asyncio.Event().wait()
            yield

        @pytest.mark.timeout(1)
        async def test_uses_stuck(stuck):
            pass

        def test_next():
            pass
        """
    )
    result = run(session)
    result.assert_outcomes(errors=1, passed=1)
    result.stdout.fnmatch_lines(["*CancelledError: Timeout (>1.0s)*"])


def test_blocking_call_in_coroutine_fails(session: pytest.Pytester) -> None:
    session.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.timeout(1)
        async def test_blocks():
            time.sleep(30)
        """
    )
    result = run(session)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout (>1.0s) from pytest-timeout*"])


def test_synchronous_test_still_fails(session: pytest.Pytester) -> None:
    session.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.timeout(1)
        def test_blocks():
            time.sleep(30)
        """
    )
    result = run(session)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout (>1.0s) from pytest-timeout*"])


def test_cancelled_test_that_keeps_running_ends_the_process(session: pytest.Pytester) -> None:
    session.makeconftest(CONFTEST_SHORT_GRACE)
    session.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.mark.timeout(1)
        async def test_refuses_to_stop():
            while True:
                try:
                    await asyncio.get_running_loop().create_future()
                except asyncio.CancelledError:
                    pass
        """
    )
    result = run(session)
    assert result.ret == 1  # the process ended: no report, but where the test was is printed
    result.stdout.fnmatch_lines(
        ["*Timeout: still running 1.0s later; the main thread*", "*in test_refuses_to_stop"]
    )


def test_a_blocked_test_that_swallows_the_timeout_ends_the_process(
    session: pytest.Pytester,
) -> None:
    session.makeconftest(CONFTEST_SHORT_GRACE)
    session.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.timeout(1)
        async def test_swallows():
            while True:
                try:
                    time.sleep(30)
                except BaseException:
                    pass
        """
    )
    result = run(session)
    assert result.ret == 1
    result.stdout.fnmatch_lines(  # the main thread's own stack shows where it is blocked
        [
            "*Timeout: still running 1.0s later; the main thread*",
            "*in test_swallows",
            "*time.sleep(30)",
            "*Timeout: the event loop's tasks*",
        ]
    )


def test_a_hang_on_a_busy_loop_is_cancelled_too(session: pytest.Pytester) -> None:
    # The signal lands while another task or a callback runs, not in the loop's poll: the
    # test's task is cancelled all the same, and the run goes on.
    session.makepyfile(
        """
        import asyncio
        import pytest

        @pytest.fixture
        async def busy():
            def tick():
                sum(range(20000))
                handle[0] = loop.call_later(0.001, tick)

            async def spin():
                while True:
                    sum(range(20000))
                    await asyncio.sleep(0)

            loop = asyncio.get_running_loop()
            handle = [loop.call_later(0.001, tick)]
            task = asyncio.create_task(spin())
            yield
            task.cancel()
            handle[0].cancel()

        @pytest.mark.timeout(1)
        async def test_hangs_while_busy(busy):
            await asyncio.Event().wait()

        def test_next():
            pass
        """
    )
    for _ in range(3):  # (where the signal lands varies: three tries)
        result = run(session)
        result.assert_outcomes(failed=1, passed=1)
        result.stdout.fnmatch_lines(["*CancelledError: Timeout (>1.0s) from pytest-timeout."])


def test_a_loop_run_by_the_test_itself_is_stopped(session: pytest.Pytester) -> None:
    session.makepyfile(
        """
        import asyncio
        import pytest
        import uvloop

        @pytest.mark.timeout(1)
        def test_runs_a_task():
            loop = uvloop.new_event_loop()
            try:
                loop.run_until_complete(asyncio.sleep(3600))
            finally:
                loop.close()

        @pytest.mark.timeout(1)
        def test_runs_a_bare_future():
            loop = uvloop.new_event_loop()
            try:
                loop.run_until_complete(loop.create_future())
            finally:
                loop.close()

        def test_next():
            pass
        """
    )
    result = run(session)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_runs_a_task _*",
            "E*CancelledError: Timeout (>1.0s) from pytest-timeout.",
            "*_ test_runs_a_bare_future _*",
            "E*RuntimeError: Event loop stopped before Future completed.",
        ]
    )
