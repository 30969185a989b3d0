"""Store backends by name, imported lazily: the gRPC client loads only when etcd is used.

    memory                              -> MemoryStore (in-process)
    etcd://h1:2379[,h2:2379][/prefix]   -> EtcdStore (the path, if any, overrides `prefix`)

`embedded` (a private etcd child process) needs a data dir and a process to own: see
`open_embedded`, which `miren serve` calls with its `--data-dir`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from miren_store.store import Store, StoreStats

if TYPE_CHECKING:
    from miren_store.embedded import EmbeddedEtcd

ETCD_SCHEME = "etcd://"
USAGE = "expected 'memory', 'embedded' or 'etcd://host:port[,host:port...][/prefix]'"


def parse_etcd_url(url: str) -> tuple[list[str], str | None]:
    """`etcd://h1:1,h2:2/pfx` -> (["h1:1", "h2:2"], "/pfx"); the prefix is None when absent.

    Only splits; `EtcdStore` validates each endpoint. Raises ValueError naming the input when it
    is not an etcd URL or names no endpoint.
    """
    if not url.startswith(ETCD_SCHEME):
        raise ValueError(f"not an etcd store URL: {url!r}; {USAGE}")
    hosts, slash, path = url[len(ETCD_SCHEME) :].partition("/")
    endpoints = [h.strip() for h in hosts.split(",") if h.strip()]
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
    """`"h1:2379,h2:2379"` or `["h1:2379", ...]` -> ((host, port), ...).

    Raises ValueError naming the bad endpoint."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid etcd endpoint {item!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return tuple(out)
