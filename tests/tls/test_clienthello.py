"""The ClientHello reader on real ClientHellos (Python's own TLS client, several shapes), split
at every byte, and on bytes that are not one."""

from __future__ import annotations

import ssl

import pytest

from miren_ingress.tls.clienthello import MAX_HELLO, NEED_MORE, Hello, NotHello, parse


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    ("name", "alpn"),
    [
        ("pr-1.app.example.com", ["http/1.1"]),
        ("APP.Example.COM", ["h2", "http/1.1"]),
        ("a" * 60 + ".example.com", ["acme-tls/1"]),
        ("plain.test", None),
    ],
)
def test_real_client_hellos(name: str, alpn: list[str] | None) -> None:
    data = client_hello(name, alpn)
    assert parse(data) == Hello(name.lower(), tuple(alpn or ()))
    for cut in range(len(data)):  # every prefix is "read more", never a wrong answer
        assert parse(data[:cut]) is NEED_MORE, cut


def test_no_server_name() -> None:
    hello = parse(client_hello(None))
    assert isinstance(hello, Hello) and hello.server_name is None


def test_a_hello_split_over_two_records() -> None:
    data = client_hello("split.example.com", ["http/1.1"])
    body = data[5:]
    first, second = body[:40], body[40:]
    two = (
        bytes([22, 3, 1]) + len(first).to_bytes(2, "big") + first
        + bytes([22, 3, 1]) + len(second).to_bytes(2, "big") + second
    )  # fmt: skip
    assert parse(two) == Hello("split.example.com", ("http/1.1",))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x02\x00\x00\x05hello",  # not TLS 1.x
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # truncated inside
        b"\x16\x03\x01\x40\x01" + b"\x00" * 100,  # a record past the maximum
    ],
)
def test_not_a_client_hello(data: bytes) -> None:
    assert isinstance(parse(data), NotHello), data


def test_a_hello_in_many_tiny_records_is_refused_at_once() -> None:
    """A header announcing a long ClientHello, then one-byte records: refused after a few
    records, so each peek costs little whatever the attacker sends."""
    data = b"\x16\x03\x01\x00\x04\x01\x00\x3e\x80" + b"\x16\x03\x01\x00\x01\x00" * 2700
    verdict = parse(data)
    assert isinstance(verdict, NotHello) and "records" in verdict.reason


def test_an_endless_hello_is_refused() -> None:
    huge = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + b"\x00" * (MAX_HELLO + 10)
    assert isinstance(parse(huge), NotHello)
