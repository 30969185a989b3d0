"""Labels: validation (reference §2.2, case 20) and branch normalization (§2.1, case 19), adapted
to SPEC §5: a normalized result over 63 characters gets a hash suffix instead of a plain cut."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miren_store.deploy.errors import InvalidLabel
from miren_store.deploy.labels import is_valid_label, label_from, normalize_branch, validate_label

VECTORS = [
    ("feature/login", "feature-login"),
    ("Feature_Login_Page", "feature-login-page"),
    ("fix/nav..bar", "fix-nav-bar"),
    ("feat-x", "feat-x"),
    ("MAIN", "main"),
    ("a", "a"),
    ("hello_world/test.branch", "hello-world-test-branch"),
    ("--leading-trailing--", "leading-trailing"),
    ("multiple___underscores", "multiple-underscores"),
    ("a/b/c/d", "a-b-c-d"),
    ("My_Branch.v2", "my-branch-v2"),
    ("PR-123", "pr-123"),
    ("feat/ünïcode-✓", "feat-ncode"),  # non-ASCII letters are dropped, not transliterated
    ("a" * 63, "a" * 63),
]


@pytest.mark.parametrize(("branch", "label"), VECTORS)
def test_normalize_vectors(branch: str, label: str) -> None:
    assert normalize_branch(branch) == label


@pytest.mark.parametrize("branch", ["", "---", "...", "///", "✓✓✓", "_-_./"])
def test_normalize_empty_is_an_error_naming_the_input(branch: str) -> None:
    with pytest.raises(InvalidLabel) as info:
        normalize_branch(branch)
    assert repr(branch) in str(info.value)
    assert info.value.code == "invalid_label"


def _suffix(branch: str) -> str:
    return hashlib.sha256(branch.encode()).hexdigest()[:6]


def test_long_branch_is_cut_to_56_plus_hash_of_the_original() -> None:
    branch = "A" * 100
    out = normalize_branch(branch)
    assert out == "a" * 56 + "-" + _suffix(branch)
    assert len(out) == 63
    assert is_valid_label(out)


def test_long_branch_cut_trims_hyphens_before_the_suffix() -> None:
    branch = "a" * 55 + "/b" + "c" * 20  # the cut lands right after the separator
    out = normalize_branch(branch)
    assert out == "a" * 55 + "-" + _suffix(branch)


def test_62_a_then_hyphen_b_is_kept_whole() -> None:
    # 64 characters after normalization: over 63, so cut + hash (reference: plain cut to 62 a's)
    branch = "a" * 62 + "-b"
    out = normalize_branch(branch)
    assert out == "a" * 56 + "-" + _suffix(branch)


def test_two_long_branches_with_a_common_70_char_prefix_differ() -> None:
    prefix = "feature/" + "x" * 62
    assert len(prefix) == 70
    one, two = normalize_branch(prefix + "-one"), normalize_branch(prefix + "-two")
    assert one != two
    assert is_valid_label(one) and is_valid_label(two)
    assert len(one) <= 63 and len(two) <= 63


@pytest.mark.parametrize("label", ["a", "feat-x", "my-branch-123", "a" * 63, "a--b", "0"])
def test_valid_labels(label: str) -> None:
    assert validate_label(label) == label


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        ("", "must not be empty"),
        ("-start", "'-start'"),
        ("end-", "'end-'"),
        ("UPPER", "'UPPER'"),
        ("has_underscore", "'has_underscore'"),
        ("has.dot", "'has.dot'"),
        ("a" * 64, "at most 63 characters, got 64"),
        ("Feat_X", "'Feat_X'"),  # case 21: the server never normalizes a label
    ],
)
def test_invalid_labels_are_refused_with_a_message(label: str, fragment: str) -> None:
    with pytest.raises(InvalidLabel) as info:
        validate_label(label)
    assert "invalid ephemeral label" in str(info.value)
    assert fragment in str(info.value)


def test_label_from_label_or_branch() -> None:
    assert label_from("feat-x", None) == "feat-x"
    assert label_from(None, "Feature/Login") == "feature-login"
    with pytest.raises(InvalidLabel):
        label_from("Feat_X", None)
    with pytest.raises(InvalidLabel, match="not both"):
        label_from("a", "b")
    with pytest.raises(InvalidLabel, match="needs a label or a branch"):
        label_from(None, None)


@given(st.text())
def test_normalize_is_valid_and_idempotent(branch: str) -> None:
    try:
        out = normalize_branch(branch)
    except InvalidLabel:
        return
    assert is_valid_label(out)
    assert len(out) <= 63
    assert normalize_branch(out) == out
    assert validate_label(out) == out


@given(st.text(alphabet="abcXYZ019_/.-", min_size=64, max_size=200))
def test_long_branches_always_end_in_their_hash(branch: str) -> None:
    try:
        out = normalize_branch(branch)
    except InvalidLabel:
        return
    plain = branch.lower().replace("_", "-").replace("/", "-").replace(".", "-")
    while "--" in plain:
        plain = plain.replace("--", "-")
    plain = plain.strip("-")
    if len(plain) > 63:
        assert out.endswith("-" + _suffix(branch))
    else:
        assert out == plain


@given(st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True))
def test_every_regex_label_validates(label: str) -> None:
    assert validate_label(label) == label
