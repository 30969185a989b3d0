"""One typed configuration object, built from defaults < TOML file < environment < flags.

The schema is written once, as the attrs classes below. Every key can be set:
- in TOML: top-level keys of `Config` and `[section]` tables for the nested classes;
- in the environment: `MIREN_<KEY>` / `MIREN_<SECTION>_<KEY>` (upper case), e.g.
  `MIREN_LISTEN`, `MIREN_EPHEMERAL_MAX_TTL`; `MIREN_ADMIN_TOKEN` for the admin token;
- on the command line: the common ones have their own flag (`--listen`), and any key can be given
  as `--set section.key=value`.
Unknown keys are errors naming the key; bad values are errors naming the key and the value.
"""

from __future__ import annotations

import os
import socket
import tomllib
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs

from miren_store.deploy.deploys import EphemeralConfig
from miren_store.durations import DurationError, parse_duration


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@attrs.frozen(kw_only=True)
class StoreConfig:
    etcd_prefix: str = "/miren"
    timeout: timedelta = timedelta(seconds=2)


@attrs.frozen(kw_only=True)
class GcConfig:
    sweep_interval: timedelta = timedelta(seconds=60)
    expiry_grace: timedelta = timedelta(seconds=1)  # 410 "expired" this long, then collected


@attrs.frozen(kw_only=True)
class IngressConfig:
    request_timeout: timedelta = timedelta(seconds=60)
    connect_timeout: timedelta = timedelta(seconds=5)
    header_timeout: timedelta = timedelta(seconds=30)
    keepalive_timeout: timedelta = timedelta(seconds=75)
    body_timeout: timedelta = timedelta(seconds=30)
    request_buffer: int = 16 * 1024
    max_headers: int = 100
    max_waiters: int = 1000
    robots_tag: str = "noindex"
    shutdown_grace: timedelta = timedelta(seconds=20)


@attrs.frozen(kw_only=True)
class SandboxConfig:
    isolation: str = "auto"  # auto | bwrap | user | none (miren_activator.runtimes.isolation)
    uid: int = 65532  # who process sandboxes run as when the edge is root (never 0)
    gid: int = 65532


@attrs.frozen(kw_only=True)
class ActivatorConfig:
    log_dir: str = ""  # default: <data_dir>/logs
    log_max_bytes: int = 10 * 1024 * 1024  # a sandbox log past this is rotated to <name>.1
    stop_grace: timedelta = timedelta(seconds=10)


@attrs.frozen(kw_only=True)
class Config:
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:8081"
    store: str = "embedded"  # memory | embedded | etcd://host:port[,host:port...]
    data_dir: str = "./.miren"
    admin_token: str = attrs.field(default="", repr=False)
    node_name: str = attrs.field(factory=socket.gethostname)
    log_level: str = "info"
    store_options: StoreConfig = StoreConfig()
    ephemeral: EphemeralConfig = attrs.field(factory=EphemeralConfig)
    gc: GcConfig = GcConfig()
    ingress: IngressConfig = IngressConfig()
    activator: ActivatorConfig = ActivatorConfig()
    sandbox: SandboxConfig = SandboxConfig()

    @property
    def log_dir(self) -> Path:
        return Path(self.activator.log_dir or Path(self.data_dir) / "logs")


for _cls in (
    StoreConfig,
    EphemeralConfig,
    GcConfig,
    IngressConfig,
    ActivatorConfig,
    SandboxConfig,
    Config,
):
    attrs.resolve_types(_cls)

_SECTIONS: dict[str, type[Any]] = {
    f.name: f.type
    for f in attrs.fields(Config)
    if attrs.has(f.type)  # type: ignore[arg-type]
}


def _fields(cls: type[Any]) -> dict[str, attrs.Attribute[Any]]:
    return {f.name: f for f in attrs.fields(cls)}


def _convert(key: str, value: Any, typ: Any) -> Any:
    """A TOML value or an environment/flag string, as the field's type."""
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(typ):  # `X | None`
        if value is None or value == "":
            return None
        typ = args[0]
    try:
        if typ is timedelta:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return timedelta(seconds=value)
            if isinstance(value, str):
                return parse_duration(value)
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
        elif typ is str and isinstance(value, str):
            return value
    except (ValueError, DurationError) as exc:
        raise ConfigError(f"{key}: invalid value {value!r}: {exc}") from None
    raise ConfigError(f"{key}: invalid value {value!r} (expected {getattr(typ, '__name__', typ)})")


def _apply(base: Config, values: Mapping[str, Any], origin: str) -> Config:
    """Overlay `{key: value, section: {key: value}}` on `base`; unknown keys are errors."""
    top = _fields(Config)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: [{key}] must be a table")
            section_cls = _SECTIONS[key]
            fields = _fields(section_cls)
            sub: dict[str, Any] = {}
            for k, v in value.items():
                if k not in fields:
                    raise ConfigError(f"{origin}: unknown key {key}.{k}")
                sub[k] = _convert(f"{key}.{k}", v, fields[k].type)
            try:
                changes[key] = attrs.evolve(changes.get(key, getattr(base, key)), **sub)
            except ValueError as exc:
                raise ConfigError(f"{origin}: [{key}]: {exc}") from None
        elif key in top:
            changes[key] = _convert(key, value, top[key].type)
        else:
            raise ConfigError(f"{origin}: unknown key {key}")
    return attrs.evolve(base, **changes)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _fields(Config):
        if name in _SECTIONS:
            for sub in _fields(_SECTIONS[name]):
                var = f"MIREN_{name}_{sub}".upper()
                if var in env:
                    out.setdefault(name, {})[sub] = env[var]
        else:
            var = f"MIREN_{name}".upper()
            if var in env:
                out[name] = env[var]
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["ephemeral.max_ttl=7d", "listen=0.0.0.0:80"]` -> nested overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        section, dot, sub = key.partition(".")
        if dot:
            out.setdefault(section, {})[sub] = value
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
    cfg = Config()
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from None
        cfg = _apply(cfg, data, str(path))
    cfg = _apply(cfg, _env_overrides(os.environ if env is None else env), "environment")
    if overrides:
        cfg = _apply(cfg, overrides, "command line")
    validate(cfg)
    return cfg


def split_hostport(text: str, key: str) -> tuple[str, int]:
    """`127.0.0.1:8080` / `[::1]:8080` / `:8080` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_MAX_REQUEST_BUFFER = 1024 * 1024  # held per client connection at most: keep it small


def validate(cfg: Config) -> None:
    split_hostport(cfg.listen, "listen")
    admin_host, _ = split_hostport(cfg.admin_listen, "admin_listen")
    if not is_loopback(admin_host) and not cfg.admin_token:
        raise ConfigError(
            f"admin_listen: refusing to open the admin API on non-loopback {cfg.admin_listen} "
            "without a token: set MIREN_ADMIN_TOKEN (or admin_token in the config)"
        )
    if cfg.store.startswith("etcd://"):
        from miren_store.backends import parse_endpoints, parse_etcd_url

        try:
            parse_endpoints(parse_etcd_url(cfg.store)[0])
        except ValueError as exc:
            raise ConfigError(f"store: {exc}") from None
    elif cfg.store not in ("memory", "embedded"):
        raise ConfigError(f"store: {cfg.store!r} is not memory, embedded or etcd://host:port")
    if cfg.ephemeral.url_scheme not in ("http", "https"):
        raise ConfigError(
            f"ephemeral.url_scheme: {cfg.ephemeral.url_scheme!r} is not http or https"
        )
    if cfg.gc.sweep_interval <= timedelta(0):
        raise ConfigError("gc.sweep_interval: must be greater than 0")
    if not timedelta(0) <= cfg.gc.expiry_grace <= timedelta(seconds=60):
        raise ConfigError("gc.expiry_grace: must be between 0s and 60s")
    for name in (
        "request_timeout",
        "connect_timeout",
        "header_timeout",
        "keepalive_timeout",
        "body_timeout",
    ):
        if getattr(cfg.ingress, name) <= timedelta(0):
            raise ConfigError(f"ingress.{name}: must be greater than 0")
    if not 0 <= cfg.ingress.request_buffer <= _MAX_REQUEST_BUFFER:
        raise ConfigError(
            f"ingress.request_buffer: must be between 0 and {_MAX_REQUEST_BUFFER} bytes"
        )
    if cfg.activator.log_max_bytes < 0:
        raise ConfigError("activator.log_max_bytes: must be 0 (no cap) or more")
    if cfg.ingress.max_waiters < 1:
        raise ConfigError("ingress.max_waiters: must be at least 1")
    if cfg.ingress.max_headers < 1:
        raise ConfigError("ingress.max_headers: must be at least 1")
    if cfg.sandbox.isolation not in ("auto", "bwrap", "user", "none"):
        raise ConfigError(
            f"sandbox.isolation: {cfg.sandbox.isolation!r} is not auto, bwrap, user or none"
        )
    for name in ("uid", "gid"):
        if not 0 < getattr(cfg.sandbox, name) < 2**32 - 1:
            raise ConfigError(f"sandbox.{name}: must be an unprivileged id (not 0)")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: {cfg.log_level!r} is not debug, info, warning or error")
