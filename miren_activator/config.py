"""The activator's settings: one typed object, the `[activator]` section of the edge's config."""

from __future__ import annotations

import socket
from pathlib import Path

import attrs

from miren_activator.policy import CrashPolicy


@attrs.frozen(kw_only=True)
class ActivatorConfig:
    node: str = attrs.field(factory=socket.gethostname)  # written as pool owner / sandbox node
    log_dir: Path | None = None  # sandbox logs: <log_dir>/<sandbox id>.log (None: discarded)
    log_max_bytes: int = 10 * 1024 * 1024  # a log past this is rotated to <name>.1 (0: never)
    max_waiters: int = 1000  # queued acquires per (version, service) before Overloaded
    acquire_timeout: float = 120.0  # backstop for any single wait
    stop_grace: float = 10.0  # SIGTERM -> SIGKILL
    sweep_interval: float = 1.0  # idle scale-down and last_activity persistence
    activity_persist_interval: float = 30.0
    crash: CrashPolicy = attrs.field(factory=CrashPolicy)
    history: int = 10  # ended sandboxes kept per pool (admin API, logs); older ones purged
    store_flush_timeout: float = 2.0  # at close, how long pending store writes may take
