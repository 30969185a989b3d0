"""Pure parts of TLS: which certificate name covers which host, the store's choice by SNI,
which names may get an on-demand certificate, and what HTTPS adds to a response head."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from miren_ingress.proxy.engine import HeadTables
from miren_ingress.proxy.exchange import F_ACME, F_HEALTH, F_REDIRECT, F_RESERVED, special_flags
from miren_ingress.routing.routes import RouteTable
from miren_ingress.tls.certs import Certificate, CertificateError, CertStore, covers
from miren_store.entities import App, AppVersion, HttpRoute, Runtime, VersionSpec
from tests.tls.pki import TestCA


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("app.example.com", "app.example.com", True),
        ("*.example.com", "pr-1.example.com", True),
        ("*.example.com", "a.b.example.com", False),  # one label only (RFC 6125 §6.4.3)
        ("*.example.com", "example.com", False),
        ("*.example.com", ".example.com", False),
        ("app.example.com", "pr-1.app.example.com", False),
    ],
)
def test_covers(pattern: str, name: str, ok: bool) -> None:
    assert covers(pattern, name) is ok


def test_the_store_prefers_exact_then_wildcard_and_a_renewal_replaces(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    exact = Certificate.from_files(*ca.issue("e", "app.example.com")[:2])
    wild = Certificate.from_files(*ca.issue("w", "*.example.com")[:2])
    store = CertStore()
    store.add(wild)
    store.add(exact)
    assert store.lookup("app.example.com")[0] is exact  # type: ignore[index]
    assert store.lookup("pr-9.example.com")[0] is wild  # type: ignore[index]
    assert store.lookup("a.b.example.com") is None and store.lookup("example.com") is None
    newer = Certificate.from_files(*ca.issue("e2", "app.example.com")[:2])
    store.add(newer)
    assert store.lookup("app.example.com")[0] is newer  # type: ignore[index]
    assert len(store) == 2


def test_bad_files_are_named(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    cert, key, _ = ca.issue("x", "app.example.com")
    other_key = ca.issue("y", "other.example.com")[1]
    with pytest.raises(CertificateError, match="cannot read"):
        Certificate.from_files(tmp_path / "missing.pem", key)
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        Certificate.from_files(key, key)
    mismatched = Certificate.from_files(cert, other_key)
    with pytest.raises(CertificateError, match="do not load"):
        CertStore().add(mismatched)


NOW = datetime(2026, 6, 1, tzinfo=UTC)


def table(*routes: str, previews: dict[str, timedelta] | None = None) -> RouteTable:
    """App `web` with an active version, `routes`, and previews by label with their TTL left."""
    spec = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))
    entities: list[object] = [
        App(name="web", active_version="v1", created_at=NOW),
        AppVersion(id="v1", app="web", created_at=NOW, spec=spec),
    ]
    for label, left in (previews or {}).items():
        entities.append(
            AppVersion(
                id=f"p-{label}",
                app="web",
                created_at=NOW,
                spec=spec,
                ephemeral_label=label,
                ephemeral_ttl="1h",
                ephemeral_expires_at=NOW + left,
            )
        )
    entities += [HttpRoute(host=h, app="web") for h in routes]
    t = RouteTable()
    t.load(entities, 1)
    return t


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("app.example.com", True),  # a route host
        ("pr-1.app.example.com", True),  # a live preview under it
        ("old.app.example.com", False),  # an expired preview
        ("nope.app.example.com", False),  # an unknown label
        ("pr-1.apps.example.com", True),  # a live preview under a wildcard route
        ("any.apps.example.com", False),  # only the wildcard would serve it
        ("apps.example.com", False),
        ("x.pr-1.app.example.com", False),
        ("pr-1.any.apps.example.com", False),  # served, but strangers could pick `any`
        ("pr-1.zzzz.apps.example.com", False),
        ("*.apps.example.com", False),  # the wildcard route's own key
        ("unrelated.org", False),
    ],
)
def test_which_names_may_get_a_certificate(name: str, ok: bool) -> None:
    t = table(
        "app.example.com", "*.apps.example.com",
        previews={"pr-1": timedelta(hours=1), "old": timedelta(seconds=-1)},
    )  # fmt: skip
    assert t.certifiable(name, NOW) is ok


def test_the_default_route_certifies_nothing_and_an_unloaded_table_nothing() -> None:
    t = table()
    default = HttpRoute(host="d.test", app="web", default=True)
    t.load([*t.apps.values(), *t.versions.values(), default], 2)
    assert t.certifiable("d.test", NOW)  # its own host, like any route host
    assert not t.certifiable("anything.else", NOW)
    assert not RouteTable().certifiable("d.test", NOW)


def test_https_heads_carry_hsts_and_plain_ones_do_not() -> None:
    robots = b"X-Robots-Tag: noindex\r\n"
    plain, secure = HeadTables(robots), HeadTables(robots, b"Strict-Transport-Security: x\r\n")
    assert b"Strict" not in b"".join([*plain.head_inserts, *plain.close_lines])
    for ephemeral in (0, 1):
        assert b"Strict-Transport-Security: x\r\n" in secure.head_inserts[ephemeral]
        assert b"Strict-Transport-Security: x\r\n" in secure.close_lines[ephemeral] + b"\r\n"
        for keep_alive in (0, 1):
            assert secure.head_tails[ephemeral][keep_alive].endswith(b"\r\n\r\n")
    assert plain.head_inserts[0] == b""  # the common case inserts nothing


@pytest.mark.parametrize(
    ("url", "redirect", "flags"),
    [
        (b"/.well-known/miren/health", False, F_RESERVED | F_HEALTH),
        (b"/.well-known/acme-challenge/tok", False, F_RESERVED | F_ACME),
        (b"/.well-known/acme-challenge/tok", True, F_RESERVED | F_ACME),
        (b"/.well-known/other", False, 0),
        (b"/.well-known/other", True, F_RESERVED | F_REDIRECT),
        (b"/x", True, F_RESERVED | F_REDIRECT),
        (b"/.well-known/miren/health", True, F_RESERVED | F_HEALTH),
    ],
)
def test_what_the_proxy_answers_itself(url: bytes, redirect: bool, flags: int) -> None:
    assert special_flags(url, redirect) == flags
