"""The TLS listener's and the ACME issuer's Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from miren_ingress.tls.certs import Certificate


class TlsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.handshakes = Counter(
            "miren_tls_handshakes",
            "TLS handshakes by outcome (ok, no_certificate, not_tls, failed, timeout)",
            ["outcome"],
            registry=registry,
        )
        self.issued = Counter(
            "miren_tls_certificates_issued", "certificates obtained from ACME", registry=registry
        )
        self.renewed = Counter(
            "miren_tls_certificates_renewed", "certificates renewed", registry=registry
        )
        self.failed = Counter(
            "miren_tls_issuance_failures",
            "ACME issuances that failed, by reason (acme, network, timeout, store, other)",
            ["reason"],
            registry=registry,
        )
        self.refused = Counter(
            "miren_tls_issuance_refused",
            "handshakes for a name that routes to nothing: no order was made",
            registry=registry,
        )
        self.issue_seconds = Histogram(
            "miren_tls_issuance_seconds",
            "from the order to the stored certificate",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.days_left = Gauge(
            "miren_tls_certificate_days_left",
            "days until a certificate expires (by its first name)",
            ["name"],
            registry=registry,
        )

    def observe(self, cert: Certificate, now: datetime | None = None) -> None:
        """Its days to expiry, by its first name."""
        left = cert.days_left(now or datetime.now(UTC))
        self.days_left.labels(name=cert.names[0]).set(round(left, 3))
