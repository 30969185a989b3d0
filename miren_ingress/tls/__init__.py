"""TLS at the edge: the HTTPS listener, certificates by SNI (files), and on demand (ACME)."""
