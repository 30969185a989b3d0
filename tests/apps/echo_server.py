"""A tiny HTTP/1.1 app for the tests: the sandbox the activator and ingress tests run.

Standard library only and few imports, so it is listening about 20 ms after exec (run it with
`python -S`). One thread per connection, keep-alive, Content-Length and chunked bodies both ways.

    python -S tests/apps/echo_server.py [--port N] [--host H]   (default: $PORT, 127.0.0.1)

Endpoints (any method):
    /health              200 "ok"
    /slow?ms=N           sleeps N ms, then answers like /
    /status/NNN          answers with status NNN (body like /)
    /echo                answers the request body back (same Content-Type)
    /stream?chunks=N&size=S&ms=D
                         a chunked response: N chunks of S bytes, D ms apart
    /log?bytes=N         writes about N bytes to stdout (100-byte lines), answers "logged"
    /crash               the process exits at once (status 3) without answering
    /ws                  WebSocket echo (text, binary, ping -> pong, close)
    anything else        200 JSON {version, app, label, service, sandbox, pid, port, method, path,
                         query, headers: [[name, value], ...], body_length}

Behaviour switches (environment):
    BOOT_DELAY_MS=N        wait N ms before listening
    ECHO_FAIL_BOOT=1       exit 1 at once, before listening
    ECHO_NEVER_HEALTHY=1   listen, but answer every request with 503
    ECHO_IGNORE_SIGTERM=1  ignore SIGTERM (only SIGKILL stops it)
    ECHO_EXIT_AFTER_MS=N   exit (status 2) N ms after it started listening

It prints `echo_server pid=<pid> listening on <host>:<port>` to stdout once listening.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import BinaryIO, cast

ENV = os.environ
INFO_BASE = {
    "version": ENV.get("MIREN_VERSION", ""),
    "app": ENV.get("MIREN_APP", ""),
    "label": ENV.get("MIREN_EPHEMERAL_LABEL", ""),
    "service": ENV.get("MIREN_SERVICE", ""),
    "sandbox": ENV.get("MIREN_SANDBOX", ""),
    "pid": os.getpid(),
}
NEVER_HEALTHY = ENV.get("ECHO_NEVER_HEALTHY") == "1"
REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class BadRequest(Exception):
    pass


def parse_query(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            out[name] = value
    return out


def read_head(rfile: BinaryIO) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between requests
        line = rfile.readline(65537)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {line!r}")
    headers: list[tuple[str, str]] = []
    while True:
        h = rfile.readline(65537)
        if not h:
            raise BadRequest("connection closed in headers")
        if h in (b"\r\n", b"\n"):
            break
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep:
            raise BadRequest(f"bad header line {h!r}")
        headers.append((name.strip(), value.strip()))
    return parts[0], parts[1], parts[2], headers


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    lname = name.lower()
    for k, v in headers:
        if k.lower() == lname:
            return v
    return None


def read_body(rfile: BinaryIO, headers: list[tuple[str, str]]) -> bytes:
    te = header(headers, "transfer-encoding")
    if te is not None and "chunked" in te.lower():
        chunks: list[bytes] = []
        while True:
            size_line = rfile.readline(1024)
            if not size_line:
                raise BadRequest("connection closed in chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(rfile.read(size))
            rfile.readline(3)  # CRLF after the chunk
    length = header(headers, "content-length")
    if length is None:
        return b""
    n = int(length)
    return rfile.read(n) if n > 0 else b""


def respond(
    conn: socket.socket,
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    close: bool = False,
    head_only: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    conn.sendall(head if head_only else head + body)


def info(
    port: int, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    data = dict(INFO_BASE)
    data.update(
        port=port,
        method=method,
        path=path,
        query=query,
        headers=[[k, v] for k, v in headers],
        body_length=len(body),
    )
    return json.dumps(data).encode()


def stream(conn: socket.socket, params: dict[str, str]) -> None:
    chunks = int(params.get("chunks", "3"))
    size = int(params.get("size", "16"))
    delay = int(params.get("ms", "0")) / 1000.0
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for i in range(chunks):
        if i and delay:
            time.sleep(delay)
        payload = bytes([ord("a") + i % 26]) * size
        conn.sendall(f"{size:x}\r\n".encode() + payload + b"\r\n")
    conn.sendall(b"0\r\n\r\n")


def websocket(conn: socket.socket, rfile: BinaryIO, headers: list[tuple[str, str]]) -> None:
    import base64
    import hashlib

    key = header(headers, "sec-websocket-key")
    if key is None:
        respond(conn, 400, b"missing Sec-WebSocket-Key", content_type="text/plain", close=True)
        return
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    conn.sendall(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    while True:
        head = rfile.read(2)
        if len(head) < 2:
            return
        fin_op, mask_len = head[0], head[1]
        opcode = fin_op & 0x0F
        n = mask_len & 0x7F
        if n == 126:
            n = int.from_bytes(rfile.read(2), "big")
        elif n == 127:
            n = int.from_bytes(rfile.read(8), "big")
        mask = rfile.read(4) if mask_len & 0x80 else b""
        payload = rfile.read(n)
        if mask and n:
            key_bytes = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key_bytes, "big")).to_bytes(
                n, "big"
            )
        if opcode == 0x9:  # ping
            fin_op = 0x80 | 0xA
        send_frame(conn, fin_op, payload)
        if opcode == 0x8:  # close: echoed, then done
            return


def send_frame(conn: socket.socket, fin_op: int, payload: bytes) -> None:
    n = len(payload)
    if n < 126:
        head = bytes([fin_op, n])
    elif n < 1 << 16:
        head = bytes([fin_op, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([fin_op, 127]) + n.to_bytes(8, "big")
    conn.sendall(head + payload)


def handle(conn: socket.socket, port: int) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rfile = cast(BinaryIO, conn.makefile("rb", buffering=65536))
    try:
        while True:
            try:
                request = read_head(rfile)
            except BadRequest as exc:
                respond(conn, 400, str(exc).encode(), content_type="text/plain", close=True)
                return
            if request is None:
                return
            method, target, version, headers = request
            path, _, query = target.partition("?")
            conn_header = (header(headers, "connection") or "").lower()
            close = "close" in conn_header or (
                version == "HTTP/1.0" and "keep-alive" not in conn_header
            )
            if (header(headers, "expect") or "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = read_body(rfile, headers)
            head_only = method == "HEAD"
            if path == "/crash":
                os._exit(3)
            if NEVER_HEALTHY:
                respond(conn, 503, b"never healthy", content_type="text/plain", close=close)
            elif path == "/health":
                respond(
                    conn, 200, b"ok", content_type="text/plain", close=close, head_only=head_only
                )
            elif path == "/echo":
                ctype = header(headers, "content-type") or "application/octet-stream"
                respond(conn, 200, body, content_type=ctype, close=close, head_only=head_only)
            elif path == "/stream":
                stream(conn, parse_query(query))
            elif path == "/log":  # write ?bytes=N to stdout (the sandbox log), in 100-byte lines
                lines = int(parse_query(query).get("bytes", "1000")) // 100
                sys.stdout.write(f"{os.getpid():>9} {'x' * 89}\n" * lines)
                sys.stdout.flush()
                respond(conn, 200, b"logged", content_type="text/plain", close=close)
            elif path == "/ws" and (header(headers, "upgrade") or "").lower() == "websocket":
                websocket(conn, rfile, headers)
                return
            else:
                status = 200
                if path == "/slow":
                    time.sleep(int(parse_query(query).get("ms", "100")) / 1000.0)
                elif path.startswith("/status/"):
                    status = int(path[len("/status/") :])
                respond(
                    conn,
                    status,
                    info(port, method, path, query, headers, body),
                    close=close,
                    head_only=head_only,
                )
            if close:
                return
    except (OSError, ValueError):
        return
    finally:
        rfile.close()
        conn.close()


def main(argv: list[str]) -> int:
    if ENV.get("ECHO_FAIL_BOOT") == "1":
        sys.stderr.write("echo_server: failing at boot as asked (ECHO_FAIL_BOOT=1)\n")
        return 1
    if ENV.get("ECHO_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    host = "127.0.0.1"
    port = int(ENV.get("PORT", "0"))
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag == "--port":
            port = int(args.pop(0))
        elif flag == "--host":
            host = args.pop(0)
        else:
            sys.stderr.write(f"echo_server: unknown argument {flag!r}\n")
            return 2
    delay = int(ENV.get("BOOT_DELAY_MS", "0"))
    if delay > 0:
        time.sleep(delay / 1000.0)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    port = listener.getsockname()[1]
    sys.stdout.write(f"echo_server pid={os.getpid()} listening on {host}:{port}\n")
    sys.stdout.flush()
    exit_after = int(ENV.get("ECHO_EXIT_AFTER_MS", "0"))
    if exit_after > 0:
        threading.Timer(exit_after / 1000.0, os._exit, args=(2,)).start()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(0)
