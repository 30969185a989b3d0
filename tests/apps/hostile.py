"""A hostile sandbox for the isolation tests: it looks for what a pull request must not reach,
and reports what it found as JSON over HTTP. Standard library only; run it with `python -S`.

    python -S tests/apps/hostile.py [--port N]   (default: $PORT; listens on 127.0.0.1)

    GET /health                 200 "ok"
    GET /?marker=M&dir=D&file=F&ports=P1,P2&pid=N
        200 JSON {
          "uid", "euid", "gid", "egid", "groups": its credentials,
          "status": {NoNewPrivs, CapEff, CapBnd, Seccomp} from /proc/self/status,
          "fds_at_start": the entries of /proc/self/fd before it opened anything,
          "pids": the pids /proc shows it,
          "environ_readable": pids other than its own whose /proc/<pid>/environ it could read,
          "marker_in": those of them whose environ holds M (the secret it hunts for),
          "pid_environ": what reading /proc/N/environ gave ("ok", or the error's name),
          "dir": listing D: {"entries": [...]} or {"error": name},
          "file": reading F: {"data": first 200 chars} or {"error": name},
          "ports": the ports among P1,P2 that accept a TCP connection on 127.0.0.1,
          "tmp": the entries of /tmp, "cwd", "home", "tmpdir",
          "can_write_cwd": whether it could create a file in its cwd,
          "ns": its pid/mnt/user namespace links (to compare with the edge's),
          with scan=1, "scan": {"open": every loopback TCP port that accepts (1-65535),
              "etcd": those answering etcd's JSON gateway (/v3/kv/range) with keys,
              "unauthenticated": those answering POST /v1/apps (the admin API) with 2xx,
              "unix_sockets": unix socket paths listed in /proc/net/unix it could connect to,
              a relative name tried in each of sockdirs=D1,D2}
        }
"""

from __future__ import annotations

import os

FDS_AT_START = sorted(os.listdir("/proc/self/fd"), key=int)  # before anything else is opened

import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402


def attempt(fn: Any) -> dict[str, Any]:
    try:
        return fn()  # type: ignore[no-any-return]
    except OSError as exc:
        return {"error": type(exc).__name__}


def read_environs(marker: str) -> tuple[list[int], list[int]]:
    readable: list[int] = []
    hits: list[int] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        readable.append(int(name))
        if marker and marker.encode() in data:
            hits.append(int(name))
    return sorted(readable), sorted(hits)


def status_fields() -> dict[str, str]:
    wanted = {"NoNewPrivs", "CapEff", "CapBnd", "Seccomp"}
    out: dict[str, str] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in wanted:
                out[name] = value.strip()
    return out


def open_ports(ports: list[int]) -> list[int]:
    ok: list[int] = []
    for port in ports:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                ok.append(port)
        except OSError:
            pass
    return ok


def http_status(port: int, request: bytes) -> int:
    """The status of one raw HTTP exchange with 127.0.0.1:port (0: no HTTP answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(request)
            head = s.recv(64)
    except OSError:
        return 0
    parts = head.split(b" ", 2)
    return (
        int(parts[1])
        if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit()
        else 0
    )


def scan(sockdirs: list[str]) -> dict[str, Any]:
    """What an attacker on loopback would try: every TCP port, then etcd's gateway and an
    admin API without credentials on each open one, then every unix socket it can name
    (relative names, as etcd binds them, are tried in each of `sockdirs`)."""
    open_: list[int] = []
    for port in range(1, 65536):
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                open_.append(port)
    etcd = [
        p for p in open_
        if http_status(p, b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 14\r\n\r\n{\"key\": \"AA==\"}")
        == 200
    ]  # fmt: skip
    unauthenticated = [
        p for p in open_
        if 200 <= http_status(p, b"POST /v1/apps HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: 16\r\n\r\n"
                                 b'{"name": "evil"}') < 300
    ]  # fmt: skip
    sockets: list[str] = []
    try:
        with open("/proc/net/unix") as f:
            names = {line.split()[-1] for line in f.readlines()[1:] if len(line.split()) > 7}
    except OSError:
        names = set()
    paths = {n for n in names if n.startswith("/")}
    paths |= {os.path.join(d, n) for n in names if not n.startswith(("/", "@")) for d in sockdirs}
    for path in sorted(paths):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.2)
            try:
                s.connect(path)
            except OSError:
                continue
            sockets.append(path)
    return {
        "open": open_,
        "etcd": etcd,
        "unauthenticated": unauthenticated,
        "unix_sockets": sockets,
    }


def can_write_cwd() -> bool:
    try:
        fd = os.open(".hostile-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(".hostile-probe")
    return True


def report(query: dict[str, str]) -> dict[str, Any]:
    marker = query.get("marker", "")
    readable, hits = read_environs(marker)
    out: dict[str, Any] = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "groups": os.getgroups(),
        "status": status_fields(),
        "fds_at_start": FDS_AT_START,
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "environ_readable": readable,
        "marker_in": hits,
        "ports": open_ports([int(p) for p in query.get("ports", "").split(",") if p]),
        "tmp": sorted(os.listdir("/tmp")),
        "cwd": os.getcwd(),
        "home": os.environ.get("HOME"),
        "tmpdir": os.environ.get("TMPDIR"),
        "can_write_cwd": can_write_cwd(),
        "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("pid", "mnt", "user")},
    }
    if query.get("scan"):
        out["scan"] = scan([d for d in query.get("sockdirs", "").split(",") if d])
    if "pid" in query:

        def read_pid_environ() -> dict[str, Any]:
            with open(f"/proc/{int(query['pid'])}/environ", "rb") as f:
                f.read()
            return {"ok": True}

        out["pid_environ"] = attempt(read_pid_environ)
    if "dir" in query:
        out["dir"] = attempt(lambda: {"entries": sorted(os.listdir(query["dir"]))})
    if "file" in query:

        def read_file() -> dict[str, Any]:
            with open(query["file"], errors="replace") as f:
                return {"data": f.read(200)}

        out["file"] = attempt(read_file)
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/health":
            body = b"ok"
            ctype = "text/plain"
        else:
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = json.dumps(report(query)).encode()
            ctype = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: list[str]) -> int:
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else int(os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"hostile pid={os.getpid()} listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
