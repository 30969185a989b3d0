"""The admin API's bearer token: configured, or generated once into the data dir.

The admin API deploys commands, so it always authenticates. An operator may set the token
(`MIREN_ADMIN_TOKEN`, or `admin_token` in the config); otherwise `miren serve` generates one on
its first start and keeps it in `<data_dir>/admin-token` (mode 0600, in a 0700 data dir), where
the CLI finds it when run from the same directory (`./.miren/admin-token`, the default data
dir), so the README's walkthrough needs no setup. The token is never logged or answered.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

TOKEN_FILE = "admin-token"
ENV_TOKEN = "MIREN_ADMIN_TOKEN"
DEFAULT_TOKEN_PATH = Path(".miren") / TOKEN_FILE  # the CLI's default, relative to its cwd


def token_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / TOKEN_FILE


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and its parents) and make it 0700: it holds the token and the store."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.stat().st_mode & 0o077:
        p.chmod(0o700)
    return p


def load_or_create(data_dir: str | os.PathLike[str]) -> str:
    """The token kept in the data dir, generated (0600) on the first call. Concurrent first
    calls agree on one token (the file is created exclusively, then read back)."""
    path = token_path(ensure_private_dir(data_dir))
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        finally:
            os.close(fd)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it to have a new token generated")
    return token


def read_token_file(path: str | os.PathLike[str]) -> str:
    """A token from a file (the CLI's `--token-file`): its first line."""
    text = Path(path).read_text().strip()
    return text.splitlines()[0].strip() if text else ""


def cli_token(env: Mapping[str, str], token_file: str | None, cwd: Path | None = None) -> str:
    """The CLI's token: `MIREN_ADMIN_TOKEN`, else `--token-file`, else `./.miren/admin-token`
    when it exists (else none: the server will answer 401 and say where to look)."""
    if env.get(ENV_TOKEN):
        return env[ENV_TOKEN]
    if token_file:
        return read_token_file(token_file)
    default = (cwd or Path.cwd()) / DEFAULT_TOKEN_PATH
    try:
        return read_token_file(default)
    except OSError:
        return ""
