"""The end-to-end harness moved to tests/support/edge.py; this name stays for
benchmarks/serve_bench.py, which imports it and tunes its `POLL_INTERVAL`. The module object is
the same, so such a setting reaches the harness. Tests import tests.support.edge directly."""

import sys

from tests.support import edge

sys.modules[__name__] = edge
