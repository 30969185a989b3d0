"""Every duration, count and size of the reliability suite, read from the environment HERE only.

Two profiles:
- short (default; what CI runs): the whole directory in about three minutes, with a 60 s soak;
- long (`MIREN_LONG=1 pytest tests/reliability -m reliability`): a 10-minute soak, a 30 s etcd
  outage, more kills, more hypothesis examples, bigger bursts.

Any single field can also be overridden for one run with `MIREN_RELIABILITY_<FIELD>` (upper
case), e.g. `MIREN_RELIABILITY_SOAK_SECONDS=120`; the value is parsed as the field's type.
Unknown `MIREN_RELIABILITY_*` variables are an error naming the variable (a typo must not
silently run the default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

LONG_VAR = "MIREN_LONG"
OVERRIDE_PREFIX = "MIREN_RELIABILITY_"
FIGURES_VAR = "MIREN_RELIABILITY_FIGURES"  # a path: figures are appended there as JSON lines


@dataclass(frozen=True)
class Budget:
    long: bool
    # soak
    soak_seconds: float  # load duration
    soak_warmup: float  # growth of RSS and fds is measured from here ("after the first minute")
    soak_rate: float  # requests per second offered in total (paced, closed loop)
    soak_concurrency: int  # client connections
    preview_every: float  # a new preview is deployed this often
    preview_ttl: float  # seconds; each preview expires this long after its deploy
    # etcd
    outage_seconds: float  # etcd stays stopped this long under load
    # sandbox kill
    kills: int  # sandboxes killed, one after the other, under load
    kill_load_seconds: float  # load before each kill and after it
    # bad input
    hypothesis_examples: int
    # slow clients
    idle_connections: int
    slowloris_clients: int
    slow_measure_seconds: float  # how long the normal client measures under that load
    # cold-start overload
    max_waiters: int
    overload_burst: int  # concurrent first requests to a cold version (> max_waiters)
    overload_big_burst: int  # larger bursts, each on its own cold version...
    overload_big_bursts: int  # ...this many: the RSS they leave must level off
    boot_delay_ms: int  # the sandbox's BOOT_DELAY_MS, so waiters pile up


SHORT = Budget(
    long=False,
    soak_seconds=60.0,
    soak_warmup=10.0,
    soak_rate=150.0,
    soak_concurrency=8,
    preview_every=2.0,
    preview_ttl=4.0,
    outage_seconds=5.0,
    kills=1,
    kill_load_seconds=1.5,
    hypothesis_examples=300,
    idle_connections=2000,
    slowloris_clients=200,
    slow_measure_seconds=3.0,
    max_waiters=20,
    overload_burst=100,
    overload_big_burst=1000,
    overload_big_bursts=6,
    boot_delay_ms=1500,
)

LONG = replace(
    SHORT,
    long=True,
    soak_seconds=600.0,
    soak_warmup=60.0,
    outage_seconds=30.0,
    kills=3,
    kill_load_seconds=3.0,
    hypothesis_examples=3000,
    slow_measure_seconds=4.0,
    overload_burst=200,
    overload_big_burst=3000,
    overload_big_bursts=10,
)


def _parse(name: str, text: str, current: Any) -> Any:
    if isinstance(current, bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    raise TypeError(f"{name}: cannot override a {type(current).__name__}")


def load_budget(env: Mapping[str, str] | None = None) -> Budget:
    """The profile chosen by `MIREN_LONG`, with `MIREN_RELIABILITY_<FIELD>` overrides."""
    env = os.environ if env is None else env
    long = env.get(LONG_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    budget = LONG if long else SHORT
    known = {f.name for f in fields(Budget)} - {"long"}
    changes: dict[str, Any] = {}
    for var, text in env.items():
        if not var.startswith(OVERRIDE_PREFIX) or var == FIGURES_VAR:
            continue
        name = var[len(OVERRIDE_PREFIX) :].lower()
        if name not in known:
            raise ValueError(f"{var}: unknown reliability setting (known: {sorted(known)})")
        changes[name] = _parse(var, text, getattr(budget, name))
    return replace(budget, **changes)


BUDGET = load_budget()
