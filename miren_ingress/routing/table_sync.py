"""Keeps a RouteTable current from the store: list once, then follow the watch (informer pattern).

The loop: snapshot the kinds the table holds, load them at the snapshot's revision, watch from
there and apply every change. When the watch cannot resume (Resync: history compacted) the loop
lists again and rebuilds the table. When the store is unreachable the table keeps serving what it
has (the data path never depends on etcd being up), `watch_ok` turns False for `/healthz`, and
the loop retries with capped exponential back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from miren_ingress.routing.routes import RouteTable
from miren_store.errors import Resync, StoreError
from miren_store.store import Change, Store
from miren_store.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class TableSync:
    def __init__(
        self,
        store: Store,
        table: RouteTable,
        *,
        on_change: Callable[[Change | None], None] | None = None,
        backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self.store = store
        self.table = table
        self.on_change = on_change  # called after each change (None: the table was reloaded)
        self.watch_ok = False
        self.last_error = ""
        self.relists = 0
        self._backoff = backoff
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    def __repr__(self) -> str:
        return f"<TableSync ok={self.watch_ok} rev={self.table.revision} relists={self.relists}>"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="miren-table-sync")

    async def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once the table was loaded (False if `timeout` passed first)."""
        try:
            async with asyncio.timeout(timeout):
                await self._loaded.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        delay = self._backoff[0]
        need_list = True
        while True:
            try:
                if need_list:
                    snap = await self.store.snapshot(RouteTable.KINDS)
                    self.table.load(snap.entities, snap.revision)
                    self.relists += 1
                    need_list = False
                    self._loaded.set()
                    self._notify(None)
                self.watch_ok = True
                self.last_error = ""
                delay = self._backoff[0]
                async for change in self.store.watch(self.table.revision):
                    self.table.apply(change)
                    self._notify(change)
                # A watch only ends when the store was closed.
                self.watch_ok = False
                return
            except Resync as exc:
                log.warning("route table watch must re-list: %s", exc)
                need_list = True
            except StoreError as exc:
                self.watch_ok = False
                self.last_error = str(exc) or type(exc).__name__
                log.warning("route table sync failed, serving the last table: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])

    def _notify(self, change: Change | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:  # a listener's bug must not stop the table from updating
                log.exception("route table listener failed")
