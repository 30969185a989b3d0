"""HTTPS at the edge, through a real `miren serve` subprocess: SNI picks the file certificate
(exact and wildcard), requests are proxied with `X-Forwarded-Proto: https`, HSTS, the plain
listener's redirect, and nothing is served for a name without a certificate."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.clients import free_port
from tests.support.edge import ECHO_CMD, TOKEN, MirenServer
from tests.support.poll import eventually_sync
from tests.tls.pki import TestCA, handshake_fails, peer_certificate

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def certs(ca: TestCA) -> dict[str, tuple[Path, Path, int]]:
    return {
        "exact": ca.issue("exact", "app.example.com"),
        "wild": ca.issue("wild", "*.example.com"),
    }


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, tuple[Path, Path, int]]
) -> Iterator[MirenServer]:
    files = ",".join(f"{c}:{k}" for c, k, _ in certs.values())
    tls_port = free_port()
    with MirenServer(
        tmp_path_factory.mktemp("https"),
        store="memory",
        token=TOKEN,
        settings={
            "tls.listen": f"127.0.0.1:{tls_port}",
            "tls.certificates": files,
            "tls.hsts": "1d",
            "tls.redirect_http": "true",
        },
    ) as server:
        server.tls_port = tls_port  # type: ignore[attr-defined]
        server.cli("app", "create", "web")
        server.cli("route", "set", "app.example.com", "--app", "web")
        server.cli("route", "set", "*.example.com", "--app", "web")
        server.cli("deploy", "--app", "web", "--wait", "--", *ECHO_CMD)
        yield server


def tls_port(edge: MirenServer) -> int:
    port: int = edge.tls_port  # type: ignore[attr-defined]
    return port


def test_sni_picks_the_exact_then_the_wildcard_certificate(
    edge: MirenServer, certs: dict[str, tuple[Path, Path, int]]
) -> None:
    port = tls_port(edge)
    assert peer_certificate(port, "app.example.com").serial_number == certs["exact"][2]
    assert peer_certificate(port, "pr-1.example.com").serial_number == certs["wild"][2]
    assert peer_certificate(port, "APP.example.com").serial_number == certs["exact"][2]
    # A wildcard covers one label only, and nothing covers other names.
    for name in ("a.b.example.com", "example.com", "other.test"):
        assert handshake_fails(port, name), name
    # A client that names no host (or an address) gets the first file certificate, as from
    # nginx's default server; its Host header still routes.
    assert peer_certificate(port, None).serial_number == certs["exact"][2]
    assert peer_certificate(port, "127.0.0.1").serial_number == certs["exact"][2]
    metrics = edge.admin("GET", "/metrics").body.decode()
    assert 'miren_tls_handshakes_total{outcome="no_certificate"}' in metrics


def test_https_requests_are_proxied_with_the_right_headers(edge: MirenServer, ca: TestCA) -> None:
    port = tls_port(edge)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.path))) as client:
        for host in ("app.example.com", "pr-1.example.com"):
            reply = client.get(
                f"https://127.0.0.1:{port}/headers",
                headers={"Host": host},
                extensions={"sni_hostname": host},
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["strict-transport-security"] == "max-age=86400"
            seen = {k.lower(): v for k, v in json.loads(reply.text)["headers"]}
            assert seen["x-forwarded-proto"] == "https"
            assert seen["x-forwarded-host"] == host
        # Keep-alive over TLS: the same connection serves again.
        again = client.get(
            f"https://127.0.0.1:{port}/", headers={"Host": "app.example.com"},
            extensions={"sni_hostname": "app.example.com"},
        )  # fmt: skip
        assert again.status_code == 200


def test_plain_http_is_redirected_but_acme_and_health_are_not(edge: MirenServer) -> None:
    port = tls_port(edge)
    reply = edge.get("app.example.com:8080", "/a/b?c=d")
    assert reply.status == 308, reply
    assert reply.header("location") == f"https://app.example.com:{port}/a/b?c=d"
    assert reply.header("strict-transport-security") is None  # (plain HTTP: RFC 6797 §7.2)
    assert edge.get("app.example.com", "/.well-known/acme-challenge/nope").status == 404
    assert edge.get("app.example.com", "/.well-known/miren/health").status == 200


def test_bytes_that_are_not_tls_are_closed(edge: MirenServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", tls_port(edge)), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # (closed with our bytes unread: a reset)
            answer = b""
        assert answer == b""  # closed, no answer in plain text
    metrics = edge.admin("GET", "/metrics").body.decode()
    assert 'miren_tls_handshakes_total{outcome="not_tls"}' in metrics


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"tls.certificates": "/nonexistent/c.pem:/nonexistent/k.pem"}, "/nonexistent/c.pem"),
        ({}, "give tls.certificates or acme.directory"),
    ],
)
def test_a_tls_listener_that_cannot_serve_stops_the_start(
    tmp_path: Path, settings: dict[str, str], words: str
) -> None:
    import subprocess

    from tests.support.apps import REPO
    from tests.support.edge import base_env, serve_argv

    args = [
        "--store",
        "memory",
        "--data-dir",
        str(tmp_path),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--set",
        f"tls.listen=127.0.0.1:{free_port()}",
    ]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    done = subprocess.run(
        serve_argv(*args), env=base_env(), capture_output=True, text=True, timeout=60,
        cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode in (1, 2), done.stderr
    assert words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_hostile_hello_is_cut_short_and_idle_handshakes_are_capped(edge: MirenServer) -> None:
    import socket

    port = tls_port(edge)
    # A ClientHello announced long, then sent in one-byte records: refused after a few records,
    # long before the handshake timeout (10 s), not parsed again and again until then.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x04\x01\x00\x3e\x80" + b"\x16\x03\x01\x00\x01\x00" * 2700)
        with contextlib.suppress(ConnectionResetError):  # (closed with our bytes unread)
            assert sock.recv(100) == b""  # (a timeout here fails the test)
    # Connections that send nothing: at most 64 wait for their ClientHello per address; the
    # next ones are closed at once, and a client gets in again once they are gone.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(70)]
    try:

        def refused() -> bool:
            return edge.metric("miren_tls_handshakes_total", outcome="refused") >= 6

        eventually_sync(refused, 10, "the connections past the cap to be refused")
    finally:
        for sock in idle:
            sock.close()
    eventually_sync(
        lambda: not handshake_fails(port, "app.example.com"), 15, "a handshake to work again"
    )


def test_a_redirect_never_copies_a_strange_host(edge: MirenServer) -> None:
    reply = edge.get("evil.example/x?", "/p")
    assert reply.status == 400, reply
    assert reply.header("location") is None
