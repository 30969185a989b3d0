"""Resolution as a pure function over the table: reference cases 36-44, R-6, R-7, R-14, R-15."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from miren_ingress.routing.hosts import BadHost, normalize_host
from miren_ingress.routing.routes import (
    EXPIRED,
    NO_ACTIVE,
    NO_PREVIEW,
    NO_ROUTE,
    NOT_LOADED,
    Refused,
    Resolved,
    RouteTable,
)
from miren_store.entities import App, AppVersion, HttpRoute, Runtime, VersionSpec
from miren_store.store import Change

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
SPEC = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))


def v(
    id: str, app: str, label: str = "", expires: timedelta | None = None, age: int = 0
) -> AppVersion:
    return AppVersion(
        id=id,
        app=app,
        spec=SPEC,
        created_at=NOW - timedelta(minutes=60 - age),
        ephemeral_label=label,
        ephemeral_expires_at=None if expires is None else NOW + expires,
    )


def table(*ents: object) -> RouteTable:
    t = RouteTable()
    t.load(ents, revision=1)
    return t


def served(t: RouteTable, host: str) -> str:
    r = t.resolve(normalize_host(host), NOW)
    assert isinstance(r, Resolved), r
    return r.version.id


BASE = (
    App(name="a", active_version="a-1"),
    v("a-1", "a"),
    v("a-pr", "a", "feat-x", timedelta(hours=1)),
    v("a-old", "a", "old-branch", timedelta(minutes=-10)),
    HttpRoute(host="app.example.com", app="a"),
)


def test_exact_route_serves_active() -> None:
    assert served(table(*BASE), "app.example.com") == "a-1"


def test_case_37_plain_route_live_preview() -> None:
    assert served(table(*BASE), "feat-x.app.example.com") == "a-pr"


def test_case_36_exact_beats_ephemeral() -> None:
    t = table(
        *BASE,
        App(name="b", active_version="b-1"),
        v("b-1", "b"),
        HttpRoute(host="feat-x.app.example.com", app="b"),
    )
    assert served(t, "feat-x.app.example.com") == "b-1"


def test_case_38_unknown_label_on_plain_route_is_404_not_default() -> None:
    t = table(
        *BASE,
        App(name="d", active_version="d-1"),
        v("d-1", "d"),
        HttpRoute(host="default.example.com", app="d", default=True),
    )
    assert t.resolve("nope.app.example.com", NOW) == NO_PREVIEW


def test_r6_expired_label_is_410_before_gc() -> None:
    assert table(*BASE).resolve("old-branch.app.example.com", NOW) == EXPIRED


def test_preview_stops_at_its_expiry_instant() -> None:
    t = table(*BASE)
    at = NOW + timedelta(hours=1)
    assert isinstance(t.resolve("feat-x.app.example.com", at - timedelta(microseconds=1)), Resolved)
    assert t.resolve("feat-x.app.example.com", at) == EXPIRED


def test_r7_expired_entry_does_not_shadow_valid_one() -> None:
    t = table(*BASE, v("a-pr-new-expired", "a", "feat-x", timedelta(minutes=-1), age=30))
    assert served(t, "feat-x.app.example.com") == "a-pr"


def test_newest_live_version_of_a_label_wins() -> None:
    t = table(*BASE, v("a-pr2", "a", "feat-x", timedelta(hours=2), age=30))
    assert served(t, "feat-x.app.example.com") == "a-pr2"


def test_case_39_only_one_label_is_stripped() -> None:
    t = table(*BASE)
    assert t.resolve("a.feat-x.app.example.com", NOW) == NO_ROUTE
    t2 = table(
        *BASE,
        App(name="d", active_version="d-1"),
        v("d-1", "d"),
        HttpRoute(host="d.example.com", app="d", default=True),
    )
    assert served(t2, "a.b.app.example.com") == "d-1"


WILD = (
    App(name="w", active_version="w-1"),
    v("w-1", "w"),
    v("w-pr", "w", "pr-1", timedelta(hours=1)),
    v("w-gone", "w", "gone", timedelta(minutes=-1)),
    HttpRoute(host="*.example.com", app="w"),
)


def test_r15_wildcard_serves_preview_or_falls_back_to_active() -> None:
    t = table(*WILD)
    assert served(t, "pr-1.example.com") == "w-pr"
    assert served(t, "tenant1.example.com") == "w-1"
    assert served(t, "gone.example.com") == "w-1"


def test_case_40_wildcard_after_stripping_first_label() -> None:
    t = table(*WILD)
    assert served(t, "pr-1.foo.example.com") == "w-pr"
    assert served(t, "other.foo.example.com") == "w-1"


def test_wildcard_does_not_match_its_own_base() -> None:
    assert table(*WILD).resolve("example.com", NOW) == NO_ROUTE


def test_case_41_42_port_and_case() -> None:
    t = table(*BASE)
    assert served(t, "feat-x.app.example.com:8080") == "a-pr"
    assert served(t, "FEAT-X.App.Example.com") == "a-pr"
    assert served(t, "feat-x.app.example.com.") == "a-pr"


def test_case_43_dotless_host_uses_default_or_404() -> None:
    assert table(*BASE).resolve("localhost", NOW) == NO_ROUTE
    t = table(*BASE, HttpRoute(host="fallback.example.com", app="a", default=True))
    assert served(t, "localhost") == "a-1"


def test_case_44_no_active_version_but_preview_works() -> None:
    t = table(
        App(name="n"),
        v("n-pr", "n", "pr-1", timedelta(hours=1)),
        HttpRoute(host="n.example.com", app="n"),
    )
    assert t.resolve("n.example.com", NOW) == NO_ACTIVE
    assert served(t, "pr-1.n.example.com") == "n-pr"


def test_r14_unloaded_table_is_503_never_default() -> None:
    t = RouteTable()
    assert t.resolve("anything.example.com", NOW) == NOT_LOADED
    assert NOT_LOADED.status == 503


def test_ephemeral_and_active_resolve_to_distinct_versions() -> None:
    t = table(*BASE)
    a = t.resolve("app.example.com", NOW)
    p = t.resolve("feat-x.app.example.com", NOW)
    assert isinstance(a, Resolved) and isinstance(p, Resolved)
    assert (a.version.id, a.ephemeral) == ("a-1", False)
    assert (p.version.id, p.ephemeral) == ("a-pr", True)


def test_watch_changes_apply_incrementally() -> None:
    t = table(*BASE)
    gen = t.generation
    newer = v("a-pr3", "a", "feat-x", timedelta(hours=3), age=50)
    t.apply(Change(AppVersion, newer.id, 5, newer))
    assert served(t, "feat-x.app.example.com") == "a-pr3"
    t.apply(Change(AppVersion, "a-pr3", 6, None))
    t.apply(Change(AppVersion, "a-pr", 7, None))
    assert t.resolve("feat-x.app.example.com", NOW) == NO_PREVIEW
    t.apply(Change(HttpRoute, "app.example.com", 8, None))
    assert t.resolve("app.example.com", NOW) == NO_ROUTE
    app = attrs.evolve(BASE[0], active_version=None)
    t.apply(Change(App, "a", 9, app))
    assert t.revision == 9 and t.generation > gen


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("app.example.com", "app.example.com"),
        ("App.Example.COM:8080", "app.example.com"),
        ("app.example.com.", "app.example.com"),
        ("app.example.com.:80", "app.example.com"),
        ("app.example.com:", "app.example.com"),
        ("app.example.com:65535", "app.example.com"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (b"Feat-X.app.example.com", "feat-x.app.example.com"),
    ],
)
def test_host_normalisation(raw: str | bytes, want: str) -> None:
    assert normalize_host(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "   ",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 characters
        ("a" * 62 + ".") * 4 + "ab",  # 254 characters
        "bücher.example.com",
        "b\xc3\xbccher.example.com".encode("latin-1"),
        "app..example.com",
        ".app.example.com",
        "app.example.com..",
        "-app.example.com",
        "app_x.example.com",
        "app.example.com:port",
        "app.example.com:123456",
        "app.example.com:65536",
        "app.example.com:99999",
        "[::1]:70000",
        "[::1",
        "[zz::1]",
        "a b.com",
        "*.example.com",
    ],
)
def test_bad_hosts_are_refused(raw: str | bytes | None) -> None:
    with pytest.raises(BadHost):
        normalize_host(raw)


def test_253_characters_is_the_limit() -> None:
    host = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(host) == 253
    assert normalize_host(host) == host
    assert normalize_host(host + ".") == host  # the trailing dot does not count


@given(st.text(max_size=300))
def test_any_host_resolves_to_an_allowed_answer(raw: str) -> None:
    t = table(*BASE, *WILD[:-1], HttpRoute(host="*.example.com", app="w"))
    try:
        host = normalize_host(raw)
    except BadHost:
        return
    r = t.resolve(host, NOW)
    assert isinstance(r, Resolved) or (isinstance(r, Refused) and r.status in (404, 410))
