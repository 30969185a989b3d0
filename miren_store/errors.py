"""Store errors, grouped by how the caller reacts.

Foreign exceptions (aetcd, grpc, OSError) are translated into these at the backend boundary, in one
place per backend; nothing above the store sees a gRPC error.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises."""


class NotFound(StoreError):
    """The entity does not exist (or no longer exists)."""


class Conflict(StoreError):
    """A write lost a race: the entity exists already, or its revision moved on."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or did not answer within the call's timeout.

    The operation may or may not have been applied (a write that timed out after etcd received it);
    callers that need certainty re-read.
    """


class InvalidQuery(StoreError):
    """A list or range on a field that is not declared as indexed or ordered."""


class Resync(StoreError):
    """Raised through a watch when it cannot resume (compacted revision): list again, then watch."""

    def __init__(self, revision: int, message: str = "") -> None:
        super().__init__(message or f"watch cannot resume from revision {revision}: re-list")
        self.revision = revision
