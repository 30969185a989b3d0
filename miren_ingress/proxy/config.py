"""Settings of the proxy engine: one typed object, built by the caller, passed down.

It is also the `[ingress]` section of the edge's configuration: each field is declared once,
with its default and its help (`miren_store.settings`); `internal` fields are not config keys.
"""

from __future__ import annotations

import attrs

from miren_store.settings import internal, setting


@attrs.frozen(slots=True)
class ProxyConfig:
    header_timeout: float = attrs.field(
        default=30.0,
        metadata=setting(
            "a request head must arrive within this (slow-client bound)",
            duration=True,
            positive=True,
        ),
    )
    keepalive_timeout: float = attrs.field(
        default=75.0,
        metadata=setting(
            "an idle client connection is closed after this", duration=True, positive=True
        ),
    )
    body_timeout: float = attrs.field(
        default=30.0,
        metadata=setting(
            "a request body that stops arriving this long is answered 408 (its lease and "
            "upstream connection are freed)",
            duration=True,
            positive=True,
        ),
    )
    request_buffer: int = attrs.field(
        default=16 * 1024,
        metadata=setting(
            "bytes of a request body read before the upstream is chosen: a shorter body arrives "
            "whole before it takes a lease, so a stalled one holds no capacity; longer bodies "
            "stream; 0 streams at once; requests with Expect are never buffered",
            minimum=0,
            maximum=1024 * 1024,  # held per client connection at most: keep it small
        ),
    )
    max_header_bytes: int = attrs.field(
        default=64 * 1024, metadata=internal("request line + header section (larger: 431)")
    )
    max_request_line: int = attrs.field(
        default=8 * 1024, metadata=internal("request target length (longer: 414)")
    )
    max_headers: int = attrs.field(
        default=100,
        metadata=setting(
            "header fields in a request head; more: 431 (also a head over 64 KiB; a target "
            "over 8 KiB: 414)",
            minimum=1,
        ),
    )
    loading_page: str = attrs.field(
        default="previews",
        metadata=setting(
            "a browser navigation that waits past loading_page_after for a cold start gets a "
            "'starting' page (503, Refresh: 2) while the boot goes on: for previews, all, none",
            choices=("previews", "all", "none"),
        ),
    )
    loading_page_after: float = attrs.field(
        default=1.0,
        metadata=setting(
            "how long a navigation waits for a cold start before the loading page",
            duration=True,
            minimum=0,
        ),
    )
    login_cookie_max_age: float = attrs.field(
        default=86400.0,
        metadata=setting(
            "how long the cookie a protected host's login (or bypass token) grants is valid",
            duration=True,
            positive=True,
        ),
    )
    robots_tag: str = attrs.field(
        default="noindex",
        metadata=setting("X-Robots-Tag value on preview responses (empty: none)"),
    )
    connect_timeout: float = attrs.field(
        default=5.0,
        metadata=setting(
            "connecting to a sandbox or upstream: past it, 502 (retried once elsewhere) and the "
            "target marked down",
            duration=True,
            positive=True,
        ),
    )
    pool_max_idle: int = attrs.field(
        default=512, metadata=internal("idle keep-alive connections kept per upstream address")
    )
    pool_idle_timeout: float = attrs.field(
        default=30.0, metadata=internal("an idle pooled connection is closed after this (s)")
    )
    buffer_limit: int = attrs.field(
        default=256 * 1024,
        metadata=internal("request bytes held while no upstream is attached yet"),
    )
    write_high_water: int = attrs.field(
        default=256 * 1024,
        metadata=internal("transport write buffer: pause the other side above this"),
    )
    write_low_water: int = attrs.field(
        default=64 * 1024, metadata=internal("... and resume it below this")
    )
