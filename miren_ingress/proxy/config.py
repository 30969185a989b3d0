"""Settings of the proxy engine: one typed object, built by the caller, passed down."""

from __future__ import annotations

import attrs


@attrs.frozen(slots=True)
class ProxyConfig:
    header_timeout: float = 30.0  # a request head must arrive within this (slowloris bound)
    keepalive_timeout: float = 75.0  # an idle client connection is closed after this
    body_timeout: float = 30.0  # a request body must not stall longer than this (408)
    request_buffer: int = 16 * 1024  # body bytes read before the upstream is chosen (0: none)
    max_header_bytes: int = 64 * 1024  # request line + header section (larger: 431)
    max_request_line: int = 8 * 1024  # request target length (longer: 414)
    max_headers: int = 100  # header fields in a request head (more: 431)
    robots_tag: str = "noindex"  # X-Robots-Tag value on ephemeral targets' responses
    connect_timeout: float = 5.0  # TCP connect to an upstream (then 502, the target marked down)
    pool_max_idle: int = 512  # idle keep-alive connections kept per upstream address
    pool_idle_timeout: float = 30.0  # an idle pooled connection is closed after this
    buffer_limit: int = 256 * 1024  # request bytes held while no upstream is attached yet
    write_high_water: int = 256 * 1024  # transport write buffer: pause the other side above
    write_low_water: int = 64 * 1024  # ... and resume it below
