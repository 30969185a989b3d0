"""Bad input: properties of the pure parsers (hypothesis), then malformed requests on raw sockets
against a real `miren serve`.

Properties (`hypothesis_examples` each, derandomized so a run is repeatable):
- host normalization never raises anything but BadHost, and what it accepts is a lowercase
  ASCII name (or bracketed IPv6 literal) of at most 253 characters that normalizes to itself;
- resolution over random route tables never raises, answers within the allowed set, and a
  resolved version is consistent with its route and app (exact beats ephemeral, an ephemeral
  answer is a live preview); the proxy's router agrees with the table on every raw Host value;
- branch normalization raises only InvalidLabel, its output is always a valid label and a fixed
  point; label validation accepts exactly the label grammar;
- TTL parsing raises only InvalidTTL, accepts only 0 < ttl <= max, round-trips its own formats,
  and accepts only Go duration syntax (ASCII).

Malformed requests (smuggling, a 1 MB header, a NUL in a header, an invalid method, a 100 KB
request line, ...) each get a 4xx and a closed connection; the upstream (a recording server
behind an `upstream` version) never sees any of them, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from miren_activator.activator import Activator
from miren_ingress.proxy.interfaces import Refusal, Target
from miren_ingress.routing.hosts import MAX_HOST, BadHost, normalize_host
from miren_ingress.routing.router import EdgeRouter
from miren_ingress.routing.routes import (
    EXPIRED,
    NO_ACTIVE,
    NO_PREVIEW,
    NO_ROUTE,
    Refused,
    Resolved,
    RouteTable,
)
from miren_store.deploy.errors import InvalidLabel, InvalidTTL
from miren_store.deploy.labels import is_valid_label, label_from, normalize_branch, validate_label
from miren_store.deploy.ttl import MAX_TTL, describe_ttl, parse_ttl
from miren_store.durations import format_duration
from miren_store.entities import App, AppVersion, HttpRoute, Runtime, VersionSpec
from miren_store.memory import MemoryStore
from tests.reliability.budget import BUDGET
from tests.reliability.figures import Figures
from tests.support.clients import RawResult, raw_exchange
from tests.support.edge import MirenServer, log_errors
from tests.support.upstream import RecordingUpstream

pytestmark = pytest.mark.reliability

PROPERTY = settings(
    max_examples=BUDGET.hypothesis_examples,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_RE = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")

# -- strategies ---------------------------------------------------------------------------------

# Any character, surrogates and controls included.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=300)
LABELS = ["app", "a", "feat-x", "pr-1", "x", "www", "b"]
BASES = ["example.com", "apps.example.com", "a.b.c", "localhost"]


@st.composite
def host_like(draw: st.DrawFn) -> str:
    """Host header values near the interesting cases: labels over known bases, odd case,
    ports, trailing dots, blanks, over-long labels, stray characters, IPv6 literals."""
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(LABELS + BASES + ["*", "", "-a", "a-", "xn--p1ai", "İ"]),
                st.text("abcXYZ019-_.:*[] \t", max_size=70),
                st.just("a" * 64),
            ),
            min_size=1,
            max_size=4,
        )
    )
    host = ".".join(parts)
    if draw(st.booleans()):
        host = host.upper() if draw(st.booleans()) else host.title()
    host += draw(st.sampled_from(["", ".", "..", ":8080", ".:80", ":", ":99999", ":x", " "]))
    return draw(st.sampled_from([host, f"[{host}]", "[::1]:80", "[fe80::1%25eth0]", " " + host]))


HOSTS = st.one_of(host_like(), ANY_TEXT, st.binary(max_size=300).map(lambda b: b.decode("latin-1")))


def _now() -> datetime:
    return datetime.now(UTC)


@st.composite
def route_tables(draw: st.DrawFn) -> RouteTable:
    """A loaded table: a few apps (one without an active version), routes (exact, wildcard,
    default, to a missing app), active versions and previews live or expired well away from
    now."""
    now = _now()
    spec = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))
    entities: list[object] = []
    for app in ("web", "api", "idle"):
        active = None if app == "idle" else f"{app}-v1"
        entities.append(App(name=app, active_version=active))
        if active is not None:
            entities.append(AppVersion(id=active, app=app, spec=spec))
        for i, label in enumerate(draw(st.lists(st.sampled_from(LABELS), max_size=4))):
            minutes = draw(st.sampled_from([-90, -5, 5, 90]))
            entities.append(
                AppVersion(
                    id=f"{app}-eph-{i}",
                    app=app,
                    spec=spec,
                    ephemeral_label=label,
                    ephemeral_ttl="1h",
                    ephemeral_expires_at=now + timedelta(minutes=minutes),
                    created_at=now - timedelta(seconds=i),
                )
            )
    candidates = [*BASES, *(f"*.{b}" for b in BASES if "." in b), "app.example.com"]
    for host in draw(st.lists(st.sampled_from(candidates), unique=True, max_size=6)):
        app = draw(st.sampled_from(["web", "api", "idle", "ghost"]))
        entities.append(HttpRoute(host=host, app=app, default=draw(st.booleans())))
    table = RouteTable()
    table.load(entities, 1)
    return table


# -- properties ---------------------------------------------------------------------------------


@PROPERTY
@given(HOSTS)
@example("FEAT-X.App.example.com.:8080")
@example("a" * 64 + ".example.com")
@example("[::1]")
def test_host_normalization_is_total_and_idempotent(raw: str) -> None:
    for value in (raw, raw.encode("utf-8", "surrogatepass")):
        try:
            host = normalize_host(value)
        except BadHost:
            continue
        assert host.isascii() and host == host.lower()
        assert len(host) <= MAX_HOST
        assert host.startswith("[") or NAME_RE.fullmatch(host), host
        assert all(len(label) <= 63 for label in host.split(".")), host
        assert normalize_host(host) == host


ALLOWED_REFUSALS = {NO_ROUTE, NO_ACTIVE, NO_PREVIEW, EXPIRED}


def _router(table: RouteTable) -> EdgeRouter:
    # The activator is never called by resolve(); it is a real one, never started.
    return EdgeRouter(table, Activator(MemoryStore(), registry=CollectorRegistry()))


@PROPERTY
@given(route_tables(), st.lists(HOSTS, min_size=1, max_size=8))
def test_resolution_never_raises_and_answers_within_the_allowed_set(
    table: RouteTable, raws: list[str]
) -> None:
    router = _router(table)
    now = _now()
    for raw in raws:
        answer = router.resolve(raw.encode("utf-8", "surrogatepass"))
        try:
            host = normalize_host(raw.encode("utf-8", "surrogatepass"))
        except BadHost:
            assert isinstance(answer, Refusal) and answer.status == 400, (raw, answer)
            continue
        found = table.resolve(host, now)
        if isinstance(found, Refused):
            assert found in ALLOWED_REFUSALS, found
            assert isinstance(answer, Refusal) and answer.status == found.status, (raw, answer)
            continue
        assert isinstance(found, Resolved)
        assert found.route.app == found.app.name == found.version.app
        if host in table.routes:  # exact beats ephemeral
            assert found.route.host == host and not found.ephemeral
        if found.ephemeral:
            assert found.version.ephemeral_label and not found.version.expired(now)
            assert host.split(".", 1)[0] == found.version.ephemeral_label
        else:
            assert found.version.id == found.app.active_version
        assert isinstance(answer, Target), (raw, answer)
        assert (answer.version, answer.ephemeral) == (found.version.id, found.ephemeral)


@PROPERTY
@given(ANY_TEXT)
@example("Feature/Login_Page")
@example("a" * 63 + "/" + "b" * 40)
@example("\udcff" * 70)
@example("İstanbul/K-branch")
def test_branch_normalization_yields_a_valid_fixed_point(branch: str) -> None:
    try:
        label = normalize_branch(branch)
    except InvalidLabel:
        assert not re.sub(r"[^a-z0-9]", "", branch.lower().translate({0x5F: 0x2D})), branch
        return
    assert LABEL_RE.fullmatch(label) and len(label) <= 63, label
    assert is_valid_label(label)
    assert normalize_branch(label) == label
    assert validate_label(label) == label
    assert label_from(None, branch) == label


@PROPERTY
@given(st.text("abcdefghijklmnopqrstuvwxyz0123456789-/_.", min_size=70, max_size=120), ANY_TEXT)
def test_long_branches_with_a_common_prefix_get_distinct_labels(prefix: str, tail: str) -> None:
    a, b = prefix + "/a" + tail, prefix + "/b" + tail
    try:
        la, lb = normalize_branch(a), normalize_branch(b)
    except InvalidLabel:
        return
    assert la != lb or len(la) < 63, (a, b, la)


@PROPERTY
@given(ANY_TEXT)
@example("a--b")
@example("-a")
@example("a" * 64)
def test_label_validation_accepts_exactly_the_grammar(label: str) -> None:
    ok = LABEL_RE.fullmatch(label) is not None
    assert is_valid_label(label) == ok
    if ok:
        assert validate_label(label) == label
    else:
        with pytest.raises(InvalidLabel):
            validate_label(label)


TTL_TEXT = st.one_of(
    ANY_TEXT,
    st.from_regex(r"\A[+-]?([0-9]{0,400}(\.[0-9]{0,12})?(ns|us|µs|ms|s|m|h|d|x)?){1,4}\Z"),
)


@PROPERTY
@given(TTL_TEXT)
@example("9" * 400 + "h")
@example("1e3s")
@example("0.0000001s")
@example("720h0.000001s")
def test_ttl_parsing_raises_only_invalid_ttl_and_stays_in_range(text: str) -> None:
    try:
        ttl = parse_ttl(text)
    except InvalidTTL:
        return
    assert timedelta(0) < ttl <= MAX_TTL


@PROPERTY
@given(st.timedeltas(min_value=timedelta(microseconds=1), max_value=MAX_TTL))
def test_ttl_formats_round_trip(ttl: timedelta) -> None:
    assert parse_ttl(describe_ttl(ttl)) == ttl
    assert parse_ttl(format_duration(ttl)) == ttl


@PROPERTY
@given(TTL_TEXT)
@example("\u0663h")  # ARABIC-INDIC DIGIT THREE
@example("\uff13h")  # FULLWIDTH DIGIT THREE
def test_accepted_ttls_are_go_duration_syntax(text: str) -> None:
    try:
        parse_ttl(text)
    except InvalidTTL:
        return
    assert re.fullmatch(
        r"[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d)"
        r"(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d))*",
        text.strip(),
    )


# -- malformed requests on raw sockets ----------------------------------------------------------

HOST = "bad.test"
H = b"Host: " + HOST.encode() + b"\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
PROBE = "/probe"
CASES: dict[str, bytes] = {
    # request smuggling: ambiguous framing, with a second request hidden in the body
    "cl_then_te": b"POST /probe HTTP/1.1\r\n" + H
    + b"Content-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_then_cl": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "two_content_lengths": b"POST /probe HTTP/1.1\r\n" + H
    + b"Content-Length: 0\r\nContent-Length: 43\r\n\r\n" + SMUGGLED,
    "content_length_list": b"POST /probe HTTP/1.1\r\n" + H + b"Content-Length: 43, 43\r\n\r\n" + SMUGGLED,
    "content_length_negative": b"POST /probe HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n" + SMUGGLED,
    "content_length_overflow": b"POST /probe HTTP/1.1\r\n" + H
    + b"Content-Length: 18446744073709551617\r\n\r\n" + SMUGGLED,
    "te_xchunked": b"POST /probe HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_chunked_then_identity": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_twice": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_space_before_colon": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding : chunked\r\nContent-Length: 43\r\n\r\n" + SMUGGLED,
    "te_vertical_tab": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_obs_fold": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "chunk_size_bare_lf": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "chunk_size_overflow": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk_data_overrun": b"POST /probe HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "host_twice": b"GET /probe HTTP/1.1\r\n" + H + b"Host: other.test\r\n\r\n",
    "absolute_form_ftp": b"GET ftp://other.test/probe HTTP/1.1\r\n" + H + b"\r\n",
    "bare_cr_in_header": b"GET /probe HTTP/1.1\r\n" + H + b"X-A: b\rX-B: c\r\n\r\n",
    # oversized and invalid
    "header_1mb": b"GET /probe HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
    "request_line_100kb": b"GET /probe?" + b"a" * 100_000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    "nul_in_header_value": b"GET /probe HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n",
    "nul_in_header_name": b"GET /probe HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n",
    "invalid_method": b"G@T /probe HTTP/1.1\r\n" + H + b"\r\n",
    "lowercase_method": b"get /probe HTTP/1.1\r\n" + H + b"\r\n",
    "connect_method": b"CONNECT bad.test:443 HTTP/1.1\r\n" + H + b"\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "missing_host": b"GET /probe HTTP/1.1\r\nX-A: b\r\n\r\n",
}  # fmt: skip
TRUNCATED = (
    b"POST /probe HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n10\r\nonly 9 by"
)  # a 16-byte chunk cut after 9 bytes


def upstream_spec(upstream: RecordingUpstream) -> dict[str, object]:
    return {"runtime": "upstream", "urls": [upstream.url], "health_path": "/__health"}


def probes(upstream: RecordingUpstream) -> list[str]:
    """Targets of request heads that reached the upstream other than its health checks and
    the test's own well-formed requests."""
    return [u for u in upstream.heads if u.startswith((PROBE, "/smuggled"))]


async def test_malformed_requests_get_4xx_and_never_reach_the_upstream(
    tmp_path: Path, figures: Figures
) -> None:
    results: dict[str, RawResult] = {}
    async with RecordingUpstream() as upstream:
        async with MirenServer(tmp_path, store="memory") as edge:
            await edge.client.create_app("bad", HOST)
            await edge.client.post_deploy("bad", upstream_spec(upstream))
            await edge.client.wait_status(HOST, 200)
            for name, payload in CASES.items():
                try:
                    results[name] = await raw_exchange(edge.proxy_port, payload, timeout=10.0)
                except OSError as exc:  # judged with the others below
                    results[name] = RawResult(b"", False, False, f"connect: {exc!r}")
                assert edge.proc is not None and edge.proc.poll() is None, f"crashed on {name}"
            # The server still serves, and anything forwarded earlier arrived before this.
            assert (await edge.client.get(HOST, "/sentinel")).status == 200
            assert upstream.complete[-1] == "/sentinel"
            health = (await edge.client.get(HOST, "/.well-known/miren/health")).status
            text = edge.log_text()

    bad = {
        name: r
        for name, r in results.items()
        if not (400 <= r.status < 500 and r.closed and r.data.count(b"HTTP/1.1 ") == 1)
    }
    figures.add("cases", len(results))
    figures.add("answered 4xx and closed", len(results) - len(bad))
    figures.add("statuses", str({n: r.status for n, r in results.items()}))
    figures.add("closed by a reset after the 4xx", sum(1 for r in results.values() if r.reset))
    figures.add("requests that reached the upstream", len(probes(upstream)))
    assert not bad, bad
    assert probes(upstream) == [], probes(upstream)
    assert upstream.parse_errors == [], upstream.parse_errors
    assert upstream.upgrades == [], upstream.upgrades
    assert health == 200
    assert not log_errors(text), log_errors(text)[:20]


async def test_truncated_chunked_body_then_fin_gets_4xx(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        async with MirenServer(tmp_path, store="memory") as edge:
            await edge.client.create_app("bad", HOST)
            await edge.client.post_deploy("bad", upstream_spec(upstream))
            await edge.client.wait_status(HOST, 200)
            result = await raw_exchange(edge.proxy_port, TRUNCATED, half_close=True)
            assert (await edge.client.get(HOST, "/sentinel")).status == 200
    assert PROBE not in upstream.complete, "a truncated request reached the upstream whole"
    assert result.closed, result
    assert result.status == 400, result


async def test_stalled_chunked_body_gets_4xx(tmp_path: Path, figures: Figures) -> None:
    request_timeout = 3.0  # bounds the wait if the body timeout did not fire
    async with RecordingUpstream() as upstream:
        server = MirenServer(
            tmp_path,
            store="memory",
            settings={
                "ingress.header_timeout": "2s",
                "ingress.body_timeout": "1s",
                "ingress.request_timeout": "3s",
            },
        )
        async with server as edge:
            await edge.client.create_app("bad", HOST)
            await edge.client.post_deploy("bad", upstream_spec(upstream))
            await edge.client.wait_status(HOST, 200)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            result = await raw_exchange(edge.proxy_port, TRUNCATED, timeout=request_timeout * 3)
            waited = loop.time() - t0
    figures.add("stalled body answered", f"{result.status} after {waited:.2f}s")
    assert PROBE not in upstream.complete
    assert result.closed and math.isfinite(waited), result
    assert result.status == 408, result  # the body timeout, not the upstream's 504
