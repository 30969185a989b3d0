"""Which hot path this process runs: the mypyc-compiled modules, or their Python sources.

`pip install .` compiles the modules in `HOT` (setup.py); they are the same typed sources, as C
extensions, about a third less CPU in the proxy's own code per request. This module is imported
first by the package (see __init__.py) and decides, before any hot module is imported:

- **compiled** when every hot module and the group's shared library are built, and the
  package's sources are the ones they were compiled from (an editable install compiles in
  place: an edited source would otherwise be shadowed by its stale extension);
- **source** otherwise: nothing compiled, `MIREN_PURE_PYTHON` set, an incomplete build, or a
  changed source. Then a finder loads every hot module from its `.py` file. All or none:
  compiled code calls the other compiled modules' classes natively and refuses their
  interpreted twins.

`decide` is the pure rule; `HOT_PATH` is this process's outcome (logged by `miren serve`).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

# The compiled modules (setup.py compiles these) and the group's shared library. They are the
# modules every proxied request runs through (a profile's top entries), compiled as one group
# so that calls between them are C calls.
HOT = ("inbound", "exchange", "upstream", "engine", "pool", "metrics")
SHARED = "_hot__mypyc"
PACKAGE = "miren_ingress.proxy"
PURE_ENV = "MIREN_PURE_PYTHON"
DIGEST = "_hot.sha256"  # the digest of the sources the build was compiled from (setup.py)


class HotPath(NamedTuple):
    compiled: bool
    reason: str  # why the sources run ("" when compiled)
    warn: bool  # a reason an operator should hear about (not a deliberate choice)

    def describe(self) -> str:
        return "compiled (mypyc)" if self.compiled else f"Python sources: {self.reason}"


def decide(built: Mapping[str, bool], recorded: str | None, current: str, pure: bool) -> HotPath:
    """The hot path from the build's state. `built`: whether each compiled part (HOT and
    SHARED) exists; `recorded`: the digest of the sources the build was compiled from (None:
    none recorded); `current`: the digest of the sources now; `pure`: MIREN_PURE_PYTHON is set."""
    if not any(built.values()):
        return HotPath(False, "not compiled (installed without mypyc or a C compiler)", False)
    if pure:
        return HotPath(False, f"{PURE_ENV} is set", False)
    missing = sorted(name for name, present in built.items() if not present)
    if missing:
        return HotPath(False, f"the compiled build is incomplete (no {', '.join(missing)})", True)
    if recorded is None:
        return HotPath(
            False,
            "the compiled build has no record of its sources (a failed or interrupted build: "
            "`pip install -e .` compiles it again)",
            True,
        )
    if recorded != current:
        return HotPath(
            False,
            "its sources changed since they were compiled (`pip install -e .` compiles them again)",
            True,
        )
    return HotPath(True, "", False)


def sources_digest(directory: Path) -> str:
    """The digest of the package's `.py` files: what a compiled build was made from (setup.py
    records it at build time by the same rule)."""
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def pure_requested(value: str | None) -> bool:
    """Whether a MIREN_PURE_PYTHON value asks for the sources (the words config booleans take
    for true; `0`, `false`, `no`, `off` and unset do not)."""
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _built(directory: Path, name: str) -> bool:
    return any(
        (directory / f"{name}{suffix}").exists()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


class _SourceFinder:
    """Loads the hot modules from their `.py` files, ahead of their compiled extensions."""

    def __init__(self, directory: Path) -> None:
        self.files = {f"{PACKAGE}.{name}": directory / f"{name}.py" for name in HOT}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def select() -> HotPath:
    directory = Path(__file__).resolve().parent
    built = {name: _built(directory, name) for name in (*HOT, SHARED)}
    try:
        recorded: str | None = (directory / DIGEST).read_text().strip()
    except OSError:
        recorded = None
    current = sources_digest(directory) if any(built.values()) else ""
    choice = decide(built, recorded, current, pure_requested(os.environ.get(PURE_ENV)))
    if not choice.compiled and any(built[name] for name in HOT):
        sys.meta_path.insert(0, _SourceFinder(directory))
    return choice


# (setup.py loads this file on its own, for HOT and sources_digest: then nothing is selected.)
HOT_PATH = select() if __name__ == f"{PACKAGE}.hotpath" else HotPath(False, "not selected", False)
