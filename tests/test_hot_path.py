"""The compiled hot path (setup.py, miren_ingress/proxy/hotpath.py): which one a process runs,
that an edited source is never shadowed by a stale compiled module, and the sources tier: the
proxy tests once more on the Python sources, where their state-move checks and test doubles
reach inside the hot path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import miren_ingress
from miren_ingress.proxy import inbound
from miren_ingress.proxy.hotpath import (
    HOT,
    HOT_PATH,
    SHARED,
    decide,
    pure_requested,
    sources_digest,
)

REPO = Path(__file__).resolve().parents[1]
ALL = {name: True for name in (*HOT, SHARED)}


# --- the rule --------------------------------------------------------------------------------
def test_a_complete_build_of_these_sources_runs_compiled() -> None:
    assert decide(ALL, "d1", "d1", pure=False) == (True, "", False)


def test_nothing_built_runs_the_sources_quietly() -> None:
    choice = decide(dict.fromkeys(ALL, False), None, "", pure=False)
    assert not choice.compiled and not choice.warn
    assert "not compiled" in choice.reason


def test_the_pure_setting_runs_the_sources_quietly() -> None:
    choice = decide(ALL, "d1", "d1", pure=True)
    assert (choice.compiled, choice.warn) == (False, False)
    assert "MIREN_PURE_PYTHON" in choice.reason


def test_an_incomplete_build_runs_the_sources_and_says_what_is_missing() -> None:
    choice = decide({**ALL, "upstream": False, SHARED: False}, "d1", "d1", pure=False)
    assert (choice.compiled, choice.warn) == (False, True)
    assert f"no {SHARED}, upstream" in choice.reason


def test_changed_sources_run_as_sources_and_say_how_to_compile_again() -> None:
    choice = decide(ALL, "d0", "d1", pure=False)
    assert (choice.compiled, choice.warn) == (False, True)
    assert "sources changed" in choice.reason and "pip install -e ." in choice.reason


def test_a_build_without_its_record_runs_the_sources() -> None:
    # setup.py records the digest only after the compile succeeded.
    choice = decide(ALL, None, "d1", pure=False)
    assert (choice.compiled, choice.warn) == (False, True)
    assert "no record of its sources" in choice.reason


@pytest.mark.parametrize(
    ("value", "pure"),
    [("1", True), ("true", True), (" YES ", True), ("on", True), ("0", False), ("false", False),
     ("no", False), ("off", False), ("", False), (None, False)],
)  # fmt: skip
def test_the_pure_setting_reads_like_a_config_boolean(value: str | None, pure: bool) -> None:
    assert pure_requested(value) is pure


def test_the_digest_covers_every_source_of_the_package(tmp_path: Path) -> None:
    for path in (REPO / "miren_ingress" / "proxy").glob("*.py"):
        shutil.copy(path, tmp_path)
    before = sources_digest(tmp_path)
    assert sources_digest(tmp_path) == before
    (tmp_path / "dates.py").write_text((tmp_path / "dates.py").read_text() + "# edited\n")
    assert sources_digest(tmp_path) != before
    (tmp_path / "dates.py").unlink()
    assert sources_digest(tmp_path) != before


# --- this process and fresh ones --------------------------------------------------------------
def test_this_process_runs_what_it_says() -> None:
    compiled_file = not inbound.__file__.endswith(".py")
    assert compiled_file == HOT_PATH.compiled


def _hot_path_of(package_root: Path, **env: str) -> tuple[str, str]:
    """(HOT_PATH, where inbound loaded from) in a fresh process that imports `miren_ingress`
    from `package_root`."""
    code = (
        "import miren_ingress.proxy as p, miren_ingress.proxy.inbound as i\n"
        "print(p.HOT_PATH.describe()); print(i.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(package_root), **env},
        cwd=package_root,  # (`-c` puts the working directory first on the path)
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    return out[0], out[1]


@pytest.mark.skipif(not HOT_PATH.compiled, reason="the hot path is not compiled in this install")
def test_an_edited_source_is_never_shadowed_by_its_compiled_module(tmp_path: Path) -> None:
    shutil.copytree(Path(miren_ingress.__file__).parent, tmp_path / "miren_ingress")
    proxy = tmp_path / "miren_ingress" / "proxy"
    described, where = _hot_path_of(tmp_path)
    assert described == "compiled (mypyc)"
    assert where.startswith(str(proxy)) and not where.endswith(".py")

    described, where = _hot_path_of(tmp_path, MIREN_PURE_PYTHON="1")
    assert described == "Python sources: MIREN_PURE_PYTHON is set"
    assert where == str(proxy / "inbound.py")

    # An edit of any module of the package (here one no compiled module is built from): every
    # hot module runs from its source.
    errors = proxy / "errors.py"
    errors.write_text(errors.read_text() + "# edited\n")
    described, where = _hot_path_of(tmp_path)
    assert "sources changed since they were compiled" in described
    assert where == str(proxy / "inbound.py")


# --- the sources tier -------------------------------------------------------------------------
@pytest.mark.timeout(600)
@pytest.mark.skipif(not HOT_PATH.compiled, reason="this run already ran them on the sources")
def test_the_proxy_tests_pass_on_the_python_sources_too() -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/proxy", "tests/cluster/test_internal_hop.py",
        ],
        cwd=REPO,
        env={**os.environ, "MIREN_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " skipped" not in proc.stdout.splitlines()[-1]  # (every test ran, checked)


# --- the build ---------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_failed_compile_leaves_no_record_and_the_sources_run(tmp_path: Path) -> None:
    shutil.copy(REPO / "setup.py", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(
        REPO / "miren_ingress",
        tmp_path / "miren_ingress",
        ignore=shutil.ignore_patterns("*.so", "_hot.sha256", "__pycache__"),
    )
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env={**os.environ, "CC": "false"},  # (a C compiler that always fails)
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiling the hot path failed" in proc.stderr
    assert not (tmp_path / "miren_ingress" / "proxy" / "_hot.sha256").exists()
    described, where = _hot_path_of(tmp_path)
    assert described.startswith("Python sources: ")
    assert where == str(tmp_path / "miren_ingress" / "proxy" / "inbound.py")
