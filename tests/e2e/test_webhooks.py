"""GitHub webhooks through a real `miren serve`: signed, real-shaped `pull_request` payloads
deploy, replace and delete a preview; a bad signature changes nothing; a redelivery is applied
once."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from miren_store.deploy.templates import PullRequest, render_env
from tests.support.clients import Response, http_call
from tests.support.edge import ECHO_CMD, REPO, TOKEN, MirenServer
from tests.support.poll import eventually_sync

pytestmark = pytest.mark.timeout(120)

SECRET = "a-webhook-secret-of-some-length"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirenServer]:
    with MirenServer(tmp_path_factory.mktemp("hooks"), store="memory", token=TOKEN) as server:
        server.cli("app", "create", "web")
        server.cli("route", "set", "web.example.com", "--app", "web")
        template = {
            "spec": {"runtime": "process", "command": list(ECHO_CMD), "cwd": str(REPO),
                     "env": {"PR_NUMBER": "{pr}", "GIT_SHA": "{sha}"}},
            "label": "branch",
            "ttl": "48h",
            "webhook_secret": SECRET,
        }  # fmt: skip
        reply = server.admin("PUT", "/v1/apps/web/preview-template", template)
        assert reply.status == 200, reply
        assert SECRET not in reply.body.decode()
        yield server


def payload(
    action: str,
    number: int = 7,
    branch: str = "Feature/Login",
    sha: str = "a" * 40,
    head_repo: str = "octo/web",
) -> bytes:
    """A `pull_request` event as GitHub sends it (the fields that matter, and some that don't)."""
    return json.dumps({
        "action": action,
        "number": number,
        "pull_request": {
            "number": number, "state": "open", "title": "Add a login page",
            "head": {"ref": branch, "sha": sha, "label": f"octo:{branch}",
                     "repo": {"full_name": head_repo}},
            "base": {"ref": "main", "sha": "b" * 40, "repo": {"full_name": "octo/web"}},
            "user": {"login": "octocat"},
        },
        "repository": {"full_name": "octo/web", "private": False},
        "sender": {"login": "octocat"},
    }).encode()  # fmt: skip


def deliver(
    edge: MirenServer,
    body: bytes,
    *,
    event: str = "pull_request",
    secret: str = SECRET,
    delivery: str | None = None,
    app: str = "web",
) -> Response:
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature,
        "User-Agent": "GitHub-Hookshot/abc",
    }
    return http_call(edge.admin_port, "POST", f"/hooks/github/{app}", body=body, headers=headers)


def previews(edge: MirenServer) -> list[dict[str, Any]]:
    out = edge.admin("GET", "/v1/apps/web/versions?ephemeral=true&limit=0")
    assert out.status == 200, out
    data: list[dict[str, Any]] = out.json()
    return data


def test_a_bad_signature_is_401_and_changes_nothing(edge: MirenServer) -> None:
    before = previews(edge)
    for reply in (
        deliver(edge, payload("opened", 1), secret="wrong-secret-wrong-secret"),
        deliver(edge, payload("opened", 1), app="nosuchapp"),  # same answer: no probing
    ):
        assert reply.status == 401, reply
        assert reply.json()["error"]["code"] == "bad_signature"
    unsigned = http_call(
        edge.admin_port, "POST", "/hooks/github/web", body=payload("opened", 1),
        headers={"Content-Type": "application/json", "X-GitHub-Event": "pull_request"},
    )  # fmt: skip
    assert unsigned.status == 401
    assert previews(edge) == before


def test_ping_and_other_events(edge: MirenServer) -> None:
    assert deliver(edge, b'{"zen": "Keep it logically awesome."}', event="ping").status == 200
    ignored = deliver(edge, payload("labeled"), event="pull_request")
    assert ignored.status == 202 and ignored.json()["status"] == "ignored"
    assert deliver(edge, b"{}", event="push").status == 202


def test_opened_synchronize_closed_follow_the_pull_request(edge: MirenServer) -> None:
    host = "feature-login.web.example.com"
    opened = deliver(edge, payload("opened", 7, sha="1" * 40), delivery="d-opened")
    assert opened.status == 200, opened
    answer = opened.json()
    assert answer["status"] == "deployed"
    assert answer["urls"] == [f"http://{host}:{edge.proxy_port}"]
    first = answer["version"]["id"]
    assert answer["version"]["source"] == {
        "branch": "Feature/Login",
        "commit": "1" * 40,
        "message": "Add a login page",
    }
    assert answer["version"]["spec"]["env"] == {"PR_NUMBER": "7", "GIT_SHA": "1" * 40}
    served = edge.get_routed(host, timeout=30)
    assert served.status == 200 and served.json()["version"] == first

    # The same delivery again: applied once; also under another id, or none (the id is not
    # signed: a captured body replayed with a new one is still the same payload).
    for replay in ("d-opened", "attacker-1", ""):
        again = deliver(edge, payload("opened", 7, sha="1" * 40), delivery=replay or None)
        assert again.status == 200 and again.json()["status"] == "duplicate", replay
    assert [v["id"] for v in previews(edge) if v.get("ephemeral_label") == "feature-login"] == [
        first
    ]

    pushed = deliver(edge, payload("synchronize", 7, sha="2" * 40)).json()
    second = pushed["version"]["id"]
    assert second != first
    eventually_sync(
        lambda: edge.get(host).json().get("version") == second, 30, "the new push to serve"
    )
    labelled = [v["id"] for v in previews(edge) if v.get("ephemeral_label") == "feature-login"]
    assert labelled == [second]  # replaced, not added

    closed = deliver(edge, payload("closed", 7)).json()
    assert closed["status"] == "deleted" and closed["versions"] == [second]
    eventually_sync(lambda: edge.get(host).status == 404, 5, "the closed preview to be gone")


def test_pr_labels_and_a_template_that_is_not_set(edge: MirenServer) -> None:
    edge.cli("app", "create", "bare")
    assert deliver(edge, payload("opened"), app="bare").status == 401  # no template: no secret
    template = edge.admin("GET", "/v1/apps/web/preview-template").json()
    assert template["webhook_secret_set"] is True and "webhook_secret" not in template
    short = edge.admin(
        "PUT", "/v1/apps/bare/preview-template",
        {"spec": {"runtime": "upstream", "urls": ["http://127.0.0.1:9"]}, "webhook_secret": "x"},
    )  # fmt: skip
    assert short.status == 422 and "webhook_secret" in short.json()["error"]["message"]


def test_env_placeholders() -> None:
    pr = PullRequest(number=12, branch="fix/x", sha="c0ffee")
    env = {"A": "pr-{pr}", "B": "{branch}@{sha}", "C": "{other} stays", "D": "plain"}
    assert render_env(env, pr) == {
        "A": "pr-12", "B": "fix/x@c0ffee", "C": "{other} stays", "D": "plain"
    }  # fmt: skip


def test_a_fork_cannot_take_a_branch_label(edge: MirenServer) -> None:
    """A fork's pull request with a branch named like ours gets `pr-<number>`: it neither
    replaces nor deletes the preview of our branch."""
    ours = deliver(edge, payload("opened", 30, branch="shared-name", sha="3" * 40)).json()
    assert ours["version"]["ephemeral_label"] == "shared-name"
    fork = payload("opened", 99, branch="shared-name", sha="9" * 40, head_repo="mallory/web")
    theirs = deliver(edge, fork).json()
    assert theirs["version"]["ephemeral_label"] == "pr-99"
    closed = deliver(edge, payload("closed", 99, branch="shared-name", head_repo="mallory/web"))
    assert closed.json()["label"] == "pr-99"
    labels = {v.get("ephemeral_label") for v in previews(edge)}
    assert "shared-name" in labels and "pr-99" not in labels
