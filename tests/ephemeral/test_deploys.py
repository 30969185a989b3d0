"""Deploy semantics on the memory store: reference R-1, R-3, R-5..R-9, R-16..R-18 and cases
21-35 at the domain level (adapted to SPEC: 7d is a valid TTL, an expired label is reported as
expired, normal deploys have no lock or deployment record)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import attrs
import pytest

from miren_store.codec import encode
from miren_store.deploy import deploys
from miren_store.deploy.deploys import (
    DeployRequest,
    EphemeralConfig,
    LabelState,
    VersionStatus,
    delete_label,
    delete_version_by_id,
    deploy,
    extend_label,
    list_versions,
    resolve_label,
)
from miren_store.deploy.errors import (
    ActiveVersion,
    AppNotFound,
    InvalidInput,
    InvalidLabel,
    InvalidSpec,
    InvalidTTL,
    LabelExpired,
    LabelNotFound,
    VersionAppMismatch,
    VersionNotFound,
)
from miren_store.entities import App, AppVersion, Runtime, SandboxPool, Source, VersionSpec
from miren_store.errors import NotFound
from miren_store.memory import MemoryStore
from tests.ephemeral.conftest import (
    SPEC,
    FakeClock,
    add_pool,
    eph,
    ephemeral_versions,
    labelled,
    normal,
    setup_app,
)

HOST = "app.example.com"


async def test_ephemeral_deploy_creates_a_labelled_version_and_never_activates(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store, "app", HOST)
    result = await deploy(store, "app", eph("feat-x", ttl="1h30m"), now=clock)
    assert result.status is VersionStatus.EPHEMERAL
    assert result.urls == ("https://feat-x.app.example.com",)
    stored = await store.get(AppVersion, result.version.id)
    assert stored == result.version
    assert stored.revision == result.version.revision
    assert stored.id.startswith("app-eph-")
    assert stored.ephemeral_label == "feat-x"
    assert stored.ephemeral_ttl == "1h30m"  # case 22: stored as given
    assert stored.ephemeral_expires_at == clock.t + timedelta(minutes=90)
    assert result.expires_at == stored.ephemeral_expires_at
    assert (await store.get(App, "app")).active_version is None  # case 24
    assert await store.list(SandboxPool) == []  # case 33: nothing provisioned, pools are lazy


async def test_case23_absent_ttl_is_24h_and_7d_is_accepted(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    one = await deploy(store, "app", eph("a"), now=clock)
    assert one.version.ephemeral_ttl == "24h"
    assert one.expires_at == clock.t + timedelta(hours=24)
    week = await deploy(store, "app", eph("b", ttl="7d"), now=clock)
    assert week.expires_at == clock.t + timedelta(days=7)


async def test_branch_is_normalized_server_side(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store, "app", HOST)
    result = await deploy(store, "app", eph(branch="Feature/Login"), now=clock)
    assert result.version.ephemeral_label == "feature-login"
    assert result.urls == ("https://feature-login.app.example.com",)


@pytest.mark.parametrize("ttl", ["0s", "-1h", "", "7", "31d"])
@pytest.mark.parametrize("path", ["spec", "from_version"])
async def test_r3_bad_ttl_fails_before_touching_anything(
    store: MemoryStore, clock: FakeClock, ttl: str, path: str
) -> None:
    await setup_app(store)
    base = await deploy(store, "app", normal(), now=clock)
    old = await deploy(store, "app", eph("feat-x"), now=clock)
    before = store.revision
    req = eph("feat-x", ttl=ttl, from_version=base.version.id if path == "from_version" else None)
    with pytest.raises(InvalidTTL) as info:
        await deploy(store, "app", req, now=clock)
    assert repr(ttl) in str(info.value)
    assert store.revision == before  # no version created, no preview deleted
    assert [v.id for v in await labelled(store, "app", "feat-x")] == [old.version.id]


async def test_case21_unnormalized_label_is_rejected(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    with pytest.raises(InvalidLabel, match="invalid ephemeral label 'Feat_X'"):
        await deploy(store, "app", eph("Feat_X"), now=clock)
    assert await store.list(AppVersion) == []


async def test_case34_invalid_spec_is_rejected_before_any_preview_is_deleted(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    old = await deploy(store, "app", eph("feat-x"), now=clock)
    bad = VersionSpec(runtime=Runtime.PROCESS)  # no command
    with pytest.raises(InvalidSpec, match="command"):
        await deploy(store, "app", eph("feat-x", spec=bad), now=clock)
    assert [v.id for v in await labelled(store, "app", "feat-x")] == [old.version.id]


async def test_unknown_app(store: MemoryStore, clock: FakeClock) -> None:
    with pytest.raises(AppNotFound, match="'nope'"):
        await deploy(store, "nope", eph("feat-x"), now=clock)
    with pytest.raises(AppNotFound):
        await deploy(store, "nope", normal(), now=clock)


async def test_request_needs_exactly_one_source(store: MemoryStore) -> None:
    await setup_app(store)
    with pytest.raises(InvalidInput, match="exactly one"):
        await deploy(store, "app", DeployRequest())
    with pytest.raises(InvalidInput, match="exactly one"):
        await deploy(store, "app", DeployRequest(spec=SPEC, from_version="v"))


# -- replace on the same label ------------------------------------------------------------------


async def test_case26_r18_redeploy_replaces_version_and_private_pool_and_resets_expiry(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    first = await deploy(store, "app", eph("feat-x", ttl="1h"), now=clock)
    await add_pool(store, "pool-1", first.version.id)
    clock.advance(minutes=30)
    second = await deploy(store, "app", eph("feat-x", ttl="1h"), now=clock)
    assert second.version.id != first.version.id
    assert second.replaced == (first.version.id,)
    assert [v.id for v in await labelled(store, "app", "feat-x")] == [second.version.id]
    with pytest.raises(NotFound):
        await store.get(SandboxPool, "pool-1")
    assert second.expires_at == clock.t + timedelta(hours=1)


async def test_r8_replace_keeps_a_shared_pool_minus_the_reference(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    first = await deploy(store, "app", eph("feat-x"), now=clock)
    other = await deploy(store, "app", normal(), now=clock)
    await add_pool(store, "shared", first.version.id, other.version.id)
    await deploy(store, "app", eph("feat-x"), now=clock)
    assert (await store.get(SandboxPool, "shared")).referenced_by_versions == (other.version.id,)


async def test_case27_same_label_in_two_apps_is_independent(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store, "a")
    await setup_app(store, "b")
    in_b = await deploy(store, "b", eph("feat-x"), now=clock)
    await deploy(store, "a", eph("feat-x"), now=clock)
    await deploy(store, "a", eph("feat-x"), now=clock)
    assert [v.id for v in await labelled(store, "b", "feat-x")] == [in_b.version.id]
    assert len(await labelled(store, "a", "feat-x")) == 1


async def test_case28_replacing_does_not_touch_other_labels(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    keep = await deploy(store, "app", eph("other"), now=clock)
    await deploy(store, "app", eph("feat-x"), now=clock)
    await deploy(store, "app", eph("feat-x"), now=clock)
    assert [v.id for v in await labelled(store, "app", "other")] == [keep.version.id]


async def test_r18_two_concurrent_deploys_of_one_label_leave_exactly_one(
    store: MemoryStore,
) -> None:
    await setup_app(store)
    results = await asyncio.gather(*(deploy(store, "app", eph("feat-x")) for _ in range(5)))
    left = await labelled(store, "app", "feat-x")
    assert len(left) == 1
    assert left[0].id == max(results, key=lambda r: r.version.created_at).version.id


async def test_replace_over_an_expired_version_of_the_label(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    await deploy(store, "app", eph("feat-x", ttl="1m"), now=clock)
    clock.advance(minutes=5)
    new = await deploy(store, "app", eph("feat-x"), now=clock)
    assert [v.id for v in await labelled(store, "app", "feat-x")] == [new.version.id]


# -- the per-app limit --------------------------------------------------------------------------


async def ten_previews(store: MemoryStore, clock: FakeClock) -> list[AppVersion]:
    out = []
    for i in range(1, 11):
        r = await deploy(store, "app", eph(f"l{i}", ttl=f"{i}h"), now=clock)
        out.append(r.version)
    return out


async def test_case29_eleventh_label_evicts_the_nearest_expiry(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    previews = await ten_previews(store, clock)
    await add_pool(store, "p-l1", previews[0].id)
    result = await deploy(store, "app", eph("l11", ttl="24h"), now=clock)
    assert tuple(v.id for v in result.evicted) == (previews[0].id,)
    left = await ephemeral_versions(store, "app")
    assert len(left) == 10
    assert previews[0].id not in {v.id for v in left}
    with pytest.raises(NotFound):
        await store.get(SandboxPool, "p-l1")  # evicted with its pool


async def test_new_version_is_never_the_one_evicted(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    await ten_previews(store, clock)
    result = await deploy(store, "app", eph("short", ttl="1m"), now=clock)
    assert result.version.id in {v.id for v in await ephemeral_versions(store, "app")}


async def test_case30_expired_uncollected_previews_are_evicted_first(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    stale = [
        (await deploy(store, "app", eph(f"old{i}", ttl="1m"), now=clock)).version for i in range(2)
    ]
    for i in range(8):
        await deploy(store, "app", eph(f"l{i}", ttl="1h"), now=clock)
    clock.advance(minutes=10)  # the two old ones have expired; the GC has not run
    result = await deploy(store, "app", eph("new"), now=clock)
    assert sorted(v.id for v in result.evicted) == sorted(v.id for v in stale[:1])
    result = await deploy(store, "app", eph("new2"), now=clock)
    assert tuple(v.id for v in result.evicted) == (stale[1].id,)
    assert len(await ephemeral_versions(store, "app")) == 10


async def test_case31_redeploying_an_existing_label_at_the_limit_evicts_nothing(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    previews = await ten_previews(store, clock)
    result = await deploy(store, "app", eph("l5", ttl="1h"), now=clock)
    assert result.evicted == ()
    assert result.replaced == (previews[4].id,)
    assert len(await ephemeral_versions(store, "app")) == 10


async def test_limit_is_configurable(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    cfg = EphemeralConfig(max_per_app=2)
    for label in ("a", "b", "c", "d"):
        await deploy(store, "app", eph(label), config=cfg, now=clock)
        clock.advance(seconds=1)
    left = await ephemeral_versions(store, "app")
    assert sorted(v.ephemeral_label for v in left) == ["c", "d"]


async def test_a_lowered_limit_is_reached_in_batches(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    for i in range(20):
        await deploy(store, "app", eph(f"l{i}"), config=EphemeralConfig(max_per_app=50), now=clock)
    small = EphemeralConfig(max_per_app=2)
    first = await deploy(store, "app", eph("new1"), config=small, now=clock)
    assert len(first.evicted) == deploys.MAX_EVICTIONS_PER_DEPLOY
    await deploy(store, "app", eph("new2"), config=small, now=clock)
    left = await ephemeral_versions(store, "app")
    assert sorted(v.ephemeral_label for v in left) == ["new1", "new2"]


async def test_twenty_concurrent_distinct_labels_leave_the_ten_newest(store: MemoryStore) -> None:
    await setup_app(store)
    results = await asyncio.gather(*(deploy(store, "app", eph(f"pr-{i}")) for i in range(20)))
    left = await ephemeral_versions(store, "app")
    assert len(left) == 10
    newest = sorted(results, key=lambda r: (r.version.created_at, r.version.id))[-10:]
    assert {v.id for v in left} == {r.version.id for r in newest}


# -- cloning (from_version) ---------------------------------------------------------------------


async def test_r9_cloning_the_active_version_never_modifies_it(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store, "app", HOST)
    src = Source(branch="main", commit="abc")
    active = await deploy(store, "app", DeployRequest(spec=SPEC, source=src), now=clock)
    app_before = await store.get(App, "app")
    raw_before = encode(await store.get(AppVersion, active.version.id))
    rev_before = (await store.get(AppVersion, active.version.id)).revision

    result = await deploy(store, "app", eph("feat-x", from_version=active.version.id), now=clock)

    clone = result.version
    assert clone.id != active.version.id and clone.id.startswith("app-eph-")
    assert clone.ephemeral_label == "feat-x"
    assert clone.spec == active.version.spec and clone.source == src
    assert result.cloned_from == active.version.id
    assert result.urls == ("https://feat-x.app.example.com",)
    after = await store.get(AppVersion, active.version.id)
    assert encode(after) == raw_before
    assert after.revision == rev_before
    assert after.ephemeral_label == "" and after.ephemeral_expires_at is None
    app_after = await store.get(App, "app")
    assert app_after.active_version == app_before.active_version == active.version.id


async def test_case35_cloning_another_apps_version_is_rejected(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store, "a")
    await setup_app(store, "b")
    theirs = await deploy(store, "b", normal(), now=clock)
    with pytest.raises(VersionAppMismatch, match="belongs to app 'b'"):
        await deploy(store, "a", eph("x", from_version=theirs.version.id), now=clock)
    with pytest.raises(VersionNotFound):
        await deploy(store, "a", eph("x", from_version="missing"), now=clock)
    assert await ephemeral_versions(store, "a") == []


# -- normal deploy and rollback -----------------------------------------------------------------


async def test_normal_deploy_activates(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store, "app", HOST, "*.apps.example.com")
    result = await deploy(store, "app", normal(), now=clock)
    assert result.status is VersionStatus.ACTIVE
    assert result.urls == ("https://app.example.com",)
    assert (await store.get(App, "app")).active_version == result.version.id
    assert not result.version.is_ephemeral


async def test_case24_concurrent_normal_and_ephemeral_deploys_both_succeed(
    store: MemoryStore,
) -> None:
    await setup_app(store)
    n, e = await asyncio.gather(deploy(store, "app", normal()), deploy(store, "app", eph("feat-x")))
    assert (await store.get(App, "app")).active_version == n.version.id
    assert [v.id for v in await labelled(store, "app", "feat-x")] == [e.version.id]


async def test_rollback_activates_an_existing_version(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    v1 = await deploy(store, "app", normal(), now=clock)
    await deploy(store, "app", normal(), now=clock)
    count = len(await store.list(AppVersion))
    result = await deploy(store, "app", DeployRequest(from_version=v1.version.id), now=clock)
    assert result.status is VersionStatus.ACTIVE and result.version.id == v1.version.id
    assert (await store.get(App, "app")).active_version == v1.version.id
    assert len(await store.list(AppVersion)) == count  # nothing created
    again = await deploy(store, "app", DeployRequest(from_version=v1.version.id), now=clock)
    assert again.version.id == v1.version.id


async def test_rollback_to_an_ephemeral_version_promotes_a_clone(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    preview = await deploy(store, "app", eph("feat-x"), now=clock)
    result = await deploy(store, "app", DeployRequest(from_version=preview.version.id), now=clock)
    assert result.status is VersionStatus.ACTIVE
    assert result.version.id != preview.version.id
    assert result.cloned_from == preview.version.id
    assert not result.version.is_ephemeral
    assert result.version.ephemeral_expires_at is None
    assert (await store.get(App, "app")).active_version == result.version.id
    # the preview itself is untouched and still a preview
    assert await store.get(AppVersion, preview.version.id) == preview.version


async def test_rollback_errors(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store, "a")
    await setup_app(store, "b")
    theirs = await deploy(store, "b", normal(), now=clock)
    with pytest.raises(VersionNotFound):
        await deploy(store, "a", DeployRequest(from_version="nope"), now=clock)
    with pytest.raises(VersionAppMismatch):
        await deploy(store, "a", DeployRequest(from_version=theirs.version.id), now=clock)


# -- resolving, extending and deleting labels ----------------------------------------------------


async def test_r6_expired_label_resolves_as_expired_not_unknown(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    await deploy(store, "app", eph("old-branch", ttl="1m"), now=clock)
    live = await resolve_label(store, "app", "old-branch", now=clock)
    assert live.state is LabelState.LIVE
    clock.advance(minutes=10)
    assert (await resolve_label(store, "app", "old-branch", now=clock)).state is (
        LabelState.EXPIRED
    )
    assert (await resolve_label(store, "app", "never", now=clock)).state is LabelState.UNKNOWN


async def test_r7_expired_entry_does_not_shadow_a_valid_one_in_the_store(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    valid = await deploy(store, "app", eph("feat-x", ttl="2h"), now=clock)
    # an expired duplicate written behind the deploy's back (e.g. by an old node)
    dup = attrs.evolve(
        valid.version, id="app-eph-dup", ephemeral_expires_at=clock.t - timedelta(minutes=1)
    )
    await store.create(dup)
    found = await resolve_label(store, "app", "feat-x", now=clock)
    assert found.version is not None and found.version.id == valid.version.id


async def test_extend_sets_expiry_from_now(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    made = await deploy(store, "app", eph("feat-x", ttl="1h"), now=clock)
    clock.advance(minutes=50)
    extended = await extend_label(store, "app", "feat-x", "2d", now=clock)
    assert extended.id == made.version.id
    assert extended.ephemeral_expires_at == clock.t + timedelta(days=2)
    assert extended.ephemeral_ttl == "2d"
    assert await store.get(AppVersion, made.version.id) == extended
    with pytest.raises(InvalidTTL):
        await extend_label(store, "app", "feat-x", "0s", now=clock)


async def test_extend_unknown_or_expired(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    with pytest.raises(LabelNotFound):
        await extend_label(store, "app", "nope", "1h", now=clock)
    await deploy(store, "app", eph("feat-x", ttl="1m"), now=clock)
    clock.advance(minutes=2)
    with pytest.raises(LabelExpired, match="has expired"):
        await extend_label(store, "app", "feat-x", "1h", now=clock)
    with pytest.raises(AppNotFound):
        await extend_label(store, "nope", "feat-x", "1h", now=clock)


async def test_delete_by_label_also_when_expired(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    made = await deploy(store, "app", eph("feat-x", ttl="1m"), now=clock)
    keep = await deploy(store, "app", eph("other"), now=clock)
    await add_pool(store, "p", made.version.id)
    clock.advance(minutes=5)
    assert await delete_label(store, "app", "feat-x") == [made.version.id]
    assert await labelled(store, "app", "feat-x") == []
    assert await store.list(SandboxPool) == []
    assert [v.id for v in await ephemeral_versions(store, "app")] == [keep.version.id]
    with pytest.raises(LabelNotFound):
        await delete_label(store, "app", "feat-x")
    with pytest.raises(InvalidLabel):
        await delete_label(store, "app", "Bad_Label")


# -- versions -----------------------------------------------------------------------------------


async def test_list_versions_newest_first_with_status(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    v1 = await deploy(store, "app", normal(), now=clock)
    clock.advance(seconds=1)
    e1 = await deploy(store, "app", eph("soon", ttl="1m"), now=clock)
    clock.advance(seconds=1)
    v2 = await deploy(store, "app", normal(), now=clock)
    clock.advance(seconds=1)
    e2 = await deploy(store, "app", eph("later", ttl="1h"), now=clock)
    clock.advance(minutes=2)
    views = await list_versions(store, "app", now=clock)
    assert [(x.version.id, x.status) for x in views] == [
        (e2.version.id, VersionStatus.EPHEMERAL),
        (v2.version.id, VersionStatus.ACTIVE),
        (e1.version.id, VersionStatus.EXPIRED),
        (v1.version.id, VersionStatus.REPLACED),
    ]
    only = await list_versions(store, "app", ephemeral_only=True, now=clock)
    assert [x.version.id for x in only] == [e2.version.id, e1.version.id]
    assert [x.version.id for x in await list_versions(store, "app", limit=1, now=clock)] == [
        e2.version.id
    ]
    assert len(await list_versions(store, "app", limit=0, now=clock)) == 4
    assert views[0].to_data()["status"] == "ephemeral"
    with pytest.raises(AppNotFound):
        await list_versions(store, "nope")


async def test_deleting_the_active_version_is_refused(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store)
    active = await deploy(store, "app", normal(), now=clock)
    with pytest.raises(ActiveVersion) as info:
        await delete_version_by_id(store, "app", active.version.id)
    assert info.value.code == "active_version"
    old = active
    await deploy(store, "app", normal(), now=clock)
    await add_pool(store, "p", old.version.id)
    await delete_version_by_id(store, "app", old.version.id)
    with pytest.raises(VersionNotFound):
        await delete_version_by_id(store, "app", old.version.id)
    assert await store.list(SandboxPool) == []


async def test_get_version_of_another_app_is_not_found(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store, "a")
    await setup_app(store, "b")
    theirs = await deploy(store, "b", normal(), now=clock)
    with pytest.raises(VersionNotFound):
        await deploys.get_version(store, "a", theirs.version.id)
    assert (await deploys.get_version(store, "b", theirs.version.id)).id == theirs.version.id


# -- access info at the domain level -------------------------------------------------------------


async def test_r17_no_routes_and_a_cluster_hostname_give_one_url(
    store: MemoryStore, clock: FakeClock
) -> None:
    await setup_app(store)
    cfg = EphemeralConfig(cluster_hostname="c.miren.systems")
    result = await deploy(store, "app", eph("feat-x"), config=cfg, now=clock)
    assert result.urls == ("https://feat-x.c.miren.systems",)


async def test_case32_wildcard_route_url(store: MemoryStore, clock: FakeClock) -> None:
    await setup_app(store, "app", "*.apps.example.com")
    cfg = EphemeralConfig(cluster_hostname="c.miren.systems", url_scheme="http")
    result = await deploy(store, "app", eph("pr-1"), config=cfg, now=clock)
    assert result.urls == ("http://pr-1.apps.example.com",)


def test_r16_the_contract_is_documented() -> None:
    doc = deploys.__doc__ or ""
    assert "never sets `active_version`" in doc
    assert "Rollback" in doc
    assert deploys.deploy.__doc__ and "ephemeral" in deploys.deploy.__doc__
