"""miren_activator: leases on sandboxes, pools on demand, process and upstream runtimes."""

from miren_activator.activator import Activator
from miren_activator.clock import Clock, ManualClock, SystemClock
from miren_activator.config import ActivatorConfig
from miren_activator.errors import (
    ActivationTimeout,
    ActivatorClosed,
    ActivatorError,
    BootFailed,
    CrashBackoff,
    IllegalTransition,
    Overloaded,
    PoolCreationFailed,
    Unreachable,
    VersionRemoved,
)
from miren_activator.policy import CrashPolicy, PoolParams, pool_id_for
from miren_activator.pools import Held, Lease, PoolSnapshot, SandboxInfo, VersionRef
from miren_activator.runtimes.base import PollSchedule, SandboxHandle, SandboxRuntime, SandboxSpec
from miren_activator.runtimes.fake import FakeRuntime, FakeSandbox
from miren_activator.runtimes.process import ProcessRuntime
from miren_activator.runtimes.upstream import UpstreamRuntime

__all__ = [
    "ActivationTimeout",
    "Activator",
    "ActivatorClosed",
    "ActivatorConfig",
    "ActivatorError",
    "BootFailed",
    "Clock",
    "CrashBackoff",
    "CrashPolicy",
    "FakeRuntime",
    "FakeSandbox",
    "Held",
    "IllegalTransition",
    "Lease",
    "ManualClock",
    "Overloaded",
    "PollSchedule",
    "PoolCreationFailed",
    "PoolParams",
    "PoolSnapshot",
    "ProcessRuntime",
    "SandboxHandle",
    "SandboxInfo",
    "SandboxRuntime",
    "SandboxSpec",
    "SystemClock",
    "Unreachable",
    "UpstreamRuntime",
    "VersionRef",
    "VersionRemoved",
    "pool_id_for",
]
