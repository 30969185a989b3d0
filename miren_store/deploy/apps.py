"""Deleting an app: its routes, its active pointer, its versions (with their pools), its
preview template and webhook records, then the app itself. Each step is idempotent, so a deletion interrupted by a store failure is finished
by the next attempt; nothing is left that points at a deleted entity (routes go first, so the
proxy stops resolving the app before its versions disappear)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime

import attrs

from miren_store.deploy import deploys
from miren_store.deploy.errors import VersionNotFound
from miren_store.entities import App, HttpRoute, PreviewTemplate, Protection, WebhookDelivery
from miren_store.errors import Conflict, NotFound
from miren_store.store import Store


async def delete_app(store: Store, name: str, *, now: Callable[[], datetime]) -> None:
    """Delete the app `name` and everything of it. Raises AppNotFound when there is no such
    app (a retry after a completed deletion, too), StoreUnavailable when the store fails (then
    call again)."""
    app = await deploys.get_app(store, name)
    for route in await store.list(HttpRoute, app=app.name):
        with contextlib.suppress(NotFound):
            await store.delete(HttpRoute, route.host)
    while app.active_version is not None:
        try:
            app = await store.update(attrs.evolve(app, active_version=None))
        except Conflict:
            app = await deploys.get_app(store, app.name)
    for view in await deploys.list_versions(store, app.name, now=now):
        with contextlib.suppress(VersionNotFound):
            await deploys.delete_version_by_id(store, app.name, view.version.id)
    for kind in (PreviewTemplate, Protection):
        with contextlib.suppress(NotFound):
            await store.delete(kind, app.name)
    for delivery in await store.list(WebhookDelivery, app=app.name):
        with contextlib.suppress(NotFound):
            await store.delete(WebhookDelivery, delivery.id)
    with contextlib.suppress(NotFound):
        await store.delete(App, app.name)
