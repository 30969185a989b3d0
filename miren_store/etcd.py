"""The etcd backend of the Store, on aetcd's asyncio gRPC client.

Theory of operation
-------------------
Key layout (P is the key prefix, `/miren` by default; `{value}` is percent-encoded, so a `/` in a
value cannot break the layout, and the empty string is a valid value):

    P/e/{kind}/{id}                              -> the entity's JSON (codec.encode)
    P/i/{kind}/{field}/{value}/{id}              -> b""  equality index, one key per tuple item
    P/o/{kind}/{field}/{ordered_text(value)}/{id} -> b"" ordered index (a None value: no key)

An entity's revision is the etcd mod_revision of its entity key. Ids are the tail of the key, so
a prefix range over `P/e/{kind}/` returns a kind's entities ordered by id (etcd orders keys by
bytes; UTF-8 byte order is code-point order, the order of Python's `sorted`).

Writes. Every write is ONE etcd transaction that puts/deletes the entity key AND its index keys,
guarded by compares on the entity keys: Create compares create_revision == 0; Update compares
mod_revision == the revision the caller read; Delete compares mod_revision == the revision read
just before (update and delete first read the current value, to know which old index keys to
remove); Check(rev) compares mod_revision == rev (rev 0: create_revision == 0). So an index key
exists iff the entity it names exists with that value: index and entity never disagree. When the
compares fail, the transaction's failure branch reads the entity keys in the same atomic step, and
`classify` (pure, shared with the pre-check) decides Conflict vs NotFound from that state.

Reads. `get` is one range. `list` with filters ranges the index prefixes (one transaction), then
fetches the entities at that same revision in transactions of range requests (chunked to the
server's --max-txn-ops), and re-checks the fetched values, so it never returns an entity that
does not match. `range` does the same on the ordered index. `snapshot` is one transaction of
prefix ranges, consistent at its header revision.

Watch. One gRPC watch stream per `watch()` over `P/e/`, from `since + 1`. etcd delivers all the
events of one revision in one response (no fragmenting is requested), and the iterator yields a
whole response before reading the next; so when the stream breaks, every event up to `last` (the
revision of the last event seen) was yielded, and re-watching from `last + 1` loses and repeats
nothing. A compacted start revision raises `Resync`.

Endpoints. `host:port` over TCP, or `unix:/abs/path/name:N` for an etcd on a unix socket (the
embedded one listens only there); `parse_endpoints` turns either into the (host, port) pair aetcd
joins into its gRPC target, see `miren_store.backends`. Everything below is the same for both.

Faults. Every call runs under one deadline (`timeout`): each RPC gets the remaining time as its
gRPC deadline, and the whole operation is also wrapped in `asyncio.timeout` so nothing can hang
on a frozen etcd. Connection errors are retried with backoff inside the deadline, rotating
endpoints: reads always; writes only when the request certainly never left (a refused
connection), because a write that reached etcd and then lost its answer may have been applied:
that is StoreUnavailable, and the caller re-reads. Foreign exceptions (gRPC, aetcd, OSError,
timeouts) become `miren_store.errors` in one place, `_translate`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

# We spawn children (etcd, sandboxes) but never fork without exec: gRPC's fork handlers are not
# needed, and without this it prints "skipping fork() handlers" on every spawn.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import aetcd
import attrs
from aetcd import rpc

from miren_store.backends import parse_endpoints
from miren_store.codec import decode, encode
from miren_store.entities import (
    KINDS,
    E,
    index_text,
    index_values,
    indexed_fields,
    ordered_fields,
    ordered_text,
)
from miren_store.errors import Conflict, NotFound, Resync, StoreError, StoreUnavailable
from miren_store.store import (
    Change,
    Check,
    Create,
    Delete,
    Op,
    Snapshot,
    Store,
    StoreStats,
    Update,
    check_query,
    check_range,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# etcd's default --max-txn-ops: the most compares, success ops or failure ops in one transaction.
DEFAULT_MAX_TXN_OPS = 128
# Rounds of read + transaction for a commit whose only failed compare is the revision an
# unconditional delete read just before (someone wrote in between): then it simply runs again.
_COMMIT_ROUNDS = 8
# Rounds of a list/range whose fixed-revision fetch hit a compaction in between.
_READ_ROUNDS = 3

# gRPC channel options. Reconnect back-off is kept short (gRPC's default grows to 120 s, which
# would keep calls failing long after etcd is back). Keepalive pings on streams detect a dead
# peer under an idle watch; etcd refuses pings more often than every 5 s (--grpc-keepalive-min-
# time), hence 10 s. No HTTP proxy: endpoints are reached directly.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.enable_http_proxy": 0,
    "grpc.max_receive_message_length": -1,
}


@attrs.frozen
class RetryPolicy:
    """Retries of connection errors inside one call's deadline (and the watch's reconnects).

    `attempts` counts tries per call (1 = no retry); delays double from `base_delay` up to
    `max_delay`, with jitter, and never run past the call's deadline.
    """

    attempts: int = 4
    base_delay: float = 0.05
    max_delay: float = 1.0

    def delay(self, failures: int) -> float:
        """The pause after `failures` consecutive failures (1, 2, ...)."""
        # The exponent is capped: a watch may count failures for as long as etcd is down.
        full = min(self.max_delay, self.base_delay * float(1 << min(max(0, failures - 1), 32)))
        return full * random.uniform(0.5, 1.0)


# -- key layout (pure) ------------------------------------------------------------------------

_ORDERED_WIDTH = len(ordered_text(datetime(2000, 1, 1, tzinfo=UTC)))  # fixed: 20 characters


def _range_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, range_end) exactly the keys starting with `prefix`."""
    out = bytearray(prefix)
    for i in reversed(range(len(out))):
        if out[i] < 0xFF:
            out[i] += 1
            return bytes(out[: i + 1])
    return b"\0"


@attrs.frozen
class KeyLayout:
    """Where entities and index entries live under a prefix (see the module docstring)."""

    prefix: str = "/miren"

    def _key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    def entity(self, kind: type[Any], id: str) -> bytes:
        return self._key("e", kind.KIND, id)

    def entities(self, kind: type[Any] | None = None) -> bytes:
        """The prefix of one kind's entity keys, or of all entity keys."""
        return self._key("e", kind.KIND, "") if kind is not None else self._key("e", "")

    def index(self, kind: type[Any], field: str, text: str) -> bytes:
        """The prefix of the equality-index keys of `field` == `text` (an `index_text`)."""
        return self._key("i", kind.KIND, field, quote(text, safe=""), "")

    def ordered(self, kind: type[Any], field: str) -> bytes:
        return self._key("o", kind.KIND, field, "")

    def ordered_bounds(
        self, kind: type[Any], field: str, start: datetime | None, end: datetime | None
    ) -> tuple[bytes, bytes]:
        """[lo, hi) over the ordered index covering values in [start, end)."""
        base = self.ordered(kind, field)
        lo = base + ordered_text(start).encode() if start is not None else base
        hi = base + ordered_text(end).encode() if end is not None else _range_end(base)
        return lo, hi

    def index_keys(self, entity: Any) -> frozenset[bytes]:
        """Every index key an entity has (equality and ordered)."""
        kind = type(entity)
        keys: set[bytes] = set()
        for f in indexed_fields(kind):
            for text in index_values(entity, f):
                keys.add(self.index(kind, f, text) + entity.id.encode())
        for f in ordered_fields(kind):
            value = getattr(entity, f)
            if value is not None:
                tail = f"{ordered_text(value)}/{entity.id}".encode()
                keys.add(self.ordered(kind, f) + tail)
        return frozenset(keys)

    def id_after(self, key: bytes, prefix: bytes) -> str:
        """The entity id at the tail of an equality-index key listed under `prefix` (ids may
        hold `/`: the id is everything after the prefix)."""
        return key[len(prefix) :].decode()

    def id_of_ordered_key(self, key: bytes, kind: type[Any], field: str) -> str:
        """The entity id at the tail of an ordered-index key (after the fixed-width value)."""
        return key[len(self.ordered(kind, field)) + _ORDERED_WIDTH + 1 :].decode()

    def parse_entity_key(self, key: bytes) -> tuple[str, str] | None:
        """(kind name, id) of an entity key, or None for a key outside the layout."""
        base = self.entities()
        if not key.startswith(base):
            return None
        kind, sep, id = key[len(base) :].decode().partition("/")
        return (kind, id) if sep else None


# -- commit planning (pure) -------------------------------------------------------------------


@attrs.frozen
class Cond:
    """A compare on an entity key: its `target` ("create" or "mod") revision equals `revision`."""

    key: bytes
    target: str
    revision: int


@attrs.frozen
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@attrs.frozen
class Del:
    key: bytes


@attrs.frozen
class Plan:
    """One transaction: `conds` all hold -> apply `writes`; else read `read_keys`."""

    conds: tuple[Cond, ...]
    writes: tuple[Put | Del, ...]
    read_keys: tuple[bytes, ...]


def _op_target(op: Op) -> tuple[type[Any], str]:
    if isinstance(op, Create | Update):
        return type(op.entity), op.entity.id
    return op.kind, op.id


def check_unique(ops: Sequence[Op]) -> None:
    """A commit writes each entity at most once (etcd refuses a key twice in one transaction)."""
    seen: set[tuple[str, str]] = set()
    for op in ops:
        if isinstance(op, Check):
            continue
        kind, id = _op_target(op)
        if (kind.KIND, id) in seen:
            raise ValueError(f"commit writes {kind.KIND} {id!r} twice")
        seen.add((kind.KIND, id))


def classify(ops: Sequence[Op], revisions: Mapping[tuple[str, str], int]) -> StoreError | None:
    """The error of the first op whose condition fails against `revisions` ((kind, id) ->
    mod_revision; absent = the entity does not exist), or None when all hold.

    An unconditional Delete holds whenever the entity exists (its transaction compare uses the
    revision read just before; a failure there alone means "read again", not an error).
    """
    for op in ops:
        kind, id = _op_target(op)
        cur = revisions.get((kind.KIND, id), 0)
        name = f"{kind.KIND} {id!r}"
        if isinstance(op, Create):
            if cur:
                return Conflict(f"{name} already exists")
        elif isinstance(op, Update):
            if not cur:
                return NotFound(f"{name} not found")
            if cur != op.entity.revision:
                return Conflict(f"{name} changed (revision {cur}, expected {op.entity.revision})")
        elif isinstance(op, Delete):
            if not cur:
                return NotFound(f"{name} not found")
            if op.revision is not None and cur != op.revision:
                return Conflict(f"{name} changed (revision {cur}, expected {op.revision})")
        elif cur != op.revision:
            if op.revision == 0:
                return Conflict(f"{name} already exists")
            if not cur:
                return NotFound(f"{name} not found")
            return Conflict(f"{name} changed (revision {cur}, expected {op.revision})")
    return None


def plan_commit(
    layout: KeyLayout, ops: Sequence[Op], current: Mapping[tuple[str, str], tuple[int, bytes]]
) -> Plan:
    """The transaction for `ops`, given the current (revision, value) of every entity that an
    Update or Delete touches (which `classify` has accepted). Index keys are diffed against the
    current value so that an entity's index keys change in the same transaction as the entity.
    """
    conds: list[Cond] = []
    writes: list[Put | Del] = []
    keys: list[bytes] = []
    for op in ops:
        kind, id = _op_target(op)
        key = layout.entity(kind, id)
        if key not in keys:
            keys.append(key)
        if isinstance(op, Create):
            conds.append(Cond(key, "create", 0))
            writes.append(Put(key, encode(op.entity), op.lease))
            writes.extend(Put(k, b"", op.lease) for k in sorted(layout.index_keys(op.entity)))
        elif isinstance(op, Check):
            target = "create" if op.revision == 0 else "mod"
            conds.append(Cond(key, target, op.revision))
        else:
            rev, raw = current[(kind.KIND, id)]
            old = layout.index_keys(decode(kind, raw, rev))
            conds.append(Cond(key, "mod", rev))
            if isinstance(op, Update):
                new = layout.index_keys(op.entity)
                writes.append(Put(key, encode(op.entity)))
                writes.extend(Del(k) for k in sorted(old - new))
                writes.extend(Put(k, b"") for k in sorted(new - old))
            else:
                writes.append(Del(key))
                writes.extend(Del(k) for k in sorted(old))
    return Plan(tuple(conds), tuple(writes), tuple(keys))


def _unsent(details: str) -> bool:
    """True when gRPC says the request never reached a server (safe to retry even a write).

    A unix socket that is gone or stale reads "failed to connect to all addresses; ... No such
    file or directory" / "... Connection refused", so it counts too."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connection refused" in lowered


class _Retryable(StoreUnavailable):
    """A connection error; `unsent`: the request certainly never reached etcd."""

    def __init__(self, message: str, *, unsent: bool) -> None:
        super().__init__(message)
        self.unsent = unsent


class _Reauthenticate(_Retryable):
    """etcd no longer knows the client's auth token: a new client authenticates again."""


def _is_auth_error(details: str) -> bool:
    lowered = details.lower()
    return any(
        word in lowered
        for word in ("authentication failed", "user name is empty", "permission denied",
                     "invalid auth", "auth token")
    )  # fmt: skip


class _Compacted(StoreError):
    """A read at a fixed revision that etcd has compacted since (the read starts over)."""


def _translate(exc: BaseException) -> StoreError:
    """THE place where foreign exceptions become store errors."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, rpc.AioRpcError):
        code, details = exc.code(), exc.details() or ""
        if code == rpc.StatusCode.UNAVAILABLE:
            return _Retryable(f"etcd unavailable: {details}", unsent=_unsent(details))
        if code == rpc.StatusCode.DEADLINE_EXCEEDED:
            return StoreUnavailable("etcd did not answer within the timeout")
        if code == rpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return NotFound("lease not found (expired or revoked)")
        if code == rpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in details:
            # (etcd restarted, or the token expired): authenticate again and resend; etcd
            # refused the request, so even a write is safe to send again.
            return _Reauthenticate(f"etcd: {details}", unsent=True)
        if code in (rpc.StatusCode.UNAUTHENTICATED, rpc.StatusCode.PERMISSION_DENIED,
                    rpc.StatusCode.INVALID_ARGUMENT) and _is_auth_error(details):  # fmt: skip
            return StoreUnavailable(
                f"etcd refused the credentials ({details}): check store_options.etcd_user "
                "and etcd_password"
            )
        if code == rpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return _Compacted(details)
        if code in (rpc.StatusCode.INVALID_ARGUMENT, rpc.StatusCode.OUT_OF_RANGE):
            # A request etcd will never accept (too many ops, a future revision): not a fault.
            return StoreError(f"etcd rejected the request: {details}")
        return StoreUnavailable(f"etcd error {code.name}: {details}")
    if isinstance(exc, aetcd.exceptions.ConnectionFailedError):
        return _Retryable(f"etcd unavailable: {exc}", unsent=False)
    if isinstance(exc, asyncio.InvalidStateError):
        # grpc.aio raises it on a write to a stream whose RPC has already ended (connection lost).
        return _Retryable(f"etcd stream ended: {exc}", unsent=False)
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return StoreUnavailable("etcd did not answer within the timeout")
    if isinstance(exc, aetcd.exceptions.ClientError | OSError):
        if _is_auth_error(str(exc)):  # (aetcd authenticates when it connects)
            return StoreUnavailable(
                f"etcd refused the credentials ({exc}): check store_options.etcd_user and "
                "etcd_password"
            )
        return StoreUnavailable(f"etcd client error: {exc}")
    return StoreError(f"unexpected etcd client failure: {exc!r}")


# -- gRPC message builders --------------------------------------------------------------------


def _range_op(
    key: bytes, end: bytes = b"", *, revision: int = 0, keys_only: bool = False, limit: int = 0
) -> Any:
    return rpc.RequestOp(
        request_range=rpc.RangeRequest(
            key=key, range_end=end, revision=revision, keys_only=keys_only, limit=limit
        )
    )


def _to_txn(plan: Plan) -> Any:
    compares = [
        # Only the compared field is set: the revision fields form a protobuf oneof, and setting
        # another one (even to 0) would switch what etcd compares.
        rpc.Compare(
            key=c.key,
            target=rpc.Compare.CREATE,
            result=rpc.Compare.EQUAL,
            create_revision=c.revision,
        )
        if c.target == "create"
        else rpc.Compare(
            key=c.key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=c.revision
        )
        for c in plan.conds
    ]
    success = [
        rpc.RequestOp(request_put=rpc.PutRequest(key=w.key, value=w.value, lease=w.lease))
        if isinstance(w, Put)
        else rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=w.key))
        for w in plan.writes
    ]
    failure = [_range_op(k, keys_only=True) for k in plan.read_keys]
    return rpc.TxnRequest(compare=compares, success=success, failure=failure)


_WATCH_RETRY_CAP = 0.25  # seconds between attempts to resume a broken watch


class EtcdStore(Store):
    """The Store on etcd. Connects lazily: constructing it never blocks and never fails for a
    down etcd; calls raise StoreUnavailable until etcd answers."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        prefix: str = "/miren",
        timeout: float = 2.0,
        retry: RetryPolicy | None = None,
        stats: StoreStats | None = None,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        user: str = "",
        password: str = "",
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        self.endpoints = parse_endpoints(endpoints)
        self.layout = KeyLayout(prefix.rstrip("/"))
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.stats = stats if stats is not None else StoreStats()
        self.max_txn_ops = max_txn_ops
        if bool(user) != bool(password):
            raise ValueError("etcd authentication needs both a user and a password")
        self._user = user or None
        self._password = password or None
        self._clients: dict[int, Any] = {}  # endpoint index -> aetcd.Client, made in the loop
        self._current = 0
        self._watches_down = 0  # watches whose stream is broken (see watch_healthy)
        self._healthy = True
        self._closed = False
        self._streams: set[Any] = set()  # open watch calls, cancelled by close()
        self._shared = True
        self._closing: set[asyncio.Task[None]] = set()  # clients being closed (re-auth)

    @property
    def shared(self) -> bool:
        return self._shared

    @shared.setter
    def shared(self, value: bool) -> None:
        """False for a store only this process uses (the embedded etcd: see backends)."""
        self._shared = value

    def __repr__(self) -> str:
        eps = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        state = "closed" if self._closed else ("healthy" if self._healthy else "unavailable")
        return f"<EtcdStore {eps} prefix={self.layout.prefix} {state} watches={len(self._streams)}>"

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def watch_healthy(self) -> bool:
        """False while any watch's stream is broken (it keeps retrying to resume)."""
        return self._watches_down == 0

    # -- plumbing -------------------------------------------------------------------------------

    async def _client(self) -> Any:
        """The client of the current endpoint; created here, inside the running loop, because a
        gRPC channel is bound to the loop that made it. connect() authenticates when the
        store has a user (one Authenticate call), else does no I/O."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        index = self._current
        client = self._clients.get(index)
        if client is None:
            host, port = self.endpoints[index]
            client = aetcd.Client(
                host=host,
                port=port,
                username=self._user,
                password=self._password,
                timeout=self.timeout,
                options=_CHANNEL_OPTIONS,
            )
            self._clients[index] = client
        await client.connect()
        return client

    def _drop_client(self, client: Any) -> None:
        """Forget `client` (its auth token is no longer valid): the next call makes a new one,
        which authenticates. Only that client: another call may have replaced it already.
        It is closed in the background."""
        if client is None:
            return
        for index, known in builtins.list(self._clients.items()):
            if known is client:
                del self._clients[index]
                task = asyncio.get_running_loop().create_task(self._close_client(client))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_client(self, client: Any) -> None:
        try:
            await client.close()
        except Exception as exc:  # closing is best effort: the channel may be broken
            log.debug("closing an etcd client failed: %r", exc)

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    @contextlib.asynccontextmanager
    async def _op(self, op: str) -> AsyncIterator[float]:
        """One store operation: its deadline (yielded, loop time), the asyncio.timeout belt
        around it, stats and health. Every public call runs inside exactly one of these."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                yield deadline
        except (NotFound, Conflict) as exc:
            self._healthy = True  # etcd answered
            self.stats.record(op, "not_found" if isinstance(exc, NotFound) else "conflict")
            raise
        except StoreUnavailable as exc:
            self._unavailable(op)
            raise StoreUnavailable(str(exc)) from exc  # the public type, not _Retryable
        except TimeoutError as exc:  # the belt fired
            self._unavailable(op)
            self._rotate()
            raise StoreUnavailable(f"etcd did not answer {op} within {self.timeout:g} s") from exc
        except StoreError:
            raise
        else:
            self._healthy = True
            self.stats.record(op, "ok")

    def _unavailable(self, op: str) -> None:
        self._healthy = False
        self.stats.record(op, "unavailable")

    async def _rpc(
        self, deadline: float, send: Callable[[Any, float], Awaitable[T]], *, idempotent: bool
    ) -> T:
        """Send one request with the remaining time as its gRPC deadline; retry connection
        errors (with backoff, rotating endpoints) while attempts and time remain. A non-
        idempotent request is retried only if it certainly never reached etcd."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StoreUnavailable(f"etcd did not answer within {self.timeout:g} s")
            client = None
            try:
                client = await self._client()
                return await send(client, remaining)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = _translate(exc)
                if isinstance(err, _Reauthenticate):
                    self._drop_client(client)  # (the next one authenticates)
                if isinstance(err, StoreUnavailable):
                    # Unreachable or frozen: this call's retry, or the next call, tries the next
                    # endpoint (a no-op with one endpoint, whose channel reconnects by itself).
                    self._rotate()
                if not isinstance(err, _Retryable):
                    raise err from exc
                failures += 1
                if failures >= self.retry.attempts or not (idempotent or err.unsent):
                    raise err from exc
                pause = self.retry.delay(failures)
                if loop.time() + pause >= deadline:
                    raise err from exc
                await asyncio.sleep(pause)

    async def _range(self, deadline: float, request: Any) -> Any:
        async def send(c: Any, t: float) -> Any:
            return await c.kvstub.Range(request, timeout=t, metadata=c.metadata)

        return await self._rpc(deadline, send, idempotent=True)

    async def _txn(self, deadline: float, request: Any, *, idempotent: bool) -> Any:
        for part in (request.compare, request.success, request.failure):
            if len(part) > self.max_txn_ops:
                raise ValueError(
                    f"the transaction needs {len(part)} etcd operations; the server allows "
                    f"{self.max_txn_ops} (etcd --max-txn-ops)"
                )

        async def send(c: Any, t: float) -> Any:
            return await c.kvstub.Txn(request, timeout=t, metadata=c.metadata)

        return await self._rpc(deadline, send, idempotent=idempotent)

    def _decode_kv(self, kind: type[E], kv: Any) -> E:
        return decode(kind, kv.value, kv.mod_revision)

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, kind: type[E], id: str) -> E:
        async with self._op("get") as deadline:
            resp = await self._range(deadline, rpc.RangeRequest(key=self.layout.entity(kind, id)))
            if not resp.kvs:
                raise NotFound(f"{kind.KIND} {id!r} not found")
            return self._decode_kv(kind, resp.kvs[0])

    async def list(self, kind: type[E], **where: object) -> builtins.list[E]:
        check_query(kind, where)
        async with self._op("list") as deadline:
            if not where:
                base = self.layout.entities(kind)
                req = rpc.RangeRequest(key=base, range_end=_range_end(base))
                resp = await self._range(deadline, req)
                return [self._decode_kv(kind, kv) for kv in resp.kvs]
            wanted = {f: index_text(v) for f, v in where.items()}
            prefixes = [self.layout.index(kind, f, text) for f, text in wanted.items()]

            def matches(entity: E) -> bool:
                return all(text in index_values(entity, f) for f, text in wanted.items())

            for _ in range(_READ_ROUNDS):
                rows = [_range_op(p, _range_end(p), keys_only=True) for p in prefixes]
                resp = await self._txn(deadline, rpc.TxnRequest(success=rows), idempotent=True)
                id_sets = [
                    {self.layout.id_after(kv.key, p) for kv in r.response_range.kvs}
                    for p, r in zip(prefixes, resp.responses, strict=True)
                ]
                ids = sorted(set.intersection(*id_sets))
                try:
                    found = await self._fetch(deadline, kind, ids, resp.header.revision)
                except _Compacted:
                    continue
                return [e for e in found if matches(e)]
            raise StoreUnavailable("etcd kept compacting the revision being read")

    async def range(
        self,
        kind: type[E],
        field: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[E]:
        check_range(kind, field)
        if limit is not None and limit <= 0:
            return []
        lo_t = ordered_text(start) if start is not None else None
        hi_t = ordered_text(end) if end is not None else None

        def inside(entity: E) -> bool:
            value = getattr(entity, field)
            if value is None:
                return False
            text = ordered_text(value)
            return (lo_t is None or text >= lo_t) and (hi_t is None or text < hi_t)

        async with self._op("range") as deadline:
            lo, hi = self.layout.ordered_bounds(kind, field, start, end)
            for _ in range(_READ_ROUNDS):
                req = rpc.RangeRequest(key=lo, range_end=hi, keys_only=True, limit=limit or 0)
                resp = await self._range(deadline, req)
                ids = [self.layout.id_of_ordered_key(kv.key, kind, field) for kv in resp.kvs]
                try:
                    found = await self._fetch(deadline, kind, ids, resp.header.revision)
                except _Compacted:
                    continue
                return [e for e in found if inside(e)]
            raise StoreUnavailable("etcd kept compacting the revision being read")

    async def _fetch(
        self, deadline: float, kind: type[E], ids: Iterable[str], revision: int
    ) -> builtins.list[E]:
        """The entities `ids` (in that order, missing ones skipped), all read at `revision`, the
        revision of the index read that named them: consistent with it even across chunks."""
        keys = [self.layout.entity(kind, i) for i in ids]
        out: builtins.list[E] = []
        for at in range(0, len(keys), self.max_txn_ops):
            chunk = keys[at : at + self.max_txn_ops]
            txn = rpc.TxnRequest(success=[_range_op(k, revision=revision) for k in chunk])
            resp = await self._txn(deadline, txn, idempotent=True)
            for r in resp.responses:
                out.extend(self._decode_kv(kind, kv) for kv in r.response_range.kvs)
        return out

    async def snapshot(self, kinds: Sequence[type[Any]]) -> Snapshot:
        async with self._op("snapshot") as deadline:
            bases = [self.layout.entities(k) for k in kinds]
            txn = rpc.TxnRequest(success=[_range_op(b, _range_end(b)) for b in bases])
            resp = await self._txn(deadline, txn, idempotent=True)
            ents: builtins.list[Any] = []
            for kind, r in zip(kinds, resp.responses, strict=True):
                ents.extend(self._decode_kv(kind, kv) for kv in r.response_range.kvs)
            return Snapshot(revision=resp.header.revision, entities=tuple(ents))

    # -- writes ---------------------------------------------------------------------------------

    async def create(self, entity: E) -> E:
        async with self._op("create") as deadline:
            rev = await self._commit(deadline, [Create(entity)])
        return attrs.evolve(entity, revision=rev)  # type: ignore[misc]

    async def update(self, entity: E) -> E:
        async with self._op("update") as deadline:
            rev = await self._commit(deadline, [Update(entity)])
        return attrs.evolve(entity, revision=rev)  # type: ignore[misc]

    async def delete(self, kind: type[Any], id: str, *, revision: int | None = None) -> None:
        async with self._op("delete") as deadline:
            await self._commit(deadline, [Delete(kind, id, revision)])

    # -- leases ---------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=max(1, ttl), ID=0)

        async def send(c: Any, t: float) -> Any:
            return await c.leasestub.LeaseGrant(request, timeout=t, metadata=c.metadata)

        async with self._op("grant_lease") as deadline:
            # (a grant whose answer was lost leaves a lease that simply expires: retry it)
            reply = await self._rpc(deadline, send, idempotent=True)
        return int(reply.ID)

    async def keep_alive(self, lease: int) -> int:
        async def send(c: Any, t: float) -> Any:
            call = c.leasestub.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=t, metadata=c.metadata
            )
            async for reply in call:
                return reply
            raise StoreUnavailable("etcd ended the keep-alive stream without an answer")

        async with self._op("keep_alive") as deadline:
            reply = await self._rpc(deadline, send, idempotent=True)
            if reply.TTL <= 0:
                raise NotFound(f"lease {lease:x} not found (expired or revoked)")
        return int(reply.TTL)

    async def revoke_lease(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)

        async def send(c: Any, t: float) -> Any:
            return await c.leasestub.LeaseRevoke(request, timeout=t, metadata=c.metadata)

        with contextlib.suppress(NotFound):
            async with self._op("revoke_lease") as deadline:
                await self._rpc(deadline, send, idempotent=True)

    async def commit(self, ops: Sequence[Op]) -> int:
        ops = builtins.list(ops)
        check_unique(ops)
        async with self._op("commit") as deadline:
            return await self._commit(deadline, ops)

    async def _commit(self, deadline: float, ops: Sequence[Op]) -> int:
        # Updates and deletes need the current value: its index keys are the ones to remove.
        # When reading anyway, every op's entity is read (same round trip), so the pre-check
        # sees every condition; creates and checks alone go straight to the transaction.
        must_read = any(isinstance(o, Update | Delete) for o in ops)
        targets = [_op_target(o) for o in ops]
        for _ in range(_COMMIT_ROUNDS):
            current: dict[tuple[str, str], tuple[int, bytes]] = {}
            if must_read:
                current = await self._read_current(deadline, targets)
                failed = classify(ops, {k: rev for k, (rev, _) in current.items()})
                if failed is not None:
                    raise failed
            plan = plan_commit(self.layout, ops, current)
            resp = await self._txn(deadline, _to_txn(plan), idempotent=False)
            if resp.succeeded:
                return int(resp.header.revision)
            state: dict[tuple[str, str], int] = {}
            for r in resp.responses:
                for kv in r.response_range.kvs:
                    parsed = self.layout.parse_entity_key(kv.key)
                    if parsed is not None:
                        state[parsed] = kv.mod_revision
            failed = classify(ops, state)
            if failed is not None:
                raise failed
            # Only an unconditional delete's freshly read revision moved on: read again.
        raise Conflict("the entities kept changing while the commit was retried")

    async def _read_current(
        self, deadline: float, targets: Sequence[tuple[type[Any], str]]
    ) -> dict[tuple[str, str], tuple[int, bytes]]:
        """(kind, id) -> (mod_revision, value) of the existing ones among `targets`, at one
        revision (one range, or one transaction of ranges)."""
        keys = list(dict.fromkeys(self.layout.entity(kind, id) for kind, id in targets))
        if len(keys) == 1:
            kvs = (await self._range(deadline, rpc.RangeRequest(key=keys[0]))).kvs
        else:
            txn = rpc.TxnRequest(success=[_range_op(k) for k in keys])
            resp = await self._txn(deadline, txn, idempotent=True)
            kvs = [kv for r in resp.responses for kv in r.response_range.kvs]
        out: dict[tuple[str, str], tuple[int, bytes]] = {}
        for kv in kvs:
            parsed = self.layout.parse_entity_key(kv.key)
            if parsed is not None:
                out[parsed] = (kv.mod_revision, kv.value)
        return out

    async def compact(self, revision: int) -> None:
        """Compact etcd's history up to `revision` (tests and maintenance)."""
        async with self._op("compact") as deadline:

            async def send(c: Any, t: float) -> Any:
                return await c.kvstub.Compact(
                    rpc.CompactionRequest(revision=revision), timeout=t, metadata=c.metadata
                )

            # Compacted at or beyond `revision` already: nothing left to do.
            with contextlib.suppress(_Compacted):
                await self._rpc(deadline, send, idempotent=True)

    # -- watch ----------------------------------------------------------------------------------

    def _change(self, event: Any) -> Change | None:
        parsed = self.layout.parse_entity_key(event.kv.key)
        kind = KINDS.get(parsed[0]) if parsed is not None else None
        if parsed is None or kind is None:
            return None  # not an entity key of a kind this version knows
        rev = event.kv.mod_revision
        if event.type == rpc.Event.DELETE:
            return Change(kind, parsed[1], rev, None)
        return Change(kind, parsed[1], rev, decode(kind, event.kv.value, rev))

    async def watch(self, since: int) -> AsyncIterator[Change]:
        """Every change of an entity with revision > `since`, in order, exactly once; survives
        etcd restarts and lost connections (re-watching from the last revision seen + 1);
        raises Resync when etcd has compacted the revision it must resume from."""
        # Invariant whenever the stream is read: every event with revision <= last has been
        # yielded (a response holds whole revisions, and it is yielded whole before the next
        # read), so a broken stream resumes from last + 1 with nothing lost or repeated.
        last = since
        failures = 0
        down = False  # this watch's stream broke and is not re-created yet (`watch_healthy`)
        try:
            while True:
                call = client = None
                try:
                    call, client = await self._open_stream(last + 1)
                    self._healthy = True
                    failures = 0
                    if down:
                        down = False
                        self._watches_down -= 1
                    floor = last
                    while True:
                        resp = await call.read()
                        self._check_watch_response(resp, last, created=False)
                        for event in resp.events:
                            rev = event.kv.mod_revision
                            if rev <= floor:  # defensive: etcd starts at start_revision
                                continue
                            last = rev
                            change = self._change(event)
                            if change is not None:
                                yield change
                except Resync:
                    raise
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed and task is not None and not task.cancelling():
                        raise StoreUnavailable("store is closed") from None
                    raise
                except Exception as exc:
                    err = _translate(exc)
                    if self._closed:
                        raise StoreUnavailable("store is closed") from exc
                    if not isinstance(err, StoreUnavailable):
                        raise err from exc
                    if isinstance(err, _Reauthenticate):
                        self._drop_client(client)
                    failures += 1
                    self._healthy = False
                    if not down:
                        down = True
                        self._watches_down += 1
                    self._rotate()
                    log.info("etcd watch lost (%s); resuming from revision %d", err, last + 1)
                    # Resume quickly once etcd is back (routing must see new writes within
                    # about a second); one attempt per quarter second costs nothing.
                    await asyncio.sleep(min(self.retry.delay(failures), _WATCH_RETRY_CAP))
                finally:
                    if call is not None:
                        call.cancel()
                        self._streams.discard(call)
        finally:
            if down:
                self._watches_down -= 1

    async def _open_stream(self, start: int) -> tuple[Any, Any]:
        """A watch stream over every entity key from revision `start`, confirmed by etcd
        within the timeout (else an error: the caller reconnects), and the client it is on."""
        client = await self._client()
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        self._streams.add(call)
        try:
            base = self.layout.entities()
            create = rpc.WatchCreateRequest(
                key=base, range_end=_range_end(base), start_revision=start, prev_kv=True
            )
            async with asyncio.timeout(self.timeout):
                await call.write(rpc.WatchRequest(create_request=create))
                first = await call.read()
            self._check_watch_response(first, start - 1, created=True)
        except _Reauthenticate:
            call.cancel()
            self._streams.discard(call)
            self._drop_client(client)
            raise
        except BaseException:
            call.cancel()
            self._streams.discard(call)
            raise
        return call, client

    def _check_watch_response(self, resp: Any, last: int, *, created: bool) -> None:
        if not isinstance(resp, rpc.WatchResponse):  # grpc.aio.EOF: the server ended the stream
            raise _Retryable("etcd closed the watch stream", unsent=False)
        if resp.compact_revision:
            raise Resync(
                last,
                f"watch cannot resume from revision {last + 1}: etcd compacted up to "
                f"{resp.compact_revision}; re-list",
            )
        if resp.canceled:
            if _is_auth_error(resp.cancel_reason):  # (a token etcd forgot: authenticate again)
                raise _Reauthenticate(
                    f"etcd cancelled the watch: {resp.cancel_reason}", unsent=True
                )
            raise _Retryable(f"etcd cancelled the watch: {resp.cancel_reason}", unsent=False)
        if created and not resp.created:
            raise _Retryable("etcd did not confirm the watch", unsent=False)

    async def close(self) -> None:
        self._closed = True
        for call in builtins.list(self._streams):
            call.cancel()
        for task in builtins.list(self._closing):
            with contextlib.suppress(Exception):
                await task
        clients, self._clients = builtins.list(self._clients.values()), {}
        for client in clients:
            try:
                await client.close()
            except Exception as exc:  # closing is best effort: the channel may be broken
                log.debug("closing an etcd client failed: %r", exc)


__all__ = ["EtcdStore", "KeyLayout", "RetryPolicy", "classify", "parse_endpoints", "plan_commit"]
