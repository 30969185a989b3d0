"""GitHub webhooks: previews that follow their pull request, with no CI job to write.

`PUT /v1/apps/{app}/preview-template` (admin token) sets what a pull request deploys and the
secret GitHub signs with. `POST /hooks/github/{app}` (outside `/v1`: GitHub cannot send the
admin token) is authenticated only by `X-Hub-Signature-256`, the HMAC-SHA256 of the raw body
with that secret, compared in constant time (401 otherwise, and nothing changes). Each signed
payload is applied once: the record is keyed by the body's SHA-256 (what the signature covers;
`X-GitHub-Delivery` is not signed, so a replay under a new id is still the same payload), made
before it is applied and removed again if applying fails, so GitHub's redelivery can retry it.

`pull_request` `opened`, `reopened`, `synchronize`: deploy the template as a preview labelled by
the head branch (or `pr-<number>`); `closed`: delete that preview now. `ping`: 200. Any other
event or action: 202, ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from miren_ingress.admin.api import (
    CTX,
    _notify_gc,
    json_response,
    only_keys,
    read_json,
    take,
)
from miren_ingress.admin.errors import ApiError, BadRequest, NotFoundError, Unauthorized
from miren_store.codec import describe_error, from_data, to_data
from miren_store.deploy import deploys, templates
from miren_store.deploy.errors import LabelNotFound
from miren_store.deploy.ttl import resolve_ttl
from miren_store.entities import PreviewTemplate, VersionSpec, WebhookDelivery
from miren_store.errors import Conflict, NotFound
from miren_store.store import Store, put

log = logging.getLogger("miren.webhooks")

KEEP_DELIVERIES = timedelta(days=3)  # GitHub redelivers within hours; older records go


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    want = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, header[len("sha256=") :].strip().lower())


def template_json(t: PreviewTemplate) -> dict[str, Any]:
    return {
        "app": t.app,
        "spec": to_data(t.spec),
        "label": t.label,
        "ttl": t.ttl,
        "webhook_secret_set": bool(t.webhook_secret),
        "webhook_url": f"/hooks/github/{t.app}",
    }


async def put_template(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = (await deploys.get_app(ctx.store, request.match_info["app"])).name
    data = await read_json(request)
    only_keys(data, {"spec", "label", "ttl", "webhook_secret"})
    label = take(data, "label", str) or "branch"
    if label not in templates.LABEL_MODES:
        raise ApiError("label: must be branch or pr", code="invalid_template", status=422)
    secret = take(data, "webhook_secret", str, required=True)
    if len(secret) < 16:
        raise ApiError(
            "webhook_secret: at least 16 characters (GitHub signs with it)",
            code="invalid_template",
            status=422,
        )
    ttl = take(data, "ttl", str)
    if ttl is not None:
        resolve_ttl(ttl, default=ctx.config.ephemeral.default_ttl,
                    maximum=ctx.config.ephemeral.max_ttl)  # fmt: skip
    try:
        spec = from_data(VersionSpec, data.get("spec"))
    except Exception as exc:
        raise ApiError(f"spec: {describe_error(exc)}", code="invalid_spec", status=422) from None
    if problems := spec.problems():
        raise ApiError(f"spec: {'; '.join(problems)}", code="invalid_spec", status=422)
    template = PreviewTemplate(app=app, spec=spec, label=label, ttl=ttl, webhook_secret=secret)
    try:
        saved = await put(ctx.store, template)
    except Conflict:
        raise ApiError("the template is being changed concurrently; retry", code="conflict",
                       status=409) from None  # fmt: skip
    return json_response(template_json(saved))


async def get_template(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = (await deploys.get_app(ctx.store, request.match_info["app"])).name
    try:
        template = await ctx.store.get(PreviewTemplate, app)
    except NotFound:
        raise NotFoundError(f"app {app!r} has no preview template", code="no_template") from None
    return json_response(template_json(template))


async def delete_template(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = (await deploys.get_app(ctx.store, request.match_info["app"])).name
    with contextlib.suppress(NotFound):
        await ctx.store.delete(PreviewTemplate, app)
    return web.Response(status=204)


async def github(request: web.Request) -> web.Response:
    """`POST /hooks/github/{app}` (see the module docstring)."""
    ctx = request.app[CTX]
    name = request.match_info["app"]
    body = await request.read()
    try:
        template = await ctx.store.get(PreviewTemplate, name)
    except NotFound:
        template = None
    # The same answer for an unknown app and a bad signature: no probing which apps exist.
    if template is None or not signature_ok(
        template.webhook_secret, body, request.headers.get("X-Hub-Signature-256")
    ):
        raise Unauthorized("bad or missing X-Hub-Signature-256", code="bad_signature")
    event = request.headers.get("X-GitHub-Event", "")
    if event == "ping":
        return json_response({"status": "pong"})
    try:
        payload = json.loads(body)
    except ValueError:
        raise BadRequest("the payload is not JSON (set the webhook's content type to "
                         "application/json)") from None  # fmt: skip
    action = payload.get("action") if isinstance(payload, dict) else None
    wanted = templates.DEPLOY_ACTIONS | templates.DELETE_ACTIONS
    if event != "pull_request" or action not in wanted:
        return json_response({"status": "ignored", "event": event, "action": action}, 202)
    pr = templates.pull_request_of(payload)
    delivery = request.headers.get("X-GitHub-Delivery", "")[:100]
    record = f"{name}:{hashlib.sha256(body).hexdigest()}"
    try:
        await ctx.store.create(WebhookDelivery(id=record, app=name))
    except Conflict:
        return json_response({"status": "duplicate", "delivery": delivery})
    try:
        answer = await _apply(request, template, pr, str(action))
    except BaseException:
        with contextlib.suppress(Exception):  # not applied: a redelivery may try again
            await ctx.store.delete(WebhookDelivery, record)
        raise
    log.info("github %s %s of %s #%d: %s", event, action, name, pr.number, answer["status"])
    await _forget_old_deliveries(ctx.store, name, ctx.now())
    return json_response(answer)


async def _forget_old_deliveries(store: Store, app: str, now: datetime) -> None:
    for record in await store.list(WebhookDelivery, app=app):
        if now - record.received_at > KEEP_DELIVERIES:
            with contextlib.suppress(NotFound):
                await store.delete(WebhookDelivery, record.id)


async def _apply(
    request: web.Request, template: PreviewTemplate, pr: templates.PullRequest, action: str
) -> dict[str, Any]:
    ctx = request.app[CTX]
    label = templates.label_for(template, pr)
    if action in templates.DELETE_ACTIONS:
        try:
            gone = await deploys.delete_label(ctx.store, template.app, label)
        except LabelNotFound:
            gone = []
        return {"status": "deleted", "label": label, "versions": gone}
    result = await deploys.deploy(
        ctx.store,
        template.app,
        templates.deploy_request(template, pr),
        config=ctx.config.ephemeral,
        now=ctx.now,
    )
    _notify_gc(ctx, result.version)
    return {**result.to_data(), "status": "deployed"}


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_put("/v1/apps/{app}/preview-template", put_template)
    r.add_get("/v1/apps/{app}/preview-template", get_template)
    r.add_delete("/v1/apps/{app}/preview-template", delete_template)
    r.add_post("/hooks/github/{app}", github)
