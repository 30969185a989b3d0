"""Sandbox isolation: how far a process sandbox (pull-request code) is kept from the edge.

A process sandbox runs code nobody reviewed. Left alone it would run as the edge's user, so it
could read `/proc/<edge pid>/environ` (where `MIREN_ADMIN_TOKEN` lives), the data dir (the
admin token file, the embedded etcd's files and socket), and signal or ptrace the edge. This
module decides, once at start-up, how each sandbox is confined; `miren_activator.runtimes.process` carries
it out.

Levels (`Isolation.mode`, chosen from `IsolationConfig.mode` = `sandbox.isolation`):

- `bwrap`: bubblewrap puts the sandbox in private mount, pid, ipc, uts (and cgroup, where the
  kernel has it) namespaces inside a user namespace. Its file system is a fresh tmpfs root with
  only `/usr`, `/etc` and the `/bin`, `/sbin`, `/lib*` entries (read-only; symlinks stay
  symlinks), the configured `ro_paths`, the app's cwd (read-only unless `writable_cwd`), a
  minimal `/dev`, a new `/proc` that shows only the sandbox's own processes, and a private tmpfs
  `/tmp` (which is also its `HOME` and `TMPDIR`). Any `hidden_paths` entry (the data dir, a
  config file holding the token) that lies inside one of those binds is covered by an empty
  tmpfs (a directory) or by `/dev/null` (a file; binds are `nodev`, so opening it fails with
  EACCES); one outside them simply does not exist in there.
  The network namespace is shared on purpose: the proxy reaches the app on 127.0.0.1:$PORT, so
  everything on loopback stays reachable (the admin API and etcd must authenticate). The sandbox
  cannot create further user namespaces (`--disable-userns`, bubblewrap >= 0.8).
- `user` (root only, no namespaces): the sandbox runs as `uid`:`gid` with no supplementary
  groups, so file permissions (a 0700 data dir, root's 0400 `/proc/<pid>/environ`) keep it out.
  Its `HOME` and `TMPDIR` are a private 0700 directory the edge creates for it. It still sees
  every process and every world-readable file.
- `none`: the sandbox runs as the edge's own user, as before isolation existed. Only on request.

Every isolated sandbox also gets no-new-privileges (`PR_SET_NO_NEW_PRIVS`: no setuid binary or
file capability can raise it) and inherits no file descriptor beyond stdin, stdout and stderr.
When the edge is root the sandbox never runs as root or as the edge's uid: the launcher drops to
`uid`:`gid` (65532 by default) *before* bubblewrap runs, so bubblewrap itself runs unprivileged
and builds the sandbox in a user namespace owned by that uid; nothing in the sandbox ever holds a
privilege on the host, and it can reach on the host only what that uid can. (The alternative,
bubblewrap as root switching uid inside, would let root bind paths the sandbox user could never
read; we prefer the sandbox user's own permissions as the outer bound.) When the edge is not root
the sandbox keeps the edge's uid inside its user namespace; the namespaces are then what separate
it from the edge, and `set_undumpable` keeps other processes of that uid (outside the sandbox, or
any sandbox run with `none`) from reading the edge's environment or memory.

Choice (`choose`, a pure function of the config and the probed host facts):

    mode     edge is root                 edge is not root
    auto     bwrap as uid, else user      bwrap (user namespace), else refused
    bwrap    bwrap as uid, else refused   bwrap (user namespace), else refused
    user     user                         refused
    none     none                         none

A refused runtime starts no process sandbox: each start fails with `BootFailed` carrying the
reason and the way out (install bubblewrap, or set `sandbox.isolation = "none"`). Whether
bubblewrap is usable is measured, not guessed: `ProcessRuntime.prepare` runs the exact sandbox
set-up once around `true`, as the uid the sandboxes will use.

A sandbox whose version names no `cwd` starts in its private HOME. Not covered here: all
sandboxes share the one uid (under `user` they can signal or ptrace one another; under `bwrap`
their pid namespaces keep them apart, but files they can write are shared); the network and
abstract unix sockets are the host's; `/etc` is bound whole (put secrets kept there in
`hidden_paths`); there are no resource limits and no seccomp filter; under `user`, a process the
sandbox daemonised out of its process group survives `stop` (under `bwrap` the pid namespace ends
it too).

Split: `choose`, `bwrap_argv`, `path_refusal` and `sandbox_env` do no I/O and are tested as
tables; `read_layout` and `find_bwrap` look at the host; `set_undumpable` changes this process.
"""

from __future__ import annotations

import ctypes
import enum
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from miren_store.settings import setting

DEFAULT_UID: Final = 65532
DEFAULT_GID: Final = 65532
DEFAULT_TMP_SIZE: Final = 256 * 1024 * 1024

# Host entries bound read-only into a bwrap sandbox (the ones that exist; symlinks as symlinks).
SYSTEM_PATHS: Final = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# The home and temp dir of a bwrap sandbox: its private tmpfs.
SANDBOX_HOME: Final = "/tmp"
SANDBOX_USER: Final = "sandbox"  # USER / LOGNAME when the sandbox has its own uid

_FIX = 'install bubblewrap (Debian: apt install bubblewrap) or set sandbox.isolation = "none"'


class IsolationMode(enum.StrEnum):
    """`sandbox.isolation`: what was asked (`auto`) or what was chosen (the other three)."""

    AUTO = "auto"
    BWRAP = "bwrap"
    USER = "user"
    NONE = "none"


def _abs_paths(value: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    paths = tuple(os.path.normpath(os.fspath(p)) for p in value)
    for p in paths:
        if not os.path.isabs(p):
            raise ValueError(f"sandbox isolation paths must be absolute: {p!r}")
    return paths


def _unprivileged_id(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not 0 < value < 2**32 - 1:
        raise ValueError(f"sandbox {attr.name} must be an unprivileged id (not 0), got {value}")


@attrs.frozen
class IsolationConfig:
    """How process sandboxes are confined (see the module docstring).

    `uid`/`gid`: who the sandbox runs as when the edge is root (never 0). `hidden_paths`: host
    paths a sandbox must not see (the data dir; a config file with secrets). `ro_paths`: extra
    host paths bound read-only into a bwrap sandbox (e.g. a virtualenv outside `/usr`).
    `writable_cwd`: bind the app's cwd read-write instead of read-only. `bwrap`: the bubblewrap
    executable (a name looked up on PATH, or a path); None never uses it. `tmp_size`: the size
    limit of a bwrap sandbox's `/tmp` in bytes (0: the kernel default, half the RAM).
    `scratch_dir`: where `user` mode creates each sandbox's private HOME (default: a fresh
    private directory in the system temp dir).
    """

    mode: IsolationMode = attrs.field(converter=IsolationMode)
    uid: int = attrs.field(default=DEFAULT_UID, validator=_unprivileged_id)
    gid: int = attrs.field(default=DEFAULT_GID, validator=_unprivileged_id)
    hidden_paths: tuple[str, ...] = attrs.field(default=(), converter=_abs_paths)
    ro_paths: tuple[str, ...] = attrs.field(default=(), converter=_abs_paths)
    writable_cwd: bool = False
    bwrap: str | None = "bwrap"
    tmp_size: int = attrs.field(default=DEFAULT_TMP_SIZE, validator=attrs.validators.ge(0))
    scratch_dir: str | None = None


@attrs.frozen(kw_only=True)
class SandboxConfig:
    """The `[sandbox]` section of the edge's config: the part of `IsolationConfig` an operator
    chooses; `miren serve` adds the paths to hide (`isolation_config`)."""

    isolation: IsolationMode = attrs.field(
        default=IsolationMode.AUTO,
        metadata=setting(
            "how process sandboxes are confined: auto, bwrap, user or none (see Security)"
        ),
    )
    uid: int = attrs.field(
        default=DEFAULT_UID,
        metadata=setting(
            "who sandboxes run as when the edge is root (never 0)", minimum=1, maximum=2**32 - 2
        ),
    )
    gid: int = attrs.field(
        default=DEFAULT_GID,
        metadata=setting("the group they run as (never 0)", minimum=1, maximum=2**32 - 2),
    )

    def isolation_config(self, hidden_paths: Iterable[str]) -> IsolationConfig:
        return IsolationConfig(
            mode=self.isolation, uid=self.uid, gid=self.gid, hidden_paths=tuple(hidden_paths)
        )


@attrs.frozen
class BwrapStatus:
    """What the host's bubblewrap can do: `path` (None: not found), its `version`, and `error`,
    why it cannot be used (None: the probe sandbox ran)."""

    path: str | None
    version: tuple[int, ...] = ()
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.path is not None and self.error is None


@attrs.frozen
class HiddenPath:
    """A resolved `hidden_paths` entry: `kind` is "dir", "file" or "missing"."""

    path: str
    kind: str


@attrs.frozen
class HostLayout:
    """The host facts a bwrap command line depends on, read once by `read_layout`.

    `system`: the `SYSTEM_PATHS` that exist, each with its symlink target (None: a directory).
    """

    system: tuple[tuple[str, str | None], ...] = ()
    ro_paths: tuple[str, ...] = ()
    hidden: tuple[HiddenPath, ...] = ()


NO_BWRAP: Final = BwrapStatus(None)
NO_LAYOUT: Final = HostLayout()


@attrs.frozen
class Isolation:
    """The decision: how this runtime's sandboxes run. `mode` is never AUTO.

    `uid`/`gid`: what the launcher switches to (None: it keeps the edge's). `refusal`: why no
    process sandbox may start (then `mode` is what was asked). `fallback`: why a stronger level
    was not used.
    """

    mode: IsolationMode
    config: IsolationConfig
    edge_uid: int
    uid: int | None = None
    gid: int | None = None
    bwrap: BwrapStatus = NO_BWRAP
    layout: HostLayout = NO_LAYOUT
    refusal: str | None = None
    fallback: str | None = None

    @property
    def confined(self) -> bool:
        """True when sandboxes get a uid switch or namespaces (and no-new-privs, no fds)."""
        return self.refusal is None and self.mode is not IsolationMode.NONE

    @property
    def description(self) -> str:
        """One line for the startup log and /healthz."""
        if self.refusal is not None:
            return f"refused: {self.refusal}"
        who = (
            f"uid {self.uid} gid {self.gid}"
            if self.uid is not None
            else f"the edge's uid {self.edge_uid}"
        )
        if self.mode is IsolationMode.NONE:
            return f"none: sandboxes run unconfined as the edge's uid {self.edge_uid}"
        hidden = len(self.layout.hidden)
        if self.mode is IsolationMode.BWRAP:
            return (
                f"bwrap: {who} in a user namespace, no-new-privs, private mount/pid/ipc/uts "
                f"namespaces, private /tmp, {hidden} hidden path(s), shared network"
            )
        text = f"user: {who}, no-new-privs, no namespaces"
        return f"{text} ({self.fallback})" if self.fallback else text


def choose(
    config: IsolationConfig,
    *,
    euid: int,
    bwrap: BwrapStatus,
    layout: HostLayout = NO_LAYOUT,
    linux: bool = True,
) -> Isolation:
    """Pick the strongest level `config.mode` allows on this host (the table above)."""
    mode = config.mode
    root = euid == 0
    base = Isolation(mode=mode, config=config, edge_uid=euid, bwrap=bwrap, layout=layout)
    if mode is IsolationMode.NONE:
        return attrs.evolve(base, mode=IsolationMode.NONE)
    if not linux:
        return attrs.evolve(
            base, refusal='sandbox isolation needs Linux; set sandbox.isolation = "none"'
        )
    uid, gid = (config.uid, config.gid) if root else (None, None)
    if mode is IsolationMode.USER:
        if not root:
            return attrs.evolve(
                base,
                refusal=f'sandbox.isolation = "user" needs the edge to run as root (uid {euid}); '
                'use "auto" or "bwrap"',
            )
        return attrs.evolve(base, mode=IsolationMode.USER, uid=uid, gid=gid)
    if bwrap.usable:
        return attrs.evolve(base, mode=IsolationMode.BWRAP, uid=uid, gid=gid)
    why = f"bubblewrap unusable: {bwrap.error or 'not found'}"
    if mode is IsolationMode.BWRAP:
        return attrs.evolve(base, refusal=f'sandbox.isolation = "bwrap" but {why}')
    if root:
        return attrs.evolve(base, mode=IsolationMode.USER, uid=uid, gid=gid, fallback=why)
    return attrs.evolve(
        base,
        refusal=f"no sandbox isolation available: the edge is not root (uid {euid}) and {why}; "
        f"{_FIX}",
    )


def _within(path: str, root: str) -> bool:
    return root in (path, "/") or path.startswith(root.rstrip("/") + "/")


def path_refusal(iso: Isolation, cwd: str | None) -> str | None:
    """Why a sandbox with this (resolved) `cwd` cannot be confined, or None."""
    if iso.mode is not IsolationMode.BWRAP:
        return None
    if cwd == "/" or "/" in iso.layout.ro_paths:
        return "/ cannot be bound into a bubblewrap sandbox (it would expose the whole host)"
    for hidden in iso.layout.hidden:
        if cwd is not None and _within(cwd, hidden.path):
            return f"the sandbox's cwd {cwd} is inside the hidden path {hidden.path}"
        for ro in iso.layout.ro_paths:
            if _within(ro, hidden.path):
                return f"the read-only path {ro} is inside the hidden path {hidden.path}"
    return None


def bwrap_argv(iso: Isolation, command: Sequence[str], cwd: str | None) -> list[str]:
    """The bubblewrap command line that runs `command` confined, in `cwd` (resolved; None: its
    private /tmp). Call `path_refusal` first."""
    assert iso.bwrap.path is not None
    new = iso.bwrap.version >= (0, 8)
    argv = [iso.bwrap.path, "--unshare-user"]
    if new:
        argv.append("--disable-userns")
    argv += [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
    ]
    bound: list[str] = []
    for path, target in iso.layout.system:
        if target is None:
            argv += ["--ro-bind", path, path]
            bound.append(path)
        else:
            argv += ["--symlink", target, path]
    for path in iso.layout.ro_paths:
        argv += ["--ro-bind", path, path]
        bound.append(path)
    argv += ["--dev", "/dev", "--proc", "/proc"]
    if new and iso.config.tmp_size:
        argv += ["--size", str(iso.config.tmp_size)]
    argv += ["--tmpfs", SANDBOX_HOME]
    if cwd is not None:
        argv += ["--bind" if iso.config.writable_cwd else "--ro-bind", cwd, cwd]
        bound.append(cwd)
    # Masks last: each must land on top of the bind that would show the path.
    for hidden in iso.layout.hidden:
        if any(_within(hidden.path, b) for b in bound):
            if hidden.kind == "file":
                argv += ["--ro-bind", "/dev/null", hidden.path]
            else:  # a directory, or missing now: a tmpfs (bwrap fails if it cannot place it)
                argv += ["--tmpfs", hidden.path]
    argv += ["--chdir", cwd if cwd is not None else SANDBOX_HOME, "--", *command]
    return argv


def sandbox_env(iso: Isolation, base: Mapping[str, str], home: str | None) -> dict[str, str]:
    """The sandbox's environment before the spec's own: `base` (the pass-through) with a
    private, writable HOME and TMPDIR when confined, and a neutral USER when the uid changed."""
    env = dict(base)
    if not iso.confined:
        return env
    if home is not None:
        env["HOME"] = env["TMPDIR"] = home
    if iso.uid is not None:
        env["USER"] = env["LOGNAME"] = SANDBOX_USER
    return env


# -- host facts (I/O) ------------------------------------------------------------------------------


def find_bwrap(config: IsolationConfig) -> str | None:
    """The bubblewrap executable `config.bwrap` names, if it exists and is executable."""
    if config.bwrap is None:
        return None
    return shutil.which(config.bwrap)


def parse_bwrap_version(text: str) -> tuple[int, ...]:
    """`bubblewrap 0.8.0` -> (0, 8, 0); () when unreadable."""
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return ()


def read_layout(config: IsolationConfig) -> HostLayout:
    """Look at the host paths a bwrap sandbox binds or hides (a few lstat/realpath calls)."""
    system: list[tuple[str, str | None]] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            system.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            system.append((path, None))
    hidden: list[HiddenPath] = []
    for path in config.hidden_paths:
        real = os.path.realpath(path)
        kind = "dir" if os.path.isdir(real) else "file" if os.path.exists(real) else "missing"
        hidden.append(HiddenPath(real, kind))
        if real != path:  # hide the name it was given too, should a bind show that one
            hidden.append(HiddenPath(path, kind))
    ro = tuple(os.path.realpath(p) for p in config.ro_paths)
    return HostLayout(system=tuple(system), ro_paths=ro, hidden=tuple(hidden))


# -- the edge itself ----------------------------------------------------------------------------------

_PR_SET_DUMPABLE: Final = 4
_PR_GET_DUMPABLE: Final = 3


def set_undumpable() -> None:
    """Make this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`).

    Its ptrace-guarded `/proc/<pid>/` files (`environ`, where `MIREN_ADMIN_TOKEN` is, `mem`,
    `fd/`, ...) then belong to root, so no other process of the same uid can read them or ptrace
    it, and it leaves no core dump. Children are not affected (exec resets the flag). `miren serve` calls it
    at start-up; it is what protects the edge from same-uid processes when it runs unprivileged.
    Raises OSError when the kernel refuses.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, ctypes.c_ulong(0), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def is_dumpable() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
