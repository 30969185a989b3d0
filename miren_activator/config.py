"""The activator's settings: one typed object, the `[activator]` section of the edge's config.

Each field is declared once, with its default and its help (`miren_store.settings`); `internal`
fields are not config keys. Under `miren serve`, `node` is the key `node.name` and `max_waiters`
the key `ingress.max_waiters` (the names users write; see `miren_ingress.shell.config`).
"""

from __future__ import annotations

import socket
from pathlib import Path

import attrs

from miren_activator.policy import CrashPolicy
from miren_store.settings import internal, setting


@attrs.frozen(kw_only=True)
class ActivatorConfig:
    node: str = attrs.field(
        factory=socket.gethostname,
        metadata=setting(
            "this node's name in the cluster (pool owner, sandbox node)", shown="host name"
        ),
    )
    # None: the logs are discarded (`miren serve` always passes one, <data_dir>/logs by default).
    log_dir: Path | None = attrs.field(
        default=None,
        metadata=setting("directory of the sandbox logs (<sandbox id>.log)", shown="data_dir/logs"),
    )
    log_max_bytes: int = attrs.field(
        default=10 * 1024 * 1024,
        metadata=setting(
            "a sandbox log past this is copied to <name>.1 and truncated (checked every "
            "second; 0: no cap)",
            minimum=0,
        ),
    )
    max_waiters: int = attrs.field(
        default=1000,
        metadata=setting(
            "cold-start queue per version and service; beyond it 503 + Retry-After", minimum=1
        ),
    )
    acquire_timeout: float = attrs.field(
        default=120.0, metadata=internal("backstop for any single wait (seconds)")
    )
    stop_grace: float = attrs.field(
        default=10.0,
        metadata=setting(
            "a stopping sandbox gets SIGTERM, then SIGKILL after this", duration=True, minimum=0
        ),
    )
    sweep_interval: float = attrs.field(
        default=1.0,
        metadata=internal("idle scale-down and last_activity persistence, every this (seconds)"),
    )
    activity_persist_interval: float = attrs.field(
        default=30.0, metadata=internal("a pool's last_activity is written at most this often (s)")
    )
    crash: CrashPolicy = attrs.field(
        factory=CrashPolicy, metadata=internal("the quick-crash back-off")
    )
    history: int = attrs.field(
        default=10,
        metadata=internal("ended sandboxes kept per pool (admin API, logs); older ones purged"),
    )
    store_flush_timeout: float = attrs.field(
        default=2.0, metadata=internal("at close, how long pending store writes may take (s)")
    )
