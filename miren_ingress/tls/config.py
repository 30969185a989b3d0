"""The `[tls]` and `[acme]` sections: the HTTPS listener, its file certificates, and on-demand
certificates from an ACME server."""

from __future__ import annotations

import attrs

from miren_store.settings import setting


@attrs.frozen
class CertFiles:
    """One certificate from files: `{cert = "fullchain.pem", key = "key.pem"}`."""

    cert: str
    key: str


@attrs.frozen
class TlsConfig:
    listen: str | None = attrs.field(
        default=None,
        metadata=setting("HTTPS listener (host:port; none: no TLS)"),
    )
    certificates: tuple[CertFiles, ...] = attrs.field(
        default=(),
        metadata=setting(
            'certificates from files, chosen by SNI: [{cert = "...", key = "..."}] (a '
            "wildcard *.example.com serves pr-1.example.com)",
            shown="none",
        ),
    )
    redirect_http: bool = attrs.field(
        default=False,
        metadata=setting("answer plain HTTP with a 308 to https:// (ACME challenges excepted)"),
    )
    hsts: float = attrs.field(
        default=0.0,
        metadata=setting(
            "Strict-Transport-Security max-age on HTTPS answers (0: none)", duration=True, minimum=0
        ),
    )
    handshake_timeout: float = attrs.field(
        default=10.0,
        metadata=setting(
            "a client must send its ClientHello and finish the handshake within this (an "
            "on-demand issuance included)",
            duration=True,
            positive=True,
        ),
    )


@attrs.frozen
class AcmeConfig:
    directory: str | None = attrs.field(
        default=None,
        metadata=setting(
            "ACME directory URL for on-demand certificates (none: only file certificates)"
        ),
    )
    email: str | None = attrs.field(
        default=None, metadata=setting("contact address for the ACME account")
    )
    ca_bundle: str | None = attrs.field(
        default=None,
        metadata=setting(
            "CA file to trust the ACME server with (a private CA; none: the system's)"
        ),
    )
    challenge: str = attrs.field(
        default="http-01",
        metadata=setting(
            "how the CA checks a name is ours: http-01 (on the plain listener, which must be "
            "port 80 to the world) or tls-alpn-01 (on the TLS listener, port 443)",
            choices=("http-01", "tls-alpn-01"),
        ),
    )
    renew_at: float = attrs.field(
        default=2 / 3,
        metadata=setting(
            "renew a certificate once this share of its lifetime has passed",
            minimum=0.01,
            maximum=0.99,
            shown="0.67",
        ),
    )
    check_interval: float = attrs.field(
        default=3600.0,
        metadata=setting(
            "how often certificates are checked for renewal", duration=True, positive=True
        ),
    )
    failure_backoff: float = attrs.field(
        default=60.0,
        metadata=setting(
            "after a failed issuance for a name, no new order for it within this (doubling, "
            "at most an hour)",
            duration=True,
            positive=True,
        ),
    )
    timeout: float = attrs.field(
        default=90.0,
        metadata=setting(
            "an issuance (order to certificate) must end within this", duration=True, positive=True
        ),
    )
