"""The route table and host resolution: pure, in memory, no I/O.

Theory of operation
-------------------
The table holds every App, AppVersion and HttpRoute, loaded from a store snapshot and kept current
by applying the store's watch changes (`RouteTable.load` / `RouteTable.apply`; the informer in
`table_sync.py` does the I/O). `resolve(host, now)` reads only these dicts: no store call.

Resolution order (SPEC §6), first hit wins, on a normalised host:
  1. exact route for the host                        -> the route's active version
  2. wildcard route covering the host (`*.rest`)     -> label = first label, preview-or-active
  3. first label stripped, exact route for the base  -> label = first label, strict
  4. first label stripped, wildcard covering the base-> label = first label, preview-or-active
  5. the default route                               -> its active version
  6. nothing                                         -> 404
"Strict" (a plain route): the label must name a live preview of the route's app: unknown is 404,
expired is 410. "Preview-or-active" (a wildcard route, also a multi-tenant catch-all): a live
preview with that label, else the active version. Exact always beats ephemeral because step 1
runs first. A table that was never loaded answers 503, never the default route.

Among several versions of one app carrying one label (a redeploy creates the new version before
it deletes the old one), the newest live one wins, so the label never stops answering.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import attrs

from miren_ingress.routing.hosts import split_first_label, wildcard_for
from miren_store.entities import App, AppVersion, EdgeSecret, HttpRoute, Node, Protection
from miren_store.store import Change


@attrs.frozen(slots=True)
class Resolved:
    """A host resolved to the version that serves it."""

    route: HttpRoute
    app: App
    version: AppVersion
    ephemeral: bool


@attrs.frozen(slots=True)
class Refused:
    """A host that resolves to an error answer; `message` is public (no ids)."""

    status: int
    message: str


COOKIE_KEY = "cookie-key"  # the EdgeSecret protection cookies are signed with
CLUSTER_KEY = "cluster-key"  # the EdgeSecret internal hops between nodes are authenticated with

NOT_LOADED = Refused(503, "The routing table is loading; retry shortly.")
NO_ROUTE = Refused(404, "No application is configured for this host.")
NO_ACTIVE = Refused(404, "This application has no active version.")
NO_PREVIEW = Refused(404, "This preview does not exist.")
EXPIRED = Refused(410, "This preview has expired.")

Resolution = Resolved | Refused


class RouteTable:
    """Apps, versions and routes in memory, with the resolution rules over them."""

    KINDS: tuple[type[Any], ...] = (App, AppVersion, HttpRoute, Protection, EdgeSecret, Node)

    def __init__(self) -> None:
        self.loaded = False
        self.revision = 0
        self.generation = 0  # bumped on every change: resolution caches key on it
        self.routes: dict[str, HttpRoute] = {}
        self.apps: dict[str, App] = {}
        self.versions: dict[str, AppVersion] = {}
        # (app, label) -> versions carrying the label, newest first
        self.labels: dict[tuple[str, str], list[AppVersion]] = {}
        self._defaults: dict[str, HttpRoute] = {}
        self.protections: dict[str, Protection] = {}  # app -> its protection (when set)
        self.secrets: dict[str, EdgeSecret] = {}
        self.nodes: dict[str, Node] = {}  # the live nodes of the cluster (membership)
        self.default_route: HttpRoute | None = None

    def __repr__(self) -> str:
        return (
            f"<RouteTable loaded={self.loaded} rev={self.revision} routes={len(self.routes)} "
            f"apps={len(self.apps)} versions={len(self.versions)} labels={len(self.labels)}>"
        )

    # -- keeping it current ---------------------------------------------------------------------

    def load(self, entities: Iterable[Any], revision: int) -> None:
        """Replace the whole content (a store snapshot at `revision`)."""
        self.routes.clear()
        self.apps.clear()
        self.versions.clear()
        self.labels.clear()
        self._defaults.clear()
        self.protections.clear()
        self.secrets.clear()
        self.nodes.clear()
        for ent in entities:
            self._put(ent)
        self._pick_default()
        self.revision = revision
        self.loaded = True
        self.generation += 1

    def apply(self, change: Change) -> None:
        """Apply one watch change (idempotent for a change already reflected)."""
        if change.kind not in self.KINDS:
            return
        if change.entity is None:
            self._drop(change.kind, change.id)
        else:
            self._drop(change.kind, change.id)
            self._put(change.entity)
        if change.kind is HttpRoute:
            self._pick_default()
        self.revision = max(self.revision, change.revision)
        self.generation += 1

    def _put(self, ent: Any) -> None:
        if isinstance(ent, HttpRoute):
            self.routes[ent.host] = ent
            if ent.default:
                self._defaults[ent.host] = ent
        elif isinstance(ent, App):
            self.apps[ent.name] = ent
        elif isinstance(ent, Protection):
            self.protections[ent.app] = ent
        elif isinstance(ent, EdgeSecret):
            self.secrets[ent.id] = ent
        elif isinstance(ent, Node):
            self.nodes[ent.id] = ent
        elif isinstance(ent, AppVersion):
            self.versions[ent.id] = ent
            if ent.ephemeral_label:
                group = self.labels.setdefault((ent.app, ent.ephemeral_label), [])
                group.append(ent)
                group.sort(key=lambda v: (v.created_at, v.id), reverse=True)

    def _drop(self, kind: type[Any], id: str) -> None:
        if kind is HttpRoute:
            self.routes.pop(id, None)
            self._defaults.pop(id, None)
        elif kind is App:
            self.apps.pop(id, None)
        elif kind is Protection:
            self.protections.pop(id, None)
        elif kind is EdgeSecret:
            self.secrets.pop(id, None)
        elif kind is Node:
            self.nodes.pop(id, None)
        elif kind is AppVersion:
            old = self.versions.pop(id, None)
            if old is not None and old.ephemeral_label:
                key = (old.app, old.ephemeral_label)
                group = [v for v in self.labels.get(key, ()) if v.id != id]
                if group:
                    self.labels[key] = group
                else:
                    self.labels.pop(key, None)

    def _pick_default(self) -> None:
        # At most one default route is kept by the admin API; if the store holds several (a race
        # between nodes), the choice is still deterministic.
        self.default_route = self._defaults[min(self._defaults)] if self._defaults else None

    # -- resolution -----------------------------------------------------------------------------

    def live_preview(self, app: str, label: str, now: datetime) -> AppVersion | None:
        """The newest non-expired version of `app` carrying `label`."""
        for v in self.labels.get((app, label), ()):
            if not v.expired(now):
                return v
        return None

    def resolve(self, host: str, now: datetime) -> Resolution:
        """Resolve a normalised host (see `hosts.normalize_host`) at time `now`."""
        if not self.loaded:
            return NOT_LOADED
        routes = self.routes
        route = routes.get(host)
        if route is not None:
            return self._active(route)
        parts = split_first_label(host)
        if parts is not None:
            label, base = parts
            wild = wildcard_for(host)
            if wild is not None:
                route = routes.get(wild)
                if route is not None:
                    return self._preview_or_active(route, label, now)
            route = routes.get(base)
            if route is not None and not route.is_wildcard:
                return self._strict(route, label, now)
            wild = wildcard_for(base)
            if wild is not None:
                route = routes.get(wild)
                if route is not None:
                    return self._preview_or_active(route, label, now)
        if self.default_route is not None:
            return self._active(self.default_route)
        return NO_ROUTE

    def certifiable(self, name: str, now: datetime) -> bool:
        """Whether a TLS certificate may be ordered for `name` now (on-demand ACME): it is an
        exact route host, or `<label>.<host>` where the route that would serve it has a live
        preview labelled so. Never a name only a wildcard route or the default route would
        serve (any label would do: strangers could make the edge order certificates for names
        of their choosing), an unknown label or an expired preview."""
        if not self.loaded or name.startswith("*."):
            return False
        route = self.routes.get(name)
        if route is not None:
            return True
        parts = split_first_label(name)
        if parts is None:
            return False
        label, base = parts
        # `<label>.<route host>` or `<label>.<base of a wildcard route>` only: a preview under
        # a host that only a wildcard serves (`pr-1.ANY.apps.example.com`) would let strangers
        # pick unboundedly many names (a wildcard file certificate covers those).
        for key in (wildcard_for(name), base):
            route = self.routes.get(key) if key is not None else None
            if route is not None and (key != base or not route.is_wildcard):
                return self.live_preview(route.app, label, now) is not None
        return False

    def _active(self, route: HttpRoute) -> Resolution:
        app = self.apps.get(route.app)
        if app is None or app.active_version is None:
            return NO_ACTIVE
        version = self.versions.get(app.active_version)
        if version is None:
            return NO_ACTIVE
        return Resolved(route, app, version, False)

    def _strict(self, route: HttpRoute, label: str, now: datetime) -> Resolution:
        app = self.apps.get(route.app)
        if app is None:
            return NO_ROUTE
        version = self.live_preview(route.app, label, now)
        if version is not None:
            return Resolved(route, app, version, True)
        return EXPIRED if (route.app, label) in self.labels else NO_PREVIEW

    def _preview_or_active(self, route: HttpRoute, label: str, now: datetime) -> Resolution:
        app = self.apps.get(route.app)
        if app is None:
            return NO_ROUTE
        version = self.live_preview(route.app, label, now)
        if version is not None:
            return Resolved(route, app, version, True)
        return self._active(route)
