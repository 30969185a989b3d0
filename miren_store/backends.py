"""Store backends by name, imported lazily: the gRPC client loads only when etcd is used.

    memory                              -> MemoryStore (in-process)
    etcd://h1:2379[,h2:2379][/prefix]   -> EtcdStore (the path, if any, overrides `prefix`)
    etcd://unix:%2Frun%2Fetcd%2Fclient.sock:0[/prefix]
                                        -> EtcdStore on a unix socket (`/run/etcd/client.sock:0`)

`embedded` (a private etcd child process) needs a data dir and a process to own: see
`open_embedded`, which `miren serve` calls with its `--data-dir`.

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

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

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
    url: str, *, timeout: float = 2.0, prefix: str = "/miren", stats: StoreStats | None = None
) -> Store:
    """A store by name (see the module docstring). Never does I/O: etcd is connected lazily,
    so this succeeds while etcd is down (its calls raise StoreUnavailable until it is up)."""
    name = url.strip()
    if name == "memory":
        from miren_store.memory import MemoryStore

        store = MemoryStore()
        if stats is not None:
            store.stats = stats
        return store
    if name.startswith(ETCD_SCHEME):
        endpoints, url_prefix = parse_etcd_url(name)
        from miren_store.etcd import EtcdStore

        try:
            return EtcdStore(endpoints, prefix=url_prefix or prefix, timeout=timeout, stats=stats)
        except ValueError as exc:
            raise ValueError(f"etcd store URL {url!r}: {exc}") from exc
    if name == "embedded":
        raise ValueError(
            "the embedded store needs a data dir and owns an etcd process: "
            "use open_embedded(data_dir)"
        )
    raise ValueError(f"unknown store {url!r}; {USAGE}")


async def open_embedded(
    data_dir: str | os.PathLike[str],
    *,
    timeout: float = 2.0,
    prefix: str = "/miren",
    stats: StoreStats | None = None,
) -> tuple[Store, EmbeddedEtcd]:
    """Start a private etcd in `data_dir` and open the etcd store on it.

    The caller owns both: close the store, then `await etcd.stop()`. If opening fails after etcd
    started, etcd is stopped before the error propagates.
    """
    from miren_store.embedded import EmbeddedEtcd

    etcd = EmbeddedEtcd(data_dir)
    await etcd.start()
    try:
        return open_store(etcd.url, timeout=timeout, prefix=prefix, stats=stats), etcd
    except BaseException:
        await etcd.stop()
        raise


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
