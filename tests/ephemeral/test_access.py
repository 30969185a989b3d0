"""Access info (SPEC §5; reference §4.7, R-1, R-17, case 32): pure, no store."""

from __future__ import annotations

from miren_store.deploy.access import access_hostnames, access_urls
from miren_store.entities import HttpRoute


def route(host: str, *, default: bool = False) -> HttpRoute:
    return HttpRoute(host=host, app="app", default=default)


def test_r1_plain_route_gives_one_prefixed_url_never_a_double_prefix() -> None:
    urls = access_urls([route("app.example.com")], "feat-x")
    assert urls == ["https://feat-x.app.example.com"]
    assert not any("feat-x.feat-x" in u for u in urls)


def test_case32_wildcard_route_gives_label_dot_base() -> None:
    assert access_hostnames([route("*.apps.example.com")], "pr-1") == ["pr-1.apps.example.com"]


def test_case32_default_route_gives_no_hostname_from_its_default_flag() -> None:
    # A reference-style default route has no usable host: it contributes nothing...
    routes = [route("*.apps.example.com"), route("", default=True)]
    assert access_hostnames(routes, "pr-1") == ["pr-1.apps.example.com"]
    # ...and with only such a route the app has no host routes: the cluster fallback applies.
    assert access_urls([route("", default=True)], "pr-1", cluster_hostname="c.miren.systems") == [
        "https://pr-1.c.miren.systems"
    ]


def test_a_default_route_with_a_real_host_gives_its_host_once() -> None:
    # The ingress strips the first label and finds the route by its host (step 3): it routes.
    routes = [route("app.example.com", default=True)]
    assert access_hostnames(routes, "pr-1") == ["pr-1.app.example.com"]


def test_r17_route_hostnames_and_cluster_hostname_give_exactly_one_url() -> None:
    urls = access_urls([route("app.example.com")], "feat-x", cluster_hostname="c.miren.systems")
    assert urls == ["https://feat-x.app.example.com"]


def test_r17_no_routes_with_cluster_hostname_gives_exactly_one_fallback() -> None:
    assert access_urls([], "feat-x", cluster_hostname="c.miren.systems") == [
        "https://feat-x.c.miren.systems"
    ]


def test_r17_neither_gives_no_url() -> None:
    assert access_urls([], "feat-x") == []
    assert access_urls([], "feat-x", cluster_hostname="") == []


def test_several_routes_in_order_deduplicated() -> None:
    routes = [route("a.example.com"), route("*.b.example.com"), route("b.example.com")]
    assert access_hostnames(routes, "pr-9") == [
        "pr-9.a.example.com",
        "pr-9.b.example.com",
    ]


def test_scheme_and_port_are_parameters() -> None:
    urls = access_urls([route("app.localhost")], "pr-1", scheme="http", port=8080)
    assert urls == ["http://pr-1.app.localhost:8080"]


def test_unusable_hosts_give_nothing() -> None:
    routes = [route("*"), route("*.com"), route("foo.*.com"), route("bad_host.example.com")]
    assert access_hostnames(routes, "pr-1") == []


def test_a_hostname_over_253_characters_is_not_listed() -> None:
    long_host = ".".join(["a" * 60] * 4)  # 243 characters
    assert access_hostnames([route(long_host)], "pr-123456789") == []


def test_active_version_lists_plain_hosts_only() -> None:
    routes = [route("app.example.com"), route("*.apps.example.com")]
    assert access_urls(routes, None, cluster_hostname="c.miren.systems") == [
        "https://app.example.com"
    ]


def test_urls_as_served_follow_the_proxy_listener() -> None:
    """No url_scheme: what the proxy serves (http) on its port; set: as configured."""
    from miren_store.deploy.deploys import EphemeralConfig

    assert EphemeralConfig().scheme == "https"  # a library caller's default (the reference's)
    served = EphemeralConfig().as_served(8080)
    assert (served.url_scheme, served.url_port) == ("http", 8080)
    assert EphemeralConfig().as_served(80).url_port is None
    assert EphemeralConfig(url_port=9000).as_served(8080).url_port == 9000
    behind_tls = EphemeralConfig(url_scheme="https").as_served(8080)
    assert (behind_tls.url_scheme, behind_tls.url_port) == ("https", None)
