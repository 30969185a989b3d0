"""Certificates by server name: which TLS context a handshake for a name gets.

A `Certificate` is a chain and its key (PEM) with the names it covers (its subjectAltName DNS
entries; `*.example.com` covers one more label: `pr-1.example.com`, not `a.b.example.com` and not
`example.com`, as RFC 6125 §6.4.3 has it). `CertStore` answers `context_for(name)` from memory:
exact names first, then the wildcard of the name's parent. A newer certificate for a name
replaces the older one (a renewal) for the handshakes that start after it.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import attrs
from cryptography import x509

ALPN = ["http/1.1"]


class CertificateError(Exception):
    """A certificate or key that cannot be used (message names the file or the name)."""


@attrs.frozen
class Certificate:
    chain_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: int
    source: str  # "file:<path>" or "acme"

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, source: str) -> Certificate:
        try:
            leaf = x509.load_pem_x509_certificate(chain_pem)
        except ValueError as exc:
            raise CertificateError(f"{source}: not a PEM certificate: {exc}") from None
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = tuple(
                n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)
            )
        except x509.ExtensionNotFound:
            names = ()
        if not names:
            raise CertificateError(f"{source}: the certificate names no DNS subjectAltName")
        return cls(
            chain_pem=chain_pem,
            key_pem=key_pem,
            names=names,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
            source=source,
        )

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> Certificate:
        try:
            chain_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
        except OSError as exc:
            raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return cls.from_pem(chain_pem, key_pem, f"file:{cert}")

    def lifetime_used(self, now: datetime) -> float:
        """How much of its validity has passed (0 at not_before, 1 at not_after)."""
        total = (self.not_after - self.not_before).total_seconds()
        return 1.0 if total <= 0 else (now - self.not_before).total_seconds() / total

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def server_context(cert: Certificate, alpn: Iterable[str] = ALPN) -> ssl.SSLContext:
    """A server-side TLS context serving `cert` (TLS 1.2+, ALPN as given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    # load_cert_chain reads files only: the PEMs go through a private temporary file.
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
        f.write(cert.key_pem + b"\n" + cert.chain_pem)
        f.flush()
        try:
            ctx.load_cert_chain(f.name)
        except ssl.SSLError as exc:
            raise CertificateError(
                f"{cert.source}: key and certificate do not load: {exc}"
            ) from None
    return ctx


def covers(pattern: str, name: str) -> bool:
    """Whether a certificate name (`app.example.com`, `*.example.com`) covers `name`."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, parent = name.partition(".")
        return bool(head) and parent == pattern[2:]
    return False


class CertStore:
    """The certificates the listener serves, by name, with their TLS contexts (built once)."""

    def __init__(self) -> None:
        self._exact: dict[str, tuple[Certificate, ssl.SSLContext]] = {}
        self._wild: dict[str, tuple[Certificate, ssl.SSLContext]] = {}  # parent -> entry

    def __len__(self) -> int:
        return len({id(c) for c, _ in (*self._exact.values(), *self._wild.values())})

    def add(self, cert: Certificate) -> None:
        """Serve `cert` for its names (replacing an older certificate of the same names)."""
        entry = (cert, server_context(cert))
        for name in cert.names:
            table, key = (self._wild, name[2:]) if name.startswith("*.") else (self._exact, name)
            old = table.get(key)
            if old is None or old[0].not_after <= cert.not_after or old[0].source == cert.source:
                table[key] = entry

    def lookup(self, name: str) -> tuple[Certificate, ssl.SSLContext] | None:
        found = self._exact.get(name)
        if found is not None:
            return found
        _, _, parent = name.partition(".")
        return self._wild.get(parent) if parent else None

    def context_for(self, name: str) -> ssl.SSLContext | None:
        found = self.lookup(name)
        return None if found is None else found[1]

    def default(self) -> ssl.SSLContext | None:
        """For a client that names no host (no SNI, or an IP address): the first file
        certificate, as nginx's default server does (None: there is none)."""
        for cert, ctx in self._exact.values():
            if cert.source.startswith("file:"):
                return ctx
        for cert, ctx in self._wild.values():
            if cert.source.startswith("file:"):
                return ctx
        return None

    def certificates(self) -> list[Certificate]:
        seen: dict[int, Certificate] = {}
        for cert, _ in (*self._exact.values(), *self._wild.values()):
            seen[id(cert)] = cert
        return list(seen.values())


def utcnow() -> datetime:
    return datetime.now(UTC)
