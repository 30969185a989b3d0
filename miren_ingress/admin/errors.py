"""Errors of the ingress package that become admin API answers.

`ApiError` carries the HTTP status and a stable machine code; the admin API turns it (and the
store's and the deploy domain's typed errors) into `{"error": {"code", "message"}}` in one place
(`admin_api.error_middleware`).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """`details`: what more the error knows, answered as `error.details` (never a secret)."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFoundError(ApiError):
    status = 404
    code = "not_found"


class ConflictError(ApiError):
    status = 409
    code = "conflict"


class Unprocessable(ApiError):
    status = 422
    code = "invalid"


class Unavailable(ApiError):
    status = 503
    code = "store_unavailable"
