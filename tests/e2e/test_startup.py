"""`miren serve` refuses bad start-ups at once, with a message and a non-zero status, and leaves
nothing running; and how long a start takes is measured, not asserted (see the report)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import (
    TOKEN,
    MirenServer,
    base_env,
    free_port,
    http_call,
    pids_naming,
    process_table,
    serve_argv,
)

FAIL_FAST_TIMEOUT = 15.0  # generous: a refusal takes ~0.5 s here (interpreter start + imports)


def serve_once(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `miren serve` expecting it to exit on its own; every listener it could open is on a
    free loopback port, so a wrongly started server cannot collide with anything."""
    defaults = {
        "--listen": f"127.0.0.1:{free_port()}",
        "--admin-listen": f"127.0.0.1:{free_port()}",
        "--store": "memory",
        "--data-dir": str(tmp_path / "data"),
    }
    argv = list(args)
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    return subprocess.run(
        serve_argv(*argv),
        env=env if env is not None else base_env(),
        capture_output=True,
        text=True,
        timeout=FAIL_FAST_TIMEOUT,
        check=False,
    )


def test_non_loopback_admin_listener_without_token_is_refused(tmp_path: Path) -> None:
    port = free_port()
    result = serve_once(tmp_path, "--admin-listen", f"0.0.0.0:{port}")
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "refusing to open the admin API on non-loopback" in result.stderr, result.stderr
    assert "MIREN_ADMIN_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_loopback_admin_listener_with_a_token_starts(tmp_path: Path) -> None:
    """The same listener with MIREN_ADMIN_TOKEN: it starts and demands the token."""
    with MirenServer(tmp_path, token=TOKEN, admin_host="0.0.0.0") as server:
        assert http_call(server.admin_port, "GET", "/v1/apps").status == 401
        assert server.admin("GET", "/v1/apps").status == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "ingress.bogus=1"), "unknown key ingress.bogus"),
        (("--set", "bogus=1"), "unknown key bogus"),
        (("--set", "gc.sweep_interval=soon"), "gc.sweep_interval"),
        (("--store", "postgres://db:5432"), "store: 'postgres://db:5432' is not memory, embedded"),
        (("--listen", "nowhere"), "listen: 'nowhere' is not host:port"),
    ],
    ids=["unknown-section-key", "unknown-key", "bad-duration", "bad-store-scheme", "bad-listen"],
)
def test_bad_configuration_is_refused(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = serve_once(tmp_path, *args)
    assert result.returncode == 2, result
    assert result.stderr.startswith("miren serve: "), result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_in_a_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "miren.toml"
    config.write_text('[ingress]\nshutdown_grace = "5s"\ncolour = "red"\n')
    result = serve_once(tmp_path, "--config", str(config))
    assert result.returncode == 2, result
    assert "unknown key ingress.colour" in result.stderr, result.stderr
    assert str(config) in result.stderr


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("etcd://", "names no endpoint"),
        ("etcd://127.0.0.1:notaport", "invalid etcd endpoint '127.0.0.1:notaport'"),
    ],
)
def test_malformed_etcd_url_is_refused(tmp_path: Path, store: str, message: str) -> None:
    result = serve_once(tmp_path, "--store", store)
    assert result.returncode != 0, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listener", ["--listen", "--admin-listen"])
def test_port_in_use_is_refused_and_leaves_no_etcd(tmp_path: Path, listener: str) -> None:
    """On the embedded store: the etcd it started before binding must be stopped again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_once(tmp_path, listener, f"127.0.0.1:{port}", "--store", "embedded")
    assert result.returncode == 1, result
    assert "address already in use" in result.stderr.lower(), result.stderr
    assert str(port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "data" / "etcd").is_dir()  # it did get as far as starting etcd
    leftovers = pids_naming(str(tmp_path / "data" / "etcd"), process_table())
    alive = [pid for pid in leftovers if (info := process_table().get(pid)) and info.state != "Z"]
    assert alive == [], f"etcd survived a failed start: {alive}"


def test_the_embedded_etcd_listens_only_on_private_unix_sockets(tmp_path: Path) -> None:
    """Issue #15: sandboxes share the host's loopback, so the unauthenticated embedded etcd must
    have no TCP port at all; `miren serve` reaches it through a socket in the 0700 data dir."""
    with MirenServer(tmp_path, store="embedded") as edge:
        edge.cli("app", "create", "private")  # the store works, over the socket
        edge.observe()
        (etcd,) = edge.etcd_pids()
        etcd_dir = edge.data_dir / "etcd"
        assert stat.S_IMODE(etcd_dir.stat().st_mode) == 0o700
        sockets = [p for p in etcd_dir.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
        assert sorted(p.name.partition(":")[0] for p in sockets) == ["client.sock", "peer.sock"]
        assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in sockets)
        held = set()
        for fd in os.listdir(f"/proc/{etcd.pid}/fd"):
            target = os.readlink(f"/proc/{etcd.pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(int(target[len("socket:[") : -1]))
        inet = set()
        for table in ("tcp", "tcp6", "udp", "udp6"):
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            inet |= {int(row.split()[9]) for row in rows}
        assert held and not held & inet, "the embedded etcd holds a TCP or UDP socket"
