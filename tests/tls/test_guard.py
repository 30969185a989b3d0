"""The protection helpers without sockets: the cookie's signature, the password hash, and the
one-pass `examine` kept equal to `credentials` + `strip` on random heads (a differential test:
the fast shapes and the fallback alike)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from miren_ingress.proxy import guard

KEY = b"k" * 32


def test_the_cookie_binds_host_and_expiry() -> None:
    value = guard.sign(KEY, b"pr-1.example.com", 1000.0)
    assert guard.verify(KEY, b"pr-1.example.com", value, 1000.0)
    assert not guard.verify(KEY, b"pr-2.example.com", value, 1000.0)  # another host
    assert not guard.verify(KEY, b"pr-1.example.com", value, 1000.0 + guard.MAX_AGE + 1)
    assert not guard.verify(b"other" * 8, b"pr-1.example.com", value, 1000.0)
    stamp, _, mac = value.partition(b".")
    forged = b"%d.%s" % (int(stamp) + 3600, mac)  # a later expiry with the old signature
    assert not guard.verify(KEY, b"pr-1.example.com", forged, 1000.0)
    assert not guard.verify(b"", b"pr-1.example.com", value, 1000.0)  # no key: nobody


def test_passwords_and_tokens_are_hashed() -> None:
    stored = guard.hash_password("s3cret-pass")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert guard.password_ok(stored, b"s3cret-pass")
    assert not guard.password_ok(stored, b"s3cret-pasS")
    assert not guard.password_ok("garbage", b"x")
    assert guard.bypass_ok(guard.hash_token("tok-123456"), b"tok-123456")
    assert not guard.bypass_ok(guard.hash_token("tok-123456"), b"tok-1234567")
    assert not guard.bypass_ok("", b"anything")


def test_next_stays_on_this_host() -> None:
    assert guard.safe_next("/a?b=c") == "/a?b=c"
    for bad in ("//evil.example/x", "https://evil.example/", "evil", "", None):
        assert guard.safe_next(bad) == "/", bad
    # What a browser drops or reads as a slash never joins two slashes into `//host`.
    for sneaky in ("/\t/evil.example/x", "/\x0b/evil", "/\xa0/evil", "/\\evil", "/ /evil"):
        out = guard.safe_next(sneaky)
        assert out.startswith("/") and not out.startswith("//") and "evil" in out, out
        assert all(c.isascii() and c.isprintable() and c not in " \\" for c in out), out


def test_an_ipv6_64_is_one_client() -> None:
    a = guard.Attempts(limit=2, window=10)
    assert a.allow(b"2001:db8:1:2::1", 0) and a.allow(b"2001:db8:1:2::ffff", 0)
    assert not a.allow(b"2001:db8:1:2:aaaa::9", 0)  # the same /64
    assert a.allow(b"2001:db8:1:3::1", 0)


def test_attempts_window() -> None:
    a = guard.Attempts(limit=2, window=10)
    assert a.allow(b"1.2.3.4", 0) and a.allow(b"1.2.3.4", 1) and not a.allow(b"1.2.3.4", 2)
    assert a.allow(b"5.6.7.8", 2)  # another address
    assert a.allow(b"1.2.3.4", 11.5)  # the window moved on


names = st.sampled_from(
    [b"Cookie", b"cookie", b"COOKIE", b"X-Miren-Bypass", b"x-miren-bypass", b"Accept", b"Referer",
     b"X-Other"]
)  # fmt: skip
pairs = st.lists(
    st.tuples(
        st.sampled_from([b"miren_auth", b"theme", b"xmiren_auth", b"miren_auth2", b"a"]),
        st.sampled_from([b"v1", b"123.abc", b"", b"x y"]),
    ),
    max_size=4,
)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    target = draw(st.sampled_from([b"/", b"/p?miren_auth=1", b"/x;miren_auth=2"]))
    lines = [b"GET " + target + b" HTTP/1.1"]
    for name in draw(st.lists(names, max_size=4)):
        if name.lower() == b"cookie":
            sep = draw(st.sampled_from([b"; ", b";"]))
            value = sep.join(k + b"=" + v for k, v in draw(pairs))
        elif name.lower() == b"referer":
            value = draw(st.sampled_from([b"https://x/?miren_auth=3", b"https://x/"]))
        else:
            value = draw(st.sampled_from([b"tok", b"text/html", b""]))
        lines.append(name + b": " + value)
    lines.append(b"Host: h")
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=3000, deadline=None)
@given(heads())
def test_examine_equals_credentials_and_strip(head: bytes) -> None:
    cookie, token = guard.credentials(head)
    assert guard.examine(head) == (cookie, token, guard.strip(head))
