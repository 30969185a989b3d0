"""A Starlette app (a real ASGI framework, behind uvicorn) for the isolation and framework tests.
Run it as a sandbox (cwd: tests/apps):

    python3 -m uvicorn starlette_app:app --host 127.0.0.1 --port $PORT

    GET  /health              "ok"
    GET  /                    JSON {framework, uid, tmp}
    GET  /sse?n=N&ms=D        text/event-stream: N events D ms apart, each sent on its own;
                              each event's data is the wall time it was sent
    WS   /ws                  echoes text and binary messages
    POST /upload              reads the whole body as it streams: JSON {length, sha256}
    GET  /download?mb=N       N MiB of a repeating pattern (streamed, &cl=1: with Content-Length)
    POST /early-413           413 at once, without reading the body
    GET  /slow?ms=N           sleeps N ms (without blocking the loop): JSON {started, ended}
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

PATTERN = bytes(range(256)) * 4096  # 1 MiB


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def index(request: Request) -> JSONResponse:
    with tempfile.NamedTemporaryFile() as f:  # TMPDIR must be writable
        tmp = f.name
    return JSONResponse({"framework": "starlette", "uid": os.getuid(), "tmp": tmp})


async def sse(request: Request) -> StreamingResponse:
    n = int(request.query_params.get("n", "5"))
    delay = int(request.query_params.get("ms", "200")) / 1000

    async def events() -> AsyncIterator[bytes]:
        for i in range(n):
            if i:
                await asyncio.sleep(delay)
            yield f"id: {i}\ndata: {time.time():.6f}\n\n".encode()

    return StreamingResponse(events(), media_type="text/event-stream")


async def ws(socket: WebSocket) -> None:
    await socket.accept()
    try:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await socket.send_bytes(message["bytes"])
            else:
                await socket.send_text(message.get("text") or "")
    except WebSocketDisconnect:
        return


async def upload(request: Request) -> JSONResponse:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.stream():
        digest.update(chunk)
        length += len(chunk)
    return JSONResponse({"length": length, "sha256": digest.hexdigest()})


async def download(request: Request) -> Response:
    mb = int(request.query_params.get("mb", "1"))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(mb):
            yield PATTERN

    headers = {"Content-Length": str(mb * len(PATTERN))} if request.query_params.get("cl") else {}
    return StreamingResponse(body(), headers=headers, media_type="application/octet-stream")


async def early_413(request: Request) -> PlainTextResponse:
    return PlainTextResponse("too large", status_code=413)


async def slow(request: Request) -> JSONResponse:
    started = time.time()
    await asyncio.sleep(int(request.query_params.get("ms", "1000")) / 1000)
    return JSONResponse({"started": started, "ended": time.time()})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/", index),
        Route("/sse", sse),
        WebSocketRoute("/ws", ws),
        Route("/upload", upload, methods=["POST"]),
        Route("/download", download),
        Route("/early-413", early_413, methods=["POST"]),
        Route("/slow", slow),
    ]
)
