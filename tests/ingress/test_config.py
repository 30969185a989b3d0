"""Configuration: one schema; TOML < env < flags; unknown keys and bad values name the key.

The sections are the components' own config classes; every field is declared once with its
default and help, and the README's table and `miren config` are rendered from those declarations.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from miren_activator.cluster import NodeConfig
from miren_activator.config import ActivatorConfig
from miren_activator.runtimes.isolation import IsolationMode, SandboxConfig
from miren_ingress.proxy.config import ProxyConfig
from miren_ingress.shell import reference
from miren_ingress.shell.cli import main
from miren_ingress.shell.config import (
    KEY_NAMES,
    KEYS,
    SECTIONS,
    Config,
    ConfigError,
    check_tls,
    load_config,
    parse_set,
)
from miren_ingress.shell.serve import activator_config
from miren_ingress.tls.config import AcmeConfig, CertFiles, TlsConfig
from miren_store.backends import StoreOptions
from miren_store.deploy.deploys import EphemeralConfig
from miren_store.deploy.gc import GcConfig
from miren_store.settings import setting_of

ROOT = Path(__file__).resolve().parents[2]

# Every key that existed before the sections became the components' classes, with its default
# as the docs wrote it: none may disappear or change its default.
KEYS_BEFORE = {
    "listen": "127.0.0.1:8080",
    "admin_listen": "127.0.0.1:8081",
    "store": "embedded",
    "data_dir": "./.miren",
    "admin_token": "empty: generated into data_dir/admin-token",
    "node_name": "host name",
    "log_level": "info",
    "store_options.etcd_prefix": "/miren",
    "store_options.timeout": "2s",
    "ephemeral.max_per_app": "10",
    "ephemeral.default_ttl": "24h",
    "ephemeral.max_ttl": "30d",
    "ephemeral.cluster_hostname": "none",
    "ephemeral.url_scheme": "none",
    "ephemeral.url_port": "none",
    "ephemeral.commit_attempts": "50",
    "gc.sweep_interval": "60s",
    "gc.expiry_grace": "1s",
    "ingress.request_timeout": "60s",
    "ingress.connect_timeout": "5s",
    "ingress.header_timeout": "30s",
    "ingress.keepalive_timeout": "75s",
    "ingress.body_timeout": "30s",
    "ingress.request_buffer": "16384",
    "ingress.max_headers": "100",
    "ingress.max_waiters": "1000",
    "ingress.robots_tag": "noindex",
    "ingress.shutdown_grace": "20s",
    "activator.log_dir": "data_dir/logs",
    "activator.log_max_bytes": "10485760",
    "activator.stop_grace": "10s",
    "sandbox.isolation": "auto",
    "sandbox.uid": "65532",
    "sandbox.gid": "65532",
}


def test_defaults_are_sane() -> None:
    cfg = load_config(env={})
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.admin_listen == "127.0.0.1:8081"
    assert cfg.store == "embedded"
    assert cfg.ephemeral.default_ttl == timedelta(hours=24)
    assert cfg.ephemeral.max_ttl == timedelta(days=30)
    assert cfg.ephemeral.max_per_app == 10
    assert cfg.gc.sweep_interval == 60.0
    assert cfg.activator.max_waiters == 1000  # the key ingress.max_waiters
    assert cfg.ingress.body_timeout == 30.0
    assert cfg.ingress.request_buffer == 16 * 1024
    assert cfg.activator.log_max_bytes == 10 * 1024 * 1024
    assert cfg.request_timeout == 60.0 and cfg.shutdown_grace == 20.0
    assert cfg.sandbox.isolation is IsolationMode.AUTO


def test_every_key_before_is_kept_with_its_default() -> None:
    shown = {k.name: k.shown_default() for k in KEYS}
    assert {name: shown.get(name) for name in KEYS_BEFORE} == KEYS_BEFORE


def test_the_sections_are_the_components_config_classes() -> None:
    assert dict(SECTIONS) == {
        "store_options": StoreOptions,
        "node": NodeConfig,
        "ephemeral": EphemeralConfig,
        "gc": GcConfig,
        "ingress": ProxyConfig,
        "activator": ActivatorConfig,
        "sandbox": SandboxConfig,
        "tls": TlsConfig,
        "acme": AcmeConfig,
    }
    cfg = Config()
    # The component defaults are the config defaults: nothing is copied from one to the other.
    assert cfg.ingress == ProxyConfig()
    assert cfg.gc == GcConfig()
    assert cfg.sandbox == SandboxConfig()
    assert attrs.evolve(cfg.activator, node="n") == ActivatorConfig(node="n")


def test_the_activator_runs_with_its_section() -> None:
    cfg = load_config(
        env={},
        overrides={
            "data_dir": "/srv/miren",
            "node_name": "edge-7",
            "ingress": {"max_waiters": "5"},
            "activator": {"stop_grace": "3s", "log_max_bytes": "0"},
        },
    )
    runs = activator_config(cfg)
    assert runs == attrs.evolve(cfg.activator, log_dir=Path("/srv/miren/logs"))
    assert (runs.node, runs.max_waiters, runs.stop_grace, runs.log_max_bytes) == (
        "edge-7",
        5,
        3.0,
        0,
    )
    explicit = load_config(env={}, overrides={"activator": {"log_dir": "/var/log/m"}})
    assert activator_config(explicit).log_dir == Path("/var/log/m")


def test_every_field_of_every_section_has_help() -> None:
    for cls in (Config, *SECTIONS.values()):
        for field in attrs.fields(cls):
            if field.name in SECTIONS and cls is Config:
                continue
            meta = setting_of(field)
            assert meta is not None, f"{cls.__name__}.{field.name} is declared without help"
            assert meta.help.strip() and "\n" not in meta.help, f"{cls.__name__}.{field.name}"
    assert all(k.setting.help for k in KEYS)


def test_renamed_keys_keep_the_names_users_write(tmp_path: Path) -> None:
    """A key whose value lives elsewhere (`KEY_NAMES`) works from every source, and the
    component-side name is not a second spelling."""
    assert KEY_NAMES == {
        "activator.node": "node_name",
        "request_timeout": "ingress.request_timeout",
        "shutdown_grace": "ingress.shutdown_grace",
        "activator.max_waiters": "ingress.max_waiters",
    }
    f = tmp_path / "c.toml"
    f.write_text(
        'node_name = "a"\n[ingress]\nmax_waiters = 7\nrequest_timeout = "9s"\n'
        'shutdown_grace = "2s"\n'
    )
    from_file = load_config(f, env={})
    from_env = load_config(
        env={
            "MIREN_NODE_NAME": "a",
            "MIREN_INGRESS_MAX_WAITERS": "7",
            "MIREN_INGRESS_REQUEST_TIMEOUT": "9s",
            "MIREN_INGRESS_SHUTDOWN_GRACE": "2s",
        }
    )
    from_flags = load_config(
        env={},
        overrides=parse_set(
            [
                "node_name=a",
                "ingress.max_waiters=7",
                "ingress.request_timeout=9s",
                "ingress.shutdown_grace=2s",
            ]
        ),
    )
    for cfg in (from_file, from_env, from_flags):
        assert (cfg.activator.node, cfg.activator.max_waiters) == ("a", 7)
        assert (cfg.request_timeout, cfg.shutdown_grace) == (9.0, 2.0)
    for wrong in ("activator.max_waiters=7", "activator.node=a", "shutdown_grace=1s"):
        with pytest.raises(ConfigError, match=f"unknown key {wrong.partition('=')[0]}"):
            load_config(env={}, overrides=parse_set([wrong]))


def _sample(key: Any) -> tuple[str, Any]:
    """A value for `key` other than its default, as written in the environment, and the field
    value it must become."""
    typ = key.type
    default = key.default()
    if key.name == "ephemeral.max_ttl":  # at least the default TTL
        return "60d", timedelta(days=60)
    if key.setting.duration or isinstance(default, timedelta):
        want = timedelta(seconds=37) if isinstance(default, timedelta) else 37.0
        return "37s", want
    if isinstance(default, IsolationMode):
        return "none", IsolationMode.NONE
    if key.setting.choices:
        other = next(c for c in key.setting.choices if c != default)
        return other, other
    if key.name == "log_level":
        return "DEBUG", "DEBUG"
    if isinstance(default, bool):
        return "true", True
    if key.name == "acme.renew_at":
        return "0.5", 0.5
    if key.name == "tls.certificates":
        return "c.pem:k.pem", (CertFiles(cert="c.pem", key="k.pem"),)
    if key.name in ("listen", "admin_listen", "tls.listen"):
        return "127.0.0.1:9", "127.0.0.1:9"
    if key.name == "store":
        return "memory", "memory"
    if key.name == "activator.log_dir":
        return "/var/log/x", Path("/var/log/x")
    if isinstance(default, int) or "int" in str(typ):
        return "42", 42
    return "some-value", "some-value"


@pytest.mark.parametrize("key", KEYS, ids=[k.name for k in KEYS])
def test_every_key_reaches_its_field_from_every_source(key: Any, tmp_path: Path) -> None:
    text, want = _sample(key)
    section, _, name = key.name.rpartition(".")
    f = tmp_path / "c.toml"
    f.write_text(
        f"[{section}]\n{name} = {json.dumps(text)}\n"
        if section
        else f"{name} = {json.dumps(text)}\n"
    )
    configs = [
        load_config(f, env={}),
        load_config(env={key.env: text}),
        load_config(env={}, overrides=parse_set([f"{key.name}={text}"])),
    ]
    for cfg in configs:
        value: Any = cfg
        for attr in key.path:
            value = getattr(value, attr)
        assert value == want, key.name


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus = 1\n", "unknown key bogus"),
        ("[gc]\nnope = 1\n", "unknown key gc.nope"),
        ('[ephemeral]\nmax_ttl = "7"\n', "ephemeral.max_ttl"),
        ('[ingress]\nmax_waiters = "many"\n', "ingress.max_waiters"),
        ("listen = 5\n", "listen"),
        ('store = "redis://x"\n', "store"),
        ("this is not toml", "c.toml"),
        ('[ingress]\nbody_timeout = "0s"\n', "ingress.body_timeout: must be greater than 0"),
        ("[ingress]\nheader_timeout = 0\n", "ingress.header_timeout: must be greater than 0"),
        ("[ingress]\nrequest_buffer = -1\n", "ingress.request_buffer: must be between"),
        ("[ingress]\nrequest_buffer = 2000000\n", "ingress.request_buffer: must be between"),
        ("[activator]\nlog_max_bytes = -1\n", "activator.log_max_bytes: must be at least 0"),
        ("[ingress]\nmax_waiters = 0\n", "ingress.max_waiters: must be at least 1"),
        ("[ingress]\nmax_headers = 0\n", "ingress.max_headers: must be at least 1"),
        ("[ingress]\nmax_header_bytes = 1\n", "unknown key ingress.max_header_bytes"),
        ('[gc]\nsweep_interval = "0s"\n', "gc.sweep_interval: must be greater than 0"),
        ('[gc]\nexpiry_grace = "2m"\n', "gc.expiry_grace: must be between 0s and 60s"),
        ('[sandbox]\nisolation = "jail"\n', "sandbox.isolation: 'jail' is not auto, bwrap"),
        ("[sandbox]\nuid = 0\n", "sandbox.uid: must be between 1 and"),
        ('[ephemeral]\nurl_scheme = "ftp"\n', "ephemeral.url_scheme: 'ftp' is not http or https"),
        ("[ephemeral]\nmax_per_app = 0\n", "ephemeral.max_per_app: must be at least 1"),
        ('[ephemeral]\ndefault_ttl = "40d"\n', r"\[ephemeral\]: default_ttl must be"),
        ('log_level = "loud"\n', "log_level: 'loud' is not debug, info, warning or error"),
        ("ingress = 3\n", r"\[ingress\] must be a table"),
        ('[store_options]\ntimeout = "soon"\n', "store_options.timeout: invalid value 'soon'"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(f, env={})


def test_bad_environment_and_flags_name_the_key_and_the_source() -> None:
    with pytest.raises(ConfigError, match=r"environment: gc\.sweep_interval: invalid value 'x'"):
        load_config(env={"MIREN_GC_SWEEP_INTERVAL": "x"})
    with pytest.raises(ConfigError, match=r"command line: unknown key ingress\.nope"):
        load_config(env={}, overrides=parse_set(["ingress.nope=1"]))
    with pytest.raises(ConfigError, match=r"command line: sandbox\.gid: must be between"):
        load_config(env={}, overrides=parse_set(["sandbox.gid=0"]))


def test_layers_merge_before_a_section_is_built(tmp_path: Path) -> None:
    """A rule across keys of one section sees every layer: the file raises max_ttl, the
    environment the default TTL above the old maximum."""
    f = tmp_path / "c.toml"
    f.write_text('[ephemeral]\nmax_ttl = "60d"\n')
    cfg = load_config(f, env={"MIREN_EPHEMERAL_DEFAULT_TTL": "40d"})
    assert (cfg.ephemeral.default_ttl, cfg.ephemeral.max_ttl) == (
        timedelta(days=40),
        timedelta(days=60),
    )


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('listen = "127.0.0.1:1"\nstore = "memory"\n[gc]\nsweep_interval = "5s"\n')
    cfg = load_config(f, env={"MIREN_LISTEN": "127.0.0.1:2", "MIREN_GC_SWEEP_INTERVAL": "7s"})
    assert (cfg.listen, cfg.store, cfg.gc.sweep_interval) == ("127.0.0.1:2", "memory", 7.0)
    cfg = load_config(f, env={"MIREN_LISTEN": "127.0.0.1:2"}, overrides={"listen": "127.0.0.1:3"})
    assert cfg.listen == "127.0.0.1:3"


def test_non_loopback_admin_needs_token() -> None:
    with pytest.raises(ConfigError, match="without a token"):
        load_config(env={}, overrides={"admin_listen": "0.0.0.0:8081"})
    cfg = load_config(
        env={"MIREN_ADMIN_TOKEN": "s3cret"}, overrides={"admin_listen": "0.0.0.0:8081"}
    )
    assert cfg.admin_token == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_set_flag_parses_sections() -> None:
    assert parse_set(["ephemeral.max_ttl=7d", "listen=0.0.0.0:80"]) == {
        "ephemeral": {"max_ttl": "7d"},
        "listen": "0.0.0.0:80",
    }
    with pytest.raises(ConfigError):
        parse_set(["novalue"])
    with pytest.raises(ConfigError, match="listen is not a section"):
        parse_set(["listen=1", "listen.port=2"])


def test_shipped_configs_load() -> None:
    root = ROOT / "configs"
    dev = load_config(root / "dev.toml", env={})
    assert dev.store == "embedded" and dev.admin_listen.startswith("127.0.0.1")
    prod = load_config(root / "production.toml", env={"MIREN_ADMIN_TOKEN": "t"})
    assert prod.store.count(",") == 2  # a three-endpoint etcd cluster
    assert prod.tls.listen == "0.0.0.0:443" and prod.tls.redirect_http  # HTTPS on, in production
    assert prod.acme.directory is not None and prod.ephemeral.url_scheme is None
    check_tls(prod)  # (the keys that go together do)
    with pytest.raises(ConfigError, match="without a token"):
        load_config(root / "production.toml", env={})


def test_the_readme_table_is_the_generated_one() -> None:
    """The README's configuration table is `reference.markdown_table()` (regenerate it with
    `miren config --format markdown`), so the docs cannot drift from the declarations."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tables = [line for line in section.splitlines() if line.startswith("|")]
    assert "\n".join(tables) + "\n" == reference.markdown_table()


def test_miren_config_prints_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in KEYS:
        assert f"{key.name}  " in out and key.env in out and key.setting.help in out
    assert main(["config", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["key"] for k in listed] == [k.name for k in KEYS]
    assert {k["key"]: k["default"] for k in listed}["ingress.header_timeout"] == "30s"
    assert main(["config", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == reference.markdown_table()
