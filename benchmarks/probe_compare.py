#!/usr/bin/env python3
"""Request-smuggling and malformed-input probes (tests/reliability/probe_catalog.py) through
nginx, haproxy and our proxy, side by side.

    python benchmarks/probe_compare.py                               # every probe, table on stdout
    python benchmarks/probe_compare.py --markdown /tmp/probe_results.md --json /tmp/probes.json
    python benchmarks/probe_compare.py --only ws_ --only close_      # ids containing a string
    python benchmarks/probe_compare.py --proxies miren               # only some proxies
    python benchmarks/probe_compare.py --miren-src /tmp/miren-head   # the proxy from another tree

Each proxy sits in front of its own recording upstream (an asyncio server in this process that
keeps the raw bytes of every connection, parses them with httptools and answers per the probe's
`upstream` behaviour, see probe_catalog.BEHAVIOURS): nginx 1.22 (`proxy_http_version 1.1`, an
upstream block with `keepalive 16`, the websocket map idiom whose empty value is `Connection ""`
on ordinary requests), haproxy (mode http, default options, `http-reuse safe`) and
`miren_ingress.proxy.ProxyServer` with a `StaticRouter`, in process (default ProxyConfig). A proxy
whose binary is missing is skipped. The three run the same probe at the same time.

Per probe and proxy: a client connects, writes the segments (`pause` apart) and reads until the
proxy closes or sends nothing for --idle seconds. Shortly after the last segment a second client
(the "victim", a fresh connection) sends `GET /victim1` then `GET /victim2` on one keep-alive
connection (haproxy's `http-reuse safe` only reuses a server connection for a session's later
requests). Then the upstream connections are closed, so nothing carries over to the next probe.

The cell of a proxy reads `<statuses> <end> up=<n> [FLAGS] [info]`: the status codes the client
got (`-`: none), how its connection ended (`close`: FIN, `reset`, `open`: still open at the end),
the number of requests the upstream parsed, then:
- SMUGGLED  a request naming the marker (`/smuggled`) reached the upstream and its answer never
            reached the client: the proxy did not know it had forwarded a request;
- SERVED    the marker was forwarded as a request and answered to the client, in a probe where it
            must not be forwarded at all (after `Connection: close`, ambiguous framing, ...);
- EARLY     bytes reached the upstream before it had answered the request before them (the
            bytes after an Upgrade head before the 101 or refusal, or upstream pipelining);
- POISON    the victim got an answer meant for another request; VSTALL: it got no answer;
            VICTIM: its connection closed or failed before both answers;
- DESYNC    the upstream read bytes the probe never sent (another client's) as the body of a
            request it had answered: the proxy announced a body, did not send it, and reused
            the connection;
- HANG      the probe holds a whole request, yet no answer came and the connection stayed open;
- FWD:name  a header or trailer that must not be forwarded reached the upstream;
- MISSING:name  a header every upstream request must carry was missing; HOST:v  a wrong Host;
- UPERR     the upstream could not parse what the proxy forwarded.
Lowercase words are information, not findings: `body` (the marker reached the upstream inside a
body), `trailers` (request trailers were forwarded), `tunnel` (a 101 and bytes through it).

Every process started here (nginx, haproxy) is stopped by its pid at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

from tests.reliability.probe_catalog import (
    MARKER,
    MARKER_ANSWER_DELAY,
    PROBES,
    UPGRADE_ANSWER_DELAY,
    Behaviour,
    Probe,
)

VICTIM_AFTER = 0.3  # seconds after the last segment (plus a late upgrade answer's delay)
VICTIM_TIMEOUT = 3.0  # seconds the victim waits for each answer
SEND_TIMEOUT = 3.0  # seconds a segment may take to be accepted by the proxy
CAP = 10.0  # seconds a probe client reads at most
RAW_KEPT = 2048  # bytes of each upstream connection kept in the JSON output
SETTLE = 0.15  # seconds after closing the upstream connections, so proxies see them closed
UNSAFE = ("SMUGGLED", "SERVED", "EARLY", "POISON", "VSTALL", "VICTIM", "DESYNC", "HANG", "FWD",
          "MISSING", "HOST", "UPERR")  # fmt: skip

NGINX_CONF = """master_process off; daemon off; worker_processes 1;
pid {run}/nginx.pid; error_log {run}/error.log info;
events {{ worker_connections 1024; }}
http {{
  access_log {run}/access.log;
  client_body_temp_path {run}/body; proxy_temp_path {run}/proxy;
  fastcgi_temp_path {run}/fastcgi; uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
  # the websocket idiom: "upgrade" when the client asked for one, else Connection "" (keep-alive)
  map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
    }}
  }}
}}
"""

HAPROXY_CONF = """global
    pidfile {run}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout tunnel 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    http-reuse safe
    server s1 127.0.0.1:{upstream}
"""

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_REASONS = {200: b"OK", 404: b"Not Found", 426: b"Upgrade Required", 400: b"Bad Request"}


def _label(target: bytes) -> str:
    """A request target as a printable, header-safe string (at most 80 characters)."""
    text = "".join(c if 32 < ord(c) < 127 else f"%{ord(c):02X}" for c in target.decode("latin-1"))
    return text[:80]


# --- the recording upstream -------------------------------------------------------------------
@dataclass
class UpRequest:
    """One request as the upstream parsed it."""

    conn: int
    target: bytes = b""
    method: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    keep_alive: bool = True
    upgrade: bool = False
    early: bool = False  # its first byte arrived before the request before it was answered
    early_bytes: int = 0  # an Upgrade request: bytes after its head that came before its answer
    answered: int = 0  # the status it got (0: none)
    # Body bytes read after its answer, once the victim had started (not the probe's bytes).
    late_body: bytearray = field(default_factory=bytearray)

    def header(self, name: str) -> list[bytes]:
        return [v for n, v in self.headers if n.decode("latin-1").lower() == name]


class UpConn(asyncio.Protocol):
    """One upstream connection: records, parses (httptools) and answers in order."""

    transport: asyncio.Transport

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.n = len(rec.conns)
        rec.conns.append(self)
        self.loop = asyncio.get_running_loop()
        self.raw = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.req: UpRequest | None = None
        self.in_head = False
        self.queue: deque[tuple[UpRequest, float]] = deque()  # complete, not answered yet
        self.held: bytearray | None = None  # bytes after an Upgrade head, until its answer
        self.upgrading: UpRequest | None = None
        # The body of an Upgrade request (llhttp leaves it unparsed): bytes still to come
        # (Content-Length) or a chunked reader, and the request it belongs to.
        self.body_left = 0
        self.chunked: ChunkedReader | None = None
        self.body_of: UpRequest | None = None
        self.replaying = False  # parsing bytes that arrived before an upgrade's answer
        self.tunnel = False
        self.failed = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        self.raw += data
        if self.tunnel:
            self.transport.write(data)  # echo
            return
        if self.held is not None:
            self._hold(data)
            self._pump()
            return
        data = self._eat_body(data)
        if data:
            self._feed(data)
        self._pump()

    # httptools callbacks
    def on_message_begin(self) -> None:
        req = self.req = UpRequest(self.n)
        req.early = bool(self.queue) or self.replaying
        self.rec.requests.append(req)
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        (self.req.headers if self.in_head else self.req.trailers).append((name, value))

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        self.in_head = False
        req.method = self.parser.get_method()
        if self.rec.behaviour == "continue" and any(
            v.lower() == b"100-continue" for v in req.header("expect")
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self.req is not None
        self.req.body += body

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        req.complete = True
        req.keep_alive = bool(self.parser.should_keep_alive())
        delay = MARKER_ANSWER_DELAY if MARKER in req.target else 0.0
        self.queue.append((req, self.loop.time() + delay))

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            req = self.req
            assert req is not None and self.queue and self.queue[-1][0] is req
            req.upgrade = True
            # (llhttp stops at the end of the head: a body it announced is still to come)
            length = (req.header("content-length") or [b"0"])[0].strip()
            self.body_left = int(length) if length.isdigit() else 0
            if any(b"chunked" in v.lower() for v in req.header("transfer-encoding")):
                self.chunked = ChunkedReader()
            body = bool(self.body_left or self.chunked)
            self.body_of = req if body else None
            req.complete = not body
            behaviour = self.rec.behaviour
            if behaviour.endswith("_after_body") and body:
                self.queue[-1] = (req, math.inf)  # answered once the body is read
            elif behaviour.endswith("_late"):
                self.queue[-1] = (req, self.loop.time() + UPGRADE_ANSWER_DELAY)
            self.held = bytearray()
            self.upgrading = req
            self._hold(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self.rec.errors.append(f"conn {self.n}: {type(exc).__name__}: {exc}")
            self.failed = True

    def _eat_body(self, data: bytes) -> bytes:
        """The body an Upgrade request announced is read as its body, also after its answer
        (as a server that answered early must, to stay in step); returns the rest."""
        req = self.body_of
        if req is None:
            return data
        if self.chunked is not None:
            body, rest = self.chunked.feed(data)
            done = self.chunked.done
        else:
            take = min(self.body_left, len(data))
            body, rest = data[:take], data[take:]
            self.body_left -= take
            done = not self.body_left
        req.body += body
        if req.answered and self.rec.victim_started:
            req.late_body += body
        if done:
            req.complete = True
            self.body_of = self.chunked = None
            for i, (queued, due) in enumerate(self.queue):
                if queued is req and due == math.inf:
                    self.queue[i] = (req, self.loop.time())
        return rest

    def _hold(self, data: bytes) -> None:
        """Bytes after an Upgrade request's head: its body, then bytes that came early."""
        req = self.upgrading
        assert req is not None and self.held is not None
        data = self._eat_body(data)
        self.held += data
        req.early_bytes += len(data)

    def _status(self, req: UpRequest) -> int:
        if not req.upgrade:
            return 200
        behaviour: Behaviour = self.rec.behaviour
        if behaviour.startswith("refuse_upgrade"):
            return 404
        if behaviour.startswith("upgrade_426"):
            return 426
        if behaviour.startswith("accept_upgrade"):
            return 101
        return 200

    def _pump(self) -> None:
        """Answer the complete requests in order, each once it is due."""
        self.timer = None
        while self.queue and not self.closed:
            req, due = self.queue[0]
            now = self.loop.time()
            if due > now:
                self.timer = self.loop.call_at(due, self._pump)
                return
            self.queue.popleft()
            self._answer(req)
        if self.failed and not self.queue and not self.closed:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()
            self.closed = True

    def _answer(self, req: UpRequest) -> None:
        status = req.answered = self._status(req)
        if status == 101:
            upgrade = (req.header("upgrade") or [b"websocket"])[0]
            accept = b""
            for key in req.header("sec-websocket-key"):  # RFC 6455 4.2.2 (haproxy checks it)
                digest = hashlib.sha1(key.strip() + _WS_GUID).digest()
                accept = b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n"
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                + upgrade + b"\r\n" + accept + b"\r\n"
            )  # fmt: skip
            self.tunnel = True
            self.body_of = self.chunked = None  # (a body not read yet is tunnel data now)
            held, self.held, self.upgrading = self.held, None, None
            if held:
                self.transport.write(bytes(held))  # echo what came before the 101
            return
        label = _label(req.target).encode()
        body = b"path=%s conn=%d\n" % (label, self.n)
        head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nX-Up: %s\r\n%s\r\n" % (
            status,
            _REASONS.get(status, b"Other"),
            len(body),
            label,
            b"" if req.keep_alive else b"Connection: close\r\n",
        )
        self.transport.write(head if req.method == b"HEAD" else head + body)
        if not req.keep_alive:
            self.transport.close()
            self.closed = True
            return
        if req.upgrade:  # refused: the connection goes on as HTTP/1.1
            held, self.held, self.upgrading = self.held, None, None
            self.parser = httptools.HttpRequestParser(self)
            if held:
                self.replaying = True
                try:
                    self._feed(bytes(held))
                finally:
                    self.replaying = False


class ChunkedReader:
    """A minimal reader of a chunked body: the body of an Upgrade request, left unparsed by
    llhttp. Malformed framing ends the body."""

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0
        self.state = "size"  # size | data | crlf | trailer
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """(body bytes, bytes after the body: only once it is done)"""
        self.buf += data
        body = bytearray()
        while not self.done:
            if self.state == "data":
                take = self.buf[: self.left]
                body += take
                self.buf = self.buf[len(take) :]
                self.left -= len(take)
                if self.left:
                    break
                self.state = "crlf"
                continue
            if self.state == "crlf":
                if len(self.buf) < 2:
                    break
                self.buf = self.buf[2:]
                self.state = "size"
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            line, self.buf = self.buf[:end], self.buf[end + 2 :]
            if self.state == "trailer":
                self.done = not line
                continue
            try:
                self.left = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.done = True
                break
            self.state = "data" if self.left else "trailer"
        if not self.done:
            return bytes(body), b""
        rest, self.buf = self.buf, b""
        return bytes(body), rest


class Recorder:
    """The recording upstream of one proxy."""

    def __init__(self) -> None:
        self.behaviour: Behaviour = "ok"
        self.conns: list[UpConn] = []
        self.requests: list[UpRequest] = []
        self.errors: list[str] = []
        self.victim_started = False  # every byte of the probe went out before this
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Recorder:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: UpConn(self), "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    def reset(self, behaviour: Behaviour) -> None:
        """Close every connection (nothing carries over to the next probe), forget them."""
        for conn in self.conns:
            if not conn.closed:
                conn.closed = True
                conn.transport.abort()
            if conn.timer is not None:
                conn.timer.cancel()
        self.conns = []
        self.requests = []
        self.errors = []
        self.victim_started = False
        self.behaviour = behaviour

    async def close(self) -> None:
        self.reset("ok")
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# --- clients ----------------------------------------------------------------------------------
class Responses:
    """Responses read by a client (httptools), with the X-Up path of each."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.statuses: list[int] = []
        self.paths: list[str | None] = []
        self.complete = 0
        self.garbled = False
        self.switched = False
        self.tunnel = bytearray()
        self._path: str | None = None

    def on_message_begin(self) -> None:
        self._path = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-up":
            self._path = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.statuses.append(int(self.parser.get_status_code()))
        self.paths.append(self._path)

    def on_message_complete(self) -> None:
        self.complete += 1

    def feed(self, data: bytes) -> None:
        if self.switched:
            self.tunnel += data
            return
        if self.garbled:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.switched = True
            self.tunnel += data[upgrade.args[0] :]
        except httptools.HttpParserError:
            self.garbled = True


@dataclass
class ClientResult:
    statuses: list[int]
    paths: list[str | None]
    end: str  # close | reset | open
    garbled: bool
    tunnel: bytes
    send_stalled: bool


async def run_client(port: int, probe: Probe, idle: float) -> ClientResult:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    resp = Responses()
    sent = asyncio.Event()
    stalled = False

    async def send() -> None:
        nonlocal stalled
        try:
            for i, segment in enumerate(probe.segments):
                if i:
                    await asyncio.sleep(probe.pause)  # the deliberate pause between segments
                writer.write(segment)
                await asyncio.wait_for(writer.drain(), SEND_TIMEOUT)
        except TimeoutError:
            stalled = True
        except OSError:
            pass
        finally:
            sent.set()

    sender = asyncio.create_task(send())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CAP
    end = "open"
    try:
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), idle)
            except TimeoutError:
                if sent.is_set():
                    break
                continue
            except OSError:
                end = "reset"
                break
            if not data:
                end = "close"
                break
            resp.feed(data)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    return ClientResult(resp.statuses, resp.paths, end, resp.garbled, bytes(resp.tunnel), stalled)


async def run_victim(port: int) -> str:
    """Two requests on a fresh keep-alive connection: `ok` when each got its own answer."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect failed: {exc}"
    resp = Responses()
    wanted = ["/victim1", "/victim2"]
    try:
        for i, path in enumerate(wanted):
            writer.write(b"GET %s HTTP/1.1\r\nHost: a.test\r\n\r\n" % path.encode())
            await writer.drain()
            while resp.complete <= i:
                data = await asyncio.wait_for(reader.read(65536), VICTIM_TIMEOUT)
                if not data:
                    break
                resp.feed(data)
            if resp.complete <= i:
                break
    except TimeoutError:
        return "stalled"
    except OSError as exc:
        return f"error: {exc}"
    finally:
        writer.close()
    for i, (status, got) in enumerate(zip(resp.statuses, resp.paths, strict=True)):
        if got is not None and got != wanted[i]:
            return f"POISON: asked {wanted[i]}, got the answer for {got}"
        if status != 200 or got is None:
            return f"asked {wanted[i]}, got {status} not from the recording upstream"
    if resp.complete < 2:
        return f"closed after {resp.complete} answers"
    return "ok"


# --- proxies under test ----------------------------------------------------------------------
@dataclass
class Target:
    name: str
    port: int
    recorder: Recorder


@dataclass
class Outcome:
    statuses: list[int]
    end: str
    upstream: list[str]  # the upstream requests: method target, in order
    flags: list[str]  # findings (UPPERCASE) and information (lowercase)
    victim: str
    errors: list[str]
    raw: list[str]  # what each upstream connection received (the start of it, escaped)

    def cell(self) -> str:
        statuses = ",".join(map(str, self.statuses)) or "-"
        return " ".join([statuses, self.end, f"up={len(self.upstream)}", *self.flags])

    @property
    def unsafe(self) -> list[str]:
        return [f for f in self.flags if f.split(":")[0] in UNSAFE]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"not listening on {port} after {timeout}s")


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}"):
        if os.access(path, os.X_OK):
            return path
    return None


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop each process started here by its pid: SIGTERM, then SIGKILL after 5 s."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


async def start_external(
    name: str, run: Path, procs: list[subprocess.Popen[bytes]], recorder: Recorder
) -> Target | None:
    binary = find_binary(name)
    if binary is None:
        print(f"{name}: not installed, skipped", file=sys.stderr)
        return None
    port = free_port()
    work = run / name
    work.mkdir()
    if name == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(run=work, port=port, upstream=recorder.port))
        cmd = [binary, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    else:
        conf = work / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(run=work, port=port, upstream=recorder.port))
        cmd = [binary, "-f", str(conf), "-db"]
    log = (work / "stderr.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    procs.append(proc)
    try:
        await wait_listening(port, proc)
    except RuntimeError as exc:
        print(f"{name}: {exc}; see {work}/stderr.log; skipped", file=sys.stderr)
        return None
    return Target(name, port, recorder)


# --- one probe ----------------------------------------------------------------------------------
VICTIM_PATHS = (b"/victim1", b"/victim2")


def classify(probe: Probe, client: ClientResult, victim: str, rec: Recorder) -> Outcome:
    flags: list[str] = []
    requests = [r for r in rec.requests if r.target not in VICTIM_PATHS]
    answered_paths = {p for p in client.paths if p is not None}
    marker = [r for r in requests if MARKER in r.target]
    if any(_label(r.target) not in answered_paths for r in marker):
        flags.append("SMUGGLED")
    elif marker and not probe.marker_may_be_request:
        flags.append("SERVED")
    if any(r.early or r.early_bytes for r in requests):
        flags.append("EARLY")
    if victim.startswith("POISON"):
        flags.append("POISON")
    elif victim == "stalled":
        flags.append("VSTALL")
    elif victim != "ok":
        flags.append("VICTIM")
    if any(r.late_body for r in requests):
        flags.append("DESYNC")
    if probe.complete and not client.statuses and client.end == "open":
        flags.append("HANG")
    for name in probe.forbid_upstream:
        if any(
            n.decode("latin-1").lower() == name for r in requests for n, _ in r.headers + r.trailers
        ):
            flags.append(f"FWD:{name}")
    for name in probe.require_upstream:
        if any(not r.header(name) for r in requests):
            flags.append(f"MISSING:{name}")
    if probe.upstream_host is not None:
        for r in requests:
            hosts = r.header("host")
            if hosts != [probe.upstream_host]:
                flags.append("HOST:" + ",".join(h.decode("latin-1") for h in hosts))
                break
    if rec.errors:
        flags.append("UPERR")
    if any(MARKER in r.body for r in requests):
        flags.append("body")
    if any(r.trailers for r in requests):
        flags.append("trailers")
    if client.tunnel:
        flags.append("tunnel")
    if client.garbled:
        flags.append("garbled")
    if client.send_stalled:
        flags.append("send-stalled")
    upstream = [
        f"{r.method.decode('latin-1') or '?'} {_label(r.target)}"
        + (" (early)" if r.early or r.early_bytes else "")
        + ("" if r.complete else " (incomplete)")
        for r in requests
    ]
    raw = [repr(bytes(c.raw[:RAW_KEPT]))[2:-1] for c in rec.conns]
    return Outcome(client.statuses, client.end, upstream, flags, victim, list(rec.errors), raw)


async def run_probe(target: Target, probe: Probe, idle: float) -> Outcome:
    rec = target.recorder
    rec.reset(probe.upstream)
    await asyncio.sleep(SETTLE)  # the proxy sees its pooled connections closed
    loop = asyncio.get_running_loop()
    client = asyncio.create_task(run_client(target.port, probe, idle))
    victim_at = loop.time() + probe.pause * (len(probe.segments) - 1) + VICTIM_AFTER
    if probe.upstream.endswith("_late"):
        victim_at += UPGRADE_ANSWER_DELAY
    # The victim comes once the probe's bytes went out (and a late answer came back).
    await asyncio.sleep(max(0.0, victim_at - loop.time()))
    rec.victim_started = True
    victim = await run_victim(target.port)
    result = await client
    return classify(probe, result, victim, rec)


# --- report ----------------------------------------------------------------------------------
def differences(
    rows: list[tuple[Probe, dict[str, Outcome]]], ours: str = "miren", ref: str = "nginx"
) -> tuple[list[str], list[str]]:
    """(security-relevant differences, safe differences) of `ours` against `ref`."""
    unsafe: list[str] = []
    safe: list[str] = []
    for probe, outcomes in rows:
        mine, theirs = outcomes.get(ours), outcomes.get(ref)
        if mine is None or theirs is None:
            continue
        extra = [f for f in mine.unsafe if f not in theirs.unsafe]
        if extra:
            unsafe.append(
                f"`{probe.id}` ({probe.family}): {ours} `{mine.cell()}` vs {ref} "
                f"`{theirs.cell()}`; {', '.join(extra)}; upstream saw: "
                f"{'; '.join(mine.upstream) or 'nothing'}; victim: {mine.victim}"
            )
        elif (mine.statuses, mine.end, len(mine.upstream)) != (
            theirs.statuses,
            theirs.end,
            len(theirs.upstream),
        ) or mine.unsafe != theirs.unsafe:
            safe.append(f"`{probe.id}`: {ours} `{mine.cell()}` vs {ref} `{theirs.cell()}`")
    return unsafe, safe


def markdown(rows: list[tuple[Probe, dict[str, Outcome]]], names: list[str], meta: str) -> str:
    out = [
        "# Request-smuggling probes: nginx, haproxy, miren",
        "",
        meta,
        "",
        "| family | probe | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for probe, outcomes in rows:
        cells = [outcomes[n].cell() if n in outcomes else "n/a" for n in names]
        out.append(f"| {probe.family} | `{probe.id}` | " + " | ".join(cells) + " |")
    unsafe, safe = differences(rows)
    out += ["", "## miren vs nginx: findings (flags miren has and nginx has not)", ""]
    out += [f"- {line}" for line in unsafe] or ["- none"]
    out += ["", "## miren vs nginx: other differences", ""]
    out += [f"- {line}" for line in safe] or ["- none"]
    out += ["", "## Findings of every proxy, with what the upstream saw", ""]
    for probe, outcomes in rows:
        for name in names:
            o = outcomes.get(name)
            if o is not None and o.unsafe:
                out.append(
                    f"- `{probe.id}` {name}: {', '.join(o.unsafe)}; client got "
                    f"{o.statuses or 'nothing'} ({o.end}); upstream saw: "
                    f"{'; '.join(o.upstream) or 'nothing'}; victim: {o.victim}"
                    + (f"; upstream errors: {o.errors}" if o.errors else "")
                )
    return "\n".join(out) + "\n"


def table(rows: list[tuple[Probe, dict[str, Outcome]]], names: list[str]) -> str:
    head = ["family", "probe", *names]
    body = [[p.family, p.id, *(o[n].cell() if n in o else "n/a" for n in names)] for p, o in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [head, *body]
    )


# --- main -------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from miren_ingress.proxy import ProxyConfig, ProxyServer, StaticRouter

    probes = [p for p in PROBES if not args.only or any(s in p.id for s in args.only)]
    wanted = args.proxies.split(",")
    procs: list[subprocess.Popen[bytes]] = []
    recorders: list[Recorder] = []
    run_dir = Path(tempfile.mkdtemp(prefix="miren-probes-"))
    server: ProxyServer | None = None
    try:
        targets: list[Target] = []
        for name in wanted:
            rec = await Recorder().start()
            recorders.append(rec)
            if name == "miren":
                router = StaticRouter({"*": f"127.0.0.1:{rec.port}"})
                server = ProxyServer(router, config=ProxyConfig(), registry=CollectorRegistry())
                _, port = await server.start("127.0.0.1", 0)
                targets.append(Target("miren", port, rec))
            elif name in ("nginx", "haproxy"):
                target = await start_external(name, run_dir, procs, rec)
                if target is not None:
                    targets.append(target)
            else:
                raise SystemExit(f"unknown proxy {name!r} (nginx, haproxy, miren)")
        names = [t.name for t in targets]
        rows: list[tuple[Probe, dict[str, Outcome]]] = []
        started = time.monotonic()
        for i, probe in enumerate(probes, 1):
            results = await asyncio.gather(*(run_probe(t, probe, args.idle) for t in targets))
            outcomes = dict(zip(names, results, strict=True))
            rows.append((probe, outcomes))
            if args.verbose:
                cells = " | ".join(f"{n}: {o.cell()}" for n, o in outcomes.items())
                print(f"[{i}/{len(probes)}] {probe.id}: {cells}", file=sys.stderr, flush=True)
        print(table(rows, names))
        unsafe, _ = differences(rows)
        print("\nmiren vs nginx, findings:" if unsafe else "\nmiren vs nginx: no findings")
        for line in unsafe:
            print("  " + line)
        print(f"\n{len(probes)} probes in {time.monotonic() - started:.0f} s")
        src = sys.modules["miren_ingress"].__file__
        meta = (
            f"{len(probes)} probes; proxies: {', '.join(names)}; client idle {args.idle} s; "
            f"miren_ingress from `{Path(src or '?').parent.parent}`; "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}."
        )
        if args.markdown:
            Path(args.markdown).write_text(markdown(rows, names, meta))
        if args.json:
            data: list[dict[str, Any]] = [
                {"family": p.family, "id": p.id, **{n: asdict(o) for n, o in out.items()}}
                for p, out in rows
            ]
            Path(args.json).write_text(json.dumps(data, indent=1))
        return 0
    finally:
        try:
            if server is not None:
                await server.close(1.0)
            for rec in recorders:
                await rec.close()
        finally:
            stop(procs)
            if args.keep:
                print(f"logs kept in {run_dir}", file=sys.stderr)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--proxies", default="nginx,haproxy,miren", help="comma-separated")
    ap.add_argument("--only", action="append", default=[], help="probe ids containing this")
    ap.add_argument("--idle", type=float, default=1.2, help="client read idle timeout (s)")
    ap.add_argument("--markdown", help="write the table and the differences here")
    ap.add_argument("--json", help="write every outcome here")
    ap.add_argument("--miren-src", help="import miren_ingress from this tree instead")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (as `miren serve`)")
    ap.add_argument("--keep", action="store_true", help="keep the nginx/haproxy logs")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each probe's outcome")
    args = ap.parse_args()
    if args.miren_src:
        # (the catalogue was imported from this checkout above; only the proxy comes from there)
        sys.path.insert(0, str(Path(args.miren_src).resolve()))
    if args.uvloop:
        import uvloop

        return int(uvloop.run(run(args)))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
