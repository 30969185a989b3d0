"""A Flask app (a real WSGI framework, behind gunicorn's forked workers) for the isolation and
framework tests. Run it as a sandbox (cwd: tests/apps):

    python3 -m gunicorn -w 2 -b 127.0.0.1:$PORT flask_app:app

    GET  /health             "ok"
    GET  /                   JSON {framework, uid, pid, ppid}
    POST /upload             reads the whole body as it streams: JSON {length, sha256}
    GET  /download?mb=N      N MiB of a repeating pattern, with Content-Length (&chunked=1: none)
    POST /early-413          413 at once, without reading the body (a limit checked on the head)
    GET  /slow?ms=N          sleeps N ms, then "slow"
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request

app = Flask(__name__)
PATTERN = bytes(range(256)) * 4096  # 1 MiB


@app.route("/health")
def health() -> str:
    return "ok"


@app.route("/")
def index():  # type: ignore[no-untyped-def]
    return jsonify(framework="flask", uid=os.getuid(), pid=os.getpid(), ppid=os.getppid())


@app.route("/upload", methods=["POST"])
def upload():  # type: ignore[no-untyped-def]
    digest = hashlib.sha256()
    length = 0
    while chunk := request.stream.read(65536):
        digest.update(chunk)
        length += len(chunk)
    return jsonify(length=length, sha256=digest.hexdigest())


@app.route("/download")
def download() -> Response:
    mb = int(request.args.get("mb", "1"))

    def body() -> Iterator[bytes]:
        for _ in range(mb):
            yield PATTERN

    headers = {} if request.args.get("chunked") else {"Content-Length": str(mb * len(PATTERN))}
    return Response(body(), headers=headers, mimetype="application/octet-stream")


@app.route("/early-413", methods=["POST"])
def early_413() -> tuple[str, int]:
    return "too large", 413


@app.route("/slow")
def slow() -> str:
    time.sleep(int(request.args.get("ms", "1000")) / 1000)
    return "slow"
