"""Deploys (normal, ephemeral, rollback), extend, delete by label, version listings.

Theory of operation
-------------------
Plain async functions over a `Store`; the rules they apply (labels, TTLs, which version a label
resolves to, which versions to evict, version status, access URLs) are pure functions tested
without I/O. Every entry point validates everything it can before its first write.

**Ephemeral deploy.** One deploy is ONE atomic `commit`, built from reads made just before it:

    Create(new version)                        the label answers with the new version at once
    pool ops of the replaced + evicted ones    (cascade.plan_pool_ops: delete or drop the ref)
    Delete(replaced, rev) for every version of the app already carrying the label
    Delete(evicted, rev)  for the versions over the per-app limit (expired first, then nearest
                          expiry; the new version is never evicted)
    Update(app)                                content unchanged; bumps the app's revision

The invariant: *ephemeral deploys of one app are serialized by the app's revision.* Every deploy
commit rewrites the App entity at the revision it read before listing versions, so a commit
succeeds only if no other deploy (ephemeral or normal) of that app committed since that read;
then its listings were complete when it committed, and
- exactly one version carries each label after any sequence of deploys (a second concurrent
  deploy of label L conflicts, re-reads, sees the first one's version and replaces it);
- at most `max_per_app` ephemeral versions exist after each deploy (each commit evicts from a
  complete count; with equal TTLs the survivors of N racing deploys are the newest, because a
  retry takes its `now` after the winner committed);
- the label never stops answering: the new version is created in the same revision the old one
  is deleted (and written first, so a watcher applying the changes one by one also never sees
  the label missing); readers resolve "newest non-expired wins" (`pick_label_version`).
Losing the race (Conflict / NotFound on a revision check) re-reads and retries with jitter, at
most `commit_attempts` times. Deletions made elsewhere (GC, delete by label) are
revision-checked against the same entities, so they conflict instead of being lost.

Any store failure raises `StoreFailure` naming the step (`read`, `replace`, `evict`, `create`)
and, because nothing is written before the single commit, leaves nothing half-made: no extra
version, the previous preview still serving. If the commit itself times out (it may or may not
have been applied) the deploy reads the new version back: found means the whole commit applied
and the deploy succeeds; otherwise it fails and says whether the outcome is known.

An ephemeral deploy never sets `active_version`. Cloning (`from_version`) copies the source's
spec and source into a new version and never writes the source, which may be the active one.

**Normal deploy**: one commit, Create(version) + Update(app.active_version) at the read revision.
**Rollback** (`from_version` without `ephemeral`): Update(app.active_version) + Check(version).
Activating an ephemeral version is never done (the GC would delete it while active): a rollback
to an ephemeral version *promotes* it instead, cloning it into a new normal version (no label,
no expiry) and activating that (reference §12.13).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import cattrs

from miren_store.codec import (
    describe_error,
    format_public_time,
    from_data,
    is_shape_error,
    to_data,
)
from miren_store.deploy.access import access_urls
from miren_store.deploy.cascade import Deleted, delete_version, plan_pool_ops, pools_of
from miren_store.deploy.errors import (
    AppNotFound,
    InvalidInput,
    InvalidSpec,
    LabelExpired,
    LabelNotFound,
    MalformedRequest,
    StoreFailure,
    TooManyConflicts,
    VersionAppMismatch,
    VersionNotFound,
)
from miren_store.deploy.labels import label_from, validate_label
from miren_store.deploy.ttl import DEFAULT_TTL, MAX_TTL, expiry, resolve_ttl
from miren_store.entities import App, AppVersion, HttpRoute, Source, VersionSpec, new_id, utcnow
from miren_store.errors import Conflict, NotFound, StoreUnavailable
from miren_store.settings import setting
from miren_store.store import Check, Create, Delete, Op, Store, Update

Clock = Callable[[], datetime]

# Evictions one deploy commits at most: keeps the transaction well inside etcd's --max-txn-ops
# (128; a version delete is 4 key operations, its pool about 3). Only matters when the limit was
# lowered below the current count: each later deploy then evicts the next batch.
MAX_EVICTIONS_PER_DEPLOY = 12


@attrs.frozen(kw_only=True)
class EphemeralConfig:
    """Settings of the deploy domain (part of the server's one config object)."""

    max_per_app: int = attrs.field(
        default=10,
        metadata=setting(
            "previews per app; a deploy beyond it evicts the expired ones first, then the "
            "nearest expiry",
            minimum=1,
        ),
    )
    default_ttl: timedelta = attrs.field(
        default=DEFAULT_TTL, metadata=setting("a preview's lifetime when its deploy names none")
    )
    max_ttl: timedelta = attrs.field(
        default=MAX_TTL, metadata=setting("the longest lifetime a deploy or an extend may ask for")
    )
    cluster_hostname: str | None = attrs.field(
        default=None,
        metadata=setting("URL for previews of apps without routes: <label>.<cluster_hostname>"),
    )
    url_scheme: str | None = attrs.field(
        default=None,
        metadata=setting(
            "the scheme of the URLs deploy answers print (none: what the edge serves, https "
            "with tls.listen, else http; set https behind a TLS terminator)",
            choices=("http", "https"),
        ),
    )
    url_port: int | None = attrs.field(
        default=None,
        metadata=setting(
            "the port of the URLs deploy answers print (none: the serving listener's when "
            "url_scheme is none, else the scheme's)",
            minimum=1,
            maximum=65535,
        ),
    )

    def as_served(self, proxy_port: int, tls_port: int | None = None) -> EphemeralConfig:
        """These settings with the URLs resolved against the listeners `miren serve` bound:
        with no `url_scheme`, `https` on the TLS listener's port when there is one, else `http`
        on the proxy's (none written for 443 and 80)."""
        if self.url_scheme is not None:
            return self
        scheme, default, port = ("https", 443, tls_port) if tls_port else ("http", 80, proxy_port)
        port = self.url_port if self.url_port is not None else port
        return attrs.evolve(self, url_scheme=scheme, url_port=None if port == default else port)

    @property
    def scheme(self) -> str:
        """The URL scheme in force (a library caller that set none gets the reference's https)."""
        return self.url_scheme or "https"

    commit_attempts: int = attrs.field(
        default=50,
        metadata=setting(
            "deploy commits lost to races before giving up (N racing deploys need N)", minimum=1
        ),
    )

    def __attrs_post_init__(self) -> None:
        if self.max_per_app < 1:
            raise ValueError("max_per_app must be at least 1")
        if not timedelta(0) < self.default_ttl <= self.max_ttl:
            raise ValueError("default_ttl must be greater than 0 and at most max_ttl")
        if self.commit_attempts < 1:
            raise ValueError("commit_attempts must be at least 1")


DEFAULT_CONFIG = EphemeralConfig()


class VersionStatus(enum.StrEnum):
    ACTIVE = "active"
    EPHEMERAL = "ephemeral"
    EXPIRED = "expired"
    REPLACED = "replaced"


# -- requests and answers -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EphemeralRequest:
    label: str | None = None
    branch: str | None = None
    ttl: str | None = None


@attrs.frozen(kw_only=True)
class DeployRequest:
    """`spec` (new version) or `from_version` (clone / rollback); `ephemeral` makes a preview."""

    spec: VersionSpec | None = None
    from_version: str | None = None
    ephemeral: EphemeralRequest | None = None
    source: Source | None = None

    @classmethod
    def from_data(cls, data: Any) -> DeployRequest:
        """A JSON body as a request; InvalidSpec / InvalidInput with a path-named message."""
        if not isinstance(data, dict):
            raise InvalidInput("the deploy request must be a JSON object")
        try:
            return from_data(cls, data)
        except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
            text = describe_error(exc)
            err: type[InvalidInput]
            if is_shape_error(exc):
                err = MalformedRequest
            else:
                err = InvalidSpec if text.startswith("spec") else InvalidInput
            raise err(f"invalid deploy request: {text}") from None


@attrs.frozen(kw_only=True)
class DeployResult:
    version: AppVersion
    status: VersionStatus  # ACTIVE or EPHEMERAL
    urls: tuple[str, ...]
    expires_at: datetime | None = None
    cloned_from: str | None = None
    replaced: tuple[str, ...] = ()  # ids of the versions that carried the label before
    evicted: tuple[AppVersion, ...] = ()  # previews deleted to stay within max_per_app

    def to_data(self) -> dict[str, Any]:
        """The deploy answer's JSON (SPEC §8)."""
        out: dict[str, Any] = {
            "version": version_data(self.version, self.status),
            "status": str(self.status),
            "urls": list(self.urls),
        }
        if self.expires_at is not None:
            out["expires_at"] = format_public_time(self.expires_at)
        if self.evicted:
            out["evicted"] = [{"id": v.id, "label": v.ephemeral_label} for v in self.evicted]
        return out


@attrs.frozen(kw_only=True)
class VersionView:
    version: AppVersion
    status: VersionStatus

    def to_data(self) -> dict[str, Any]:
        return version_data(self.version, self.status)


class LabelState(enum.Enum):
    LIVE = "live"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


@attrs.frozen
class LabelLookup:
    state: LabelState
    version: AppVersion | None = None  # the live version when LIVE


# -- pure rules -----------------------------------------------------------------------------------


def _newest_key(v: AppVersion) -> tuple[datetime, str]:
    return (v.created_at, v.id)


def pick_label_version(versions: Iterable[AppVersion], now: datetime) -> AppVersion | None:
    """Among the versions carrying one label, the newest non-expired one (None if none).

    During a redeploy both the old and the new version may be listed: the newest wins, and an
    expired entry never shadows a live one (reference R-6, R-7).
    """
    live = [v for v in versions if v.is_ephemeral and not v.expired(now)]
    return max(live, key=_newest_key) if live else None


def label_lookup(versions: Sequence[AppVersion], now: datetime) -> LabelLookup:
    """LIVE with the winning version, EXPIRED (only expired ones carry it) or UNKNOWN."""
    found = pick_label_version(versions, now)
    if found is not None:
        return LabelLookup(LabelState.LIVE, found)
    if any(v.is_ephemeral for v in versions):
        return LabelLookup(LabelState.EXPIRED)
    return LabelLookup(LabelState.UNKNOWN)


def choose_evictions(candidates: Iterable[AppVersion], keep: int) -> list[AppVersion]:
    """The versions to delete so that at most `keep` of `candidates` remain.

    Expired ones first, then the nearest expiry (ascending expiry puts expired ones first);
    ties: the oldest first.
    """
    floor = datetime.min.replace(tzinfo=UTC)
    ordered = sorted(
        candidates, key=lambda v: (v.ephemeral_expires_at or floor, v.created_at, v.id)
    )
    excess = len(ordered) - max(keep, 0)
    return ordered[:excess] if excess > 0 else []


def version_status(version: AppVersion, active_version: str | None, now: datetime) -> VersionStatus:
    if version.id == active_version:
        return VersionStatus.ACTIVE
    if version.is_ephemeral:
        return VersionStatus.EXPIRED if version.expired(now) else VersionStatus.EPHEMERAL
    return VersionStatus.REPLACED


def spec_data(version: AppVersion) -> dict[str, Any]:
    """A version's spec as the API shows it: its concurrency with the defaults in force
    resolved (a preview's one instance, the idle delay), and no hard cap key when it has none."""
    data: dict[str, Any] = to_data(version.spec)
    effective = to_data(version.spec.effective_concurrency(version.is_ephemeral))
    data["concurrency"] = {k: v for k, v in effective.items() if v is not None}
    return data


def version_data(version: AppVersion, status: VersionStatus) -> dict[str, Any]:
    """A version as the API and the CLI's `--format json` show it (SPEC §8)."""
    out: dict[str, Any] = {
        "id": version.id,
        "app": version.app,
        "created_at": format_public_time(version.created_at),
        "status": str(status),
        "spec": spec_data(version),
    }
    if version.source is not None:
        out["source"] = to_data(version.source)
    if version.is_ephemeral:
        out["ephemeral_label"] = version.ephemeral_label
        out["ephemeral_ttl"] = version.ephemeral_ttl
        if version.ephemeral_expires_at is not None:
            out["expires_at"] = format_public_time(version.ephemeral_expires_at)
    return out


def sort_newest_first(versions: Iterable[AppVersion]) -> list[AppVersion]:
    return sorted(versions, key=_newest_key, reverse=True)


# -- helpers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _step(op: str, step: str, what: str) -> Iterator[None]:
    """Turn StoreUnavailable inside the block into StoreFailure naming the operation's step."""
    try:
        yield
    except StoreUnavailable as exc:
        raise StoreFailure(step, f"{op} failed at step {step!r}: {what}: {exc}") from exc


async def get_app(store: Store, name: str) -> App:
    try:
        return await store.get(App, name)
    except NotFound:
        raise AppNotFound(f"app {name!r} not found") from None


async def _get_version(store: Store, app: str, version_id: str) -> AppVersion:
    try:
        found = await store.get(AppVersion, version_id)
    except NotFound:
        raise VersionNotFound(f"version {version_id!r} not found") from None
    if found.app != app:
        raise VersionAppMismatch(
            f"version {version_id!r} belongs to app {found.app!r}, not {app!r}"
        )
    return found


def _check_spec(spec: VersionSpec) -> None:
    problems = spec.problems()
    if problems:
        raise InvalidSpec("invalid spec: " + "; ".join(problems))


async def _backoff(attempt: int) -> None:
    # Jittered, capped: racing deploys of one app spread out instead of retrying in lockstep.
    await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** min(attempt, 5))))


async def _confirm_commit(
    store: Store, op: str, version_id: str, exc: StoreUnavailable
) -> AppVersion:
    """After a commit failed with StoreUnavailable (it may have been applied): read the new
    version back. Found: the whole commit applied. Otherwise raise StoreFailure saying whether
    the outcome is known."""
    try:
        return await store.get(AppVersion, version_id)
    except NotFound:
        detail = "nothing was changed"
    except StoreUnavailable:
        detail = f"the outcome is unknown: version {version_id!r} may exist, list the versions"
    raise StoreFailure("create", f"{op} failed at step 'create': {exc}; {detail}") from exc


# -- deploy ---------------------------------------------------------------------------------------


async def deploy(
    store: Store,
    app: str,
    request: DeployRequest,
    *,
    config: EphemeralConfig = DEFAULT_CONFIG,
    now: Clock = utcnow,
    activate: bool = True,
) -> DeployResult:
    """Deploy to `app`: ephemeral (`request.ephemeral`), normal (`spec`) or rollback.

    `activate=False` stages a normal deploy or a rollback: the version is created (a promoted
    preview: cloned) but the app keeps its active version; activate it later with a rollback to
    it (`from_version`), as `deploy --wait` does once a sandbox of it is healthy. (A preview is
    never activated: the flag changes nothing for it.)

    Raises InvalidInput / Missing subclasses before any write, StoreFailure naming the step,
    TooManyConflicts when concurrent writers kept winning.
    """
    if (request.spec is None) == (request.from_version is None):
        raise InvalidInput("a deploy needs exactly one of spec or from_version")
    if request.ephemeral is not None:
        return await _deploy_ephemeral(
            store, app, request, request.ephemeral, config=config, now=now
        )
    if request.spec is not None:
        _check_spec(request.spec)
        with _step("deploy", "read", f"reading app {app!r}"):
            found = await get_app(store, app)
            routes = await store.list(HttpRoute, app=app)
        return await _create_active(
            store,
            found,
            request.spec,
            request.source,
            routes,
            config=config,
            now=now,
            activate=activate,
        )
    assert request.from_version is not None
    return await _rollback(
        store,
        app,
        request.from_version,
        request.source,
        config=config,
        now=now,
        activate=activate,
    )


async def _deploy_ephemeral(
    store: Store,
    app_name: str,
    request: DeployRequest,
    eph: EphemeralRequest,
    *,
    config: EphemeralConfig,
    now: Clock,
) -> DeployResult:
    label = label_from(eph.label, eph.branch)
    ttl, ttl_text = resolve_ttl(eph.ttl, default=config.default_ttl, maximum=config.max_ttl)
    if request.spec is not None:
        _check_spec(request.spec)
    src: AppVersion | None = None
    with _step("deploy", "read", f"reading app {app_name!r}"):
        app = await get_app(store, app_name)
        if request.from_version is not None:
            src = await _get_version(store, app_name, request.from_version)
        routes = await store.list(HttpRoute, app=app_name)
    spec = request.spec if src is None else src.spec
    assert spec is not None
    source = request.source if request.source is not None or src is None else src.source
    urls = tuple(
        access_urls(
            routes,
            label,
            cluster_hostname=config.cluster_hostname,
            scheme=config.scheme,
            port=config.url_port,
        )
    )

    for attempt in range(config.commit_attempts):
        if attempt:
            await _backoff(attempt)
            with _step("deploy", "read", f"reading app {app_name!r}"):
                app = await get_app(store, app_name)
        # `now` is taken after the app was read: a deploy that commits later is newer.
        t = now()
        version = AppVersion(
            id=new_id(f"{app_name}-eph"),
            app=app_name,
            created_at=t,
            spec=spec,
            source=source,
            ephemeral_label=label,
            ephemeral_ttl=ttl_text,
            ephemeral_expires_at=expiry(t, ttl),
        )
        with _step("deploy", "replace", f"listing the versions labelled {label!r}"):
            same = await store.list(AppVersion, app=app_name, ephemeral_label=label)
        replaced = [v for v in same if v.id != app.active_version]
        with _step("deploy", "evict", f"listing the versions of app {app_name!r}"):
            every = await store.list(AppVersion, app=app_name)
        others = [
            v
            for v in every
            if v.is_ephemeral and v.ephemeral_label != label and v.id != app.active_version
        ]
        evicted = choose_evictions(others, config.max_per_app - 1)[:MAX_EVICTIONS_PER_DEPLOY]
        with _step("deploy", "replace", f"listing the pools of the versions labelled {label!r}"):
            pools = await pools_of(store, [v.id for v in replaced])
        with _step("deploy", "evict", "listing the pools of the versions to evict"):
            pools += await pools_of(store, [v.id for v in evicted])
        doomed = replaced + evicted
        ops: list[Op] = [Create(version)]
        ops += plan_pool_ops(pools, {v.id for v in doomed})
        ops += [Delete(AppVersion, v.id, v.revision) for v in doomed]
        ops.append(Update(app))
        try:
            rev = await store.commit(ops)
        except (Conflict, NotFound):
            continue  # another writer won: read again and re-plan
        except StoreUnavailable as exc:
            stored = await _confirm_commit(store, "deploy", version.id, exc)
        else:
            stored = attrs.evolve(version, revision=rev)
        return DeployResult(
            version=stored,
            status=VersionStatus.EPHEMERAL,
            urls=urls,
            expires_at=stored.ephemeral_expires_at,
            cloned_from=src.id if src is not None else None,
            replaced=tuple(v.id for v in replaced),
            evicted=tuple(evicted),
        )
    raise TooManyConflicts(
        f"deploy of {label!r} to app {app_name!r} lost {config.commit_attempts} races with "
        "concurrent writers; retry"
    )


async def _create_active(
    store: Store,
    app: App,
    spec: VersionSpec,
    source: Source | None,
    routes: Sequence[HttpRoute],
    *,
    config: EphemeralConfig,
    now: Clock,
    cloned_from: str | None = None,
    activate: bool = True,
) -> DeployResult:
    """Create a normal version and make it the app's active version, in one commit (with
    `activate=False`: only create it)."""
    urls = tuple(access_urls(routes, None, scheme=config.scheme, port=config.url_port))
    for attempt in range(config.commit_attempts):
        if attempt:
            await _backoff(attempt)
            with _step("deploy", "read", f"reading app {app.name!r}"):
                app = await get_app(store, app.name)
        version = AppVersion(
            id=new_id(app.name), app=app.name, created_at=now(), spec=spec, source=source
        )
        ops: list[Op] = [Create(version)]
        if activate:
            ops.append(Update(attrs.evolve(app, active_version=version.id)))
        try:
            rev = await store.commit(ops)
        except (Conflict, NotFound):
            continue
        except StoreUnavailable as exc:
            stored = await _confirm_commit(store, "deploy", version.id, exc)
        else:
            stored = attrs.evolve(version, revision=rev)
        return DeployResult(
            version=stored,
            status=VersionStatus.ACTIVE if activate else VersionStatus.REPLACED,
            urls=urls,
            cloned_from=cloned_from,
        )
    raise TooManyConflicts(f"deploy to app {app.name!r} lost {config.commit_attempts} races; retry")


async def _rollback(
    store: Store,
    app_name: str,
    version_id: str,
    source: Source | None,
    *,
    config: EphemeralConfig,
    now: Clock,
    activate: bool = True,
) -> DeployResult:
    with _step("rollback", "read", f"reading app {app_name!r} and version {version_id!r}"):
        app = await get_app(store, app_name)
        target = await _get_version(store, app_name, version_id)
        routes = await store.list(HttpRoute, app=app_name)
    if target.is_ephemeral:
        # Promote: never activate a labelled version (the GC would delete it while active).
        return await _create_active(
            store,
            app,
            target.spec,
            source if source is not None else target.source,
            routes,
            config=config,
            now=now,
            cloned_from=target.id,
            activate=activate,
        )
    urls = tuple(access_urls(routes, None, scheme=config.scheme, port=config.url_port))
    if not activate:
        return DeployResult(
            version=target, status=version_status(target, app.active_version, now()), urls=urls
        )
    for attempt in range(config.commit_attempts):
        if attempt:
            await _backoff(attempt)
            with _step("rollback", "read", f"reading app {app_name!r}"):
                app = await get_app(store, app_name)
                target = await _get_version(store, app_name, version_id)
        if app.active_version != target.id:
            try:
                await store.commit(
                    [
                        Update(attrs.evolve(app, active_version=target.id)),
                        Check(AppVersion, target.id, target.revision),
                    ]
                )
            except (Conflict, NotFound):
                continue
            except StoreUnavailable as exc:
                raise StoreFailure(
                    "activate", f"rollback failed at step 'activate': {exc}; re-read the app"
                ) from exc
        return DeployResult(version=target, status=VersionStatus.ACTIVE, urls=urls)
    raise TooManyConflicts(
        f"rollback of app {app_name!r} lost {config.commit_attempts} races; retry"
    )


# -- labels: resolve, extend, delete --------------------------------------------------------------


async def resolve_label(store: Store, app: str, label: str, *, now: Clock = utcnow) -> LabelLookup:
    """Which version of `app` the label answers with now (store read; the ingress uses its table)."""
    versions = await store.list(AppVersion, app=app, ephemeral_label=label)
    return label_lookup(versions, now())


async def extend_label(
    store: Store,
    app: str,
    label: str,
    ttl: str | None,
    *,
    config: EphemeralConfig = DEFAULT_CONFIG,
    now: Clock = utcnow,
) -> AppVersion:
    """Replace the TTL of the live version carrying `label`: new expiry = now + TTL.

    An expired label is refused (LabelExpired: deploy it again); an unknown one is LabelNotFound.
    """
    validate_label(label)
    value, ttl_text = resolve_ttl(ttl, default=config.default_ttl, maximum=config.max_ttl)
    for attempt in range(config.commit_attempts):
        if attempt:
            await _backoff(attempt)
        with _step("extend", "read", f"reading the versions labelled {label!r}"):
            await get_app(store, app)
            versions = await store.list(AppVersion, app=app, ephemeral_label=label)
        found = label_lookup(versions, now())
        if found.state is LabelState.EXPIRED:
            raise LabelExpired(f"ephemeral label {label!r} of app {app!r} has expired")
        if found.version is None:
            raise LabelNotFound(f"ephemeral label {label!r} not found in app {app!r}")
        t = now()
        updated = attrs.evolve(
            found.version, ephemeral_ttl=ttl_text, ephemeral_expires_at=expiry(t, value)
        )
        try:
            return await store.update(updated)
        except (Conflict, NotFound):
            continue
        except StoreUnavailable as exc:
            raise StoreFailure(
                "extend", f"extend failed at step 'extend': {exc}; the old expiry may still hold"
            ) from exc
    raise TooManyConflicts(f"extend of {label!r} lost {config.commit_attempts} races; retry")


async def delete_label(store: Store, app: str, label: str, *, attempts: int = 5) -> list[str]:
    """Delete every version of `app` carrying `label` (expired ones too), with their pools.

    Returns the ids deleted. LabelNotFound when none carries it; CleanupFailed when a version's
    pools could not be cleaned (that version is kept for a retry).
    """
    validate_label(label)
    with _step("delete", "read", f"reading the versions labelled {label!r}"):
        await get_app(store, app)
        versions = await store.list(AppVersion, app=app, ephemeral_label=label)
    if not versions:
        raise LabelNotFound(f"ephemeral label {label!r} not found in app {app!r}")
    deleted: list[str] = []
    for version in versions:
        if await _delete_current(store, version, attempts):
            deleted.append(version.id)
    return deleted


async def _delete_current(store: Store, version: AppVersion, attempts: int) -> bool:
    """Delete a version whatever revision it moved to; False if it was gone already."""
    for _ in range(attempts):
        outcome = await delete_version(store, version)
        if outcome is Deleted.DELETED:
            return True
        if outcome is Deleted.GONE:
            return False
        with _step("delete", "read", f"re-reading version {version.id!r}"):
            try:
                version = await store.get(AppVersion, version.id)
            except NotFound:
                return False
    raise TooManyConflicts(f"version {version.id!r} kept changing while being deleted; retry")


# -- versions -------------------------------------------------------------------------------------


async def get_version(store: Store, app: str, version_id: str) -> AppVersion:
    """A version of `app` (VersionNotFound also when it belongs to another app)."""
    with _step("get version", "read", f"reading version {version_id!r}"):
        try:
            found = await store.get(AppVersion, version_id)
        except NotFound:
            found = None
    if found is None or found.app != app:
        raise VersionNotFound(f"version {version_id!r} not found in app {app!r}")
    return found


async def delete_version_by_id(store: Store, app: str, version_id: str) -> None:
    """Delete a version with its pools; ActiveVersion for the app's active version."""
    version = await get_version(store, app, version_id)
    if not await _delete_current(store, version, 5):
        raise VersionNotFound(f"version {version_id!r} not found in app {app!r}")


async def list_versions(
    store: Store,
    app: str,
    *,
    ephemeral_only: bool = False,
    limit: int | None = None,
    now: Clock = utcnow,
) -> list[VersionView]:
    """The versions of `app`, newest first, with their status; `limit` <= 0 or None: all."""
    with _step("list versions", "read", f"reading app {app!r}"):
        found = await get_app(store, app)
        versions = await store.list(AppVersion, app=app)
    if ephemeral_only:
        versions = [v for v in versions if v.is_ephemeral]
    ordered = sort_newest_first(versions)
    if limit is not None and limit > 0:
        ordered = ordered[:limit]
    t = now()
    return [
        VersionView(version=v, status=version_status(v, found.active_version, t)) for v in ordered
    ]
