"""The entities the store keeps: immutable attrs classes.

Every stored record carries its `revision` (the store's revision of its last write; 0 for a record
not yet stored). The revision is not part of the record's JSON and not part of equality.

Secondary indexes are declared once, here, next to the field, through field metadata:
- `index=True`   equality index (`Store.list(kind, field=value)`); a tuple field indexes each item.
- `ordered=True` ordered index (`Store.range(kind, field, start, end)`); `None` is not indexed.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol, TypeVar

import attrs

INDEX = {"index": True}
ORDERED = {"ordered": True}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Entity(Protocol):
    """What every stored kind provides."""

    KIND: ClassVar[str]

    @property
    def id(self) -> str: ...

    @property
    def revision(self) -> int: ...


E = TypeVar("E", bound=Entity)


class Runtime(enum.StrEnum):
    PROCESS = "process"
    UPSTREAM = "upstream"


class SandboxStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DOWN = "down"  # an upstream that does not answer: re-probed until it does
    STOPPED = "stopped"
    DEAD = "dead"


@attrs.frozen(kw_only=True)
class Concurrency:
    """Scaling knobs of a version. `requests_per_instance` is a scaling target (in-flight work
    per sandbox above which another sandbox is started), not a limit; `max_requests_per_instance`
    is the hard cap (None: no cap; work beyond it queues). `None` elsewhere means the default for
    the kind of version: `max_instances` 20 (ephemeral: 1), `scale_down_delay` 2m (ephemeral:
    15m). See miren_activator.capacity."""

    requests_per_instance: int = 10
    max_requests_per_instance: int | None = None
    max_instances: int | None = None
    min_instances: int = 0
    scale_down_delay: timedelta | None = None

    def effective_max(self, ephemeral: bool) -> int:
        if self.max_instances is not None:
            return self.max_instances
        return 1 if ephemeral else 20

    def effective_scale_down_delay(self, ephemeral: bool) -> timedelta:
        if self.scale_down_delay is not None:
            return self.scale_down_delay
        return timedelta(minutes=15) if ephemeral else timedelta(minutes=2)


@attrs.frozen(kw_only=True)
class VersionSpec:
    """How to run a version: spawn a command (`process`) or use running servers (`upstream`)."""

    runtime: Runtime
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    cwd: str | None = None
    health_path: str | None = "/"
    boot_timeout: timedelta = timedelta(seconds=60)
    urls: tuple[str, ...] = ()
    concurrency: Concurrency = Concurrency()

    def effective_concurrency(self, ephemeral_web: bool) -> Concurrency:
        """The scaling knobs in force, defaults resolved: `ephemeral_web` is a preview's web
        service (one instance, 15 minutes idle by default). An upstream version has at most one
        instance per URL (two on one URL would double-count its work). The hard cap stays None
        when absent (no cap); a target above it is the cap."""
        c = self.concurrency
        max_instances = c.effective_max(ephemeral_web)
        if self.runtime is Runtime.UPSTREAM:
            max_instances = min(max_instances, len(self.urls))
        max_instances = max(1, max_instances)
        cap = c.max_requests_per_instance
        target = max(
            1, c.requests_per_instance if cap is None else min(c.requests_per_instance, cap)
        )
        return Concurrency(
            requests_per_instance=target,
            max_requests_per_instance=None if cap is None else max(1, cap),
            max_instances=max_instances,
            min_instances=min(c.min_instances, max_instances),
            scale_down_delay=c.effective_scale_down_delay(ephemeral_web),
        )

    def problems(self) -> list[str]:
        """What makes this spec unusable, as messages for the user (empty when valid)."""
        out: list[str] = []
        if self.runtime is Runtime.PROCESS and not self.command:
            out.append("spec.command: a process runtime needs a command")
        if self.runtime is Runtime.UPSTREAM:
            if not self.urls:
                out.append("spec.urls: an upstream runtime needs at least one URL")
            for url in self.urls:
                if not (url.startswith("http://") and len(url) > len("http://")):
                    out.append(f"spec.urls: {url!r} is not an http:// URL")
        if self.health_path is not None and not self.health_path.startswith("/"):
            out.append("spec.health_path: must start with /")
        if self.boot_timeout <= timedelta(0):
            out.append("spec.boot_timeout: must be greater than 0")
        c = self.concurrency
        if c.requests_per_instance < 1:
            out.append("spec.concurrency.requests_per_instance: must be at least 1")
        if c.max_requests_per_instance is not None and c.max_requests_per_instance < 1:
            out.append("spec.concurrency.max_requests_per_instance: must be at least 1 (or absent)")
        if c.min_instances < 0:
            out.append("spec.concurrency.min_instances: must not be negative")
        if c.max_instances is not None and c.max_instances < max(1, c.min_instances):
            out.append("spec.concurrency.max_instances: must be at least 1 and >= min_instances")
        if c.scale_down_delay is not None and c.scale_down_delay < timedelta(0):
            out.append("spec.concurrency.scale_down_delay: must not be negative")
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                out.append(f"spec.env: invalid variable name {key!r}")
        return out


@attrs.frozen(kw_only=True)
class Source:
    branch: str | None = None
    commit: str | None = None
    message: str | None = None


@attrs.frozen(kw_only=True)
class App:
    KIND: ClassVar[str] = "app"

    name: str
    active_version: str | None = None
    created_at: datetime = attrs.field(factory=utcnow)
    # Which of its hosts give a browser the loading page during a cold start: previews, all,
    # none (None: the server's ingress.loading_page).
    loading_page: str | None = None
    revision: int = attrs.field(default=0, eq=False)

    @property
    def id(self) -> str:
        return self.name


@attrs.frozen(kw_only=True)
class AppVersion:
    KIND: ClassVar[str] = "app_version"

    id: str
    app: str = attrs.field(metadata=INDEX)
    created_at: datetime = attrs.field(factory=utcnow)
    spec: VersionSpec
    source: Source | None = None
    ephemeral_label: str = attrs.field(default="", metadata=INDEX)
    ephemeral_ttl: str = ""
    ephemeral_expires_at: datetime | None = attrs.field(default=None, metadata=ORDERED)
    revision: int = attrs.field(default=0, eq=False)

    @property
    def is_ephemeral(self) -> bool:
        return self.ephemeral_label != ""

    def expired(self, now: datetime) -> bool:
        """True once an ephemeral version's expiry instant has passed (never for a normal one)."""
        return self.ephemeral_expires_at is not None and now >= self.ephemeral_expires_at


@attrs.frozen(kw_only=True)
class HttpRoute:
    KIND: ClassVar[str] = "http_route"

    host: str
    app: str = attrs.field(metadata=INDEX)
    default: bool = attrs.field(default=False, metadata=INDEX)
    service: str = "web"
    request_timeout: timedelta | None = None
    revision: int = attrs.field(default=0, eq=False)

    @property
    def id(self) -> str:
        return self.host

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*.")


@attrs.frozen(kw_only=True)
class SandboxPool:
    KIND: ClassVar[str] = "sandbox_pool"

    id: str
    app: str = attrs.field(metadata=INDEX)
    service: str = "web"
    spec: VersionSpec
    ephemeral: bool = False
    referenced_by_versions: tuple[str, ...] = attrs.field(default=(), metadata=INDEX)
    desired_instances: int = 0
    consecutive_crashes: int = 0
    last_crash_at: datetime | None = None
    cooldown_until: datetime | None = None
    owner: str = ""  # the node that runs and leases its sandboxes (see miren_activator.cluster)
    owner_lease: int = 0  # ... in its membership under this store lease (0: none, any may take)
    created_at: datetime = attrs.field(factory=utcnow)
    revision: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True)
class Node:
    """A live `miren serve` node: written under the node's store lease, so it disappears when
    the node stops renewing it (dies, freezes, loses the store)."""

    KIND: ClassVar[str] = "node"

    id: str  # node.name
    advertise: str  # host:port where other nodes reach its proxy
    lease: int  # the store lease it lives under: one per membership (a re-join gets a new one)
    started_at: datetime = attrs.field(factory=utcnow)
    revision: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True)
class Leader:
    """A job one node at a time runs (`gc`): held by `node` under its store lease."""

    KIND: ClassVar[str] = "leader"

    id: str  # the job
    node: str
    lease: int
    since: datetime = attrs.field(factory=utcnow)
    revision: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True)
class Sandbox:
    KIND: ClassVar[str] = "sandbox"

    id: str
    pool: str = attrs.field(metadata=INDEX)
    app: str = attrs.field(metadata=INDEX)
    version: str = attrs.field(metadata=INDEX)
    node: str = ""
    status: SandboxStatus = SandboxStatus.PENDING
    url: str = ""
    pid: int | None = None
    started_at: datetime = attrs.field(factory=utcnow)
    last_activity: datetime | None = None
    reason: str = ""  # why it ended or is out of service (`exited with status 3`); "" otherwise
    revision: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True)
class TlsCertificate:
    """A certificate the edge obtained on demand (ACME) for one name, with its key: kept in the
    store so a restart or another node serves it instead of ordering again."""

    KIND: ClassVar[str] = "tls_certificate"

    name: str
    chain_pem: str = attrs.field(repr=False)
    key_pem: str = attrs.field(repr=False)
    not_after: datetime
    serial: str  # hex
    issued_at: datetime = attrs.field(factory=utcnow)
    revision: int = attrs.field(default=0, eq=False)

    @property
    def id(self) -> str:
        return self.name


@attrs.frozen(kw_only=True)
class AcmeAccount:
    """The edge's account at one ACME directory (its key signs every order)."""

    KIND: ClassVar[str] = "acme_account"

    id: str  # a digest of the directory URL
    directory: str
    key_pem: str = attrs.field(repr=False)
    uri: str = ""
    revision: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True)
class PreviewTemplate:
    """What a pull request of an app deploys as its preview (GitHub webhooks): the spec (env
    values may use `{pr}`, `{branch}`, `{sha}`), how the label is made (`branch`: the head
    branch, normalised; `pr`: `pr-<number>`), the TTL, and the secret GitHub signs with."""

    KIND: ClassVar[str] = "preview_template"

    app: str
    spec: VersionSpec
    label: str = "branch"
    ttl: str | None = None
    webhook_secret: str = attrs.field(default="", repr=False)
    revision: int = attrs.field(default=0, eq=False)

    @property
    def id(self) -> str:
        return self.app


@attrs.frozen(kw_only=True)
class WebhookDelivery:
    """A webhook delivery already applied (`X-GitHub-Delivery`): a redelivery changes nothing."""

    KIND: ClassVar[str] = "webhook_delivery"

    id: str
    app: str = attrs.field(metadata=INDEX)
    received_at: datetime = attrs.field(factory=utcnow)
    revision: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True)
class Protection:
    """Who may open an app's hosts: `mode` none, previews (its previews only) or all; a shared
    password (a salted scrypt hash, never the password) and a bypass token for CI and bots (its
    SHA-256). The cookie it grants is signed with the `EdgeSecret` "cookie-key"."""

    KIND: ClassVar[str] = "protection"

    app: str
    mode: str = "none"
    password_hash: str = attrs.field(default="", repr=False)
    bypass_hash: str = attrs.field(default="", repr=False)
    revision: int = attrs.field(default=0, eq=False)

    @property
    def id(self) -> str:
        return self.app


@attrs.frozen(kw_only=True)
class EdgeSecret:
    """A secret the nodes share through the store (the key protection cookies are signed with)."""

    KIND: ClassVar[str] = "edge_secret"

    id: str
    value: str = attrs.field(repr=False)
    revision: int = attrs.field(default=0, eq=False)


KINDS: dict[str, type[Any]] = {
    cls.KIND: cls
    for cls in (
        App, AppVersion, HttpRoute, SandboxPool, Sandbox, TlsCertificate, AcmeAccount,
        PreviewTemplate, WebhookDelivery, Protection, EdgeSecret, Node, Leader,
    )
}  # fmt: skip


_INDEXED: dict[type[Any], tuple[str, ...]] = {}
_ORDERED: dict[type[Any], tuple[str, ...]] = {}


def indexed_fields(kind: type[Any]) -> tuple[str, ...]:
    """Fields with an equality index, in declaration order."""
    found = _INDEXED.get(kind)
    if found is None:
        found = _INDEXED[kind] = tuple(
            f.name for f in attrs.fields(kind) if f.metadata.get("index")
        )
    return found


def ordered_fields(kind: type[Any]) -> tuple[str, ...]:
    """Fields with an ordered index."""
    found = _ORDERED.get(kind)
    if found is None:
        found = _ORDERED[kind] = tuple(
            f.name for f in attrs.fields(kind) if f.metadata.get("ordered")
        )
    return found


def index_values(entity: Any, field: str) -> tuple[str, ...]:
    """The index keys an entity has under an equality-indexed field, as strings."""
    value = getattr(entity, field)
    if isinstance(value, tuple):
        return tuple(index_text(v) for v in value)
    return (index_text(value),)


def index_text(value: object) -> str:
    """How a value of an indexed field is written in an index key (and compared in `list`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def ordered_text(value: datetime) -> str:
    """A fixed-width, lexically ordered form of an ordered-index value (µs since the epoch)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    us = int(value.timestamp() * 1_000_000)
    return f"{us:020d}"


_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    """`<prefix>-<time-ordered base36 + random>`: ids made later sort later (within a process)."""
    t = time.time_ns() // 1000
    stamp = ""
    while t:
        t, r = divmod(t, 36)
        stamp = _ALPHABET[r] + stamp
    rand = "".join(_ALPHABET[b % 36] for b in os.urandom(6))
    return f"{prefix}-{stamp}{rand}"
