"""Configuration: one schema; TOML < env < flags; unknown keys and bad values name the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from miren_ingress.shell.config import ConfigError, load_config, parse_set


def test_defaults_are_sane() -> None:
    cfg = load_config(env={})
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.admin_listen == "127.0.0.1:8081"
    assert cfg.store == "embedded"
    assert cfg.ephemeral.default_ttl == timedelta(hours=24)
    assert cfg.ephemeral.max_ttl == timedelta(days=30)
    assert cfg.ephemeral.max_per_app == 10
    assert cfg.gc.sweep_interval == timedelta(seconds=60)
    assert cfg.ingress.max_waiters == 1000
    assert cfg.ingress.body_timeout == timedelta(seconds=30)
    assert cfg.ingress.request_buffer == 16 * 1024
    assert cfg.activator.log_max_bytes == 10 * 1024 * 1024


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('listen = "127.0.0.1:1"\nstore = "memory"\n[gc]\nsweep_interval = "5s"\n')
    cfg = load_config(f, env={"MIREN_LISTEN": "127.0.0.1:2", "MIREN_GC_SWEEP_INTERVAL": "7s"})
    assert (cfg.listen, cfg.store, cfg.gc.sweep_interval) == (
        "127.0.0.1:2",
        "memory",
        timedelta(seconds=7),
    )
    cfg = load_config(f, env={"MIREN_LISTEN": "127.0.0.1:2"}, overrides={"listen": "127.0.0.1:3"})
    assert cfg.listen == "127.0.0.1:3"


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
        ("[activator]\nlog_max_bytes = -1\n", "activator.log_max_bytes: must be 0"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(f, env={})


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


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    dev = load_config(root / "dev.toml", env={})
    assert dev.store == "embedded" and dev.admin_listen.startswith("127.0.0.1")
    prod = load_config(root / "production.toml", env={"MIREN_ADMIN_TOKEN": "t"})
    assert prod.store.count(",") == 2  # a three-endpoint etcd cluster
    with pytest.raises(ConfigError, match="without a token"):
        load_config(root / "production.toml", env={})
