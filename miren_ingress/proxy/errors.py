"""Typed errors of the proxy engine, grouped by the reaction they cause.

Every error carries the HTTP status it becomes, a public message (no ids, safe to show a client)
and a short `reason` used as the `miren_ingress_upstream_errors_total{reason}` label. Foreign
exceptions (OSError, parser errors) are translated to these at the boundary where they occur;
`errorpage.py` turns them into responses, in one place.
"""

from __future__ import annotations

from typing import ClassVar


class ProxyError(Exception):
    """Base class. Subclasses fix `status`, `reason` and the default public message."""

    status: ClassVar[int] = 500
    reason: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "Something went wrong."

    def __init__(self, message: str | None = None, *, retry_after: int | None = None) -> None:
        self.public_message = message or self.default_message
        self.retry_after = retry_after
        super().__init__(self.public_message)


# --- the client sent something we refuse to forward: 400 and close the connection -------------
class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"
    default_message = "The request could not be understood."


class MethodNotAllowed(ProxyError):
    status = 405
    reason = "bad_request"
    default_message = "This method is not supported by the proxy."


class UriTooLong(ProxyError):
    """The request target is longer than max_request_line."""

    status = 414
    reason = "bad_request"
    default_message = "The request target is too long."


class HeaderFieldsTooLarge(ProxyError):
    """The header section is larger than max_header_bytes or has more than max_headers fields."""

    status = 431
    reason = "bad_request"
    default_message = "The request header section is too large."


class RequestTimeout(ProxyError):
    """The client stopped sending its request body for longer than body_timeout."""

    status = 408
    reason = "client_timeout"
    default_message = "The request body was not received in time."


# --- the upstream failed: 502 --------------------------------------------------------------
class BadGateway(ProxyError):
    status = 502
    reason = "bad_gateway"
    default_message = "The application is temporarily unavailable."


class UpstreamConnectError(BadGateway):
    """Connecting to the sandbox failed (refused, unreachable, connect timeout)."""

    reason = "connect"


class UpstreamReset(BadGateway):
    """The upstream closed or reset the connection before a complete response head."""

    reason = "reset"


class UpstreamProtocolError(BadGateway):
    """The upstream sent something that is not a valid HTTP/1.1 response."""

    reason = "protocol"


class BootFailed(BadGateway):
    """The sandbox died while booting, or the pool is in crash back-off."""

    reason = "boot_failed"


# --- nothing answered in time: 504 ---------------------------------------------------------
class GatewayTimeout(ProxyError):
    status = 504
    reason = "timeout"
    default_message = "The application did not answer in time."


class UpstreamTimeout(GatewayTimeout):
    """No response head within the route's request_timeout (an idle timeout)."""

    reason = "timeout"


class ActivationTimeout(GatewayTimeout):
    """No sandbox became ready within boot_timeout."""

    reason = "activation_timeout"


# --- try again later: 503 with Retry-After ---------------------------------------------------
class ServiceUnavailable(ProxyError):
    status = 503
    reason = "unavailable"
    default_message = "The application is temporarily unavailable."

    def __init__(self, message: str | None = None, *, retry_after: int | None = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class Starting(ServiceUnavailable):
    """A browser navigation waited past `loading_page_after` for a cold start: the loading page
    (the boot goes on)."""

    reason = "starting"
    default_message = "This preview is starting; the page reloads by itself."

    def __init__(self, message: str | None = None, *, retry_after: int | None = 2) -> None:
        super().__init__(message, retry_after=retry_after)


class Overloaded(ServiceUnavailable):
    """The cold-start queue of the version is full."""

    reason = "overloaded"


class NotReady(ServiceUnavailable):
    """The route table is not loaded yet."""

    reason = "not_ready"
