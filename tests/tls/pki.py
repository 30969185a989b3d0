"""A throwaway certificate authority for the TLS tests, and a real ACME server (pebble).

`TestCA` signs leaf certificates for any names (wildcards too). `Pebble` runs Debian's `pebble`
and `pebble-challtestsrv` on free loopback ports: the mock DNS answers every name with
127.0.0.1, so pebble validates HTTP-01 challenges against the edge's plain listener
(`http_port`); its own HTTPS endpoint uses a certificate of a `TestCA`, which the edge trusts
through `acme.ca_bundle`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.clients import free_port
from tests.support.poll import eventually_sync


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    __test__ = False  # (not a test class)

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "miren test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = self.dir / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, *names: str, ip: bool = False) -> tuple[Path, Path, int]:
        """A leaf for `names`: (chain file, key file, serial)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        if ip:
            import ipaddress

            alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = self.dir / f"{stem}.pem"
        private = self.dir / f"{stem}.key"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        private.write_bytes(_key_pem(key))
        return chain, private, serial


def peer_certificate(
    port: int, server_name: str | None, timeout: float = 30.0, alpn: list[str] | None = None
) -> x509.Certificate:
    """The certificate the edge's TLS listener presents for `server_name` (no verification:
    the tests compare serials and names)."""
    import socket

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def handshake_fails(
    port: int, server_name: str | None, timeout: float = 30.0, alpn: list[str] | None = None
) -> bool:
    try:
        peer_certificate(port, server_name, timeout, alpn)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


class Pebble:
    """pebble + pebble-challtestsrv on free loopback ports, ended (by pid) on exit."""

    def __init__(
        self,
        workdir: Path,
        *,
        http_port: int,
        tls_port: int | None = None,
        validity: int | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(self.dir / "pebble-ca")
        self.http_port = http_port
        self.tls_port = tls_port or free_port()  # where it checks TLS-ALPN-01
        self.validity = validity
        self.port = free_port()
        self.management = free_port()
        self.dns = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def __enter__(self) -> Self:
        cert, key, _ = self.ca.issue("pebble", "localhost", ip=True)
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            config["certificateValidityPeriod"] = self.validity
        path = self.dir / "pebble.json"
        path.write_text(json.dumps({"pebble": config}))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        log = open(self.dir / "pebble.log", "ab")
        self._log = log
        try:
            dns = [
                "pebble-challtestsrv", "-dns01", f"127.0.0.1:{self.dns}", "-http01", "",
                "-https01", "", "-tlsalpn01", "", "-defaultIPv6", "",
                "-management", f"127.0.0.1:{free_port()}",
            ]  # fmt: skip
            ca = ["pebble", "-config", str(path), "-dnsserver", f"127.0.0.1:{self.dns}"]
            self._procs.append(subprocess.Popen(dns, stdout=log, stderr=subprocess.STDOUT))
            self._procs.append(subprocess.Popen(ca, stdout=log, stderr=subprocess.STDOUT, env=env))
            eventually_sync(self._ready, 30, "pebble to serve its directory", interval=0.05)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _ready(self) -> bool:
        for proc in self._procs:
            assert proc.poll() is None, (self.dir / "pebble.log").read_text()
        try:
            self.get(self.directory)
        except OSError:
            return False
        return True

    def get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            body: bytes = resp.read()
            return body

    def root_pem(self) -> bytes:
        """pebble's issuing root (a new one each start), to verify the edge's chain."""
        return self.get(f"https://127.0.0.1:{self.management}/roots/0")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._procs.clear()
        self._log.close()
