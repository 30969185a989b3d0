"""One typed configuration object, built from defaults < TOML file < environment < flags.

The sections of `Config` are the components' own config classes, passed down as they are:

    [store_options]  miren_store.backends.StoreOptions
    [node]           miren_activator.cluster.NodeConfig (`node.name` is `node_name`)
    [ephemeral]      miren_store.deploy.deploys.EphemeralConfig
    [gc]             miren_store.deploy.gc.GcConfig
    [ingress]        miren_ingress.proxy.config.ProxyConfig
    [activator]      miren_activator.config.ActivatorConfig
    [sandbox]        miren_activator.runtimes.isolation.SandboxConfig

and what only `miren serve` uses (listeners, data dir, shutdown grace, ...) is a field of
`Config` itself. Every field is declared once, where it lives, with its default and one line of
help (`miren_store.settings`); the keys below, `miren config` and the README's table are all
derived from those declarations. A key is `<section>.<field>` of where its value lives, except
for the few in `KEY_NAMES`, which keep the names users already write.

Every key can be set:
- in TOML: top-level keys and `[section]` tables;
- in the environment: `MIREN_<KEY>` / `MIREN_<SECTION>_<KEY>` (upper case), e.g. `MIREN_LISTEN`,
  `MIREN_EPHEMERAL_MAX_TTL`; `MIREN_ADMIN_TOKEN` for the admin token;
- on the command line: the common ones have their own flag (`--listen`), and any key can be given
  as `--set section.key=value`.
Durations are written `30s`, `2m`, `24h`, `7d` (a bare TOML number is seconds) and become the
field's type (a float of seconds or a `timedelta`). Unknown keys and bad values are errors naming
the key (and where it was set); the layers are merged first, then each section is built once.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import attrs

from miren_activator.cluster import NodeConfig
from miren_activator.config import ActivatorConfig
from miren_activator.runtimes.isolation import SandboxConfig
from miren_ingress.proxy.config import ProxyConfig
from miren_ingress.tls.config import AcmeConfig, CertFiles, TlsConfig
from miren_store.backends import StoreOptions, check_store
from miren_store.deploy.deploys import EphemeralConfig
from miren_store.deploy.gc import GcConfig
from miren_store.durations import DurationError, parse_duration
from miren_store.settings import Setting, one_of, setting, setting_of

LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@attrs.frozen(kw_only=True)
class Config:
    listen: str = attrs.field(
        default="127.0.0.1:8080", metadata=setting("proxy listener (host:port)")
    )
    admin_listen: str = attrs.field(
        default="127.0.0.1:8081",
        metadata=setting("admin API + /metrics listener; off loopback only with a token"),
    )
    store: str = attrs.field(
        default="embedded",
        metadata=setting(
            "memory, embedded (a private etcd in data_dir/etcd) or etcd://h1:2379,h2:2379[/prefix]"
        ),
    )
    data_dir: str = attrs.field(
        default="./.miren",
        metadata=setting(
            "state: the embedded etcd's data, the admin token, sandbox logs; one miren serve at a time (locked)"
        ),
    )
    admin_token: str = attrs.field(
        default="",
        repr=False,
        metadata=setting(
            "the admin API's bearer token; prefer MIREN_ADMIN_TOKEN",
            shown="empty: generated into data_dir/admin-token",
        ),
    )
    log_level: str = attrs.field(
        default="info", metadata=setting(f"{one_of(LOG_LEVELS)} (any case)")
    )
    request_timeout: float = attrs.field(
        default=60.0,
        metadata=setting(
            "idle timeout on the upstream (per route: request_timeout); not applied to WebSockets",
            duration=True,
            positive=True,
        ),
    )
    shutdown_grace: float = attrs.field(
        default=20.0,
        metadata=setting(
            "on SIGTERM, in-flight requests may finish within this", duration=True, minimum=0
        ),
    )
    store_options: StoreOptions = attrs.field(factory=StoreOptions)
    node: NodeConfig = attrs.field(factory=NodeConfig)
    ephemeral: EphemeralConfig = attrs.field(factory=EphemeralConfig)
    gc: GcConfig = attrs.field(factory=GcConfig)
    ingress: ProxyConfig = attrs.field(factory=ProxyConfig)
    activator: ActivatorConfig = attrs.field(factory=ActivatorConfig)
    sandbox: SandboxConfig = attrs.field(factory=SandboxConfig)
    tls: TlsConfig = attrs.field(factory=TlsConfig)
    acme: AcmeConfig = attrs.field(factory=AcmeConfig)

    @property
    def log_dir(self) -> Path:
        """Where sandbox logs go: `activator.log_dir`, else `<data_dir>/logs`."""
        return Path(self.activator.log_dir or Path(self.data_dir) / "logs")


# The keys whose name is not the `<section>.<field>` (or top-level `<field>`) of where their value
# lives: where it lives -> the key users write. The only place the two differ.
KEY_NAMES: Final[Mapping[str, str]] = {
    "activator.node": "node_name",  # one name per edge node, not an activator detail
    "request_timeout": "ingress.request_timeout",  # the router's, passed to it by `serve`
    "shutdown_grace": "ingress.shutdown_grace",  # `serve` drains the proxy within it
    "activator.max_waiters": "ingress.max_waiters",  # seen by clients as the proxy's 503
}


# Other spellings of a key, read as the key itself: `[node] name = "a"` sits with the other
# `[node]` keys (its environment variable, MIREN_NODE_NAME, is the same).
ALIASES: Final[Mapping[str, str]] = {"node.name": "node_name"}


@attrs.frozen
class Key:
    """One config key: its name, where its value lives in `Config`, and its declaration."""

    name: str  # as users write it: `ingress.header_timeout`
    # The attributes from `Config` to the value: ("ingress", "header_timeout").
    path: tuple[str, ...]
    type: Any  # the field's type
    setting: Setting

    @property
    def env(self) -> str:
        """`MIREN_INGRESS_HEADER_TIMEOUT`."""
        return "MIREN_" + self.name.replace(".", "_").upper()

    @property
    def section(self) -> str:
        """The TOML table the key is written in ("" for a top-level key)."""
        return self.name.rpartition(".")[0]

    def default(self) -> Any:
        value: Any = Config()
        for name in self.path:
            value = getattr(value, name)
        return value

    def shown_default(self) -> str:
        """The default as the docs write it."""
        if self.setting.shown is not None:
            return self.setting.shown
        return self.setting.show(self.default())


def _sections() -> dict[str, type[Any]]:
    out: dict[str, type[Any]] = {}
    for field in attrs.fields(Config):
        if isinstance(field.type, type) and attrs.has(field.type):
            out[field.name] = field.type
    return out


def _declared(cls: type[Any], prefix: tuple[str, ...]) -> list[Key]:
    """The keys of a config class, in declaration order (its `internal` fields left out)."""
    keys = []
    for field in attrs.fields(cls):
        meta = setting_of(field)
        path = (*prefix, field.name)
        if meta is None:
            if prefix:  # a section's every field is declared with setting() or internal()
                raise TypeError(f"{cls.__name__}.{field.name} has no setting metadata")
            continue  # a section of Config itself
        if meta.key:
            where = ".".join(path)
            keys.append(Key(KEY_NAMES.get(where, where), path, field.type, meta))
    return keys


def _schema() -> tuple[tuple[Key, ...], dict[str, type[Any]]]:
    attrs.resolve_types(Config)
    sections = _sections()
    for cls in sections.values():
        attrs.resolve_types(cls)
    keys = _declared(Config, ())
    for name, cls in sections.items():
        keys += _declared(cls, (name,))
    known = {".".join(k.path) for k in keys}
    if missing := set(KEY_NAMES) - known:
        raise TypeError(f"KEY_NAMES names no config key: {sorted(missing)}")
    if len({k.name for k in keys}) != len(keys):
        raise TypeError("two config fields have the same key")
    # Grouped as the file is written: top-level keys, then each table in the order of `Config`.
    order = ["", *sections]
    keys.sort(key=lambda k: order.index(k.section))
    return tuple(keys), sections


KEYS, SECTIONS = _schema()
_BY_NAME: Final = {k.name: k for k in KEYS}
_TABLES: Final = frozenset(k.section for k in KEYS if k.section)


# -- reading values -------------------------------------------------------------------------------


def _optional(typ: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (typ, False)."""
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return typ, False


def _convert(key: Key, value: Any) -> Any:
    """A TOML value or an environment/flag string, as the field's type; bounds checked."""
    typ, optional = _optional(key.type)
    if optional and (value is None or value == ""):
        return None
    result = _as_type(key, value, typ)
    if problem := key.setting.problem(result):
        raise ConfigError(f"{key.name}: {problem}")
    return result


def _as_type(key: Key, value: Any, typ: Any) -> Any:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(typ, type) and issubclass(typ, enum.Enum) and isinstance(value, str):
        choices = [str(m.value) for m in typ]
        if value not in choices:
            raise ConfigError(f"{key.name}: {value!r} is not {one_of(choices)}")
        return typ(value)
    if typing.get_origin(typ) is tuple:
        return _cert_files(key, value)
    try:
        if typ is timedelta or (typ is float and key.setting.duration):
            if number:
                seconds = timedelta(seconds=value)
            elif isinstance(value, str):
                seconds = parse_duration(value)
            else:
                seconds = None
            if seconds is not None:
                return seconds if typ is timedelta else seconds.total_seconds()
        elif typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
        elif typ is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value)
        elif typ is float:
            if number:
                return float(value)
            if isinstance(value, str):
                return float(value)
        elif typ is str and isinstance(value, str):
            return value
        elif typ is Path and isinstance(value, str):
            return Path(value)
    except (ValueError, DurationError) as exc:
        raise ConfigError(f"{key.name}: invalid value {value!r}: {exc}") from None
    expected = "a duration such as 30s" if key.setting.duration else getattr(typ, "__name__", typ)
    raise ConfigError(f"{key.name}: invalid value {value!r} (expected {expected})")


def _cert_files(key: Key, value: Any) -> tuple[CertFiles, ...]:
    """`[{cert = "...", key = "..."}]` (TOML), or `cert.pem:key.pem,...` (environment, --set)."""
    if isinstance(value, str):
        items: list[Any] = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            cert, sep, private = part.partition(":")
            if not sep or not cert or not private:
                raise ConfigError(f"{key.name}: {part!r} is not cert.pem:key.pem")
            items.append({"cert": cert, "key": private})
        value = items
    if not isinstance(value, list):
        raise ConfigError(f"{key.name}: expected a list of {{cert = ..., key = ...}} tables")
    out = []
    for item in value:
        if (
            not isinstance(item, Mapping)
            or set(item) != {"cert", "key"}
            or not all(isinstance(v, str) and v for v in item.values())
        ):
            raise ConfigError(f'{key.name}: each entry is {{cert = "file", key = "file"}}')
        out.append(CertFiles(cert=item["cert"], key=item["key"]))
    return tuple(out)


def _flatten(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """`{key: value, section: {key: value}}` -> `{"section.key": value}`; unknown keys are
    errors naming the key and `origin`."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in _TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: [{name}] must be a table")
            for sub, subvalue in value.items():
                full = f"{name}.{sub}"
                out[ALIASES.get(full, full)] = subvalue
        else:
            out[ALIASES.get(name, name)] = value
    for name in out:
        if name not in _BY_NAME:
            raise ConfigError(f"{origin}: unknown key {name}")
    return out


def _read(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """Flatten and convert one layer (file, environment or command line)."""
    out = {}
    for name, value in _flatten(values, origin).items():
        try:
            out[name] = _convert(_BY_NAME[name], value)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    return out


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    return {k.name: env[k.env] for k in KEYS if k.env in env}


def _build(values: Mapping[str, Any]) -> Config:
    """The defaults with `values` (`{key name: converted value}`) applied, each section built
    once (so its own rules see every layer's values)."""
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = _BY_NAME[name].path
        if len(path) == 1:
            top[path[0]] = value
        else:
            per_section.setdefault(path[0], {})[path[1]] = value
    base = Config()
    for section, changes in per_section.items():
        try:
            top[section] = attrs.evolve(getattr(base, section), **changes)
        except ValueError as exc:
            raise ConfigError(f"[{section}]: {exc}") from None
    return attrs.evolve(base, **top)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["ephemeral.max_ttl=7d", "listen=0.0.0.0:80"]` -> nested overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        section, dot, sub = key.partition(".")
        if dot:
            table = out.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {section} is not a section")
            table[sub] = value
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the TOML file, then `MIREN_*` variables, then flag overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from None
        values |= _read(data, str(path))
    values |= _read(_env_values(os.environ if env is None else env), "environment")
    if overrides:
        values |= _read(overrides, "command line")
    cfg = _build(values)
    validate(cfg)
    return cfg


# -- rules across keys ----------------------------------------------------------------------------


def split_hostport(text: str, key: str) -> tuple[str, int]:
    """`127.0.0.1:8080` / `[::1]:8080` / `:8080` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> None:
    """What no single key's declaration can say. (Each key's bounds and choices were checked as
    it was read.)"""
    split_hostport(cfg.listen, "listen")
    admin_host, _ = split_hostport(cfg.admin_listen, "admin_listen")
    if not is_loopback(admin_host) and not cfg.admin_token:
        raise ConfigError(
            f"admin_listen: refusing to open the admin API on non-loopback {cfg.admin_listen} "
            "without a token: set MIREN_ADMIN_TOKEN (or admin_token in the config)"
        )
    try:
        check_store(cfg.store)
    except ValueError as exc:
        raise ConfigError(f"store: {exc}") from None
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level: {cfg.log_level!r} is not {one_of(LOG_LEVELS)}")
    if cfg.tls.listen is not None:
        split_hostport(cfg.tls.listen, "tls.listen")


def check_tls(cfg: Config) -> None:
    """The TLS keys that only make sense together (checked when `serve` starts)."""
    if cfg.tls.listen is not None:
        if not cfg.tls.certificates and cfg.acme.directory is None:
            raise ConfigError(
                "tls.listen: no certificate to serve: give tls.certificates or acme.directory"
            )
    elif cfg.tls.redirect_http:
        raise ConfigError("tls.redirect_http: needs tls.listen (nothing would answer https://)")
    elif cfg.acme.directory is not None:
        raise ConfigError("acme.directory: needs tls.listen (certificates for what listener?)")
