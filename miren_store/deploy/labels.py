"""Ephemeral labels: validation and branch normalization. Pure functions.

A label is one DNS label: `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`. The server validates a given
`label` and never rewrites it; a `branch` is normalized into a label (the CLI does the same and
prints what it used):

1. lowercase; 2. `_`, `/`, `.` become `-`; 3. every other character outside `a-z0-9-` is dropped;
4. runs of `-` collapse; 5. `-` is trimmed from both ends; 6. a result over 63 characters is cut
to 56, trimmed of `-` again, and suffixed with `-` + the first 6 hex digits of the sha256 of the
*original* branch, so two long branches with a common 63-character prefix still get two labels;
7. an empty result is an error.

Normalization is idempotent on its outputs and every output is a valid label (property-tested).
"""

from __future__ import annotations

import hashlib
import re

from miren_store.deploy.errors import InvalidLabel

MAX_LABEL = 63
_CUT = 56  # 56 + "-" + 6 hex digits = 63
_HASH_HEX = 6
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SEPARATORS = str.maketrans({"_": "-", "/": "-", ".": "-"})
_DROP = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")


def is_valid_label(label: str) -> bool:
    return _LABEL.fullmatch(label) is not None


def validate_label(label: str) -> str:
    """The label itself if valid; else InvalidLabel naming it and what is wrong."""
    if not label:
        raise InvalidLabel("invalid ephemeral label: label must not be empty")
    if len(label) > MAX_LABEL:
        raise InvalidLabel(
            f"invalid ephemeral label {label!r}: must be at most {MAX_LABEL} characters, "
            f"got {len(label)}"
        )
    if not is_valid_label(label):
        raise InvalidLabel(
            f"invalid ephemeral label {label!r}: must contain only lowercase letters, digits "
            "and hyphens, and start and end with a letter or digit"
        )
    return label


def normalize_branch(branch: str) -> str:
    """A branch name (`Feature/Login_Page`) as a valid label (`feature-login-page`).

    Raises InvalidLabel when nothing usable is left (`""`, `"---"`, `"///"`).
    """
    text = _DROP.sub("", branch.lower().translate(_SEPARATORS))
    text = _DASHES.sub("-", text).strip("-")
    if not text:
        raise InvalidLabel(f"invalid ephemeral branch {branch!r}: empty after normalization")
    if len(text) > MAX_LABEL:
        digest = hashlib.sha256(branch.encode("utf-8", "surrogatepass")).hexdigest()
        text = text[:_CUT].rstrip("-") + "-" + digest[:_HASH_HEX]
    return text


def label_from(label: str | None, branch: str | None) -> str:
    """The label of a request that gives `label` (validated as is) or `branch` (normalized)."""
    if label is not None and branch is not None:
        raise InvalidLabel("give either an ephemeral label or a branch, not both")
    if label is not None:
        return validate_label(label)
    if branch is not None:
        return normalize_branch(branch)
    raise InvalidLabel("an ephemeral deploy needs a label or a branch")
