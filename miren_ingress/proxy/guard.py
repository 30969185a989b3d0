"""Protected previews: the cookie, the bypass token, the password, the login page.

Pure functions (the exchange calls them for a target with a `Guard` only; an unprotected host
pays one attribute test):

- **the cookie** `miren_auth=<expires>.<mac>`: HMAC-SHA256 of `<host>|<expires>` under the
  cluster's cookie key, so a cookie of one host opens no other; HttpOnly, SameSite=Lax, Path=/,
  Secure over TLS, valid `ingress.login_cookie_max_age` (24 h);
- **the bypass token** (`X-Miren-Bypass: <token>`, for CI and bots): its SHA-256 against the
  stored one, in constant time; it sets the same cookie;
- **the password**: a salted scrypt hash (`scrypt$n$r$p$salt$hash`), checked off the event loop
  by the caller (scrypt is deliberately slow), attempts rate-limited per client address;
- what reaches the app: the request head without the `miren_auth` cookie and without the
  `X-Miren-Bypass` header (the app never sees either, nor the password: the login form posts to
  the edge's reserved path, never to the app).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import os
import time
import urllib.parse

COOKIE = b"miren_auth"
BYPASS = b"x-miren-bypass"
LOGIN_PATH = b"/.well-known/miren/login"
MAX_AGE = 86400
SCRYPT = (16384, 8, 1)  # n, r, p: about 16 MiB and tens of ms per check
ATTEMPTS = 10  # login attempts per client address ...
WINDOW = 60.0  # ... per this many seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- the cookie -----------------------------------------------------------------------------------


def _mac(key: bytes, host: bytes, expires: int) -> str:
    return _b64(hmac.new(key, host + b"|%d" % expires, hashlib.sha256).digest())


def sign(key: bytes, host: bytes, now: float, max_age: int = MAX_AGE) -> bytes:
    expires = int(now) + max_age
    return b"%d.%s" % (expires, _mac(key, host, expires).encode())


def verify(key: bytes, host: bytes, value: bytes, now: float) -> bool:
    """A cookie value this key signed for this host, not expired."""
    stamp, dot, mac = value.partition(b".")
    if not dot or not stamp.isdigit() or not key:
        return False
    expires = int(stamp)
    if expires < now:
        return False
    return hmac.compare_digest(_mac(key, host, expires).encode(), mac)


def set_cookie(value: bytes, *, secure: bool, max_age: int = MAX_AGE) -> bytes:
    """The Set-Cookie header line (with CRLF)."""
    return (
        b"Set-Cookie: " + COOKIE + b"=" + value
        + b"; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax" % max_age
        + (b"; Secure" if secure else b"") + b"\r\n"
    )  # fmt: skip


# -- the request head -----------------------------------------------------------------------------


def host_key(host: bytes) -> bytes:
    """The Host value a cookie is bound to: lowercase, without the port."""
    host = host.lower()
    if host.startswith(b"["):
        return host.split(b"]", 1)[0] + b"]"
    return host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host


def credentials(head: bytes) -> tuple[bytes | None, bytes | None]:
    """(the miren_auth cookie's value, the bypass token) in a request head."""
    cookie = token = None
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"cookie" and cookie is None:
            for pair in value.split(b";"):
                k, eq, v = pair.strip().partition(b"=")
                if eq and k == COOKIE:
                    cookie = v.strip()
                    break
        elif name == BYPASS:
            token = value.strip()
    return cookie, token


def strip(head: bytes) -> bytes:
    """The head without the miren_auth cookie and the bypass header (what the app gets)."""
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        lowered = name.strip().lower()
        if colon and lowered == BYPASS:
            continue
        if colon and lowered == b"cookie":
            pairs = [p.strip() for p in value.split(b";")]
            if not any(p.partition(b"=")[0] == COOKIE and b"=" in p for p in pairs):
                out.append(line)  # not ours: the line as it came
                continue
            kept = [p for p in pairs if p and not (p.partition(b"=")[0] == COOKIE and b"=" in p)]
            if kept:
                out.append(name + b": " + b"; ".join(kept))
            continue
        out.append(line)
    return b"\r\n".join(out)


def examine(head: bytes) -> tuple[bytes | None, bytes | None, bytes]:
    """(cookie value, bypass token, the head the app gets): `credentials` and `strip` in one
    pass of C-level searches for the common shapes (no credential; one `miren_auth` cookie in a
    Cookie line, no bypass header), else exactly those two functions. Kept equal to them by a
    differential test (tests/tls/test_guard.py); measured in benchmarks/protection_bench.py."""
    lower = head.lower()
    first = lower.find(b"\r\n")
    at = lower.find(b"miren_auth=", first)
    bypass = lower.find(b"\r\nx-miren-bypass:", first)
    if at < 0 and bypass < 0:
        return None, None, head
    line = lower.rfind(b"\r\n", 0, at)
    if (
        bypass >= 0
        or not lower.startswith(b"\r\ncookie:", line)
        or lower.find(b"miren_auth=", at + 11) >= 0
        or lower.find(b"\r\ncookie:", line + 2) >= 0
        or head[at - 1 : at] not in (b" ", b":", b";")
        or head[at : at + 11] != COOKIE + b"="
    ):
        cookie, token = credentials(head)
        return cookie, token, strip(head)
    end = lower.find(b"\r\n", at)
    semi = head.find(b";", at, end)
    value = head[at + 11 : end if semi < 0 else semi].strip()
    before = head[line + 2 : at]  # "Cookie: a=b; " (or "Cookie: ")
    after = b"" if semi < 0 else head[semi + 1 : end]
    kept = [p.strip() for p in (*before.partition(b":")[2].split(b";"), *after.split(b";"))]
    kept = [p for p in kept if p]
    if kept:
        name = before.partition(b":")[0]
        return value, None, head[: line + 2] + name + b": " + b"; ".join(kept) + head[end:]
    return value, None, head[:line] + head[end:]


def bypass_ok(stored_hash: str, token: bytes) -> bool:
    if not stored_hash or not token:
        return False
    return hmac.compare_digest(hashlib.sha256(token).hexdigest().encode(), stored_hash.encode())


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- the password ---------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    n, r, p = SCRYPT
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def password_ok(stored: str, password: bytes) -> bool:
    """(blocking: run it off the event loop)"""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(
            password, salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=32,
            maxmem=64 << 20,
        )  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


class Attempts:
    """Login attempts per client address in a sliding window (a bounded dict)."""

    def __init__(self, limit: int = ATTEMPTS, window: float = WINDOW, cap: int = 100_000) -> None:
        self.limit, self.window, self.cap = limit, window, cap
        self._seen: dict[bytes, list[float]] = {}

    def allow(self, client: bytes, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if b":" in client:  # IPv6: one host usually has a whole /64
            client = b":".join(client.split(b":")[:4])
        if len(self._seen) >= self.cap:
            self._seen.clear()
        recent = [t for t in self._seen.get(client, ()) if now - t < self.window]
        if len(recent) >= self.limit:
            self._seen[client] = recent
            return False
        recent.append(now)
        self._seen[client] = recent
        return True


# -- the login page -------------------------------------------------------------------------------


def safe_next(raw: bytes | str | None) -> str:
    """Where to go after logging in: a path on this host only. Everything but the characters a
    URL path and query may hold as they are is percent-encoded first (a tab, a space or a
    no-break space between two slashes would otherwise read `//host` to a browser, which drops
    them), then anything not starting with one `/` is refused."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else (raw or "")
    text = urllib.parse.quote(text, safe="/?&=%:@!$'()*+,;~-._")
    if not text.startswith("/") or text.startswith("//"):
        return "/"
    return text


def form_password(body: bytes) -> bytes | None:
    """The `password` field of an application/x-www-form-urlencoded body."""
    for pair in body.split(b"&"):
        k, eq, v = pair.partition(b"=")
        if eq and urllib.parse.unquote_plus(k.decode("latin-1")) == "password":
            return urllib.parse.unquote_plus(v.decode("latin-1")).encode("latin-1")
    return None


def login_page(next_path: str, message: str = "") -> bytes:
    action = LOGIN_PATH.decode() + "?next=" + urllib.parse.quote(next_path, safe="/")
    note = f'<p class="err">{html.escape(message)}</p>' if message else ""
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><meta name="robots" '
        'content="noindex"><title>Protected preview</title><style>body{font:16px system-ui,'
        "sans-serif;margin:20vh auto;max-width:22em}input{font:inherit;width:100%;margin:.3em 0}"
        ".err{color:#b00}</style></head>\n<body><h1>Protected preview</h1>" + note
        + f'<form method="post" action="{html.escape(action)}">'
        '<input type="password" name="password" autofocus required aria-label="password">'
        '<input type="submit" value="Open"></form></body></html>\n'
    ).encode()  # fmt: skip
