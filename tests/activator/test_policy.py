"""Pure decisions: scaling, idle scale-down, crash back-off, pool parameters. No I/O."""

from __future__ import annotations

from datetime import timedelta

import attrs
import pytest

from miren_activator.policy import (
    CrashPolicy,
    CrashState,
    IdleCandidate,
    PoolParams,
    after_clean_stop,
    after_death,
    idle_victims,
    pool_id_for,
    sandboxes_to_start,
)
from miren_store.entities import AppVersion, Concurrency, Runtime, VersionSpec

P = PoolParams(
    target=10,
    hard_cap=None,
    max_instances=3,
    min_instances=0,
    scale_down_delay=60.0,
    boot_timeout=5.0,
)


def version(label: str = "", runtime: Runtime = Runtime.PROCESS, **conc: object) -> AppVersion:
    spec = VersionSpec(
        runtime=runtime,
        command=("x",) if runtime is Runtime.PROCESS else (),
        urls=("http://a:1", "http://b:2") if runtime is Runtime.UPSTREAM else (),
        concurrency=Concurrency(**conc),  # type: ignore[arg-type]
    )
    return AppVersion(id="v1", app="app", spec=spec, ephemeral_label=label)


def test_pool_id_is_deterministic_per_version_and_service() -> None:
    assert pool_id_for("app-v1", "web") == "pool-app-v1-web"
    assert pool_id_for("app-v1", "web") != pool_id_for("app-v1", "worker")
    assert pool_id_for("app-v1", "web") != pool_id_for("app-v2", "web")


def test_params_defaults_normal_and_ephemeral() -> None:
    normal = PoolParams.for_version(version(), "web")
    assert (normal.target, normal.max_instances, normal.min_instances) == (10, 20, 0)
    assert normal.hard_cap is None  # requests_per_instance is a target: no cap unless asked
    assert normal.scale_down_delay == 120.0
    assert normal.boot_timeout == 60.0
    eph = PoolParams.for_version(version("pr-1"), "web")
    assert (eph.max_instances, eph.scale_down_delay) == (1, 900.0)
    # A preview's other services scale like a normal version's.
    assert PoolParams.for_version(version("pr-1"), "worker").max_instances == 20
    # Explicit settings win over the ephemeral defaults.
    custom = PoolParams.for_version(
        version("pr-1", max_instances=2, scale_down_delay=timedelta(seconds=1)), "web"
    )
    assert (custom.max_instances, custom.scale_down_delay) == (2, 1.0)


def test_params_hard_cap_and_a_target_above_it() -> None:
    capped = PoolParams.for_version(version(max_requests_per_instance=50), "web")
    assert (capped.target, capped.hard_cap) == (10, 50)
    low = PoolParams.for_version(
        version(requests_per_instance=10, max_requests_per_instance=4), "web"
    )
    assert (low.target, low.hard_cap) == (4, 4)  # a target above the cap is the cap


def test_params_upstream_is_capped_at_one_sandbox_per_url() -> None:
    assert PoolParams.for_version(version(runtime=Runtime.UPSTREAM), "web").max_instances == 2


def test_params_min_never_exceeds_max() -> None:
    p = PoolParams.for_version(version(min_instances=5, max_instances=2), "web")
    assert p.min_instances == 2


@pytest.mark.parametrize(
    ("waiting", "pending", "live", "backoff", "saturated", "expected"),
    [
        (0, 0, 0, False, False, 0),  # nobody asks: nothing starts
        (1, 0, 0, False, False, 1),  # first request: one sandbox
        (500, 0, 0, False, False, 1),  # a crowd still starts one (it waits on the boot)
        (5, 1, 1, False, False, 0),  # one is booting: wait for it instead
        (1, 0, 2, False, False, 1),  # all running ones at the hard cap: scale up by one
        (0, 0, 2, False, True, 1),  # all past the target: scale up, nobody waits meanwhile
        (0, 1, 2, False, True, 0),  # ... unless one is booting already
        (0, 0, 3, False, True, 0),  # at max_instances: the work spreads over the three
        (1, 0, 3, False, False, 0),  # at max_instances and the hard cap: wait for a unit
        (1, 0, 0, True, False, 0),  # crash back-off: nothing starts
        (0, 0, 1, True, True, 0),
    ],
)
def test_sandboxes_to_start(
    waiting: int, pending: int, live: int, backoff: bool, saturated: bool, expected: int
) -> None:
    got = sandboxes_to_start(
        waiting=waiting,
        pending=pending,
        live=live,
        params=P,
        in_backoff=backoff,
        saturated=saturated,
    )
    assert got == expected


def test_sandboxes_to_start_fills_min_instances_within_max() -> None:
    p = attrs.evolve(P, min_instances=2)
    assert sandboxes_to_start(waiting=0, pending=0, live=0, params=p, in_backoff=False) == 2
    assert sandboxes_to_start(waiting=0, pending=1, live=1, params=p, in_backoff=False) == 1
    assert sandboxes_to_start(waiting=0, pending=0, live=2, params=p, in_backoff=False) == 0
    assert sandboxes_to_start(waiting=0, pending=0, live=0, params=p, in_backoff=True) == 0


def test_idle_victims_oldest_first_never_busy_never_below_min() -> None:
    now = 1000.0
    cands = [
        IdleCandidate("busy-old", in_use=1, last_used=0.0),  # in-flight lease: never
        IdleCandidate("idle-new", in_use=0, last_used=now - 61),
        IdleCandidate("idle-old", in_use=0, last_used=now - 500),
        IdleCandidate("recent", in_use=0, last_used=now - 10),
    ]
    assert idle_victims(cands, live=4, now=now, params=P) == ["idle-old", "idle-new"]
    p = attrs.evolve(P, min_instances=3)
    assert idle_victims(cands, live=4, now=now, params=p) == ["idle-old"]
    p = attrs.evolve(P, min_instances=4)
    assert idle_victims(cands, live=4, now=now, params=p) == []


def test_idle_exactly_at_the_delay_counts() -> None:
    c = [IdleCandidate("a", 0, 940.0)]
    assert idle_victims(c, live=1, now=1000.0, params=P) == ["a"]
    assert idle_victims(c, live=1, now=999.9, params=P) == []


def test_crash_backoff_doubles_from_10s_to_15min() -> None:
    policy = CrashPolicy()
    # The first quick crash is replaced at once; a crash loop then backs off 10 s doubling.
    assert [policy.backoff(n) for n in range(1, 10)] == [0, 10, 20, 40, 80, 160, 320, 640, 900]
    assert policy.backoff(10_000) == 900
    assert policy.backoff(0) == 0


def test_quick_crashes_accumulate_and_a_long_life_resets() -> None:
    policy = CrashPolicy()
    s = CrashState()
    s = after_death(s, uptime=1.0, now=100.0, policy=policy)
    assert (s.consecutive, s.cooldown_until) == (1, 100.0)  # the first is replaced at once
    assert s.remaining(100.0) == 0.0
    s = after_death(s, uptime=30.0, now=200.0, policy=policy)
    assert (s.consecutive, s.cooldown_until) == (2, 210.0)
    assert s.remaining(205.0) == 5.0
    assert s.remaining(211.0) == 0.0
    assert after_death(s, uptime=60.0, now=300.0, policy=policy) == CrashState()
    assert after_clean_stop(s, uptime=59.0, policy=policy) == s
    assert after_clean_stop(s, uptime=61.0, policy=policy) == CrashState()
