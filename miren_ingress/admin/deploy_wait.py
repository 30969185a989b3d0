"""`deploy --wait`: a deploy that answers only once a sandbox of the new version is healthy.

The deploy is staged (the version is created, the app keeps its active version), the activator
boots one sandbox of it and waits for its health check (`Activator.boot_check`, bounded by the
spec's `boot_timeout`), and only then is the version activated, through the same rollback step
as `from_version` deploys. A preview is created as usual and booted the same way. When the boot
fails the answer is `422 boot_failed` with the reason (exit status or signal, boot timeout and
the last health check) and the last lines of the sandbox's log; a staged normal version stays
inactive, so the previous version keeps serving, and is kept (with its sandbox record and log)
for `miren sandbox logs`.
"""

from __future__ import annotations

import attrs

from miren_activator import Activator
from miren_activator.errors import ActivatorError
from miren_activator.pools import BootReport
from miren_ingress.admin.errors import ApiError
from miren_store.deploy import deploys
from miren_store.deploy.deploys import Clock, DeployRequest, DeployResult, EphemeralConfig
from miren_store.store import Store

LOG_LINES = 20  # of the failed sandbox's log, in the answer


class BootCheckFailed(ApiError):
    status = 422
    code = "boot_failed"


async def deploy_and_wait(
    store: Store,
    activator: Activator,
    app: str,
    request: DeployRequest,
    *,
    config: EphemeralConfig,
    now: Clock,
) -> tuple[DeployResult, BootReport]:
    """Deploy, boot one sandbox of the version and activate it once healthy (see the module
    docstring). Raises `BootCheckFailed` when the sandbox does not become healthy."""
    staged = await deploys.deploy(store, app, request, config=config, now=now, activate=False)
    version = staged.version
    try:
        report = await activator.boot_check(version)
    except ActivatorError as exc:
        raise _failure(activator, staged, exc) from None
    if request.ephemeral is not None:
        return staged, report
    active = await deploys.deploy(
        store, app, DeployRequest(from_version=version.id), config=config, now=now
    )
    return attrs.evolve(active, cloned_from=staged.cloned_from, evicted=staged.evicted), report


def _failure(activator: Activator, staged: DeployResult, exc: ActivatorError) -> BootCheckFailed:
    version = staged.version
    sandbox = getattr(exc, "sandbox_id", None)
    lines = (activator.tail_log(sandbox, LOG_LINES) if sandbox else None) or []
    preview = version.is_ephemeral
    outcome = (
        f"preview {version.ephemeral_label!r} ({version.id}) is deployed but does not serve"
        if preview
        else f"version {version.id} was not activated"
    )
    return BootCheckFailed(
        f"{exc}; {outcome}",
        details={"version": version.id, "sandbox": sandbox, "log": lines},
    )
