"""Store backends by name, imported lazily: the gRPC client loads only when etcd is used.

    memory                              -> MemoryStore (in-process)
    etcd://h1:2379[,h2:2379][/prefix]   -> EtcdStore (the path, if any, overrides `prefix`)
    etcd://unix:%2Frun%2Fetcd%2Fclient.sock:0[/prefix]
                                        -> EtcdStore on a unix socket (`/run/etcd/client.sock:0`)
    embedded                            -> EtcdStore on a private etcd child process in
                                           `<data_dir>/etcd` (`miren_store.embedded`)

`open_backend` is the one place a store is chosen: an async context manager that opens the store
named by the `store` setting with its `StoreOptions` (the `[store_options]` section) and, for
`embedded`, starts the etcd first and stops it after the store is closed. `check_store` says
whether a name is valid without any I/O (config validation). `open_store` opens the in-process
and `etcd://` backends only (it never starts a process; tests use it on a server they own).

Endpoints. An endpoint is `host:port` (TCP) or `unix:/absolute/path` (a unix socket). aetcd, the
gRPC client, always dials the target `f"{host}:{port}"`, and gRPC reads `unix:<path>` as a
socket path; so a socket endpoint is split like a TCP one, at its last `:`, and its file name must
end in `:N` (N a plain decimal number, which is part of the name, not a port): `parse_endpoints`
turns `unix:/run/etcd/client.sock:0` into `("unix:/run/etcd/client.sock", 0)`, whose target is
the path again. (etcd 3.5 demands the same `name:N` shape of its own `unix://` listen URLs; see
`miren_store.embedded`.) The path is limited to `UNIX_PATH_MAX` bytes (the kernel's sun_path).
In an `etcd://` URL everything up to the first `/` is the endpoint list, so a socket path is
written with each `/` as `%2F` (as in `http+unix://` URLs); `EmbeddedEtcd.url` does that.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

import attrs

from miren_store.settings import setting
from miren_store.store import Store, StoreStats

if TYPE_CHECKING:
    from miren_store.embedded import EmbeddedEtcd

ETCD_SCHEME: Final = "etcd://"
UNIX_SCHEME: Final = "unix:"
# The longest unix socket path: sun_path is 108 bytes including the terminating NUL. gRPC refuses
# longer targets ("Path name should not have more than 107 characters").
UNIX_PATH_MAX: Final = 107
USAGE = (
    "expected 'memory', 'embedded' or 'etcd://host:port[,host:port...][/prefix]' "
    "(a unix socket: 'etcd://unix:%2Fpath%2Fto%2Fname:N', each '/' of the path as %2F)"
)


MEMORY: Final = "memory"
EMBEDDED: Final = "embedded"
EMBEDDED_SUBDIR: Final = "etcd"  # the embedded etcd's directory inside the data dir


@attrs.frozen(kw_only=True)
class StoreOptions:
    """The `[store_options]` section of the edge's config: how the store is used, whichever
    backend `store` names."""

    etcd_prefix: str = attrs.field(
        default="/miren",
        metadata=setting("key prefix in etcd (the path of an etcd:// URL overrides it)"),
    )
    timeout: float = attrs.field(
        default=2.0,
        metadata=setting(
            "every store call fails (store_unavailable) within this",
            duration=True,
            positive=True,
        ),
    )
    etcd_user: str = attrs.field(
        default="",
        metadata=setting(
            "etcd user (etcd authentication; with several nodes etcd is on the network, where "
            "previews are too)",
            shown="none",
        ),
    )
    etcd_password: str = attrs.field(
        default="",
        repr=False,
        metadata=setting("the etcd user's password (best from the environment)", shown="none"),
    )


@attrs.frozen
class Backend:
    """An open store, and the embedded etcd under it (None for `memory` and `etcd://`)."""

    name: str  # `memory`, `embedded` or `etcd`
    store: Store
    etcd: EmbeddedEtcd | None = None

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.store!r}>"


def check_store(name: str) -> None:
    """Raise ValueError naming `name` unless `open_backend` can open it. No I/O."""
    if name in (MEMORY, EMBEDDED):
        return
    if not name.startswith(ETCD_SCHEME):
        raise ValueError(
            f"{name!r} is not memory, embedded or etcd://host:port[,host:port...][/prefix]"
        )
    parse_endpoints(parse_etcd_url(name)[0])


@contextlib.asynccontextmanager
async def open_backend(
    name: str,
    options: StoreOptions | None = None,
    *,
    data_dir: str | os.PathLike[str],
    stats: StoreStats | None = None,
) -> AsyncIterator[Backend]:
    """The store named `name` (`memory`, `embedded`, `etcd://...`), open for the block.

    For `embedded`, a private etcd is started in `<data_dir>/etcd` first (`EtcdLaunchError`
    if it cannot be) and stopped after the store is closed, also when the block raises; no
    process outlives the block. Raises ValueError naming `name` when it is not a store.
    """
    options = options if options is not None else StoreOptions()
    check_store(name)
    async with contextlib.AsyncExitStack() as stack:
        etcd: EmbeddedEtcd | None = None
        url = name
        if name == EMBEDDED:
            from miren_store.embedded import EmbeddedEtcd

            etcd = await stack.enter_async_context(EmbeddedEtcd(Path(data_dir) / EMBEDDED_SUBDIR))
            url = etcd.url
        store = open_store(
            url,
            timeout=options.timeout,
            prefix=options.etcd_prefix,
            stats=stats,
            user=options.etcd_user,
            password=options.etcd_password,
        )
        if etcd is not None:
            # The embedded etcd listens on a private unix socket in a data dir one process
            # holds (its lock): no other node can share it, so no membership has to be proven.
            store.shared = False  # type: ignore[misc]
        stack.push_async_callback(store.close)
        yield Backend(name.partition("://")[0], store, etcd)


def parse_etcd_url(url: str) -> tuple[list[str], str | None]:
    """`etcd://h1:1,h2:2/pfx` -> (["h1:1", "h2:2"], "/pfx"); the prefix is None when absent.

    A `unix:` endpoint is percent-decoded: `etcd://unix:%2Fa%2Fb.sock:0` -> (["unix:/a/b.sock:0"],
    None). Only splits; `EtcdStore` validates each endpoint. Raises ValueError naming the input
    when it is not an etcd URL or names no endpoint.
    """
    if not url.startswith(ETCD_SCHEME):
        raise ValueError(f"not an etcd store URL: {url!r}; {USAGE}")
    hosts, slash, path = url[len(ETCD_SCHEME) :].partition("/")
    endpoints: list[str] = []
    for host in (h.strip() for h in hosts.split(",")):
        if host == UNIX_SCHEME:
            # `etcd://unix:/run/x.sock:0`: the path's first '/' ended the endpoint list.
            raise ValueError(
                f"etcd store URL {url!r}: write each '/' of a unix socket path as %2F "
                "(e.g. 'etcd://unix:%2Frun%2Fetcd%2Fclient.sock:0')"
            )
        if host:
            endpoints.append(unquote(host) if host.startswith(UNIX_SCHEME) else host)
    if not endpoints:
        raise ValueError(f"etcd store URL {url!r} names no endpoint; {USAGE}")
    path = path.strip("/")
    return endpoints, ("/" + path if slash and path else None)


def open_store(
    url: str,
    *,
    timeout: float = 2.0,
    prefix: str = "/miren",
    stats: StoreStats | None = None,
    user: str = "",
    password: str = "",
) -> Store:
    """A store by name (see the module docstring). Never does I/O: etcd is connected lazily,
    so this succeeds while etcd is down (its calls raise StoreUnavailable until it is up)."""
    name = url.strip()
    if name == MEMORY:
        from miren_store.memory import MemoryStore

        store = MemoryStore()
        if stats is not None:
            store.stats = stats
        return store
    if name.startswith(ETCD_SCHEME):
        endpoints, url_prefix = parse_etcd_url(name)
        from miren_store.etcd import EtcdStore

        try:
            return EtcdStore(
                endpoints,
                prefix=url_prefix or prefix,
                timeout=timeout,
                stats=stats,
                user=user,
                password=password,
            )
        except ValueError as exc:
            raise ValueError(f"etcd store URL {url!r}: {exc}") from exc
    if name == EMBEDDED:
        raise ValueError(
            "the embedded store needs a data dir and owns an etcd process: use open_backend"
        )
    raise ValueError(f"unknown store {url!r}; {USAGE}")


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[tuple[str, int], ...]:
    """`"h1:2379,h2:2379"` or `["h1:2379", ...]` -> ((host, port), ...): aetcd's arguments.

    A unix socket endpoint `unix:/abs/path/name:N` becomes `("unix:/abs/path/name", N)` (see the
    module docstring). Raises ValueError naming the bad endpoint."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        if item.startswith(UNIX_SCHEME + "/"):
            out.append(_parse_unix_endpoint(item))
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"invalid etcd endpoint {item!r}: expected host:port or unix:/path/to/name:N"
            )
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return tuple(out)


def _parse_unix_endpoint(item: str) -> tuple[str, int]:
    path = item[len(UNIX_SCHEME) :]
    stem, sep, number = path.rpartition(":")
    name = stem.rpartition("/")[2]
    if not sep or not name or not number.isdigit():
        raise ValueError(
            f"invalid etcd endpoint {item!r}: a unix socket endpoint is unix:/absolute/path "
            "whose file name ends in ':N' (aetcd appends ':port' to its target)"
        )
    if str(int(number)) != number:
        # "007" would come back as 7: the target would name another file.
        raise ValueError(f"invalid etcd endpoint {item!r}: ':{number}' has a leading zero")
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise ValueError(
            f"invalid etcd endpoint {item!r}: the socket path is {size} bytes, over the "
            f"{UNIX_PATH_MAX}-byte limit of unix socket paths (sun_path)"
        )
    return UNIX_SCHEME + stem, int(number)
