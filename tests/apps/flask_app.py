"""A Flask app for the isolation tests (a real WSGI framework, with gunicorn's forked workers
and their heartbeat files in the temp dir):

    python3 -m gunicorn -w 2 -b 127.0.0.1:$PORT flask_app:app   (cwd: tests/apps)
"""

from __future__ import annotations

import os

from flask import Flask, jsonify

app = Flask(__name__)


@app.route("/health")
def health() -> str:
    return "ok"


@app.route("/")
def index():  # type: ignore[no-untyped-def]
    return jsonify(framework="flask", uid=os.getuid(), pid=os.getpid(), ppid=os.getppid())
