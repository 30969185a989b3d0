"""The admin HTTP API (aiohttp): apps, routes, deploys, versions, previews, sandboxes, health.

Trust boundary. The API deploys commands, so it is remote code execution for whoever can call
it: every `/v1/*` call needs `Authorization: Bearer <token>` (compared in constant time; there
is always a token: `miren serve` generates one when none is configured, see `admin_token.py`).
Anything that is not a well-formed bearer token, including bytes that do not decode, is 401. A
request body must be `application/json` (415 otherwise): a web page cannot send one without a
CORS preflight, which this API never answers. JSON nested deeper than `MAX_JSON_DEPTH` is 400.

Every error, ours or aiohttp's (unknown path, wrong method, body too large, and a request the
low-level HTTP parser refused), leaves as `{"error": {"code": ..., "message": ...}}` through one
place; a message never repeats a header value (the parser's own messages quote the offending
line, which may hold the token: they are neither answered nor logged). An unexpected exception
is logged and answered 500 `internal` without details.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import attrs
from aiohttp import web, web_protocol
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from miren_ingress.admin import openapi
from miren_ingress.admin.deploy_wait import deploy_and_wait
from miren_ingress.admin.errors import (
    ApiError,
    BadRequest,
    ConflictError,
    NotFoundError,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from miren_ingress.routing.hosts import BadHost, validate_route_host
from miren_ingress.shell.config import Config
from miren_store.codec import format_public_time, to_data
from miren_store.deploy import apps, deploys
from miren_store.deploy.deploys import DeployRequest
from miren_store.deploy.errors import (
    DeployError,
    InvalidInput,
    MalformedRequest,
    Missing,
    StateConflict,
    StoreFailure,
)
from miren_store.deploy.labels import is_valid_label
from miren_store.durations import DurationError, parse_duration
from miren_store.entities import App, HttpRoute, Sandbox
from miren_store.errors import Conflict, NotFound, StoreUnavailable
from miren_store.logfiles import tail_lines
from miren_store.store import Store

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.define
class AdminContext:
    """What the handlers need, injected by `serve` (or by tests)."""

    store: Store
    config: Config
    registry: CollectorRegistry
    health: Callable[[], dict[str, Any]] = lambda: {"status": "ok"}
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    extra: dict[str, Any] = attrs.field(factory=dict)


CTX = web.AppKey("miren_admin_ctx", AdminContext)


# -- plumbing -----------------------------------------------------------------------------------


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def api_error_response(exc: ApiError) -> web.Response:
    resp = json_response(error_body(exc.code, exc.message, exc.details), exc.status)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="miren"'
    return resp


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    400: "bad_request",
}


def translate(exc: BaseException) -> ApiError | None:
    """A typed error from any layer as an ApiError (None: not ours, a bug)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StoreUnavailable):
        return Unavailable(f"the store is unavailable, nothing was changed: {exc}")
    if isinstance(exc, NotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, Conflict):
        return ConflictError(f"{exc}; retry")
    if isinstance(exc, DeployError):
        for cls, status in _DEPLOY_STATUS:
            if isinstance(exc, cls):
                return ApiError(exc.message, code=exc.code, status=status)
    return None


# The deploy domain groups its errors by how the caller reacts; each group has one status.
_DEPLOY_STATUS: tuple[tuple[type[DeployError], int], ...] = (
    (MalformedRequest, 400),
    (InvalidInput, 422),
    (Missing, 404),
    (StateConflict, 409),
    (StoreFailure, 503),
)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no such endpoint: {request.path}"
        resp = json_response(error_body(code, message), exc.status)
        if exc.status == 405:
            allow = exc.headers.get("Allow")
            if allow:
                resp.headers["Allow"] = allow
        return resp
    except Exception as exc:
        api = translate(exc)
        if api is None:
            log.exception("admin API: unexpected error on %s %s", request.method, request.path)
            return json_response(error_body("internal", "internal error (see server log)"), 500)
        return api_error_response(api)


UNAUTHORIZED = (
    "missing or wrong bearer token (Authorization: Bearer <token>; the CLI reads "
    "MIREN_ADMIN_TOKEN, --token-file, or .miren/admin-token)"
)
PROTECTED_PREFIX = "/v1/"


def auth_middleware(token: str) -> Any:
    if not token:
        raise ValueError("the admin API needs a token (see miren_ingress.admin.token)")
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIX):
            # aiohttp decodes header bytes as UTF-8 with surrogate escapes: bytes that are not
            # UTF-8 come back as the same bytes here, and simply do not match.
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return api_error_response(Unauthorized(UNAUTHORIZED))
        return await handler(request)

    return check


@web.middleware
async def json_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request that carries a body must say it is JSON (415 otherwise)."""
    if (request.body_exists or request.content_length) and request.content_type != (
        "application/json"
    ):
        return api_error_response(
            ApiError(
                "request bodies must be JSON (Content-Type: application/json)",
                code="unsupported_media_type",
                status=415,
            )
        )
    return await handler(request)


MAX_JSON_DEPTH = 32


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How many containers deep `value` nests (counting stops past `limit`)."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]
    return depth


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    if not raw:
        raise BadRequest("request body must be a JSON object", code="bad_json")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadRequest(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="bad_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="bad_json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="bad_json")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="bad_json")
    return data


def take(data: dict[str, Any], key: str, typ: type[Any], *, required: bool = False) -> Any:
    """`data[key]` checked against `typ` (400 naming the field when it is not)."""
    if key not in data or data[key] is None:
        if required:
            raise BadRequest(f"{key}: required field missing")
        return None
    value = data[key]
    if typ is int and isinstance(value, bool):
        raise BadRequest(f"{key}: expected an integer")
    if not isinstance(value, typ):
        raise BadRequest(f"{key}: expected {_TYPE_NAMES.get(typ, typ.__name__)}")
    return value


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", dict: "an object"}


def only_keys(data: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}")


def app_json(app: App) -> dict[str, Any]:
    return {
        "name": app.name,
        "active_version": app.active_version,
        "created_at": format_public_time(app.created_at),
        "loading_page": app.loading_page,
    }


def route_json(route: HttpRoute) -> dict[str, Any]:
    data: dict[str, Any] = to_data(route)
    return data


def check_app_name(name: str) -> str:
    if not is_valid_label(name):
        raise Unprocessable(
            f"app name {name!r} must be 1-63 lowercase letters, digits or hyphens, "
            "starting and ending with a letter or digit",
            code="invalid_name",
        )
    return name


# -- health and metrics ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    report = request.app[CTX].health()
    return json_response(report, 200 if report.get("status") == "ok" else 503)


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[CTX].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- apps ---------------------------------------------------------------------------------------


async def create_app(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    data = await read_json(request)
    only_keys(data, {"name"})
    name = check_app_name(take(data, "name", str, required=True))
    try:
        app = await ctx.store.create(App(name=name, created_at=ctx.now()))
    except Conflict:
        raise ConflictError(f"app {name!r} already exists", code="app_exists") from None
    return json_response(app_json(app), 201)


async def list_apps(request: web.Request) -> web.Response:
    apps = await request.app[CTX].store.list(App)
    return json_response([app_json(a) for a in apps])


LOADING_MODES = ("previews", "all", "none")


async def patch_app(request: web.Request) -> web.Response:
    """`PATCH /v1/apps/{app} {"loading_page": "previews"|"all"|"none"|null}` (null: the
    server's `ingress.loading_page`)."""
    ctx = request.app[CTX]
    data = await read_json(request)
    only_keys(data, {"loading_page"})
    mode = data.get("loading_page")
    if mode is not None and mode not in LOADING_MODES:
        raise Unprocessable("loading_page: must be previews, all, none or null",
                            code="invalid_app")  # fmt: skip
    for _ in range(5):
        app = await deploys.get_app(ctx.store, request.match_info["app"])
        try:
            saved = await ctx.store.update(attrs.evolve(app, loading_page=mode))
        except (Conflict, NotFound):
            continue
        return json_response(app_json(saved))
    raise ConflictError("the app is being changed concurrently; retry")


async def show_app(request: web.Request) -> web.Response:
    app = await deploys.get_app(request.app[CTX].store, request.match_info["app"])
    return json_response(app_json(app))


# -- routes -------------------------------------------------------------------------------------


async def put_route(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    try:
        host = validate_route_host(request.match_info["host"])
    except BadHost as exc:
        raise Unprocessable(str(exc), code="invalid_host") from None
    data = await read_json(request)
    only_keys(data, {"app", "default", "service", "request_timeout", "force"})
    app_name = take(data, "app", str, required=True)
    default = take(data, "default", bool) or False
    force = take(data, "force", bool) or False
    service = take(data, "service", str) or "web"
    timeout_text = take(data, "request_timeout", str)
    timeout = None
    if timeout_text is not None:
        try:
            timeout = parse_duration(timeout_text)
        except DurationError as exc:
            raise Unprocessable(f"request_timeout: {exc}", code="invalid_timeout") from None
        if timeout.total_seconds() <= 0:
            raise Unprocessable(
                f'request_timeout: "{timeout_text}" must be greater than 0', code="invalid_timeout"
            )
    await deploys.get_app(ctx.store, app_name)
    if default:
        others = [r for r in await ctx.store.list(HttpRoute, default=True) if r.host != host]
        if others:
            raise ConflictError(
                f"route {others[0].host!r} is already the default route; unset it first",
                code="default_route_exists",
            )
    route = HttpRoute(
        host=host, app=app_name, default=default, service=service, request_timeout=timeout
    )
    for _ in range(5):
        try:
            current = await ctx.store.get(HttpRoute, host)
        except NotFound:
            try:
                saved = await ctx.store.create(route)
            except Conflict:
                continue
            return json_response(route_json(saved), 201)
        if current.app != app_name and not force:
            raise ConflictError(
                f"host {host!r} is routed to app {current.app!r}; taking it makes that app's "
                "site answer 404 there: repeat with force (CLI: --force) to take it",
                code="route_taken",
            )
        try:
            saved = await ctx.store.update(attrs.evolve(route, revision=current.revision))
        except (Conflict, NotFound):
            continue
        answer = route_json(saved)
        if current.app != app_name:
            answer["taken_from"] = current.app
            log.warning("route %s moved from app %s to app %s", host, current.app, app_name)
        return json_response(answer, 200)
    raise ConflictError(f"route {host!r} is being changed concurrently; retry")


async def list_routes(request: web.Request) -> web.Response:
    routes = await request.app[CTX].store.list(HttpRoute)
    return json_response([route_json(r) for r in routes])


async def delete_route(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    host = request.match_info["host"].lower().rstrip(".")
    try:
        await ctx.store.delete(HttpRoute, host)
    except NotFound:
        raise NotFoundError(f"route {host!r} not found", code="route_not_found") from None
    return web.Response(status=204)


# -- deploys, versions, previews ----------------------------------------------------------------


def _notify_gc(ctx: AdminContext, version: Any) -> None:
    gc = ctx.extra.get("gc")
    if gc is not None and getattr(version, "is_ephemeral", False):
        gc.notify(version)


async def create_deploy(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    data = await read_json(request)
    wait = data.pop("wait", False)
    if not isinstance(wait, bool):
        raise BadRequest("invalid deploy request: wait: must be true or false")
    req = DeployRequest.from_data(data)
    app = request.match_info["app"]
    activator = ctx.extra.get("activator")
    if not wait:
        result = await deploys.deploy(ctx.store, app, req, config=ctx.config.ephemeral, now=ctx.now)
        _notify_gc(ctx, result.version)
        return json_response(result.to_data(), 201)
    if activator is None:
        raise ApiError("this server runs no activator: wait is not available", code="no_activator")
    result, report = await deploy_and_wait(
        ctx.store, activator, app, req, config=ctx.config.ephemeral, now=ctx.now
    )
    _notify_gc(ctx, result.version)
    answer = result.to_data()
    answer["ready"] = {"sandbox": report.sandbox_id, "seconds": round(report.seconds, 3)}
    return json_response(answer, 201)


def _query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise BadRequest(f"query parameter {name}: expected true or false, got {raw!r}")


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name}: expected an integer, got {raw!r}") from None


def _limit(request: web.Request) -> int:
    limit = _query_int(request, "limit", 20)
    if limit < 0:
        raise BadRequest(f"query parameter limit: must be 0 (all) or more, got {limit}")
    return limit


async def list_versions(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    views = await deploys.list_versions(
        ctx.store,
        request.match_info["app"],
        ephemeral_only=_query_bool(request, "ephemeral"),
        limit=_limit(request),
        now=ctx.now,
    )
    return json_response([v.to_data() for v in views])


async def show_version(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = await deploys.get_app(ctx.store, request.match_info["app"])
    version = await deploys.get_version(ctx.store, app.name, request.match_info["id"])
    status = deploys.version_status(version, app.active_version, ctx.now())
    return json_response(deploys.version_data(version, status))


async def delete_version(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    await deploys.delete_version_by_id(
        ctx.store, request.match_info["app"], request.match_info["id"]
    )
    return web.Response(status=204)


async def extend_preview(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    data = await read_json(request)
    only_keys(data, {"ttl"})
    ttl = take(data, "ttl", str, required=True)
    app = await deploys.get_app(ctx.store, request.match_info["app"])
    version = await deploys.extend_label(
        ctx.store,
        app.name,
        request.match_info["label"],
        ttl,
        config=ctx.config.ephemeral,
        now=ctx.now,
    )
    _notify_gc(ctx, version)
    status = deploys.version_status(version, app.active_version, ctx.now())
    return json_response(deploys.version_data(version, status))


async def delete_preview(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    deleted = await deploys.delete_label(
        ctx.store, request.match_info["app"], request.match_info["label"]
    )
    return json_response({"deleted": deleted})


async def delete_app(request: web.Request) -> web.Response:
    """Delete an app with its routes and versions (and their pools). Safe to retry."""
    ctx = request.app[CTX]
    await apps.delete_app(ctx.store, request.match_info["app"], now=ctx.now)
    return web.Response(status=204)


# -- sandboxes ----------------------------------------------------------------------------------

_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
MAX_TAIL = 10_000


def sandbox_json(sb: Sandbox) -> dict[str, Any]:
    return {
        "id": sb.id,
        "version": sb.version,
        "status": str(sb.status),
        "url": sb.url or None,
        "pid": sb.pid,
        "started_at": format_public_time(sb.started_at),
        "last_activity": format_public_time(sb.last_activity) if sb.last_activity else None,
        "reason": sb.reason or None,
    }


async def list_sandboxes(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = await deploys.get_app(ctx.store, request.match_info["app"])
    boxes = await ctx.store.list(Sandbox, app=app.name)
    boxes.sort(key=lambda b: b.started_at, reverse=True)
    return json_response([sandbox_json(b) for b in boxes])


async def sandbox_logs(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    sid = request.match_info["id"]
    tail = _query_int(request, "tail", 200)
    if not 0 <= tail <= MAX_TAIL:
        raise BadRequest(f"query parameter tail: must be between 0 and {MAX_TAIL}")
    if not _SANDBOX_ID.fullmatch(sid):
        raise NotFoundError(f"sandbox {sid!r} not found", code="sandbox_not_found")
    path = ctx.config.log_dir / f"{sid}.log"
    # At most about 512 bytes a line, so the read stays bounded whatever the log's size.
    lines = await asyncio.to_thread(tail_lines, path, tail, tail * 512 + 4096)
    if lines is None:
        raise NotFoundError(f"no log for sandbox {sid!r} on this node", code="sandbox_not_found")
    return json_response({"sandbox": sid, "lines": lines})


# -- application --------------------------------------------------------------------------------

RouteAdder = Callable[[web.UrlDispatcher], None]


def make_admin_app(ctx: AdminContext, *, extra_routes: RouteAdder | None = None) -> web.Application:
    """The admin aiohttp application. `extra_routes` lets other modules add their endpoints."""
    app = web.Application(
        middlewares=[
            error_middleware,
            auth_middleware(ctx.config.admin_token),
            json_body_middleware,
        ],
        client_max_size=1 << 20,
    )
    app[CTX] = ctx
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi_json)
    r.add_post("/v1/apps", create_app)
    r.add_get("/v1/apps", list_apps)
    r.add_get("/v1/apps/{app}", show_app)
    r.add_patch("/v1/apps/{app}", patch_app)
    r.add_delete("/v1/apps/{app}", delete_app)
    r.add_post("/v1/apps/{app}/deploys", create_deploy)
    r.add_get("/v1/apps/{app}/versions", list_versions)
    r.add_get("/v1/apps/{app}/versions/{id}", show_version)
    r.add_delete("/v1/apps/{app}/versions/{id}", delete_version)
    r.add_patch("/v1/apps/{app}/ephemeral/{label}", extend_preview)
    r.add_delete("/v1/apps/{app}/ephemeral/{label}", delete_preview)
    r.add_put("/v1/routes/{host}", put_route)
    r.add_get("/v1/routes", list_routes)
    r.add_delete("/v1/routes/{host}", delete_route)
    r.add_get("/v1/apps/{app}/sandboxes", list_sandboxes)
    r.add_get("/v1/sandboxes/{id}/logs", sandbox_logs)
    from miren_ingress.admin import protection, webhooks  # (they build on this module)

    webhooks.add_routes(r)
    protection.add_routes(r)
    if extra_routes is not None:
        extra_routes(r)
    return app


# -- the low-level HTTP layer -------------------------------------------------------------------


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with its own errors (a request its HTTP parser refused, a
    handler timeout) answered in the API's JSON shape. Its default answer and log line quote the
    offending header line, which may hold the bearer token: here they name the status only."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error(
                "admin API: internal error on a request from %s (%s)",
                request.remote,
                type(exc).__name__ if exc is not None else "no exception",
            )
        else:
            log.info(
                "admin API: refused a malformed request from %s (HTTP %d)", request.remote, status
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started")
        code = _HTTP_CODES.get(status, "http_error" if status < 500 else "internal")
        text = "the request could not be parsed as HTTP" if status == 400 else "internal error"
        resp = json_response(error_body(code, text), status)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """An AppRunner whose connections answer aiohttp's own errors in the API's shape (see
    `_RequestHandler`). Pinned to aiohttp 3.14's Server constructor (tests/admin cover it)."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _Server(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
