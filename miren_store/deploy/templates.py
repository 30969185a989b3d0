"""Previews that follow a pull request: what a `pull_request` event deploys or deletes.

Pure: a template and the event's facts in, a deploy request (or the label to delete) out.
"""

from __future__ import annotations

import attrs

from miren_store.deploy.deploys import DeployRequest, EphemeralRequest
from miren_store.deploy.errors import InvalidInput
from miren_store.deploy.labels import normalize_branch
from miren_store.entities import PreviewTemplate, Source

LABEL_MODES = ("branch", "pr")
DEPLOY_ACTIONS = frozenset({"opened", "reopened", "synchronize"})
DELETE_ACTIONS = frozenset({"closed"})


@attrs.frozen
class PullRequest:
    number: int
    branch: str
    sha: str
    title: str = ""
    fork: bool = False  # its head is in another repository


def label_for(template: PreviewTemplate, pr: PullRequest) -> str:
    """`pr-<number>`, or the head branch normalised. A pull request from a fork is always
    `pr-<number>`: anyone can name a fork's branch like one of ours and take its preview."""
    if template.label == "pr" or pr.fork:
        return f"pr-{pr.number}"
    return normalize_branch(pr.branch)


def render_env(env: dict[str, str], pr: PullRequest) -> dict[str, str]:
    """`{pr}`, `{branch}` and `{sha}` in env values replaced (nothing else is: a value with other
    braces stays as written)."""
    facts = (("{pr}", str(pr.number)), ("{branch}", pr.branch), ("{sha}", pr.sha))
    out = {}
    for key, written in env.items():
        value = written
        for name, text in facts:
            value = value.replace(name, text)
        out[key] = value
    return out


def deploy_request(template: PreviewTemplate, pr: PullRequest) -> DeployRequest:
    spec = attrs.evolve(template.spec, env=render_env(dict(template.spec.env), pr))
    return DeployRequest(
        spec=spec,
        ephemeral=EphemeralRequest(label=label_for(template, pr), ttl=template.ttl),
        source=Source(branch=pr.branch, commit=pr.sha, message=pr.title[:200] or None),
    )


def pull_request_of(payload: object) -> PullRequest:
    """The facts of a GitHub `pull_request` payload; InvalidInput naming what is missing."""
    try:
        assert isinstance(payload, dict)
        pr = payload["pull_request"]
        number = payload.get("number", pr["number"])
        head = pr["head"]
        branch, sha = head["ref"], head["sha"]
        if not isinstance(number, int) or not isinstance(branch, str) or not isinstance(sha, str):
            raise TypeError
        title = pr.get("title") or ""
        head_repo = (head.get("repo") or {}).get("full_name")
        base_repo = ((pr.get("base") or {}).get("repo") or {}).get("full_name")
        fork = head_repo is not None and base_repo is not None and head_repo != base_repo
    except (AssertionError, KeyError, TypeError, AttributeError):
        raise InvalidInput(
            "not a pull_request payload: needs number, pull_request.head.ref and .sha"
        ) from None
    return PullRequest(number=number, branch=branch, sha=sha, title=str(title), fork=fork)
