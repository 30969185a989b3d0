"""`PUT/GET /v1/apps/{app}/protection`: who may open an app's hosts (see proxy/guard.py).

The password is stored as a salted scrypt hash and the bypass token as its SHA-256: neither is
ever stored, logged or answered in clear. The first protection also creates the cluster's cookie
key (an `EdgeSecret`), in the same commit.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import attrs
from aiohttp import web

from miren_ingress.admin.api import CTX, json_response, only_keys, read_json, take
from miren_ingress.admin.errors import ApiError
from miren_ingress.proxy import guard
from miren_ingress.routing.routes import COOKIE_KEY
from miren_store.deploy import deploys
from miren_store.entities import EdgeSecret, Protection
from miren_store.errors import Conflict, NotFound
from miren_store.store import Create, Op, Update

MODES = ("none", "previews", "all")
MIN_SECRET = 8


def protection_json(p: Protection) -> dict[str, Any]:
    return {
        "app": p.app,
        "mode": p.mode,
        "password_set": bool(p.password_hash),
        "bypass_token_set": bool(p.bypass_hash),
    }


async def put_protection(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = (await deploys.get_app(ctx.store, request.match_info["app"])).name
    data = await read_json(request)
    only_keys(data, {"mode", "password", "bypass_token"})
    mode = take(data, "mode", str, required=True)
    if mode not in MODES:
        raise ApiError("mode: must be none, previews or all", code="invalid_protection", status=422)
    password = take(data, "password", str)
    token = take(data, "bypass_token", str)
    for name, value in (("password", password), ("bypass_token", token)):
        if value is not None and len(value) < MIN_SECRET:
            raise ApiError(
                f"{name}: at least {MIN_SECRET} characters", code="invalid_protection", status=422
            )
    try:
        current: Protection | None = await ctx.store.get(Protection, app)
    except NotFound:
        current = None
    new = Protection(
        app=app,
        mode=mode,
        password_hash=(
            await asyncio.to_thread(guard.hash_password, password)
            if password is not None
            else (current.password_hash if current else "")
        ),
        bypass_hash=(
            guard.hash_token(token)
            if token is not None
            else (current.bypass_hash if current else "")
        ),
    )
    if mode != "none" and not new.password_hash and not new.bypass_hash:
        raise ApiError(
            "a protected app needs a password or a bypass token (else nobody gets in)",
            code="invalid_protection",
            status=422,
        )
    for _ in range(5):
        ops: list[Op] = []
        try:
            await ctx.store.get(EdgeSecret, COOKIE_KEY)
        except NotFound:
            ops.append(Create(EdgeSecret(id=COOKIE_KEY, value=secrets.token_hex(32))))
        if current is None:
            ops.append(Create(new))
        else:
            ops.append(Update(attrs.evolve(new, revision=current.revision)))
        try:
            await ctx.store.commit(ops)
            return json_response(protection_json(new))
        except (Conflict, NotFound):
            try:
                current = await ctx.store.get(Protection, app)
            except NotFound:
                current = None
    raise ApiError("the protection is being changed concurrently; retry", code="conflict",
                   status=409)  # fmt: skip


async def get_protection(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    app = (await deploys.get_app(ctx.store, request.match_info["app"])).name
    try:
        p = await ctx.store.get(Protection, app)
    except NotFound:
        p = Protection(app=app)
    return json_response(protection_json(p))


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_put("/v1/apps/{app}/protection", put_protection)
    r.add_get("/v1/apps/{app}/protection", get_protection)
