"""`miren serve`: wires the store, route table, activator, proxy, GC and admin API together.

Start-up order: store (starting the embedded etcd first when it is the store) -> route table sync
-> activator -> proxy listener -> GC -> admin listener; "ready" is logged when all listen.
Shutdown (SIGTERM / SIGINT) runs in reverse under a deadline: stop accepting on the proxy and let
in-flight requests finish up to the grace, stop the admin listener, the GC and the table sync,
stop every sandbox (SIGTERM, then SIGKILL), close the store, stop the embedded etcd. Every child
process is also tied to this process's life (PR_SET_PDEATHSIG), so none outlives a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc as pygc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from miren_activator.activator import Activator
from miren_activator.config import ActivatorConfig
from miren_activator.runtimes.isolation import IsolationConfig, set_undumpable
from miren_activator.runtimes.process import ProcessRuntime
from miren_activator.runtimes.upstream import UpstreamRuntime
from miren_ingress.admin import token as admin_token
from miren_ingress.admin.api import AdminContext, AdminRunner, make_admin_app
from miren_ingress.proxy.config import ProxyConfig
from miren_ingress.proxy.server import ProxyServer
from miren_ingress.routing.router import EdgeRouter
from miren_ingress.routing.routes import RouteTable
from miren_ingress.routing.table_sync import TableSync
from miren_ingress.shell.config import Config, split_hostport
from miren_store.deploy.gc import ExpiryGC
from miren_store.embedded import EmbeddedEtcd
from miren_store.entities import AppVersion, Runtime
from miren_store.memory import MemoryStore
from miren_store.store import Change, Store, StoreStats

log = logging.getLogger("miren")


@contextlib.asynccontextmanager
async def open_configured_store(
    config: Config, stats: StoreStats
) -> AsyncIterator[tuple[Store, EmbeddedEtcd | None]]:
    """The configured store; for `embedded`, a private etcd under `<data_dir>/etcd`."""
    etcd: EmbeddedEtcd | None = None
    timeout = config.store_options.timeout.total_seconds()
    prefix = config.store_options.etcd_prefix
    if config.store == "memory":
        store: Store = MemoryStore()
        store.stats = stats
    else:
        from miren_store.backends import open_store

        url = config.store
        if config.store == "embedded":
            etcd = EmbeddedEtcd(Path(config.data_dir) / "etcd")
            await etcd.start()
            url = etcd.url
        store = open_store(url, timeout=timeout, prefix=prefix, stats=stats)
    try:
        yield store, etcd
    finally:
        await store.close()
        if etcd is not None:
            await etcd.stop()


class Edge:
    """The running pieces of one `miren serve` process (handy for in-process tests)."""

    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # hidden from sandboxes (it may hold the token)
        self.isolation = "not started"  # how process sandboxes are confined (/healthz)
        self.registry = CollectorRegistry(auto_describe=True)
        ops = Counter(
            "miren_store_operations_total",
            "Store calls by operation and result",
            ["op", "result"],
            registry=self.registry,
        )
        self.stats = StoreStats(observer=lambda op, result: ops.labels(op, result).inc())
        self.table = RouteTable()
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.started_at = time.monotonic()
        self.ready_after: float | None = None
        self._stop = asyncio.Event()
        self._sync: TableSync | None = None
        self.store: Store | None = None
        self._removals: set[asyncio.Task[None]] = set()

    def health(self) -> dict[str, Any]:
        store_ok = self.store is not None and self.store.healthy
        sync = self._sync
        watch_ok = (
            sync is not None
            and sync.watch_ok
            and self.store is not None
            and self.store.watch_healthy
        )
        ok = store_ok and watch_ok and self.table.loaded
        report: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "store": {"ok": store_ok, "backend": self.config.store.split("://")[0]},
            "watch": {
                "ok": watch_ok,
                "revision": self.table.revision,
                "error": (sync.last_error if sync is not None else "")
                or ("" if watch_ok else "the store's watch is disconnected; retrying"),
            },
            "routes": {
                "loaded": self.table.loaded,
                "routes": len(self.table.routes),
                "apps": len(self.table.apps),
                "versions": len(self.table.versions),
            },
            "sandbox_isolation": self.isolation,
        }
        return report

    def proxy_health(self) -> tuple[int, dict[str, Any]]:
        report = self.health()
        # The data path keeps serving from its table during a store outage: only an unloaded
        # table makes the proxy itself unhealthy.
        return (200 if self.table.loaded else 503), report

    def _forget_removed(self, activator: Activator, change: Change | None) -> None:
        """Stop the sandboxes of versions that left the store (deleted, expired and collected)."""
        if change is None:  # the table was re-listed: drop every pool whose version is gone
            gone = {v for v, _ in activator.pools() if v not in self.table.versions}
        elif change.kind is AppVersion and change.deleted:
            gone = {change.id}
        else:
            return
        for version_id in gone:
            task = asyncio.create_task(activator.remove_version(version_id))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def admin_token(self) -> str:
        """The token the admin API requires (configured, or generated into the data dir)."""
        return self.config.admin_token

    def _sandbox_runtime(self) -> ProcessRuntime:
        cfg = self.config
        hidden = [str(Path(cfg.data_dir).absolute()), str(cfg.log_dir.absolute())]
        if self.config_path:
            hidden.append(str(Path(self.config_path).absolute()))
        return ProcessRuntime(
            isolation=IsolationConfig(
                mode=cfg.sandbox.isolation,
                uid=cfg.sandbox.uid,
                gid=cfg.sandbox.gid,
                hidden_paths=tuple(hidden),
            )
        )

    async def run(self, on_ready: Callable[[Edge], None] | None = None) -> None:
        cfg = self.config
        await asyncio.to_thread(admin_token.ensure_private_dir, cfg.data_dir)
        if not cfg.admin_token:
            token = await asyncio.to_thread(admin_token.load_or_create, cfg.data_dir)
            cfg = self.config = attrs.evolve(cfg, admin_token=token)
            log.info("admin API token: %s", admin_token.token_path(cfg.data_dir))
        async with open_configured_store(cfg, self.stats) as (store, _etcd):
            self.store = store
            processes = self._sandbox_runtime()
            activator = Activator(
                store,
                config=ActivatorConfig(
                    node=cfg.node_name,
                    log_dir=cfg.log_dir,
                    log_max_bytes=cfg.activator.log_max_bytes,
                    max_waiters=cfg.ingress.max_waiters,
                    stop_grace=cfg.activator.stop_grace.total_seconds(),
                ),
                runtimes={Runtime.PROCESS: processes, Runtime.UPSTREAM: UpstreamRuntime()},
                registry=self.registry,
            )
            await activator.start()
            iso = processes.isolation
            self.isolation = iso.description if iso is not None else "unknown"
            if iso is not None and iso.refusal is not None:
                log.error("process sandboxes will not start: %s", iso.refusal)
            elif iso is not None and not iso.confined:
                log.warning(
                    'SANDBOX ISOLATION IS OFF (sandbox.isolation = "none"): previews run '
                    "as this process's user and can read its data dir and secrets"
                )
            else:
                log.info("sandbox isolation: %s", self.isolation)
            sync = self._sync = TableSync(
                store, self.table, on_change=lambda change: self._forget_removed(activator, change)
            )
            sync.start()
            router = EdgeRouter(
                self.table, activator, request_timeout=cfg.ingress.request_timeout.total_seconds()
            )
            proxy = ProxyServer(
                router,
                config=ProxyConfig(
                    header_timeout=cfg.ingress.header_timeout.total_seconds(),
                    connect_timeout=cfg.ingress.connect_timeout.total_seconds(),
                    keepalive_timeout=cfg.ingress.keepalive_timeout.total_seconds(),
                    body_timeout=cfg.ingress.body_timeout.total_seconds(),
                    request_buffer=cfg.ingress.request_buffer,
                    max_headers=cfg.ingress.max_headers,
                    robots_tag=cfg.ingress.robots_tag,
                ),
                registry=self.registry,
                health=self.proxy_health,
            )
            gc = ExpiryGC(
                store,
                sweep_interval=cfg.gc.sweep_interval.total_seconds(),
                grace=cfg.gc.expiry_grace.total_seconds(),
                registry=self.registry,
            )
            runner: web.AppRunner | None = None
            try:
                host, port = split_hostport(cfg.listen, "listen")
                self.proxy_address = await proxy.start(host, port)
                gc.start()
                ctx = AdminContext(
                    store=store,
                    config=cfg,
                    registry=self.registry,
                    health=self.health,
                    now=lambda: datetime.now(UTC),
                    extra={"gc": gc, "activator": activator},
                )
                runner = AdminRunner(make_admin_app(ctx), access_log=None)
                await runner.setup()
                host, port = split_hostport(cfg.admin_listen, "admin_listen")
                site = web.TCPSite(runner, host, port, reuse_address=True)
                await site.start()
                self.admin_address = _bound_address(runner, (host, port))
                if not await sync.wait_loaded(cfg.store_options.timeout.total_seconds() * 5):
                    log.warning(
                        "the store is not reachable yet (%s): the proxy answers 503 until the "
                        "route table loads",
                        sync.last_error or "no answer",
                    )
                self.ready_after = time.monotonic() - self.started_at
                pygc.collect()
                pygc.freeze()  # start-up objects never need scanning again
                log.info(
                    "miren serve ready in %.2fs: proxy on %s:%d, admin API on %s:%d, store %s",
                    self.ready_after,
                    *self.proxy_address,
                    *self.admin_address,
                    cfg.store,
                )
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
                log.info("shutting down")
            finally:
                grace = cfg.ingress.shutdown_grace.total_seconds()
                await proxy.close(grace)
                if runner is not None:
                    await runner.cleanup()
                await gc.stop()
                await sync.stop()
                if self._removals:
                    await asyncio.wait(list(self._removals))
                await activator.close()
                log.info("stopped")


def _bound_address(runner: web.AppRunner, fallback: tuple[str, int]) -> tuple[str, int]:
    """The admin listener's real address (port 0 picks a free one)."""
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return str(addr[0]), int(addr[1])
    return fallback


def run(config: Config, *, config_path: str | None = None) -> int:
    """Run until SIGTERM / SIGINT; returns the process exit status."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        # Same-uid processes (a sandbox run with isolation "none", anything else of this
        # user) must not read our environment (MIREN_ADMIN_TOKEN) or memory.
        try:
            set_undumpable()
        except OSError as exc:
            log.warning("cannot make the edge non-dumpable: %s", exc)
    edge = Edge(config, config_path=config_path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, edge.request_stop)
        await edge.run()

    try:
        uvloop.run(main())
    except OSError as exc:
        log.error("miren serve: %s", exc)
        return 1
    except Exception as exc:
        log.error("miren serve failed: %s", exc, exc_info=config.log_level == "debug")
        return 1
    return 0
