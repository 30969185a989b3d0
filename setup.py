"""Build step: the proxy's hot path is compiled with mypyc (C extensions from the same typed
sources), everything else stays Python. See the README, "Compiled hot path".

- `MIREN_PURE_PYTHON=1` at install time builds nothing (and removes an earlier in-place
  build): the package runs from its sources.
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
    """Builds the hot path, then records the digest of the sources it was compiled from next
    to it (in the build and, for an editable install, in the tree). A failed compile (no C
    compiler, no Python headers) leaves no digest, so the package runs its sources."""

    def run(self) -> None:
        targets = [Path(self.build_lib) / "miren_ingress" / "proxy"]
        if self.inplace:
            targets.append(PROXY)
        for directory in targets:
            (directory / HOTPATH.DIGEST).unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:
            _warn(f"compiling the hot path failed ({exc}); it runs as pure Python")
            return
        if self.extensions and COMPILED_FROM:
            for directory in targets:
                directory.mkdir(parents=True, exist_ok=True)
                (directory / HOTPATH.DIGEST).write_text(COMPILED_FROM + "\n")


def _remove_in_place_build() -> None:
    """An earlier editable build's extensions and digest (a pure install builds nothing)."""
    for name in (*HOTPATH.HOT, HOTPATH.SHARED):
        for path in PROXY.glob(f"{name}.*"):
            if path.suffix in (".so", ".pyd"):
                path.unlink()
    (PROXY / HOTPATH.DIGEST).unlink(missing_ok=True)


def ext_modules() -> tuple[list[Any], str]:
    """The extensions to build, and the digest of the sources they are compiled from."""
    if HOTPATH.pure_requested(os.environ.get(HOTPATH.PURE_ENV)):
        _remove_in_place_build()
        return [], ""
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not available; installing the hot path as pure Python")
        return [], ""
    digest = HOTPATH.sources_digest(PROXY)  # (mypycify reads the sources now)
    hot = [f"miren_ingress/proxy/{name}.py" for name in HOTPATH.HOT]
    group = f"{HOTPATH.PACKAGE}.{HOTPATH.SHARED.removesuffix('__mypyc')}"
    return list(mypycify([*MYPY_OPTIONS, *hot], group_name=group)), digest


HOTPATH = _hotpath()
EXTENSIONS, COMPILED_FROM = ext_modules()
setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": OptionalBuildExt})
