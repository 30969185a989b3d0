"""The one place where errors become HTTP responses.

The body follows `Accept`: JSON `{"error": {"code": "<snake_case status>", "message": "..."}}`
(the admin API's shape), a small HTML page, or text/plain (the default, also for a missing or unsupported Accept). Every error response
carries `Cache-Control: no-store` and `Vary: Accept`; messages are public texts only.
"""

from __future__ import annotations

import html
import json
from http import HTTPStatus

from .dates import date_line

_JSON = 0
_HTML = 1
_TEXT = 2
_TYPES = {
    b"application/json": _JSON,
    b"text/html": _HTML,
    b"text/plain": _TEXT,
}
_CONTENT_TYPE = {
    _JSON: b"application/json",
    _HTML: b"text/html; charset=utf-8",
    _TEXT: b"text/plain; charset=utf-8",
}


def negotiate(accept: bytes) -> int:
    """Pick JSON, HTML or text for an Accept header value. Highest q wins; among equal q the most
    specific media range wins; unsupported or missing means text/plain."""
    best, best_key = _TEXT, (0.0, -1)
    for item in accept.split(b","):
        fields = item.split(b";")
        media = fields[0].strip().lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if q <= 0.0:
            continue
        if media in _TYPES:
            candidates = [(_TYPES[media], 2)]
        elif media == b"text/*":
            candidates = [(_TEXT, 1)]
        elif media in (b"*/*", b"application/*"):
            candidates = [(_TEXT, 0)] if media == b"*/*" else []
        else:
            candidates = []
        for kind, specificity in candidates:
            if (q, specificity) > best_key:
                best, best_key = kind, (q, specificity)
    return best


def status_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def render_body(status: int, message: str, accept: bytes) -> tuple[bytes, bytes]:
    """(content type, body) for an error."""
    kind = negotiate(accept) if accept else _TEXT
    phrase = status_name(status)
    if kind == _JSON:
        code = phrase.lower().replace(" ", "_").replace("-", "_").replace("'", "")
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
    elif kind == _HTML:
        title = html.escape(f"{status} {phrase}")
        body = (
            '<!doctype html>\n<html><head><meta charset="utf-8"><title>'
            f"{title}</title></head>\n<body><h1>{title}</h1>\n<p>{html.escape(message)}</p>"
            "</body></html>\n"
        ).encode()
    else:
        body = f"{status} {phrase}: {message}\n".encode()
    return _CONTENT_TYPE[kind], body


def render_response(
    status: int,
    message: str,
    accept: bytes,
    *,
    keep_alive: bool,
    retry_after: int | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 error response (head and body) ready to write."""
    content_type, body = render_body(status, message, accept)
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, status_name(status).encode()),
        b"Content-Type: " + content_type + b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\nVary: Accept\r\n",
        date_line(),
    ]
    if retry_after is not None:
        lines.append(b"Retry-After: %d\r\n" % retry_after)
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def render_own(
    status: int,
    content_type: bytes,
    body: bytes,
    extra: bytes = b"",
    *,
    keep_alive: bool,
    head_only: bool,
) -> bytes:
    """A complete response the proxy answers itself (never cached): `extra` is header lines,
    each ending in CRLF. The one place such a head is written."""
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\n%s%s%s\r\n"
        % (
            status,
            status_name(status).encode(),
            content_type,
            len(body),
            extra,
            date_line(),
            b"" if keep_alive else b"Connection: close\r\n",
        )
    )
    return head if head_only else head + body


def render_json(status: int, payload: object, *, keep_alive: bool, head_only: bool) -> bytes:
    """A complete JSON response (the reserved health endpoint)."""
    body = json.dumps(payload).encode()
    return render_own(status, b"application/json", body, keep_alive=keep_alive, head_only=head_only)


LOADING_PAGE = (
    b'<!doctype html>\n<html><head><meta charset="utf-8"><meta name="robots" content="noindex">'
    b"<title>Starting\xe2\x80\xa6</title><style>body{font:16px system-ui,sans-serif;"
    b"margin:20vh auto;max-width:32em;text-align:center;color:#333}</style></head>\n"
    b"<body><h1>Starting\xe2\x80\xa6</h1><p>This preview was asleep and is starting now. "
    b"The page reloads by itself.</p></body></html>\n"
)
_HTML_TYPE = b"text/html; charset=utf-8"
_NOINDEX = b"X-Robots-Tag: noindex\r\n"


def render_loading(*, keep_alive: bool, head_only: bool) -> bytes:
    """The page a browser gets while a preview boots: 503 with Retry-After and Refresh, never
    cached or indexed."""
    extra = b"Retry-After: 2\r\nRefresh: 2\r\n" + _NOINDEX
    return render_own(
        503, _HTML_TYPE, LOADING_PAGE, extra, keep_alive=keep_alive, head_only=head_only
    )


def render_page(status: int, page: bytes, *, keep_alive: bool, head_only: bool) -> bytes:
    """An HTML page the proxy answers itself (the login page of a protected host)."""
    return render_own(
        status, _HTML_TYPE, page, _NOINDEX, keep_alive=keep_alive, head_only=head_only
    )


def render_plain(
    status: int, body: bytes, extra: bytes = b"", *, keep_alive: bool, head_only: bool
) -> bytes:
    """A text/plain response the proxy answers itself (an ACME challenge, a redirect)."""
    return render_own(
        status, b"text/plain", body, extra, keep_alive=keep_alive, head_only=head_only
    )
