"""The pure rules of the deploy domain: which version a label answers with, which versions to
evict, version status, the pool cascade plan, the JSON shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest

from miren_store.deploy.cascade import plan_pool_ops
from miren_store.deploy.deploys import (
    DeployRequest,
    DeployResult,
    EphemeralConfig,
    EphemeralRequest,
    LabelState,
    VersionStatus,
    choose_evictions,
    label_lookup,
    pick_label_version,
    sort_newest_first,
    version_data,
    version_status,
)
from miren_store.deploy.errors import InvalidInput, InvalidSpec
from miren_store.entities import AppVersion, Runtime, SandboxPool, Source, VersionSpec
from miren_store.store import Delete, Update

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = VersionSpec(runtime=Runtime.UPSTREAM, urls=("http://127.0.0.1:9",))


def v(
    id: str,
    *,
    label: str = "",
    created: int = 0,
    expires: int | None = None,
) -> AppVersion:
    return AppVersion(
        id=id,
        app="app",
        spec=SPEC,
        created_at=T0 + timedelta(seconds=created),
        ephemeral_label=label,
        ephemeral_ttl="1h" if label else "",
        ephemeral_expires_at=T0 + timedelta(seconds=expires) if expires is not None else None,
    )


NOW = T0 + timedelta(seconds=100)


def test_r6_an_expired_version_is_not_picked() -> None:
    assert pick_label_version([v("old", label="old-branch", expires=-600)], NOW) is None


def test_r7_expired_entry_never_shadows_a_valid_one() -> None:
    expired = v("a", label="feat-x", created=5, expires=50)
    valid = v("b", label="feat-x", created=1, expires=1000)
    assert pick_label_version([expired, valid], NOW) == valid
    assert pick_label_version([valid, expired], NOW) == valid


def test_newest_live_wins_during_a_redeploy() -> None:
    old = v("v1", label="feat-x", created=1, expires=1000)
    new = v("v2", label="feat-x", created=2, expires=1000)
    assert pick_label_version([old, new], NOW) == new
    assert pick_label_version([new, old], NOW) == new


def test_expiry_instant_itself_is_expired() -> None:
    at = v("v", label="x", expires=100)
    assert pick_label_version([at], NOW) is None


def test_label_lookup_distinguishes_expired_from_unknown() -> None:
    assert label_lookup([], NOW).state is LabelState.UNKNOWN
    assert label_lookup([v("v", label="x", expires=10)], NOW).state is LabelState.EXPIRED
    live = label_lookup([v("v", label="x", expires=1000)], NOW)
    assert live.state is LabelState.LIVE and live.version is not None and live.version.id == "v"


def test_case29_limit_evicts_the_nearest_expiry() -> None:
    previews = [v(f"p{i}", label=f"l{i}", expires=3600 * i) for i in range(1, 11)]
    assert [x.id for x in choose_evictions(previews, keep=9)] == ["p1"]


def test_case30_expired_ones_go_first() -> None:
    previews = [v(f"p{i}", label=f"l{i}", expires=3600 * i) for i in range(1, 9)]
    previews += [v("gone1", label="g1", expires=10), v("gone2", label="g2", expires=20)]
    assert [x.id for x in choose_evictions(previews, keep=8)] == ["gone1", "gone2"]


def test_under_the_limit_evicts_nothing() -> None:
    assert choose_evictions([v("a", label="a", expires=1)], keep=9) == []
    assert choose_evictions([], keep=0) == []


def test_version_status() -> None:
    assert version_status(v("a"), "a", NOW) is VersionStatus.ACTIVE
    assert version_status(v("a"), "b", NOW) is VersionStatus.REPLACED
    assert version_status(v("a"), None, NOW) is VersionStatus.REPLACED
    assert version_status(v("e", label="x", expires=1000), "a", NOW) is VersionStatus.EPHEMERAL
    assert version_status(v("e", label="x", expires=1), "a", NOW) is VersionStatus.EXPIRED


def test_sort_newest_first() -> None:
    out = sort_newest_first([v("a", created=1), v("c", created=3), v("b", created=2)])
    assert [x.id for x in out] == ["c", "b", "a"]


def pool(id: str, *refs: str) -> SandboxPool:
    return SandboxPool(
        id=id, app="app", spec=SPEC, referenced_by_versions=refs, created_at=T0, revision=7
    )


def test_r8_plan_shared_pool_loses_the_reference_private_pool_is_deleted() -> None:
    ops = plan_pool_ops([pool("shared", "v1", "v2"), pool("private", "v1")], {"v1"})
    assert ops == [
        Delete(SandboxPool, "private", 7),
        Update(pool("shared", "v2")),
    ]
    update = ops[1]
    assert isinstance(update, Update) and update.entity.revision == 7  # revision-checked


def test_plan_pool_shared_only_by_deleted_versions_is_deleted_once() -> None:
    ops = plan_pool_ops([pool("p", "v1", "v2"), pool("p", "v1", "v2")], {"v1", "v2"})
    assert ops == [Delete(SandboxPool, "p", 7)]


def test_plan_ignores_pools_not_referencing_the_versions() -> None:
    assert plan_pool_ops([pool("p", "other")], {"v1"}) == []


def test_version_data_has_ephemeral_keys_only_on_ephemeral_versions() -> None:
    plain = version_data(v("a", created=1), VersionStatus.ACTIVE)
    assert plain == {
        "id": "a",
        "app": "app",
        "created_at": "2026-01-01T00:00:01Z",
        "status": "active",
        "spec": plain["spec"],
    }
    assert plain["spec"]["runtime"] == "upstream"
    eph = version_data(
        attrs_evolve_source(v("e", label="pr-1", expires=3600)), VersionStatus.EPHEMERAL
    )
    assert eph["ephemeral_label"] == "pr-1"
    assert eph["ephemeral_ttl"] == "1h"
    assert eph["expires_at"] == "2026-01-01T01:00:00Z"
    assert eph["source"] == {"branch": "main", "commit": None, "message": None}


def attrs_evolve_source(version: AppVersion) -> AppVersion:
    return attrs.evolve(version, source=Source(branch="main"))


def test_deploy_result_json() -> None:
    version = v("e", label="pr-1", expires=3600)
    out = DeployResult(
        version=version,
        status=VersionStatus.EPHEMERAL,
        urls=("https://pr-1.app.example.com",),
        expires_at=version.ephemeral_expires_at,
    ).to_data()
    assert out["status"] == "ephemeral"
    assert out["urls"] == ["https://pr-1.app.example.com"]
    assert out["expires_at"] == "2026-01-01T01:00:00Z"
    assert out["version"]["id"] == "e"


def test_deploy_request_from_json() -> None:
    req = DeployRequest.from_data(
        {
            "spec": {"runtime": "process", "command": ["python", "-m", "http.server", "$PORT"]},
            "ephemeral": {"branch": "Feature/Login", "ttl": "2h"},
            "source": {"branch": "Feature/Login"},
        }
    )
    assert req.spec is not None and req.spec.command[0] == "python"
    assert req.ephemeral == EphemeralRequest(branch="Feature/Login", ttl="2h")
    assert DeployRequest.from_data({"from_version": "v1"}).from_version == "v1"


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        ({"spec": {"runtime": "nope"}}, InvalidSpec, "spec"),
        ({"spec": {"runtime": "process"}, "bogus": 1}, InvalidInput, "bogus"),
        ([], InvalidInput, "JSON object"),
    ],
)
def test_deploy_request_errors(body: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        DeployRequest.from_data(body)
    assert fragment in str(info.value)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_per_app"):
        EphemeralConfig(max_per_app=0)
    with pytest.raises(ValueError, match="default_ttl"):
        EphemeralConfig(default_ttl=timedelta(days=40))


def test_an_expiry_is_a_whole_second_never_before_the_ttl() -> None:
    """The API shows whole seconds: the stored expiry is one, rounded up, so the time shown is
    the instant the preview stops answering."""
    from miren_store.deploy.ttl import expiry

    start = datetime(2026, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert expiry(start, timedelta(hours=1)) == datetime(2026, 1, 1, 13, 0, 1, tzinfo=UTC)
    whole = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert expiry(whole, timedelta(seconds=90)) == datetime(2026, 1, 1, 12, 1, 30, tzinfo=UTC)
