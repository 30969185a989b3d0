"""Metrics, error-page negotiation, header helpers, host normalization (no sockets needed
except for the metrics round trip)."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from miren_ingress.proxy import StaticRouter, Target, normalize_host
from miren_ingress.proxy.errorpage import negotiate, render_response
from miren_ingress.proxy.headers import connection_tokens, drop_named, is_chunked_only

from .conftest import RawUpstream, raw_exchange


def sample(registry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_metrics_move(proxy, ok_upstream: RawUpstream) -> None:
    p = await proxy({"shop.test": ok_upstream.address})
    reg = p.registry
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(p.url + "/", headers={"Host": "shop.test"}) as r:
                assert r.status == 200
        async with s.request("PROPFIND", p.url + "/", headers={"Host": "shop.test"}) as r:
            assert r.status == 200
        async with s.get(p.url + "/", headers={"Host": "nope.test"}) as r:
            assert r.status == 404
    await raw_exchange(
        p.port, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    m = "miren_ingress_requests_total"
    assert sample(reg, m, app="shop.test", code="200", method="GET") == 3
    assert sample(reg, m, app="shop.test", code="200", method="OTHER") == 1
    assert sample(reg, m, app="unknown", code="404", method="GET") == 1
    assert sample(reg, m, app="unknown", code="400", method="OTHER") == 1
    assert sample(reg, "miren_ingress_request_duration_seconds_count", app="shop.test") == 4
    assert sample(reg, "miren_ingress_request_duration_seconds_sum", app="shop.test") > 0
    assert sample(reg, "miren_ingress_lease_lookups_total", result="hit") == 4
    assert sample(reg, "miren_ingress_in_flight_requests") == 0
    text = generate_latest(reg).decode()
    assert 'miren_ingress_lease_lookups_total{result="miss"} 0.0' in text
    assert "miren_ingress_upstream_errors_total" in text


async def test_upstream_error_metric(proxy) -> None:
    p = await proxy({"*": "127.0.0.1:1"})  # nothing listens on port 1
    async with aiohttp.ClientSession() as s, s.get(p.url + "/") as r:
        assert r.status == 502
    assert sample(p.registry, "miren_ingress_upstream_errors_total", reason="connect") == 1
    assert (
        sample(p.registry, "miren_ingress_requests_total", app="default", code="502", method="GET")
        == 1
    )


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        (b"", 2),
        (b"application/json", 0),
        (b"text/html", 1),
        (b"text/plain", 2),
        (b"*/*", 2),
        (b"text/*", 2),
        (b"image/png", 2),
        (b"text/html;q=0.2, application/json;q=0.9", 0),
        (b"application/json;q=0, text/html", 1),
        (b"text/*;q=0.9, text/html", 1),
        (b"application/json;q=abc", 2),
    ],
)
def test_negotiate(accept: bytes, kind: int) -> None:
    assert negotiate(accept) == kind


def test_error_response_shape() -> None:
    data = render_response(503, "Try <later>", b"text/html", keep_alive=False, retry_after=3)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    for line in (
        b"Cache-Control: no-store",
        b"Vary: Accept",
        b"Retry-After: 3",
        b"Connection: close",
    ):
        assert line in head
    assert b"Try &lt;later&gt;" in body
    assert b"Content-Length: %d" % len(body) in head
    head_only = render_response(404, "x", b"", keep_alive=True, head_only=True)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: " in head_only


def test_header_helpers() -> None:
    assert connection_tokens(b"keep-alive, X-Foo , Upgrade") == (frozenset({b"x-foo"}), True)
    assert connection_tokens(b"close") == (frozenset(), False)
    lines = [b"", b"X-Foo: 1\r\n", b"x-bar: 2\r\n", b"Other: 3\r\n"]
    assert drop_named(lines, frozenset({b"x-foo", b"x-bar"})) == [b"", b"Other: 3\r\n"]
    assert is_chunked_only(b"Chunked ") and not is_chunked_only(b"gzip, chunked")


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        (b"App.Example.COM", "app.example.com"),
        (b"app.example.com:8080", "app.example.com"),
        (b"app.example.com.", "app.example.com"),
        (b"[::1]:80", "[::1]"),
        (b"", None),
        (b"a..b", None),
        (b"bad host", None),
        (b"x" * 64 + b".com", None),
    ],
)
def test_normalize_host(raw: bytes, host: str | None) -> None:
    assert normalize_host(raw) == host


def test_static_router_reprs_and_hits() -> None:
    router = StaticRouter({"a.test": "127.0.0.1:9"})
    target = router.resolve(b"A.test:1")
    assert isinstance(target, Target) and target.app == "a.test"
    assert router.resolve(b"b.test").status == 404  # type: ignore[union-attr]
    assert repr(router) == "<StaticRouter routes=1>"


def test_request_done_counts_and_buckets() -> None:
    from miren_ingress.proxy.metrics import ProxyMetrics

    reg = CollectorRegistry()
    m = ProxyMetrics(reg, lambda: 0.0)
    for code, method, seconds in [
        (200, b"GET", 0.0005),
        (200, b"GE" + b"T", 0.001),  # (a fresh bytes object, as the parser gives)
        (200, b"POST", 0.003),
        (404, b"GET", 100.0),
        (200, b"BREW", 0.0),
    ]:
        m.request_done("shop", code, method, seconds)
    count = "miren_ingress_requests_total"
    assert sample(reg, count, app="shop", code="200", method="GET") == 2
    assert sample(reg, count, app="shop", code="200", method="POST") == 1
    assert sample(reg, count, app="shop", code="404", method="GET") == 1
    assert sample(reg, count, app="shop", code="200", method="OTHER") == 1
    bucket = "miren_ingress_request_duration_seconds_bucket"
    assert sample(reg, bucket, app="shop", le="0.001") == 3  # 0.0, 0.0005 and 0.001 itself
    assert sample(reg, bucket, app="shop", le="0.005") == 4
    assert sample(reg, bucket, app="shop", le="60.0") == 4
    assert sample(reg, bucket, app="shop", le="+Inf") == 5
    assert sample(reg, "miren_ingress_request_duration_seconds_sum", app="shop") == pytest.approx(
        100.0045
    )
