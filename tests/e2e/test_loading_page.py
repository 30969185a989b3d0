"""The loading page: a browser navigation to a cold preview gets a "starting" page after
`loading_page_after` while the boot goes on, then the app after a refresh; curl, scripts, other
methods and active versions wait for the app as before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clients import Response
from tests.support.edge import ECHO_CMD, REPO, TOKEN, MirenServer
from tests.support.poll import eventually_sync

pytestmark = pytest.mark.timeout(120)

BROWSER = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Sec-Fetch-Mode": "navigate",
    "User-Agent": "Mozilla/5.0",
}
SLOW = {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO),
        "env": {"BOOT_DELAY_MS": "2500"}}  # fmt: skip


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    with MirenServer(tmp_path_factory.mktemp("loading"), store="memory", token=TOKEN) as server:
        server.cli("app", "create", "web")
        server.cli("route", "set", "web.example.com", "--app", "web")
        yield server


def routed(edge: MirenServer, host: str, headers: dict[str, str], timeout: float = 30) -> Response:
    """The first answer that is not the route table's 404 (a deploy reaches the proxy through
    the store watch a moment after the API answered)."""

    def answer() -> Response | None:
        reply = edge.get(host, headers=headers, timeout=timeout)
        return reply if reply.status != 404 else None

    found: Response = eventually_sync(answer, timeout, f"{host} to be routed", interval=0.02)
    return found


def preview(edge: MirenServer, label: str) -> str:
    reply = edge.admin(
        "POST", "/v1/apps/web/deploys", {"spec": SLOW, "ephemeral": {"label": label}}
    )
    assert reply.status == 201, reply
    return f"{label}.web.example.com"


def test_a_browser_sees_the_loading_page_then_the_app(edge: MirenServer) -> None:
    host = preview(edge, "nav")
    page = routed(edge, host, BROWSER, timeout=10)
    assert page.status == 503, page
    assert page.header("refresh") == "2" and page.header("retry-after") == "2"
    assert page.header("cache-control") == "no-store"
    assert page.header("x-robots-tag") == "noindex"
    assert b"Starting" in page.body and (page.header("content-type") or "").startswith("text/html")
    # (A 503 page can only come while the boot is still going: it ends the wait for it.)
    # The boot went on: a refresh a little later gets the app.
    done = eventually_sync(
        lambda: (r := edge.get(host, headers=BROWSER, timeout=10)).status == 200 and r,
        30, "the app after a refresh",
    )  # fmt: skip
    assert done


@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "*/*", "User-Agent": "curl/8"},  # curl
        {**BROWSER, "Sec-Fetch-Mode": "cors", "X-Requested-With": "XMLHttpRequest"},  # a script
        {"Accept": "application/json"},  # an API client
    ],
    ids=["curl", "script", "api"],
)
def test_other_clients_wait_for_the_app(edge: MirenServer, headers: dict[str, str]) -> None:
    host = preview(edge, f"w-{len(headers)}-{abs(hash(tuple(headers))) % 10000}")
    reply = routed(edge, host, headers)
    assert reply.status == 200, reply  # waited through the whole boot


def test_an_active_version_is_not_given_the_loading_page(edge: MirenServer) -> None:
    reply = edge.admin("POST", "/v1/apps/web/deploys", {"spec": SLOW})
    assert reply.status == 201
    assert routed(edge, "web.example.com", BROWSER).status == 200


def test_an_app_chooses_its_own_mode(edge: MirenServer) -> None:
    """`PATCH /v1/apps/{app} {"loading_page": ...}`: none makes a browser wait on a preview too;
    all gives the page on the active version; null goes back to the server's default."""
    edge.cli("app", "create", "own")
    edge.cli("route", "set", "own.example.com", "--app", "own")
    bad = edge.admin("PATCH", "/v1/apps/own", {"loading_page": "sometimes"})
    assert bad.status == 422 and "loading_page" in bad.json()["error"]["message"]
    assert (
        edge.admin("PATCH", "/v1/apps/own", {"loading_page": "none"}).json()["loading_page"]
        == "none"
    )
    reply = edge.admin(
        "POST", "/v1/apps/own/deploys", {"spec": SLOW, "ephemeral": {"label": "quiet"}}
    )
    assert reply.status == 201
    assert routed(edge, "quiet.own.example.com", BROWSER).status == 200  # waited for the app
    assert edge.admin("PATCH", "/v1/apps/own", {"loading_page": "all"}).status == 200
    assert edge.admin("POST", "/v1/apps/own/deploys", {"spec": SLOW}).status == 201
    page = routed(edge, "own.example.com", BROWSER, timeout=10)
    assert page.status == 503 and page.header("refresh") == "2", page
    back = edge.admin("PATCH", "/v1/apps/own", {"loading_page": None}).json()
    assert back["loading_page"] is None
