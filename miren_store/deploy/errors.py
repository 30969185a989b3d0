"""Errors of the deploy domain (labels, TTLs, deploys, versions, the delete cascade).

Grouped by how the caller reacts; every class has a stable machine `code` the admin API puts in
`{"error": {"code": ..., "message": ...}}`. Messages are for users: they name the input or the
step that failed and never carry a stack trace.

- `InvalidInput`    the request is wrong; fix it and send it again (400/422).
- `Missing`         something the request names does not exist (404; `label_expired`: 410).
- `StateConflict`   the current state forbids it, or concurrent writers kept winning (409).
- `StoreFailure`    the store could not be reached or did not answer; nothing half-made was left
                    behind, retry later (503). `step` names what was being done.
"""

from __future__ import annotations

from typing import ClassVar


class DeployError(Exception):
    """Base of every error of this domain."""

    code: ClassVar[str] = "deploy_error"

    @property
    def message(self) -> str:
        return str(self)


# -- the request is wrong -------------------------------------------------------------------------


class InvalidInput(DeployError):
    code = "invalid_request"


class MalformedRequest(InvalidInput):
    """The request's shape is wrong: a wrong JSON type, a missing or unknown field (400)."""

    code = "bad_request"


class InvalidLabel(InvalidInput):
    code = "invalid_label"


class InvalidTTL(InvalidInput):
    code = "invalid_ttl"


class InvalidSpec(InvalidInput):
    code = "invalid_spec"


class VersionAppMismatch(InvalidInput):
    """`from_version` names a version of another app."""

    code = "version_app_mismatch"


# -- something named does not exist ---------------------------------------------------------------


class Missing(DeployError):
    code = "not_found"


class AppNotFound(Missing):
    code = "app_not_found"


class VersionNotFound(Missing):
    code = "version_not_found"


class LabelNotFound(Missing):
    code = "label_not_found"


class LabelExpired(Missing):
    """The label exists but every version carrying it has expired (the GC has not run yet)."""

    code = "label_expired"


# -- the current state forbids it -----------------------------------------------------------------


class StateConflict(DeployError):
    code = "conflict"


class ActiveVersion(StateConflict):
    """Deleting the active version of an app is refused."""

    code = "active_version"


class TooManyConflicts(StateConflict):
    """Concurrent writers on the same app kept winning the revision race; retry."""

    code = "conflict"


# -- the store failed -----------------------------------------------------------------------------


class StoreFailure(DeployError):
    """A store call failed (unreachable, timed out). Nothing half-made is left behind.

    `step` names the step that failed (`read`, `replace`, `evict`, `create`, `activate`, ...).
    """

    code = "store_unavailable"

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


class CleanupFailed(StoreFailure):
    """Deleting a version's pools (or the version) failed: the version is kept for a retry."""

    code = "cleanup_failed"

    def __init__(self, step: str, message: str, version_id: str) -> None:
        super().__init__(step, message)
        self.version_id = version_id
