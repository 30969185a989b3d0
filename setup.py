"""Build step: the proxy's hot path is compiled with mypyc (C extensions from the same typed
sources), everything else stays Python. See the README, "Compiled hot path".

- `MIREN_PURE_PYTHON=1` at install time builds nothing: the package runs from its sources.
- Without mypyc or a C compiler the install still succeeds, pure Python, with a warning; `miren
  serve` says at start which hot path it runs (`miren_ingress/proxy/hotpath.py`).
- An editable install compiles in place. After an edit of any module of `miren_ingress/proxy`
  the sources differ from what was compiled, and the package runs the sources (all of them:
  compiled and interpreted hot modules do not mix) until the next `pip install -e .`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PROXY = ROOT / "miren_ingress" / "proxy"


def _hotpath() -> Any:
    """miren_ingress/proxy/hotpath.py on its own (the package imports what a build lacks): the
    list of hot modules and the digest rule have their one owner there."""
    spec = importlib.util.spec_from_file_location("miren_build_hotpath", PROXY / "hotpath.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# mypy options for the compile: the types of third-party packages absent from the build
# environment become Any (the compiled code then calls them as Python does); errors in the
# modules the hot ones import are not this step's business (`mypy` in the tests checks them).
MYPY_OPTIONS = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-unused-ignores"]


def _warn(message: str) -> None:
    print(f"miren-edge: {message}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """A failed compile (no C compiler, no Python headers) leaves the pure-Python package."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # (a part may be built: the package then runs its sources)
            _warn(f"compiling the hot path failed ({exc}); it runs as pure Python")


def ext_modules() -> list[Any]:
    hotpath = _hotpath()
    digest = PROXY / hotpath.DIGEST
    digest.unlink(missing_ok=True)
    if os.environ.get("MIREN_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not available; installing the hot path as pure Python")
        return []
    digest.write_text(hotpath.sources_digest(PROXY) + "\n")
    hot = [f"miren_ingress/proxy/{name}.py" for name in hotpath.HOT]
    group = f"{hotpath.PACKAGE}.{hotpath.SHARED.removesuffix('__mypyc')}"
    return list(mypycify([*MYPY_OPTIONS, *hot], group_name=group))


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
