"""The activator's Prometheus metrics (SPEC §10), registered on a registry the caller passes.

`app` is the only label with caller-supplied values and is bounded by the number of apps; the
ephemeral label is never a metric label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from miren_store.entities import SandboxStatus

COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ActivatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, node: str = "") -> None:
        # A private registry when none is given, so several activators (tests) never collide.
        self.registry = registry if registry is not None else CollectorRegistry()
        self.cold_starts = Counter(
            "miren_activator_cold_starts",
            "Sandboxes started by the activator (each one is a cold start).",
            ["app"],
            registry=self.registry,
        )
        self.cold_start_duration = Histogram(
            "miren_activator_cold_start_duration_seconds",
            "Time from starting a sandbox to its passing health check.",
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.sandboxes = Gauge(
            "miren_activator_sandboxes",
            "Sandboxes this node tracks, by state (ended ones are kept for a while).",
            ["node", "state"],
            registry=self.registry,
        )
        self.pool_creations = Counter(
            "miren_activator_pool_creations",
            "Pool entities this activator created in the store.",
            registry=self.registry,
        )
        self.takeovers = Counter(
            "miren_activator_pool_takeovers",
            "Pools this node took over from a node that left the cluster.",
            registry=self.registry,
        )
        self.waiters = Gauge(
            "miren_activator_waiters",
            "Acquires waiting for a sandbox (booting or busy).",
            registry=self.registry,
        )
        # Children exist from the start, so a scrape shows zeros rather than no series.
        self._by_state = {s: self.sandboxes.labels(node=node, state=s.value) for s in SandboxStatus}

    def sandbox_state(self, old: SandboxStatus | None, new: SandboxStatus | None) -> None:
        if old is not None:
            self._by_state[old].dec()
        if new is not None:
            self._by_state[new].inc()
