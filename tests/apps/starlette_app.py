"""A Starlette app for the isolation tests (a real ASGI framework in a sandbox):

python3 -m uvicorn starlette_app:app --host 127.0.0.1 --port $PORT   (cwd: tests/apps)
"""

from __future__ import annotations

import os
import tempfile

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def index(request: Request) -> JSONResponse:
    with tempfile.NamedTemporaryFile() as f:  # TMPDIR must be writable
        tmp = f.name
    return JSONResponse({"framework": "starlette", "uid": os.getuid(), "tmp": tmp})


app = Starlette(routes=[Route("/health", health), Route("/", index)])
