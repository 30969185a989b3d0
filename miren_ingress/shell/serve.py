"""`miren serve`: wires the store, route table, activator, proxy, GC and admin API together.

Start-up and shutdown are one `contextlib.AsyncExitStack`: each component is entered on it as it
starts, so shutdown is start-up in reverse, and a failure at any step of start-up tears down what
already started before the error propagates (no process, task or listener is left behind). The
steps, in start-up order:

    store             `miren_store.backends.open_backend` (`embedded` starts its etcd first)
    activator         sandboxes, confined as `[sandbox]` says
    route table sync  the table follows the store through a watch
    gc                the expiry GC (on the elected node only, with several nodes)
    cluster           this node's membership (miren_activator.cluster); it joins once the
                      proxy listens (its advertised address)
    proxy listener
    admin listener    then "ready" is logged

Shutdown (SIGTERM / SIGINT) unwinds them: the admin listener closes; the proxy stops accepting
and lets in-flight requests finish up to `ingress.shutdown_grace`; the GC and the table sync
stop; every sandbox stops (SIGTERM, then SIGKILL after `activator.stop_grace`); the store closes
and the embedded etcd stops. Leaving the cluster (revoking the node's lease) comes right after
the proxy drained, before the sandboxes stop: the other nodes take this node's pools over at
once, and nothing reaches its sandboxes any more. Every child process is also tied to this process's life
(PR_SET_PDEATHSIG), so none outlives a SIGKILL. Each step logs "started <step>" and "stopped
<step>" at debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc as pygc
import hashlib
import hmac
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from miren_activator.activator import Activator
from miren_activator.cluster import MARGIN, Leadership, Membership
from miren_activator.config import ActivatorConfig
from miren_activator.runtimes.isolation import set_undumpable
from miren_activator.runtimes.process import ProcessRuntime
from miren_activator.runtimes.upstream import UpstreamRuntime
from miren_ingress.admin import token as admin_token
from miren_ingress.admin.api import AdminContext, AdminRunner, make_admin_app
from miren_ingress.proxy.hotpath import HOT_PATH
from miren_ingress.proxy.server import ProxyServer
from miren_ingress.routing.router import EdgeRouter
from miren_ingress.routing.routes import CLUSTER_KEY, RouteTable
from miren_ingress.routing.table_sync import TableSync
from miren_ingress.shell import datadir
from miren_ingress.shell.config import Config, ConfigError, check_tls, split_hostport
from miren_ingress.shell.datadir import DataDirInUse
from miren_ingress.tls.certs import Certificate, CertificateError, CertStore
from miren_ingress.tls.clienthello import Hello, is_ip_literal
from miren_ingress.tls.listener import ACME_ALPN, TlsListener
from miren_ingress.tls.metrics import TlsMetrics
from miren_ingress.tls.ondemand import OnDemand
from miren_store.backends import open_backend
from miren_store.deploy.gc import ExpiryGC
from miren_store.entities import AppVersion, EdgeSecret, Node, Runtime
from miren_store.errors import Conflict, StoreError
from miren_store.settings import configured
from miren_store.store import Change, Store, StoreStats

T = TypeVar("T")

log = logging.getLogger("miren")


class ListenError(Exception):
    """A listener could not be opened; the message names the key, the address and why."""


def activator_config(config: Config) -> ActivatorConfig:
    """The `[activator]` section as the activator runs it: the log dir resolved (`<data_dir>/logs`
    unless `activator.log_dir` is set). Built by name from the section's keys, so every other
    field (the crash policy) is the activator's own default, and a test may substitute the name."""
    return ActivatorConfig(**{**configured(config.activator), "log_dir": config.log_dir})


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
        self.tls_address: tuple[str, int] | None = None
        self.proxy: ProxyServer | None = None
        self.ondemand: OnDemand | None = None
        self.admin_address: tuple[str, int] | None = None
        self.started_at = time.monotonic()
        self.ready_after: float | None = None
        self._stop = asyncio.Event()
        self._sync: TableSync | None = None
        self.store: Store | None = None
        self.membership: Membership | None = None
        self.gc_leader: Leadership | None = None
        self._removals: set[asyncio.Task[None]] = set()
        self.started: list[str] = []  # the start-up steps, in the order they started
        self.stopped: list[str] = []  # ... and in the order they stopped

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
            "node": self._node_health(),
        }
        return report

    def _node_health(self) -> dict[str, Any]:
        m = self.membership
        if m is None:
            return {"name": self.config.activator.node, "member": False}
        node = m.node
        return {
            "name": m.name,
            "advertise": m.advertise,
            "member": m.proven(),
            "lease": f"{node.lease:x}" if node is not None and node.lease else "",
            "gc_leader": self.gc_leader is not None and self.gc_leader.leading,
            "nodes": sorted(self.table.nodes) if m.shared else [m.name],
        }

    def proxy_health(self) -> tuple[int, dict[str, Any]]:
        report = self.health()
        # Public (every host answers it): the cluster's names and addresses stay internal.
        report["node"] = {"member": report["node"]["member"]}
        # The data path keeps serving from its table during a store outage: only an unloaded
        # table makes the proxy itself unhealthy.
        return (200 if self.table.loaded else 503), report

    def _table_changed(self, activator: Activator, change: Change | None) -> None:
        """The route table changed (`None`: re-listed): tell the cluster and the activator."""
        m = self.membership
        if m is not None:
            if change is None:
                m.load(self.table.nodes)
            elif change.kind is Node:
                m.node_changed(change.id, change.entity)
        if change is None or change.kind is EdgeSecret:
            self._set_hop_key()
        self._forget_removed(activator, change)

    def _set_hop_key(self, secret: EdgeSecret | None = None) -> None:
        """The key internal hops are signed with, derived from the cluster secret (a store
        shared by nodes only)."""
        engine = self.proxy.engine if self.proxy is not None else None
        secret = secret or self.table.secrets.get(CLUSTER_KEY)
        if engine is None or self.store is None or not self.store.shared or secret is None:
            return
        key = bytes.fromhex(secret.value)
        engine.hop_key = hmac.new(key, b"miren internal hop", hashlib.sha256).digest()

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
        return ProcessRuntime(isolation=cfg.sandbox.isolation_config(hidden))

    async def run(self, on_ready: Callable[[Edge], None] | None = None) -> None:
        """Start every component, serve until `request_stop()`, stop them in reverse order.

        Raises what made start-up fail (`ListenError`, `EtcdLaunchError`, ...) once everything
        that had started is stopped again."""
        cfg = self.config
        check_tls(cfg)
        await asyncio.to_thread(admin_token.ensure_private_dir, cfg.data_dir)
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.enter_context(datadir.hold(cfg.data_dir))  # first: one serve per dir
                if not cfg.admin_token:
                    token = await asyncio.to_thread(admin_token.load_or_create, cfg.data_dir)
                    cfg = self.config = attrs.evolve(cfg, admin_token=token)
                    log.info("admin API token: %s", admin_token.token_path(cfg.data_dir))
                backend = await self._start(
                    stack,
                    "store",
                    open_backend(
                        cfg.store, cfg.store_options, data_dir=cfg.data_dir, stats=self.stats
                    ),
                )
                store = self.store = backend.store
                membership = self._membership(store)
                activator = await self._start(
                    stack, "activator", self._activator(store, membership)
                )
                sync = await self._start(
                    stack, "route table sync", self._table_sync(store, activator)
                )
                gc = await self._start(stack, "gc", self._gc(store))
                # (entered before the proxy listener: it leaves the cluster once the proxy has
                # drained, before the sandboxes stop, so the other nodes take over at once)
                await self._start(stack, "cluster", self._cluster(membership))
                self.proxy_address = await self._start(
                    stack, "proxy listener", self._proxy_listener(activator)
                )
                await self._join(membership, activator)
                if cfg.tls.listen is not None:
                    self.tls_address = await self._start(
                        stack, "tls listener", self._tls_listener(store)
                    )
                self.admin_address = await self._start(
                    stack, "admin listener", self._admin_listener(store, gc, activator)
                )
                await self._ready(sync)
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
                log.info("shutting down")
        finally:
            log.info("stopped")

    async def _start(
        self, stack: contextlib.AsyncExitStack, step: str, cm: AbstractAsyncContextManager[T]
    ) -> T:
        """Enter one start-up step on the stack: it is stopped when the stack unwinds."""
        return await stack.enter_async_context(self._logged(step, cm))

    @contextlib.asynccontextmanager
    async def _logged(self, step: str, cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
        """`cm`, its start and its stop recorded (`started`, `stopped`) and logged. A step whose
        own stop fails is not recorded as stopped; one stopped while an error passes through
        (a later step failed to start) is."""
        thrown: BaseException | None = None
        try:
            async with cm as value:
                self.started.append(step)
                log.debug("started %s", step)
                try:
                    yield value
                except BaseException as exc:
                    thrown = exc
                    raise
                finally:
                    log.debug("stopping %s", step)
        except BaseException as exc:
            if exc is thrown:
                self._record_stop(step)
            raise
        self._record_stop(step)

    def _record_stop(self, step: str) -> None:
        self.stopped.append(step)
        log.debug("stopped %s", step)

    def _membership(self, store: Store) -> Membership:
        cfg = self.config
        membership = self.membership = Membership(
            store,
            name=cfg.activator.node,
            advertise=cfg.node.advertise or "",
            ttl=cfg.node.lease_ttl,
            state_dir=Path(cfg.data_dir),
        )
        self.gc_leader = Leadership(membership, "gc")
        return membership

    @contextlib.asynccontextmanager
    async def _cluster(self, membership: Membership) -> AsyncIterator[Membership]:
        """On the way out: stop running for GC leader and leave (the lease is revoked: this
        node's pools are free at once). Joining waits for the proxy's address (`_join`)."""
        try:
            yield membership
        finally:
            if self.gc_leader is not None:
                await self.gc_leader.stop()
            await membership.leave()

    async def _join(self, membership: Membership, activator: Activator) -> None:
        """Join the cluster as `node.advertise` (default: the proxy's address), with the shared
        cluster secret in place; then renew in the background and run for GC leader."""
        assert self.proxy_address is not None and self.store is not None
        if not membership.advertise:
            host, port = self.proxy_address
            if host in ("0.0.0.0", "::", ""):
                host = socket.gethostname()
            membership.advertise = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        engine = self.proxy.engine if self.proxy is not None else None
        if self.store.shared and engine is not None:
            # The hop key before any pool can be another node's (no unsigned forward, ever).
            try:
                secret = await self.store.create(
                    EdgeSecret(id=CLUSTER_KEY, value=secrets.token_hex(32))
                )
            except Conflict:
                secret = await self.store.get(EdgeSecret, CLUSTER_KEY)
            self._set_hop_key(secret)
            engine.node_name = membership.name.encode()
            engine.fence_check = membership.fence_check
            membership.on_proven.append(lambda until: setattr(engine, "fence_at", until))
            membership.on_peer_gone.append(lambda old: engine.forget_peer(old.advertise))
        if membership.shared:
            window = membership.ttl * (1 - MARGIN) - membership.ttl / 3
            if window < 2 * self.config.store_options.timeout:
                log.warning(
                    "node.lease_ttl %d s leaves %.1f s for a renewal to succeed, less than two "
                    "store calls (store_options.timeout %g s): one slow etcd answer will fence "
                    "this node",
                    membership.ttl,
                    window,
                    self.config.store_options.timeout,
                )
        await membership.join()
        membership.start()
        assert self.gc_leader is not None
        self.gc_leader.start()

    @contextlib.asynccontextmanager
    async def _activator(self, store: Store, membership: Membership) -> AsyncIterator[Activator]:
        processes = self._sandbox_runtime()
        activator = Activator(
            store,
            config=activator_config(self.config),
            runtimes={Runtime.PROCESS: processes, Runtime.UPSTREAM: UpstreamRuntime()},
            registry=self.registry,
            membership=membership,
        )
        await activator.start()
        try:
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
            yield activator
        finally:
            if self._removals:
                await asyncio.wait(list(self._removals))
            await activator.close()

    @contextlib.asynccontextmanager
    async def _table_sync(self, store: Store, activator: Activator) -> AsyncIterator[TableSync]:
        sync = self._sync = TableSync(
            store, self.table, on_change=lambda change: self._table_changed(activator, change)
        )
        sync.start()
        try:
            yield sync
        finally:
            await sync.stop()

    @contextlib.asynccontextmanager
    async def _gc(self, store: Store) -> AsyncIterator[ExpiryGC]:
        gc = ExpiryGC(
            store,
            sweep_interval=self.config.gc.sweep_interval,
            grace=self.config.gc.expiry_grace,
            registry=self.registry,
            leading=(lambda: leader.leading) if (leader := self.gc_leader) is not None else None,
        )
        gc.start()
        try:
            yield gc
        finally:
            await gc.stop()

    @contextlib.asynccontextmanager
    async def _proxy_listener(self, activator: Activator) -> AsyncIterator[tuple[str, int]]:
        cfg = self.config
        router = EdgeRouter(
            self.table,
            activator,
            request_timeout=cfg.request_timeout,
            loading_page=cfg.ingress.loading_page,
        )
        proxy = ProxyServer(
            router, config=cfg.ingress, registry=self.registry, health=self.proxy_health
        )
        host, port = split_hostport(cfg.listen, "listen")
        address = await _listen("listen", host, port, proxy.start(host, port))
        self.proxy = proxy
        try:
            yield address
        finally:
            await proxy.close(cfg.shutdown_grace)

    @contextlib.asynccontextmanager
    async def _tls_listener(self, store: Store) -> AsyncIterator[tuple[str, int]]:
        """HTTPS: file certificates by SNI, on-demand ACME ones when `acme.directory` is set."""
        cfg = self.config
        assert self.proxy is not None  # (the proxy listener starts first)
        engine = self.proxy.engine
        assert engine is not None
        metrics = TlsMetrics(self.registry)
        certs = CertStore()
        for files in cfg.tls.certificates:
            cert = Certificate.from_files(files.cert, files.key)
            certs.add(cert)
            metrics.observe(cert)
        if cfg.acme.directory is not None:
            self.ondemand = OnDemand(
                cfg.acme,
                store,
                certs,
                lambda name: self.table.certifiable(name, datetime.now(UTC)),
                engine.acme_answers,
                metrics,
            )
            await self.ondemand.start()
        ondemand = self.ondemand
        context_for = ondemand.context_for if ondemand is not None else None

        async def pick(hello: Hello) -> ssl.SSLContext | None:
            name = hello.server_name
            if name is None or is_ip_literal(name):
                return certs.default()
            if hello.alpn == (ACME_ALPN,):  # a CA's TLS-ALPN-01 check, nothing else
                return ondemand.challenge_context(name) if ondemand is not None else None
            ctx = certs.context_for(name)
            if ctx is None and context_for is not None:
                ctx = await context_for(name)
            return ctx

        engine.set_hsts(int(cfg.tls.hsts))
        listener = TlsListener(
            self.proxy, pick, metrics, handshake_timeout=cfg.tls.handshake_timeout
        )
        host, port = split_hostport(cfg.tls.listen or "", "tls.listen")
        address = await _listen("tls.listen", host, port, listener.start(host, port))
        if cfg.tls.redirect_http:
            engine.redirect_port = address[1]
        try:
            yield address
        finally:
            engine.redirect_port = None
            await listener.close()
            if self.ondemand is not None:
                await self.ondemand.close()

    @contextlib.asynccontextmanager
    async def _admin_listener(
        self, store: Store, gc: ExpiryGC, activator: Activator
    ) -> AsyncIterator[tuple[str, int]]:
        assert self.proxy_address is not None  # (the proxy listener starts first)
        cfg = self.config
        tls_port = self.tls_address[1] if self.tls_address is not None else None
        served = attrs.evolve(
            cfg, ephemeral=cfg.ephemeral.as_served(self.proxy_address[1], tls_port)
        )
        ctx = AdminContext(
            store=store,
            config=served,
            registry=self.registry,
            health=self.health,
            now=lambda: datetime.now(UTC),
            extra={"gc": gc, "activator": activator},
        )
        runner = AdminRunner(make_admin_app(ctx), access_log=None)
        await runner.setup()
        try:
            host, port = split_hostport(self.config.admin_listen, "admin_listen")
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await _listen("admin_listen", host, port, site.start())
            yield _bound_address(runner, (host, port))
        finally:
            await runner.cleanup()

    async def _ready(self, sync: TableSync) -> None:
        cfg = self.config
        if not await sync.wait_loaded(cfg.store_options.timeout * 5):
            log.warning(
                "the store is not reachable yet (%s): the proxy answers 503 until the "
                "route table loads",
                sync.last_error or "no answer",
            )
        self.ready_after = time.monotonic() - self.started_at
        pygc.collect()
        pygc.freeze()  # start-up objects never need scanning again
        assert self.proxy_address is not None and self.admin_address is not None
        log.info(
            "miren serve ready in %.2fs: proxy on %s:%d, admin API on %s:%d, store %s, hot path %s",
            self.ready_after,
            *self.proxy_address,
            *self.admin_address,
            cfg.store,
            HOT_PATH.describe(),
        )
        if HOT_PATH.warn:
            log.warning("the proxy's hot path runs from its Python sources: %s", HOT_PATH.reason)


async def _listen(key: str, host: str, port: int, opening: Awaitable[T]) -> T:
    """Await `opening` (a listener starting); an OSError becomes a `ListenError` naming `key`."""
    try:
        return await opening
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"{key}: cannot listen on {host}:{port}: {reason}") from exc


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
    except (ListenError, StoreError, DataDirInUse, CertificateError, ConfigError, OSError) as exc:
        # Start-up failures (a port taken, etcd not starting, ...): the message says it all.
        log.error("miren serve: %s", exc)
        return 1
    except Exception as exc:
        log.error("miren serve failed: %s", exc, exc_info=config.log_level == "debug")
        return 1
    return 0
