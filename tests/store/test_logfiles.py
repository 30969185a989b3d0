"""miren_store.logfiles: the one log-tail reader (bounded from the end, a cut first line dropped,
lenient UTF-8, a missing file answered with None)."""

from __future__ import annotations

from pathlib import Path

import pytest

from miren_store.logfiles import read_tail, tail_lines


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "sb.log"
    path.write_bytes(data)
    return path


def test_a_small_file_is_read_whole(tmp_path: Path) -> None:
    path = write(tmp_path, b"one\ntwo\nthree\n")
    assert read_tail(path, 1024) == "one\ntwo\nthree\n"
    assert tail_lines(path, 2, 1024) == ["two", "three"]
    assert tail_lines(path, 10, 1024) == ["one", "two", "three"]
    assert tail_lines(path, 0, 1024) == []


def test_a_missing_file_is_none(tmp_path: Path) -> None:
    assert read_tail(tmp_path / "absent.log", 1024) is None
    assert tail_lines(tmp_path / "absent.log", 5, 1024) is None


def test_another_error_is_the_callers(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        read_tail(tmp_path, 1024)


def test_an_empty_file_is_empty(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    assert read_tail(path, 1024) == ""
    assert tail_lines(path, 5, 1024) == []


def test_the_read_is_bounded_and_the_cut_line_is_dropped(tmp_path: Path) -> None:
    path = write(tmp_path, b"a" * 100 + b"\n" + b"bbb\nccc\n")
    assert read_tail(path, 10) == "bbb\nccc\n"  # 10 bytes: "aa\nbbb\nccc\n" minus the cut "aa"
    assert tail_lines(path, 5, 10) == ["bbb", "ccc"]


def test_a_window_that_starts_on_a_line_keeps_it(tmp_path: Path) -> None:
    path = write(tmp_path, b"first\nsecond\nthird\n")
    assert read_tail(path, len(b"second\nthird\n")) == "second\nthird\n"
    assert read_tail(path, len(b"econd\nthird\n")) == "third\n"


def test_a_partial_line_that_is_all_there_is_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, b"x" * 50 + b"tail of a long line\n")
    assert read_tail(path, 10) == "long line\n"
    path = write(tmp_path, b"x" * 50)  # no line end at all
    assert read_tail(path, 10) == "x" * 10


def test_a_cut_multibyte_character_never_reaches_the_text(tmp_path: Path) -> None:
    # "é" is two bytes; a window starting inside it is inside the dropped partial line.
    path = write(tmp_path, "héllo\nwörld\n".encode())
    assert read_tail(path, len("éllo\nwörld\n".encode()) - 1) == "wörld\n"


def test_invalid_utf8_is_replaced_not_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, b"ok\n\xff\xfe bad\n")
    assert tail_lines(path, 5, 1024) == ["ok", "\ufffd\ufffd bad"]


def test_start_bounds_the_region_read(tmp_path: Path) -> None:
    old = b"an earlier run\n"
    path = write(tmp_path, old + b"this run 1\nthis run 2\n")
    assert read_tail(path, 1024, start=len(old)) == "this run 1\nthis run 2\n"
    # The window begins at `start` exactly: its first line is whole, not cut.
    assert read_tail(path, len(b"this run 1\nthis run 2\n"), start=len(old)) == (
        "this run 1\nthis run 2\n"
    )
    assert read_tail(path, 1024, start=path.stat().st_size) == ""
    assert read_tail(path, 15, start=len(old)) == "this run 2\n"


def test_zero_bytes_reads_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, b"one\n")
    assert read_tail(path, 0) == ""
