"""Tests whose test double reaches inside the hot path (a subclass of a hot class, a stand-in
for one of its values) need its Python sources: with the hot path compiled they are skipped
here and run in the sources tier (tests/test_hot_path.py), which runs tests/proxy on the
sources."""

from __future__ import annotations

import pytest

from miren_ingress.proxy.hotpath import HOT_PATH

needs_sources = pytest.mark.skipif(
    HOT_PATH.compiled,
    reason="a test double inside the hot path: runs on the sources (tests/test_hot_path.py)",
)
