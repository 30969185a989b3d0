"""The OpenAPI document describes exactly the routes the admin app serves."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from miren_ingress.admin.api import AdminContext, make_admin_app
from miren_ingress.admin.openapi import document
from miren_ingress.shell.config import load_config
from miren_store.memory import MemoryStore


def served_routes() -> set[tuple[str, str]]:
    ctx = AdminContext(
        store=MemoryStore(),
        config=load_config(env={"MIREN_ADMIN_TOKEN": "t"}),
        registry=CollectorRegistry(),
    )
    app: web.Application = make_admin_app(ctx)
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        info: dict[str, Any] = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        out.add((route.method.lower(), str(path)))
    return out


def test_every_route_is_documented_and_nothing_else() -> None:
    doc = document()
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    documented.discard(("get", "/openapi.json"))
    served = served_routes()
    served.discard(("get", "/openapi.json"))
    assert served == documented


def test_refs_resolve() -> None:
    doc = document()
    text = repr(doc)
    import re

    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in doc["components"]["schemas"], name
