"""On-demand certificates from a real ACME server (pebble), through a real `miren serve`.

A route host and a live preview get a certificate on their first handshake and answer over
HTTPS with a chain that verifies to pebble's root; an unknown label, an expired preview, a host
without a route and a name only a wildcard route covers get none, and no order; 50 concurrent
first handshakes make one order; a restart serves the same certificate (same serial) from the
store; a certificate near its end is replaced without a failed handshake.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.support.clients import free_port
from tests.support.edge import DEAD_UPSTREAM, ECHO_CMD, TOKEN, MirenServer
from tests.support.poll import eventually_sync
from tests.tls.pki import Pebble, handshake_fails, peer_certificate

pytestmark = pytest.mark.timeout(180)


def acme_edge(
    workdir: Path, *, validity: int | None = None, **settings: str
) -> Iterator[tuple[MirenServer, Pebble, int]]:
    server = MirenServer(workdir / "edge", store="embedded", token=TOKEN)
    tls_port = free_port()
    with Pebble(
        workdir / "pebble", http_port=server.proxy_port, tls_port=tls_port, validity=validity
    ) as pebble:
        server.settings = {
            "tls.listen": f"127.0.0.1:{tls_port}",
            "acme.directory": pebble.directory,
            "acme.ca_bundle": str(pebble.ca.path),
            "acme.email": "ops@example.com",
            **settings,
        }
        with server:
            server.cli("app", "create", "web")
            server.cli("route", "set", "app.example.com", "--app", "web")
            server.cli("route", "set", "*.apps.example.com", "--app", "web")
            server.cli("deploy", "--app", "web", "--upstream", DEAD_UPSTREAM)
            yield server, pebble, tls_port


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MirenServer, Pebble, int]]:
    yield from acme_edge(tmp_path_factory.mktemp("acme"))


def issuer_cn(cert: x509.Certificate) -> str:
    return str(cert.issuer.rfc4514_string())


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(ext.value.get_values_for_type(x509.DNSName))


def issued(edge: MirenServer) -> float:
    return edge.metric("miren_tls_certificates_issued_total")


def test_a_route_host_and_a_live_preview_get_certificates_on_first_handshake(
    world: tuple[MirenServer, Pebble, int], tmp_path: Path
) -> None:
    edge, pebble, port = world
    edge.cli("deploy", "--app", "web", "--wait", "--", *ECHO_CMD)
    out = edge.cli("deploy", "--app", "web", "--ephemeral", "pr-1", "--", *ECHO_CMD).stdout
    assert f"https://pr-1.app.example.com:{port}" in out, out  # URLs follow the TLS listener
    before = issued(edge)
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())
    verify = ssl.create_default_context(cafile=str(root))
    with httpx.Client(verify=verify, timeout=60) as client:
        for host in ("app.example.com", "pr-1.app.example.com"):
            reply = client.get(
                f"https://127.0.0.1:{port}/", headers={"Host": host},
                extensions={"sni_hostname": host},
            )  # fmt: skip
            assert reply.status_code == 200, reply.text
            assert sans(peer_certificate(port, host)) == [host]
    assert issued(edge) == before + 2


@pytest.mark.parametrize(
    "name",
    [
        "nope.app.example.com",  # a label without a preview
        "expired.app.example.com",  # a preview that expired
        "nohost.example.org",  # no route at all
        "random.apps.example.com",  # only a wildcard route would serve it: any label would do
        "a.b.app.example.com",
    ],
)
def test_names_that_route_to_nothing_get_no_certificate_and_no_order(
    world: tuple[MirenServer, Pebble, int], name: str
) -> None:
    edge, _, port = world
    if name.startswith("expired."):
        edge.cli("deploy", "--app", "web", "--ephemeral", "expired", "--ttl", "1s",
                 "--upstream", DEAD_UPSTREAM)  # fmt: skip
        eventually_sync(
            lambda: edge.get("expired.app.example.com").status in (404, 410),
            15,
            "the preview to expire",
        )
    orders_before = issued(edge) + edge.metric("miren_tls_issuance_failures_total", reason="acme")
    refused_before = edge.metric("miren_tls_issuance_refused_total")
    t0 = time.monotonic()
    assert handshake_fails(port, name)
    assert time.monotonic() - t0 < 5  # refused at once, not after an order's timeout
    assert edge.metric("miren_tls_issuance_refused_total") == refused_before + 1
    after = issued(edge) + edge.metric("miren_tls_issuance_failures_total", reason="acme")
    assert after == orders_before


def test_fifty_concurrent_first_handshakes_make_one_order(
    world: tuple[MirenServer, Pebble, int],
) -> None:
    edge, _, port = world
    edge.cli("route", "set", "burst.example.com", "--app", "web")
    before = issued(edge)
    with ThreadPoolExecutor(50) as pool:
        serials = list(
            pool.map(lambda _: peer_certificate(port, "burst.example.com").serial_number, range(50))
        )
    assert len(set(serials)) == 1, serials
    assert issued(edge) == before + 1


def test_a_restart_serves_the_stored_certificate(
    world: tuple[MirenServer, Pebble, int],
) -> None:
    edge, _, port = world
    edge.cli("route", "set", "kept.example.com", "--app", "web")
    serial = peer_certificate(port, "kept.example.com").serial_number
    edge.restart()
    assert issued(edge) == 0  # a fresh process: its counters start again
    assert peer_certificate(port, "kept.example.com").serial_number == serial
    assert issued(edge) == 0  # no new order: the certificate came from the store


def test_renewal_replaces_a_certificate_without_a_failed_handshake(tmp_path: Path) -> None:
    """Certificates valid 20 s, renewed past 25 % of that: a new serial within seconds, while
    handshakes go on every 50 ms and none fails."""
    for edge, _, port in acme_edge(
        tmp_path, validity=20, **{"acme.renew_at": "0.25", "acme.check_interval": "1s"}
    ):
        first = peer_certificate(port, "app.example.com").serial_number
        failures = 0
        deadline = time.monotonic() + 60
        current = first
        while current == first:
            assert time.monotonic() < deadline, "never renewed"
            try:
                current = peer_certificate(port, "app.example.com", timeout=10).serial_number
            except (ssl.SSLError, OSError):
                failures += 1
            time.sleep(0.05)
        assert failures == 0
        assert edge.metric("miren_tls_certificates_renewed_total") >= 1


def test_tls_alpn_01_on_the_tls_listener(tmp_path: Path) -> None:
    """The CA checks the name on the TLS listener (acme.challenge = tls-alpn-01): the plain
    listener is not involved."""
    for edge, _, port in acme_edge(tmp_path, **{"acme.challenge": "tls-alpn-01"}):
        cert = peer_certificate(port, "app.example.com")
        assert sans(cert) == ["app.example.com"]
        assert "Pebble" in issuer_cn(cert), issuer_cn(cert)
        assert issued(edge) == 1
        # Only a CA's validation gets the challenge certificate, and only while it waits.
        assert handshake_fails(port, "app.example.com", alpn=["acme-tls/1"])


def test_a_failed_issuance_backs_off_for_its_name_only(tmp_path: Path) -> None:
    """An ACME server that does not answer: the first handshake's order fails; the next one for
    that name makes no new attempt (backed off) and fails at once; another name tries its own."""
    tls_port = free_port()
    with MirenServer(
        tmp_path, store="memory", token=TOKEN,
        settings={
            "tls.listen": f"127.0.0.1:{tls_port}",
            "acme.directory": f"https://127.0.0.1:{free_port()}/dir",  # nothing listens
            "acme.failure_backoff": "1h",
        },
    ) as edge:  # fmt: skip
        for host in ("app.example.com", "other.example.com"):
            edge.cli("app", "create", host.split(".")[0])
            edge.cli("route", "set", host, "--app", host.split(".")[0])

        def failures() -> float:
            return edge.metric("miren_tls_issuance_failures_total", reason="network")

        assert handshake_fails(tls_port, "app.example.com")
        assert failures() == 1
        t0 = time.monotonic()
        assert handshake_fails(tls_port, "app.example.com")
        assert time.monotonic() - t0 < 5 and failures() == 1  # backed off: no second attempt
        assert handshake_fails(tls_port, "other.example.com")
        assert failures() == 2  # another name is not blocked by the first one's failure
