"""A catalogue of HTTP/1.1 request-smuggling and malformed-input probes, as data.

Written for this project from the public descriptions of the published probe families (request
smuggling CL.TE / TE.CL / TE.TE, the "HTTP desync" research, differential-fuzzing families such as
bare CR/LF and chunk-extension parsing, h2c upgrade smuggling, refused-upgrade desyncs). No code
or payload is taken from another project: every probe below was written here.

Each `Probe` is what one client sends on one fresh connection to the proxy under test (one or more
segments, with `pause` seconds between them) and how the recording upstream behind the proxy
answers (`upstream`, one of `BEHAVIOURS`). `benchmarks/probe_compare.py` runs them through nginx,
haproxy and our proxy and classifies what happened.

Conventions:
- Every request is for `Host: a.test` unless the probe is about the Host.
- `MARKER` (`/smuggled`) is the path of a request hidden in bytes that a proxy must not forward
  as a request of its own: a body under one reading of ambiguous framing, bytes after a
  `Connection: close` request, bytes after an Upgrade request's head. A probe whose marker may
  legitimately become a request once the proxy has answered what came before says so
  (`marker_may_be_request`). The upstream answers a marker request late
  (`MARKER_ANSWER_DELAY`), so a proxy that put one on a connection it later reuses for another
  client hands that client the marker's answer.
- Paths `/first`, `/second`, ... are ordinary requests that any proxy may forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Behaviour = Literal[
    "ok",
    "refuse_upgrade",
    "refuse_upgrade_late",
    "upgrade_200",
    "upgrade_200_late",
    "upgrade_426",
    "upgrade_426_late",
    "refuse_upgrade_after_body",
    "accept_upgrade",
    "accept_upgrade_after_body",
    "continue",
]

# Seconds the upstream waits before answering a request whose target contains MARKER.
MARKER_ANSWER_DELAY: Final = 0.8
# Seconds the "*_late" behaviours wait before answering an Upgrade request.
UPGRADE_ANSWER_DELAY: Final = 0.6

BEHAVIOURS: Final[dict[Behaviour, str]] = {
    "ok": "every request: 200 with a small body naming its target, keep-alive (an Upgrade "
    "request too: the upgrade is ignored); a request naming MARKER is answered late",
    "refuse_upgrade": "an Upgrade request: 404 as soon as its head is read (before a body it "
    "announced: a server may answer early), keep-alive; the announced body is then read and "
    "dropped and the connection goes on as HTTP/1.1; anything else as `ok`",
    "refuse_upgrade_after_body": "as refuse_upgrade, the 404 sent once the announced body is read",
    "refuse_upgrade_late": "as refuse_upgrade, the 404 sent UPGRADE_ANSWER_DELAY after the head",
    "upgrade_200": "an Upgrade request: 200 at once (upgrade ignored), keep-alive",
    "upgrade_200_late": "as upgrade_200, sent UPGRADE_ANSWER_DELAY after the head",
    "upgrade_426": "an Upgrade request: 426 Upgrade Required at once, keep-alive",
    "upgrade_426_late": "as upgrade_426, sent UPGRADE_ANSWER_DELAY after the head",
    "accept_upgrade": "an Upgrade request: 101 Switching Protocols as soon as its head is read, "
    "then echoes every byte",
    "accept_upgrade_after_body": "as accept_upgrade, the 101 sent once the announced body is read",
    "continue": "a request with `Expect: 100-continue`: 100 Continue as soon as its head is "
    "read, then 200 once its body is complete; anything else as `ok`",
}

MARKER: Final = b"/smuggled"
H: Final = b"Host: a.test\r\n"
SMUGGLED: Final = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
# CL.TE body: the end of a chunked body, then the marker request. Read with Content-Length the
# marker is body; read as chunked it is the next request.
TE_BODY: Final = b"0\r\n\r\n" + SMUGGLED
CHUNKED_HELLO: Final = b"5\r\nhello\r\n0\r\n\r\n"
UPGRADE_HEAD: Final = (
    b"GET /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
H2C_HEAD: Final = (
    b"GET /h2c HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


@dataclass(frozen=True, slots=True)
class Probe:
    family: str
    id: str
    segments: tuple[bytes, ...]  # written in order, `pause` seconds apart
    upstream: Behaviour = "ok"
    pause: float = 0.2
    # A MARKER request may reach the upstream as a request of its own, after what came before
    # it was answered (otherwise any MARKER request at the upstream is a finding).
    marker_may_be_request: bool = False
    # The bytes hold at least one whole request a proxy must answer or refuse (False: a proxy
    # may rightly wait for more).
    complete: bool = True
    # Header or trailer names (lowercase) that must not reach the upstream.
    forbid_upstream: tuple[str, ...] = ()
    # Header names (lowercase) every request at the upstream must carry.
    require_upstream: tuple[str, ...] = ()
    # The Host value the upstream must see (absolute-form targets).
    upstream_host: bytes | None = None
    note: str = ""


def _cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def _cl_te(te_lines: bytes, version: bytes = b"HTTP/1.1") -> tuple[bytes, ...]:
    """POST with Content-Length (the whole TE_BODY) and the given Transfer-Encoding line(s)."""
    return (b"POST / " + version + b"\r\n" + H + _cl(TE_BODY) + te_lines + b"\r\n" + TE_BODY,)


def _te_only(te_lines: bytes) -> tuple[bytes, ...]:
    """POST framed only by the given (obfuscated) Transfer-Encoding line(s)."""
    return (b"POST / HTTP/1.1\r\n" + H + te_lines + b"\r\n" + CHUNKED_HELLO,)


def _cl_body(cl_lines: bytes, body: bytes = SMUGGLED, method: bytes = b"POST") -> tuple[bytes]:
    return (method + b" / HTTP/1.1\r\n" + H + cl_lines + b"\r\n" + body,)


def _chunked(body: bytes) -> tuple[bytes]:
    return (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + body,)


def _trailers(lines: bytes, after: bytes = b"") -> tuple[bytes]:
    return _chunked(b"5\r\nhello\r\n0\r\n" + lines + b"\r\n" + after)


def _get(path: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + path + b" " + version + b"\r\n" + H + extra + b"\r\n"


# A chunk-extension line ended by a bare LF (or CR). Read up to the LF: a 2-byte chunk "xx",
# then a chunk of len(_EXT_TAIL) bytes holding the marker. Read up to the next CRLF (the LF
# inside the extension): a 2-byte chunk made of the hex digits of that size, the last chunk,
# then the marker as the next request.
_EXT_TAIL = TE_BODY
_EXT_SIZE = b"%x" % len(_EXT_TAIL)  # two hex digits
assert len(_EXT_SIZE) == 2


def _ext_split(sep: bytes) -> tuple[bytes]:
    return _chunked(b"2;a" + sep + b"xx\r\n" + _EXT_SIZE + b"\r\n" + _EXT_TAIL + b"\r\n0\r\n\r\n")


_TE = "te"
_CL = "content-length"
_CRLF = "bare-cr-lf"
_CHUNK = "chunk"
_TRAILER = "trailer"
_PIPE = "pipelining"
_UP = "upgrade"
_OTHER = "other"

PROBES: Final[tuple[Probe, ...]] = (
    # --- 1. Transfer-Encoding obfuscations (with Content-Length: CL.TE shape) -----------------
    Probe(_TE, "te_tab_before_value", _cl_te(b"Transfer-Encoding:\tchunked\r\n")),
    Probe(_TE, "te_no_space", _cl_te(b"Transfer-Encoding:chunked\r\n")),
    Probe(_TE, "te_two_spaces", _cl_te(b"Transfer-Encoding:  chunked\r\n")),
    Probe(_TE, "te_trailing_space", _cl_te(b"Transfer-Encoding: chunked \r\n")),
    Probe(_TE, "te_trailing_tab", _cl_te(b"Transfer-Encoding: chunked\t\r\n")),
    Probe(_TE, "te_value_uppercase", _cl_te(b"Transfer-Encoding: CHUNKED\r\n")),
    Probe(_TE, "te_name_lowercase", _cl_te(b"transfer-encoding: chunked\r\n")),
    Probe(_TE, "te_mixed_case", _cl_te(b"TrAnSfEr-EnCoDiNg: cHuNkEd\r\n")),
    Probe(_TE, "te_chunked_identity", _cl_te(b"Transfer-Encoding: chunked, identity\r\n")),
    Probe(_TE, "te_identity_chunked", _cl_te(b"Transfer-Encoding: identity, chunked\r\n")),
    Probe(_TE, "te_chunked_chunked", _cl_te(b"Transfer-Encoding: chunked, chunked\r\n")),
    Probe(_TE, "te_xchunked", _cl_te(b"Transfer-Encoding: xchunked\r\n")),
    Probe(_TE, "te_chunkedx", _cl_te(b"Transfer-Encoding: chunkedx\r\n")),
    Probe(_TE, "te_quoted", _cl_te(b'Transfer-Encoding: "chunked"\r\n')),
    Probe(_TE, "te_leading_comma", _cl_te(b"Transfer-Encoding: , chunked\r\n")),
    Probe(_TE, "te_twice", _cl_te(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n")),
    Probe(
        _TE,
        "te_chunked_then_identity",
        _cl_te(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"),
    ),
    Probe(
        _TE,
        "te_identity_then_chunked",
        _cl_te(b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"),
    ),
    Probe(_TE, "te_obs_fold_value", _cl_te(b"Transfer-Encoding:\r\n chunked\r\n")),
    Probe(
        _TE,
        "te_obs_fold_hidden",
        _cl_te(b"X-Pad: a\r\n Transfer-Encoding: chunked\r\n"),
        note="the TE line is a continuation of X-Pad",
    ),
    Probe(_TE, "te_vtab_before_value", _cl_te(b"Transfer-Encoding:\x0bchunked\r\n")),
    Probe(_TE, "te_ff_before_value", _cl_te(b"Transfer-Encoding:\x0cchunked\r\n")),
    Probe(_TE, "te_vtab_after_value", _cl_te(b"Transfer-Encoding: chunked\x0b\r\n")),
    Probe(_TE, "te_nul_after_value", _cl_te(b"Transfer-Encoding: chunked\x00\r\n")),
    Probe(
        _TE,
        "te_underscore_name",
        _cl_te(b"Transfer_Encoding: chunked\r\n"),
        forbid_upstream=("transfer_encoding",),
        note="CGI/WSGI-style backends map `_` and `-` to the same variable",
    ),
    Probe(_TE, "te_space_before_colon", _cl_te(b"Transfer-Encoding : chunked\r\n")),
    Probe(_TE, "te_tab_before_colon", _cl_te(b"Transfer-Encoding\t: chunked\r\n")),
    Probe(
        _TE,
        "te_then_cl",
        (
            b"POST / HTTP/1.1\r\n"
            + H
            + b"Transfer-Encoding: chunked\r\n"
            + _cl(TE_BODY)
            + b"\r\n"
            + TE_BODY,
        ),
        note="plain TE before CL (RFC 9112 6.1: TE wins, or reject; close after)",
    ),
    Probe(_TE, "cl_then_te", _cl_te(b"Transfer-Encoding: chunked\r\n"), note="plain CL before TE"),
    Probe(
        _TE,
        "te_http10",
        (
            b"POST / HTTP/1.0\r\n"
            + H
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + CHUNKED_HELLO
            + SMUGGLED,
        ),
        note="RFC 9112 6.1: TE on HTTP/1.0 is faulty framing; close after",
    ),
    Probe(
        _TE,
        "te_http10_keepalive",
        (
            b"POST / HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n" + CHUNKED_HELLO + SMUGGLED,
        ),
    ),
    Probe(_TE, "te_cl_http10", _cl_te(b"Transfer-Encoding: chunked\r\n", b"HTTP/1.0")),
    # TE alone, obfuscated: a proxy that does not see it forwards a bodiless POST.
    Probe(_TE, "te_only_space_before_colon", _te_only(b"Transfer-Encoding : chunked\r\n")),
    Probe(
        _TE,
        "te_only_underscore",
        _te_only(b"Transfer_Encoding: chunked\r\n"),
        forbid_upstream=("transfer_encoding",),
    ),
    Probe(_TE, "te_only_xchunked", _te_only(b"Transfer-Encoding: xchunked\r\n")),
    Probe(_TE, "te_only_obs_fold", _te_only(b"Transfer-Encoding:\r\n chunked\r\n")),
    Probe(_TE, "te_only_vtab", _te_only(b"Transfer-Encoding:\x0bchunked\r\n")),
    Probe(_TE, "te_only_identity", _te_only(b"Transfer-Encoding: identity\r\n")),
    # --- 2. Content-Length tricks (the body is the marker request) ----------------------------
    Probe(_CL, "cl_dup_equal", _cl_body(_cl(SMUGGLED) * 2)),
    Probe(_CL, "cl_dup_zero_first", _cl_body(b"Content-Length: 0\r\n" + _cl(SMUGGLED))),
    Probe(_CL, "cl_dup_zero_last", _cl_body(_cl(SMUGGLED) + b"Content-Length: 0\r\n")),
    Probe(_CL, "cl_list_equal", _cl_body(b"Content-Length: %d, %d\r\n" % ((len(SMUGGLED),) * 2))),
    Probe(_CL, "cl_list_differ", _cl_body(b"Content-Length: 0, %d\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_trailing_comma", _cl_body(b"Content-Length: %d,\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_plus", _cl_body(b"Content-Length: +%d\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_minus", _cl_body(b"Content-Length: -1\r\n")),
    Probe(
        _CL,
        "cl_leading_zeros",
        _cl_body(b"Content-Length: 000%d\r\n" % len(SMUGGLED)),
        note="valid: 1*DIGIT",
    ),
    Probe(_CL, "cl_ows_around", _cl_body(b"Content-Length:  %d  \r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_tab_before", _cl_body(b"Content-Length:\t%d\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_vtab_before", _cl_body(b"Content-Length:\x0b%d\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_space_inside", _cl_body(b"Content-Length: 4 1\r\n")),
    Probe(_CL, "cl_hex", _cl_body(b"Content-Length: 0x%x\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_decimal", _cl_body(b"Content-Length: %d.0\r\n" % len(SMUGGLED))),
    Probe(
        _CL,
        "cl_overflow_wraps",
        _cl_body(b"Content-Length: %d\r\n" % (2**64 + len(SMUGGLED))),
        note="2**64 + len(body): a 64-bit parser that wraps reads the body length",
    ),
    Probe(_CL, "cl_overflow_huge", _cl_body(b"Content-Length: 99999999999999999999999\r\n")),
    Probe(_CL, "cl_empty", _cl_body(b"Content-Length: \r\n")),
    Probe(_CL, "cl_space_before_colon", _cl_body(b"Content-Length : %d\r\n" % len(SMUGGLED))),
    Probe(_CL, "cl_obs_fold", _cl_body(b"Content-Length:\r\n %d\r\n" % len(SMUGGLED))),
    Probe(
        _CL,
        "cl_underscore",
        _cl_body(b"Content_Length: %d\r\n" % len(SMUGGLED)),
        marker_may_be_request=True,
        forbid_upstream=("content_length",),
        note="not a Content-Length: the marker is the next request; the field must not go on",
    ),
    Probe(
        _CL,
        "cl_on_get",
        _cl_body(_cl(SMUGGLED), method=b"GET"),
        note="a GET body that looks like a request: body, not a second request",
    ),
    Probe(
        _CL,
        "cl_zero_with_body",
        _cl_body(b"Content-Length: 0\r\n"),
        marker_may_be_request=True,
        note="no body: the bytes after the head are the next request",
    ),
    Probe(
        _CL,
        "cl_larger_than_data",
        _cl_body(b"Content-Length: 100\r\n", b"hello"),
        complete=False,
    ),
    # --- 3. Bare CR / bare LF -------------------------------------------------------------------
    Probe(_CRLF, "lf_after_request_line", (b"GET / HTTP/1.1\n" + H + b"\r\n",)),
    Probe(_CRLF, "lf_after_header", (b"GET / HTTP/1.1\r\nHost: a.test\nX-A: b\r\n\r\n",)),
    Probe(_CRLF, "lf_everywhere", (b"GET / HTTP/1.1\nHost: a.test\nX-A: b\n\n",)),
    Probe(_CRLF, "lf_ends_head", (b"GET / HTTP/1.1\r\n" + H + b"\n",)),
    Probe(_CRLF, "lf_cr_lf_ends_head", (b"GET / HTTP/1.1\r\nHost: a.test\n\r\n",)),
    Probe(
        _CRLF,
        "lf_before_body",
        (b"POST / HTTP/1.1\r\n" + H + _cl(SMUGGLED) + b"\n" + SMUGGLED,),
    ),
    Probe(
        _CRLF,
        "lf_hides_te",
        (
            b"POST / HTTP/1.1\r\n"
            + H
            + _cl(TE_BODY)
            + b"X-A: b\nTransfer-Encoding: chunked\r\n\r\n"
            + TE_BODY,
        ),
        note="a bare LF inside X-A: a line end to some parsers, so a TE line appears",
    ),
    Probe(
        _CRLF,
        "cr_hides_te",
        (
            b"POST / HTTP/1.1\r\n"
            + H
            + _cl(TE_BODY)
            + b"X-A: b\rTransfer-Encoding: chunked\r\n\r\n"
            + TE_BODY,
        ),
    ),
    Probe(_CRLF, "cr_in_value", (b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n",)),
    Probe(_CRLF, "cr_ends_header", (b"GET / HTTP/1.1\r\nHost: a.test\rX-A: b\r\n\r\n",)),
    Probe(_CRLF, "cr_ends_request_line", (b"GET / HTTP/1.1\r" + H + b"\r\n",)),
    Probe(_CRLF, "cr_in_target", (b"GET /a\rb HTTP/1.1\r\n" + H + b"\r\n",)),
    Probe(_CRLF, "lf_in_target", (b"GET /a\nb HTTP/1.1\r\n" + H + b"\r\n",)),
    Probe(_CRLF, "cr_cr_lf", (b"GET / HTTP/1.1\r\nHost: a.test\r\r\n\r\n",)),
    Probe(
        _CRLF, "cr_before_body", (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\rhello",)
    ),
    Probe(_CRLF, "leading_crlf", (b"\r\n" + _get(b"/"),), note="RFC 9112 2.2: SHOULD be ignored"),
    Probe(_CRLF, "leading_lf", (b"\n" + _get(b"/"),)),
    # --- 4. Chunk sizes and extensions ----------------------------------------------------------
    Probe(_CHUNK, "chunk_valid_split", _chunked(CHUNKED_HELLO), note="control"),
    Probe(_CHUNK, "chunk_leading_zeros", _chunked(b"0005\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_many_leading_zeros", _chunked(b"0" * 32 + b"5\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_uppercase_hex", _chunked(b"A\r\n0123456789\r\n0\r\n\r\n")),
    Probe(
        _CHUNK,
        "chunk_size_overflow_wraps",
        _chunked(b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        note="2**64 + 5: a parser that wraps reads 5",
    ),
    Probe(_CHUNK, "chunk_size_overlong", _chunked(b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_0x_prefix", _chunked(b"0x5\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_negative", _chunked(b"-5\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_plus", _chunked(b"+5\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_space_after_size", _chunked(b"5 \r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_tab_after_size", _chunked(b"5\t\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_space_before_size", _chunked(b" 5\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_ext_name", _chunked(b"5;ext\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_ext_value", _chunked(b"5;ext=val\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_ext_quoted", _chunked(b'5;ext="v a;l"\r\nhello\r\n0\r\n\r\n')),
    Probe(_CHUNK, "chunk_ext_bws", _chunked(b"5 ; ext = val\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_ext_empty", _chunked(b"5;\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_ext_bare_lf", _ext_split(b"\n"), note="see _ext_split"),
    Probe(_CHUNK, "chunk_ext_bare_cr", _ext_split(b"\r")),
    Probe(
        _CHUNK,
        "chunk_ext_long",
        _chunked(b"5;" + b"x" * 70_000 + b"\r\nhello\r\n0\r\n\r\n"),
        note="70 KB of extension on one chunk",
    ),
    Probe(_CHUNK, "chunk_ext_many", _chunked(b"5" + b";a=b" * 5_000 + b"\r\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_size_bare_lf", _chunked(b"5\nhello\r\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_data_bare_lf", _chunked(b"5\r\nhello\n0\r\n\r\n")),
    Probe(_CHUNK, "chunk_last_bare_lf", _chunked(b"5\r\nhello\r\n0\n\n")),
    Probe(
        _CHUNK,
        "chunk_larger_than_data",
        _chunked(b"10\r\nhello\r\n0\r\n\r\n"),
        complete=False,
    ),
    Probe(_CHUNK, "chunk_smaller_than_data", _chunked(b"3\r\nhello\r\n0\r\n\r\n")),
    Probe(
        _CHUNK,
        "chunk_missing_crlf_after_data",
        _chunked(b"5\r\nhello0\r\n\r\n" + SMUGGLED),
    ),
    Probe(_CHUNK, "chunk_data_overrun", _chunked(b"5\r\nhelloXX\r\n0\r\n\r\n" + SMUGGLED)),
    Probe(_CHUNK, "chunk_last_zeros", _chunked(b"5\r\nhello\r\n000\r\n\r\n")),
    Probe(_CHUNK, "chunk_last_ext", _chunked(b"5\r\nhello\r\n0;x=y\r\n\r\n")),
    Probe(
        _CHUNK,
        "chunk_in_segments",
        (
            b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n0\r\n",
            b"\r\n",
        ),
        note="control: a valid body over three segments",
    ),
    # --- 5. Trailers ----------------------------------------------------------------------------
    Probe(_TRAILER, "trailer_plain", _trailers(b"X-Trailer: a\r\n"), note="control"),
    Probe(
        _TRAILER,
        "trailer_content_length",
        _trailers(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        marker_may_be_request=True,
        note="after the trailers the marker is the next request",
    ),
    Probe(_TRAILER, "trailer_transfer_encoding", _trailers(b"Transfer-Encoding: chunked\r\n")),
    Probe(_TRAILER, "trailer_host", _trailers(b"Host: evil.test\r\n")),
    Probe(_TRAILER, "trailer_huge", _trailers(b"X-Big: " + b"v" * 70_000 + b"\r\n")),
    Probe(_TRAILER, "trailer_many", _trailers(b"".join(b"X-T%d: v\r\n" % i for i in range(2_000)))),
    Probe(_TRAILER, "trailer_bare_lf", _trailers(b"X-T: a\n")),
    Probe(_TRAILER, "trailer_obs_fold", _trailers(b"X-T: a\r\n b\r\n")),
    Probe(_TRAILER, "trailer_space_before_colon", _trailers(b"X-T : a\r\n")),
    Probe(
        _TRAILER,
        "trailer_then_request",
        _trailers(b"X-T: a\r\n", _get(b"/second")),
        note="control: a valid request after the trailers",
    ),
    Probe(
        _TRAILER,
        "trailer_missing_blank_line",
        _chunked(b"5\r\nhello\r\n0\r\n" + SMUGGLED),
        note="no empty line after the last chunk: the marker's lines read as trailers",
    ),
    # --- 6. Pipelining ----------------------------------------------------------------------------
    Probe(_PIPE, "pipe_two", (_get(b"/first") + _get(b"/second"),), note="control"),
    Probe(_PIPE, "pipe_three", (_get(b"/first") + _get(b"/second") + _get(b"/third"),)),
    Probe(_PIPE, "pipe_two_segments", (_get(b"/first"), _get(b"/second"))),
    Probe(
        _PIPE,
        "pipe_post_then_get",
        (b"POST /first HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello" + _get(b"/second"),),
    ),
    Probe(_PIPE, "pipe_20", (b"".join(_get(b"/p%d" % i) for i in range(20)),)),
    Probe(
        _PIPE,
        "close_same_write",
        (_get(b"/first", b"Connection: close\r\n") + SMUGGLED,),
    ),
    Probe(
        _PIPE,
        "close_later_segment",
        (_get(b"/first", b"Connection: close\r\n"), SMUGGLED),
    ),
    Probe(
        _PIPE,
        "close_uppercase",
        (_get(b"/first", b"Connection: CLOSE\r\n") + SMUGGLED,),
    ),
    Probe(
        _PIPE,
        "close_in_list",
        (_get(b"/first", b"Connection: keep-alive, close\r\n") + SMUGGLED,),
    ),
    Probe(
        _PIPE,
        "close_on_second",
        (_get(b"/first") + _get(b"/second", b"Connection: close\r\n") + SMUGGLED,),
    ),
    Probe(
        _PIPE,
        "close_post_body",
        (
            b"POST /first HTTP/1.1\r\n"
            + H
            + b"Connection: close\r\nContent-Length: 5\r\n\r\nhello"
            + SMUGGLED,
        ),
    ),
    Probe(_PIPE, "http10_same_write", (_get(b"/first", version=b"HTTP/1.0") + SMUGGLED,)),
    Probe(_PIPE, "http10_later_segment", (_get(b"/first", version=b"HTTP/1.0"), SMUGGLED)),
    Probe(
        _PIPE,
        "http10_keepalive",
        (_get(b"/first", b"Connection: keep-alive\r\n", b"HTTP/1.0") + _get(b"/second"),),
    ),
    # --- 7. Refused (and accepted) upgrades -------------------------------------------------------
    # RFC 9931: nothing after an Upgrade request's head goes upstream before a 101; after any
    # other answer the connection goes on as HTTP/1.1, so the marker may then be served as the
    # next request (EARLY and SMUGGLED are the findings here, not the marker being served).
    Probe(
        _UP,
        "ws_404_same_write",
        (UPGRADE_HEAD + SMUGGLED,),
        "refuse_upgrade",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_404_later_segment",
        (UPGRADE_HEAD, SMUGGLED),
        "refuse_upgrade_late",
        marker_may_be_request=True,
        note="the marker arrives after the head, before the (late) 404",
    ),
    Probe(
        _UP,
        "ws_200_same_write",
        (UPGRADE_HEAD + SMUGGLED,),
        "upgrade_200",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_200_later_segment",
        (UPGRADE_HEAD, SMUGGLED),
        "upgrade_200_late",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_426_same_write",
        (UPGRADE_HEAD + SMUGGLED,),
        "upgrade_426",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_426_later_segment",
        (UPGRADE_HEAD, SMUGGLED),
        "upgrade_426_late",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_101_same_write",
        (UPGRADE_HEAD + b"tunnel bytes sent early",),
        "accept_upgrade",
        note="bytes after the head, before the 101, are held by a careful proxy",
    ),
    Probe(
        _UP,
        "ws_101_later_segment",
        (UPGRADE_HEAD, b"tunnel bytes after the 101"),
        "accept_upgrade",
        note="control",
    ),
    Probe(
        _UP,
        "ws_404_post_body",
        (
            b"POST /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\n\r\nhello" + SMUGGLED,
        ),
        "refuse_upgrade",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_404_post_body_later_segment",
        (
            b"POST /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\n\r\n",
            b"hello",
        ),
        "refuse_upgrade",
        note="the announced body comes after the (early) 404",
    ),
    Probe(
        _UP,
        "ws_404_post_body_read_first",
        (
            b"POST /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\n\r\n",
            b"hello",
        ),
        "refuse_upgrade_after_body",
        note="the upstream reads the announced body before it answers",
    ),
    Probe(
        _UP,
        "ws_404_chunked_body",
        (
            b"POST /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO + SMUGGLED,
        ),
        "refuse_upgrade",
        marker_may_be_request=True,
    ),
    Probe(
        _UP,
        "ws_101_post_body",
        (
            b"POST /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Content-Length: 5\r\n\r\nhello",
        ),
        "accept_upgrade",
        note="the body belongs to the request: it goes upstream before the 101",
    ),
    Probe(
        _UP,
        "ws_101_post_body_read_first",
        (
            b"POST /up HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Content-Length: 5\r\n\r\n",
            b"hello",
        ),
        "accept_upgrade_after_body",
        note="the upstream reads the announced body before it answers 101",
    ),
    Probe(
        _UP,
        "ws_no_connection_token",
        (_get(b"/up", b"Upgrade: websocket\r\n") + SMUGGLED,),
        marker_may_be_request=True,
        note="not an upgrade request (no Connection: upgrade): plain pipelining",
    ),
    Probe(
        _UP,
        "h2c_ignored",
        (H2C_HEAD,),
        forbid_upstream=("upgrade", "http2-settings"),
        note="h2c smuggling: a proxy that passes the h2c upgrade lets the client tunnel",
    ),
    Probe(
        _UP,
        "h2c_accepted",
        (H2C_HEAD,),
        "accept_upgrade",
        forbid_upstream=("upgrade", "http2-settings"),
    ),
    Probe(
        _UP,
        "h2c_settings_not_listed",
        (
            b"GET /h2c HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        ),
        forbid_upstream=("upgrade", "http2-settings"),
    ),
    # --- 8. Other malformed input -----------------------------------------------------------------
    Probe(
        _OTHER,
        "connection_host",
        (_get(b"/", b"Connection: Host\r\n"),),
        require_upstream=("host",),
        note="Connection must not strip Host",
    ),
    Probe(
        _OTHER,
        "connection_xff",
        (_get(b"/", b"Connection: X-Forwarded-For\r\n"),),
        require_upstream=("x-forwarded-for",),
    ),
    Probe(
        _OTHER,
        "connection_content_length",
        (
            b"POST / HTTP/1.1\r\n"
            + H
            + b"Connection: Content-Length\r\n"
            + _cl(SMUGGLED)
            + b"\r\n"
            + SMUGGLED,
        ),
        note="stripping the framing would make the body a request",
    ),
    Probe(
        _OTHER,
        "headers_101",
        (_get(b"/", b"".join(b"X-H%d: v\r\n" % i for i in range(100))),),
        note="Host + 100",
    ),
    Probe(
        _OTHER, "headers_10000", (_get(b"/", b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))),)
    ),
    Probe(_OTHER, "header_70kb", (_get(b"/", b"X-Big: " + b"v" * 70_000 + b"\r\n"),)),
    Probe(_OTHER, "http09", (b"GET /\r\n\r\n",)),
    Probe(_OTHER, "http09_no_blank", (b"GET /\r\n",)),
    Probe(_OTHER, "valid_then_junk", (_get(b"/first") + b"\x16\x03\x01\x00junk\r\n\r\n",)),
    Probe(
        _OTHER,
        "valid_then_junk_later",
        (_get(b"/first"), b"NOT HTTP AT ALL\r\n\r\n"),
    ),
    Probe(
        _OTHER,
        "absolute_form",
        (b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n",),
        upstream_host=b"a.test",
        note="RFC 9112 3.2.2: MUST accept; the authority replaces Host",
    ),
    Probe(
        _OTHER,
        "absolute_form_same_host",
        (b"GET http://a.test/x HTTP/1.1\r\n" + H + b"\r\n",),
        upstream_host=b"a.test",
    ),
    Probe(
        _OTHER,
        "absolute_form_no_host",
        (b"GET http://a.test/x HTTP/1.1\r\n\r\n",),
        note="RFC 9112 3.2: a 1.1 request without Host: 400",
    ),
    Probe(_OTHER, "authority_form_get", (b"GET a.test:80 HTTP/1.1\r\n" + H + b"\r\n",)),
    Probe(_OTHER, "asterisk_get", (b"GET * HTTP/1.1\r\n" + H + b"\r\n",)),
    Probe(
        _OTHER,
        "underscore_xff",
        (_get(b"/", b"X_Forwarded_For: 1.2.3.4\r\n"),),
        forbid_upstream=("x_forwarded_for",),
        note="a CGI-style backend reads it as X-Forwarded-For (spoofed client address)",
    ),
    Probe(
        _OTHER,
        "underscore_host",
        (_get(b"/", b"X_Forwarded_Host: evil.test\r\n"),),
        forbid_upstream=("x_forwarded_host",),
    ),
    Probe(_OTHER, "target_9kb", (_get(b"/" + b"a" * 9_000),)),
    Probe(_OTHER, "target_70kb", (_get(b"/" + b"a" * 70_000),)),
    Probe(
        _OTHER,
        "expect_100_upstream_silent",
        (
            b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            b"hello",
        ),
        pause=0.5,
    ),
    Probe(
        _OTHER,
        "expect_100_upstream_continues",
        (
            b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            b"hello",
        ),
        "continue",
        pause=0.5,
    ),
    Probe(
        _OTHER,
        "expect_100_no_body",
        (_get(b"/", b"Expect: 100-continue\r\n"),),
        "continue",
    ),
    Probe(_OTHER, "expect_unknown", (_get(b"/", b"Expect: teapot\r\n"),)),
    Probe(_OTHER, "host_with_space", (b"GET / HTTP/1.1\r\nHost: a.test evil\r\n\r\n",)),
    Probe(_OTHER, "host_empty", (b"GET / HTTP/1.1\r\nHost:\r\n\r\n",)),
)


def by_id() -> dict[str, Probe]:
    """The probes keyed by id (ids are unique)."""
    table = {p.id: p for p in PROBES}
    assert len(table) == len(PROBES), "duplicate probe ids"
    return table
