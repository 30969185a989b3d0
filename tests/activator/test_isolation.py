"""Sandbox isolation (SPEC §14, `miren_activator.runtimes.isolation`).

First the decision without processes: which level each mode gets on which host, the bubblewrap
command line, the environment. Then real sandboxes through `ProcessRuntime`, probed from the
inside by tests/apps/hostile.py (it reports its uid, privileges, fds, what /proc and the file
system show it, whose environment it can read): as root in `user` and `bwrap` mode, with stop
and SIGKILL of the edge checked for leftovers; the edge run as a separate process
(tests/apps/edge_stub.py) with a secret in its environment, as root and as an unprivileged uid;
real frameworks (uvicorn + Starlette, gunicorn + Flask) under bubblewrap.

Sandbox commands use /usr/bin/python3: the interpreter running the tests may sit below a 0700
directory (pyenv under /root) that the sandbox uid cannot enter, which is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from miren_activator.errors import BootFailed
from miren_activator.runtimes.base import SandboxSpec
from miren_activator.runtimes.isolation import (
    BwrapStatus,
    HiddenPath,
    HostLayout,
    Isolation,
    IsolationConfig,
    IsolationMode,
    bwrap_argv,
    choose,
    is_dumpable,
    parse_bwrap_version,
    path_refusal,
    read_layout,
    sandbox_env,
)
from miren_activator.runtimes.process import ProcessHandle, ProcessRuntime, group_members
from miren_store.entities import Runtime, VersionSpec
from tests.activator.conftest import (
    ECHO,
    ActivatorFactory,
    get_json,
    make_version,
    pid_gone,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "apps"
HOSTILE = APPS / "hostile.py"
STUB = APPS / "edge_stub.py"
SANDBOX_PY = "/usr/bin/python3"
UID = 65532

AUTO, BWRAP, USER, NONE = (
    IsolationMode.AUTO,
    IsolationMode.BWRAP,
    IsolationMode.USER,
    IsolationMode.NONE,
)


# -- the decision, without processes --------------------------------------------------------------

GOOD_BWRAP = BwrapStatus("/usr/bin/bwrap", (0, 8, 0))
NO_BWRAP = BwrapStatus(None, error="bwrap not found")
BROKEN_BWRAP = BwrapStatus(
    "/usr/bin/bwrap", (0, 8, 0), error="No permissions to create new namespace"
)


@pytest.mark.parametrize(
    ("mode", "euid", "bwrap", "linux", "chosen", "uid", "refusal"),
    [
        # root: a dedicated uid always, namespaces when bubblewrap works
        (AUTO, 0, GOOD_BWRAP, True, BWRAP, UID, None),
        (AUTO, 0, BROKEN_BWRAP, True, USER, UID, None),
        (AUTO, 0, NO_BWRAP, True, USER, UID, None),
        (BWRAP, 0, GOOD_BWRAP, True, BWRAP, UID, None),
        (BWRAP, 0, NO_BWRAP, True, BWRAP, None, 'sandbox.isolation = "bwrap" but bubblewrap'),
        (USER, 0, GOOD_BWRAP, True, USER, UID, None),
        (USER, 0, NO_BWRAP, True, USER, UID, None),
        (NONE, 0, GOOD_BWRAP, True, NONE, None, None),
        # unprivileged: bubblewrap's user namespace, or nothing at all
        (AUTO, 1000, GOOD_BWRAP, True, BWRAP, None, None),
        (AUTO, 1000, BROKEN_BWRAP, True, AUTO, None, "install bubblewrap"),
        (AUTO, 1000, NO_BWRAP, True, AUTO, None, 'or set sandbox.isolation = "none"'),
        (BWRAP, 1000, GOOD_BWRAP, True, BWRAP, None, None),
        (BWRAP, 1000, BROKEN_BWRAP, True, BWRAP, None, "No permissions to create"),
        (USER, 1000, GOOD_BWRAP, True, USER, None, "needs the edge to run as root"),
        (NONE, 1000, NO_BWRAP, True, NONE, None, None),
        # not Linux: nothing to confine with
        (AUTO, 0, GOOD_BWRAP, False, AUTO, None, "needs Linux"),
        (NONE, 1000, NO_BWRAP, False, NONE, None, None),
    ],
)
def test_choose(
    mode: IsolationMode,
    euid: int,
    bwrap: BwrapStatus,
    linux: bool,
    chosen: IsolationMode,
    uid: int | None,
    refusal: str | None,
) -> None:
    iso = choose(IsolationConfig(mode=mode), euid=euid, bwrap=bwrap, linux=linux)
    assert iso.mode is chosen
    assert (iso.uid, iso.gid) == (uid, uid)
    if refusal is None:
        assert iso.refusal is None
        assert iso.confined is (chosen is not NONE)
    else:
        assert iso.refusal is not None and refusal in iso.refusal
        assert not iso.confined
        assert iso.description.startswith("refused: ")
    assert iso.uid not in (0, euid)  # never root, never the edge's own uid when it switches


def test_a_fallback_says_why() -> None:
    iso = choose(IsolationConfig(mode=AUTO), euid=0, bwrap=BROKEN_BWRAP)
    assert iso.mode is USER and iso.fallback is not None
    assert iso.description == (
        "user: uid 65532 gid 65532, no-new-privs, no namespaces "
        "(bubblewrap unusable: No permissions to create new namespace)"
    )


def test_descriptions() -> None:
    config = IsolationConfig(mode=AUTO, hidden_paths=["/var/lib/miren"])
    layout = HostLayout(hidden=(HiddenPath("/var/lib/miren", "dir"),))
    root = choose(config, euid=0, bwrap=GOOD_BWRAP, layout=layout)
    assert root.description == (
        "bwrap: uid 65532 gid 65532 in a user namespace, no-new-privs, private mount/pid/ipc/uts "
        "namespaces, private /tmp, 1 hidden path(s), shared network"
    )
    user = choose(config, euid=1000, bwrap=GOOD_BWRAP, layout=layout)
    assert user.description.startswith("bwrap: the edge's uid 1000 in a user namespace")
    none = choose(IsolationConfig(mode="none"), euid=1000, bwrap=NO_BWRAP)
    assert none.description == "none: sandboxes run unconfined as the edge's uid 1000"


def test_config_is_checked() -> None:
    assert IsolationConfig(mode="bwrap").mode is BWRAP
    with pytest.raises(ValueError):
        IsolationConfig(mode="chroot")
    with pytest.raises(ValueError, match="unprivileged"):
        IsolationConfig(mode="auto", uid=0)
    with pytest.raises(ValueError, match="unprivileged"):
        IsolationConfig(mode="auto", gid=0)
    with pytest.raises(ValueError, match="absolute"):
        IsolationConfig(mode="auto", hidden_paths=["data"])
    assert IsolationConfig(mode="auto", hidden_paths=[Path("/a/b/")]).hidden_paths == ("/a/b",)


LAYOUT = HostLayout(
    system=(("/usr", None), ("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/etc", None)),
    ro_paths=("/opt/venv",),
    hidden=(
        HiddenPath("/srv/app/.miren", "dir"),  # inside the cwd: covered
        HiddenPath("/etc/miren/edge.toml", "file"),  # inside /etc: /dev/null on top
        HiddenPath("/var/lib/miren", "dir"),  # bound nowhere: simply absent
    ),
)


def bwrap_iso(euid: int = 0, version: tuple[int, ...] = (0, 8, 0), **config: Any) -> Isolation:
    return choose(
        IsolationConfig(mode=BWRAP, **config),
        euid=euid,
        bwrap=BwrapStatus("/usr/bin/bwrap", version),
        layout=LAYOUT,
    )


def pairs(argv: list[str], flag: str) -> list[list[str]]:
    """Every occurrence of a two-argument option, as [src, dest]."""
    return [argv[i + 1 : i + 3] for i, a in enumerate(argv) if a == flag]


def test_bwrap_command_line() -> None:
    argv = bwrap_argv(bwrap_iso(), ["python3", "app.py", "--port", "9000"], "/srv/app")
    assert argv[0] == "/usr/bin/bwrap"
    sep = argv.index("--")
    assert argv[sep + 1 :] == ["python3", "app.py", "--port", "9000"]
    opts = argv[:sep]
    for flag in (
        "--unshare-user",
        "--disable-userns",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
    ):
        assert flag in opts
    assert "--unshare-net" not in opts and "--unshare-all" not in opts  # the proxy needs loopback
    assert "--new-session" not in opts  # the sandbox stays in our process group
    assert pairs(opts, "--ro-bind") == [
        ["/usr", "/usr"],
        ["/etc", "/etc"],
        ["/opt/venv", "/opt/venv"],
        ["/srv/app", "/srv/app"],
        ["/dev/null", "/etc/miren/edge.toml"],
    ]
    assert pairs(opts, "--symlink") == [["usr/bin", "/bin"], ["usr/lib", "/lib"]]
    assert opts[opts.index("--dev") + 1] == "/dev" and opts[opts.index("--proc") + 1] == "/proc"
    tmpfs = [opts[i + 1] for i, a in enumerate(opts) if a == "--tmpfs"]
    assert tmpfs == ["/tmp", "/srv/app/.miren"]
    assert opts[opts.index("--tmpfs") - 2 :][:2] == ["--size", str(256 * 1024 * 1024)]
    # Each mask comes after the bind it covers, or the bind would cover the mask.
    assert opts.index("/srv/app/.miren") > opts.index("/srv/app")
    assert "/var/lib/miren" not in opts
    assert opts[-2:] == ["--chdir", "/srv/app"]


def test_bwrap_command_line_variants() -> None:
    writable = bwrap_argv(bwrap_iso(writable_cwd=True), ["app"], "/srv/app")
    assert pairs(writable, "--bind") == [["/srv/app", "/srv/app"]]
    no_cwd = bwrap_argv(bwrap_iso(), ["app"], None)
    assert no_cwd[no_cwd.index("--chdir") + 1] == "/tmp" and "/srv/app" not in no_cwd
    old = bwrap_argv(bwrap_iso(version=(0, 4, 1)), ["app"], None)  # before 0.8: no such options
    assert "--disable-userns" not in old and "--size" not in old
    unlimited = bwrap_argv(bwrap_iso(tmp_size=0), ["app"], None)
    assert "--size" not in unlimited


def test_paths_that_cannot_be_confined() -> None:
    iso = bwrap_iso()
    assert path_refusal(iso, "/srv/app") is None
    assert path_refusal(iso, None) is None
    assert "inside the hidden path /var/lib/miren" in (path_refusal(iso, "/var/lib/miren/x") or "")
    assert "expose the whole host" in (path_refusal(iso, "/") or "")
    user = choose(IsolationConfig(mode=USER), euid=0, bwrap=NO_BWRAP, layout=LAYOUT)
    assert path_refusal(user, "/var/lib/miren/x") is None  # permissions, not binds, apply there


def test_sandbox_env() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root", "USER": "root", "LOGNAME": "root"}
    none = choose(IsolationConfig(mode=NONE), euid=0, bwrap=NO_BWRAP)
    assert sandbox_env(none, base, None) == base
    root = bwrap_iso()
    assert sandbox_env(root, base, "/tmp") == {
        "PATH": "/usr/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
    }
    mine = {**base, "USER": "edge", "LOGNAME": "edge"}
    assert sandbox_env(bwrap_iso(euid=1000), mine, "/tmp") == {
        **mine,
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
    }


def test_parse_bwrap_version() -> None:
    assert parse_bwrap_version("bubblewrap 0.8.0\n") == (0, 8, 0)
    assert parse_bwrap_version("garbage") == ()


def test_read_layout(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "token").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    config = IsolationConfig(
        mode=AUTO,
        hidden_paths=[tmp_path / "link", tmp_path / "token", tmp_path / "gone"],
        ro_paths=[tmp_path / "link"],
    )
    layout = read_layout(config)
    assert layout.hidden == (
        HiddenPath(str(tmp_path / "data"), "dir"),
        HiddenPath(str(tmp_path / "link"), "dir"),  # the name it was given is hidden too
        HiddenPath(str(tmp_path / "token"), "file"),
        HiddenPath(str(tmp_path / "gone"), "missing"),
    )
    assert layout.ro_paths == (str(tmp_path / "data"),)
    assert ("/usr", None) in layout.system
    for path, target in layout.system:
        assert (target is not None) == os.path.islink(path)


async def test_runtime_repr_and_default() -> None:
    runtime = ProcessRuntime()
    assert repr(runtime) == "<ProcessRuntime host=127.0.0.1 isolation=none?>"
    iso = await runtime.prepare()
    assert iso.mode is NONE and runtime.isolation is iso
    assert repr(runtime).endswith(" isolation=none>")


# -- real sandboxes -----------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SANDBOX_PY, os.X_OK),
    reason=f"starts sandboxes as another uid: needs root, and {SANDBOX_PY} for the sandboxes",
)


@functools.cache
def bwrap_usable_as_sandbox_uid() -> bool:
    bwrap = shutil.which("bwrap")
    if bwrap is None or os.geteuid() != 0:
        return False
    argv = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--", bwrap]
    argv += ["--unshare-user", "--unshare-pid", "--ro-bind", "/", "/", "true"]
    return subprocess.run(argv, check=False, capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def bwrap_ok() -> None:
    if not bwrap_usable_as_sandbox_uid():
        pytest.skip("bubblewrap is not usable here (missing, or no user namespaces)")


@attrs.frozen
class World:
    """A world-readable tree the sandbox uid can reach, removed after the test.

    app/ (the cwd) holds data/secret and config.toml, both hidden in the bwrap tests and both
    world-readable, so that only the sandbox's mounts keep them out; edge-data/ is the edge's
    data dir (0700, hidden, bound nowhere)."""

    base: Path
    marker: str

    @property
    def app(self) -> Path:
        return self.base / "app"

    @property
    def data(self) -> Path:
        return self.app / "data"

    @property
    def config(self) -> Path:
        return self.app / "config.toml"

    @property
    def edge_data(self) -> Path:
        return self.base / "edge-data"

    @property
    def logs(self) -> Path:
        return self.base / "logs"


@pytest.fixture
def world() -> Iterator[World]:
    # Not below /tmp: a bind below the sandbox's /tmp would show up in its listing.
    var_tmp = "/var/tmp" if os.path.isdir("/var/tmp") else None
    base = Path(tempfile.mkdtemp(prefix="miren-isolation-", dir=var_tmp))
    w = World(base, f"miren-secret-{os.urandom(8).hex()}")
    try:
        base.chmod(0o755)
        w.data.mkdir(parents=True)
        for d in (w.app, w.data):
            d.chmod(0o755)
        (w.data / "secret").write_text(w.marker)
        w.config.write_text(f'admin_token = "{w.marker}"\n')
        w.edge_data.mkdir(mode=0o700)
        (w.edge_data / "admin-token").write_text(w.marker)
        w.logs.mkdir()
        os.chown(w.logs, UID, UID)  # an unprivileged edge writes its sandboxes' logs here
        yield w
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def handles() -> AsyncIterator[list[ProcessHandle]]:
    """Handles to stop at teardown; then nothing of their process groups may be left."""
    made: list[ProcessHandle] = []
    try:
        yield made
    finally:
        for h in made:
            await h.stop(0.0)
        for h in made:
            await wait_until(lambda h=h: not group_members(h.pid), 5.0, f"group {h.pid} gone")


def spec_for(
    world: World,
    command: tuple[str, ...],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    sandbox_id: str = "sb-iso",
) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=sandbox_id,
        app="app",
        version_id="app-v1",
        ephemeral_label="",
        service="web",
        spec=VersionSpec(
            runtime=Runtime.PROCESS,
            command=command,
            env=env or {},
            cwd=None if cwd is None else str(cwd),
            health_path="/health",
            boot_timeout=timedelta(seconds=30),
        ),
        ordinal=0,
        log_path=world.logs / f"{sandbox_id}.log",
    )


HOSTILE_CMD = (SANDBOX_PY, "-S", str(HOSTILE), "--port", "$PORT")
ECHO_SANDBOX_CMD = (SANDBOX_PY, "-S", str(ECHO), "--port", "$PORT")


async def boot(
    runtime: ProcessRuntime, spec: SandboxSpec, handles: list[ProcessHandle]
) -> ProcessHandle:
    handle = await runtime.start(spec)
    handles.append(handle)
    try:
        await asyncio.wait_for(handle.wait_ready(), 30)
    except BaseException:
        assert spec.log_path is not None
        print(spec.log_path.read_text())
        raise
    return handle


async def ask(port: int, path: str = "/", **query: str | int) -> dict[str, Any]:
    params = {k: str(v) for k, v in query.items()}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", params=params) as resp,
    ):
        assert resp.status == 200, resp.status
        data: dict[str, Any] = await resp.json(content_type=None)
        return data


def host_uids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of `pid` as the host sees it."""
    fields: dict[str, list[str]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return int(fields["Uid"][0]), int(fields["Gid"][0])


@contextlib.contextmanager
def inheritable_fd() -> Iterator[None]:
    """An inheritable fd in the edge while it spawns: uvloop hands such fds to the child (it
    ignores close_fds), so only the launcher keeps the sandbox from getting it."""
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        yield
    finally:
        os.close(r)
        os.close(w)


def assert_confined_basics(r: dict[str, Any]) -> None:
    assert (r["uid"], r["euid"], r["gid"], r["egid"]) == (UID, UID, UID, UID)
    assert r["groups"] == []  # no supplementary groups
    assert r["status"]["NoNewPrivs"] == "1"
    assert int(r["status"]["CapEff"], 16) == 0 and int(r["status"]["CapBnd"], 16) == 0
    # stdin, stdout, stderr and the directory fd of the listing itself: nothing inherited
    assert r["fds_at_start"] == ["0", "1", "2", "3"]


@needs_root
async def test_user_mode_runs_as_the_sandbox_uid_with_nothing_inherited(
    world: World, handles: list[ProcessHandle]
) -> None:
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="user", hidden_paths=[world.edge_data]))
    iso = await runtime.prepare()
    assert iso.mode is USER and iso.description.startswith("user: uid 65532 gid 65532")
    with inheritable_fd():
        handle = await boot(runtime, spec_for(world, HOSTILE_CMD, cwd=APPS), handles)
    assert host_uids(handle.pid) == (UID, UID)
    r = await ask(
        handle.port,
        pid=os.getpid(),
        dir=world.edge_data,
        file=world.edge_data / "admin-token",
        marker=world.marker,
    )
    assert_confined_basics(r)
    assert os.getpid() in r["pids"]  # no pid namespace: it sees us, but may not read us
    assert r["pid_environ"] == {"error": "PermissionError"}
    assert r["dir"] == {"error": "PermissionError"} and r["file"] == {"error": "PermissionError"}
    assert r["marker_in"] == []
    home = Path(r["home"])
    assert r["tmpdir"] == r["home"] and home.is_dir()
    st = home.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, UID, 0o700)
    await handle.stop(5.0)
    assert handle.returncode == -signal.SIGTERM
    assert not home.exists()  # the private home goes with the sandbox


@needs_root
async def test_bwrap_sandbox_sees_only_itself(
    bwrap_ok: None, world: World, handles: list[ProcessHandle]
) -> None:
    hidden = [world.edge_data, world.data, world.config]
    runtime = ProcessRuntime(
        isolation=IsolationConfig(mode="bwrap", hidden_paths=hidden, ro_paths=[APPS])
    )
    iso = await runtime.prepare()
    assert iso.mode is BWRAP, iso.description
    assert repr(runtime).endswith("isolation=bwrap>")
    with socket.create_server(("127.0.0.1", 0)) as listener:  # a loopback service of the host
        service = listener.getsockname()[1]
        with inheritable_fd():
            handle = await boot(runtime, spec_for(world, HOSTILE_CMD, cwd=world.app), handles)
        others = [p for p in group_members(handle.pid) if p != handle.pid]
        assert others and all(host_uids(p) == (UID, UID) for p in [handle.pid, *others])
        r = await ask(
            handle.port,
            pid=os.getpid(),
            dir=world.data,
            file=world.config,
            ports=f"{service},{handle.port}",
        )
    assert_confined_basics(r)
    assert r["pids"] == [1, 2]  # bubblewrap's init and itself: not us, not the host
    assert r["pid_environ"] == {"error": "FileNotFoundError"}
    assert r["tmp"] == [] and os.listdir("/tmp")  # its own empty /tmp, not the host's
    assert r["home"] == r["tmpdir"] == "/tmp"
    assert r["cwd"] == str(world.app) and not r["can_write_cwd"]  # read-only by default
    assert r["dir"] == {"entries": []}  # the hidden data dir: an empty tmpfs
    assert r["file"] == {"error": "PermissionError"}  # the hidden file: a nodev /dev/null
    edge = await ask(handle.port, dir=world.edge_data, file=world.edge_data / "admin-token")
    assert edge["dir"] == {"error": "FileNotFoundError"}  # bound nowhere: it does not exist
    assert edge["file"] == {"error": "FileNotFoundError"}
    assert r["ns"]["pid"] != os.readlink("/proc/self/ns/pid")
    assert r["ns"]["mnt"] != os.readlink("/proc/self/ns/mnt")
    # The network is shared on purpose: loopback services must authenticate.
    assert r["ports"] == [service, handle.port]


@needs_root
@pytest.mark.parametrize("writable", [False, True])
async def test_bwrap_cwd_is_read_only_unless_asked(
    bwrap_ok: None, world: World, handles: list[ProcessHandle], writable: bool
) -> None:
    shutil.copy(HOSTILE, world.app / "hostile.py")
    os.chown(world.app, UID, UID)  # the sandbox uid owns it: only the mount can refuse writes
    isolation = IsolationConfig(mode="bwrap", writable_cwd=writable)
    runtime = ProcessRuntime(isolation=isolation)
    command = (SANDBOX_PY, "-S", "hostile.py", "--port", "$PORT")
    handle = await boot(runtime, spec_for(world, command, cwd=world.app), handles)
    r = await ask(handle.port)
    assert r["can_write_cwd"] is writable


@needs_root
async def test_bwrap_stop_gives_the_app_its_sigterm(
    bwrap_ok: None, world: World, handles: list[ProcessHandle]
) -> None:
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="bwrap", ro_paths=[APPS]))
    handle = await boot(runtime, spec_for(world, ECHO_SANDBOX_CMD), handles)
    members = group_members(handle.pid)
    assert len(members) == 3  # bwrap's monitor (the leader), its init, the app
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await handle.stop(10.0)
    # The app died of the SIGTERM and the monitor exited normally with 128 + 15: had the monitor
    # been signalled too, it would have died of it (-15) and SIGKILLed the app at once.
    assert handle.returncode == 128 + signal.SIGTERM
    assert loop.time() - t0 < 5.0
    await wait_until(lambda: all(pid_gone(p) for p in members), 5.0, "the sandbox to be gone")


@needs_root
async def test_bwrap_stop_kills_an_app_that_ignores_sigterm(
    bwrap_ok: None, world: World, handles: list[ProcessHandle]
) -> None:
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="bwrap", ro_paths=[APPS]))
    spec = spec_for(world, ECHO_SANDBOX_CMD, env={"ECHO_IGNORE_SIGTERM": "1"})
    handle = await boot(runtime, spec, handles)
    members = group_members(handle.pid)
    await handle.stop(0.3)
    assert handle.returncode == -signal.SIGKILL
    await wait_until(lambda: all(pid_gone(p) for p in members), 5.0, "the sandbox to be gone")


@needs_root
async def test_a_sandbox_without_its_bubblewrap_refuses_to_start(world: World) -> None:
    missing = "/nonexistent/bwrap"
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="bwrap", bwrap=missing))
    iso = await runtime.prepare()
    assert iso.refusal is not None and f"{missing} not found" in iso.refusal
    assert repr(runtime).endswith("isolation=refused>")
    with pytest.raises(BootFailed, match=r'sandbox\.isolation = "bwrap" but bubblewrap') as err:
        await runtime.start(spec_for(world, HOSTILE_CMD))
    assert err.value.sandbox_id == "sb-iso"
    # auto falls back to the uid switch as root (and the unprivileged refusal is tested below)
    fallback = await ProcessRuntime(isolation=IsolationConfig(mode="auto", bwrap=missing)).prepare()
    assert (
        fallback.mode is USER and fallback.fallback == f"bubblewrap unusable: {missing} not found"
    )


@needs_root
async def test_a_cwd_inside_a_hidden_path_is_refused(bwrap_ok: None, world: World) -> None:
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="bwrap", hidden_paths=[world.app]))
    with pytest.raises(BootFailed, match="inside the hidden path"):
        await runtime.start(spec_for(world, HOSTILE_CMD, cwd=world.data))


@needs_root
async def test_an_activator_serves_through_bubblewrap(
    bwrap_ok: None, make_activator: ActivatorFactory
) -> None:
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="auto", ro_paths=[APPS]))
    act = await make_activator(runtimes={Runtime.PROCESS: runtime})
    assert runtime.isolation is not None  # Activator.start prepared it
    assert runtime.isolation.mode is BWRAP
    lease = await act.acquire(make_version(command=ECHO_SANDBOX_CMD))
    try:
        body = await get_json(lease)
    finally:
        act.release(lease)
    assert body["pid"] == 2  # its pid inside the sandbox's pid namespace


FRAMEWORKS = {
    "uvicorn+starlette": (
        ("uvicorn", "starlette"),
        (
            SANDBOX_PY,
            "-m",
            "uvicorn",
            "starlette_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            "$PORT",
        ),
    ),
    "gunicorn+flask": (
        ("gunicorn", "flask"),
        (SANDBOX_PY, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:$PORT", "flask_app:app"),
    ),
}


@needs_root
@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
async def test_real_frameworks_run_under_bubblewrap(
    bwrap_ok: None, world: World, handles: list[ProcessHandle], name: str
) -> None:
    modules, command = FRAMEWORKS[name]
    check = subprocess.run(
        [SANDBOX_PY, "-c", f"import {', '.join(modules)}"], check=False, capture_output=True
    )
    if check.returncode != 0:
        debian = "python3-uvicorn python3-starlette gunicorn python3-flask"
        pytest.skip(f"{SANDBOX_PY} lacks {modules} (Debian packages: {debian})")
    runtime = ProcessRuntime(isolation=IsolationConfig(mode="bwrap"))
    handle = await boot(runtime, spec_for(world, command, cwd=APPS), handles)
    for _ in range(4):  # (with gunicorn, the forked workers answer)
        r = await ask(handle.port)
        assert r["uid"] == UID and r["framework"] in name
    if name.startswith("uvicorn"):
        assert r["tmp"].startswith("/tmp/")
    members = group_members(handle.pid)
    await handle.stop(10.0)
    assert handle.returncode in (0, 128 + signal.SIGTERM)  # a graceful exit, not a SIGKILL
    await wait_until(lambda: all(pid_gone(p) for p in members), 5.0, "the sandbox to be gone")


# -- the edge as its own process ----------------------------------------------------------------------


def as_sandbox_uid(argv: list[str]) -> list[str]:
    """Run `argv` (our interpreter) as the unprivileged UID. If our interpreter sits below a
    directory that uid cannot enter (pyenv in a 0700 /root), show it just that part of the file
    system first: root's bubblewrap, the whole host bound, a 0755 tmpfs over the closed
    directory and the way to the interpreter bound back on it."""
    setpriv = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--"]
    prefixes = {Path(os.path.realpath(sys.base_prefix)), Path(os.path.realpath(sys.prefix))}
    closed: set[Path] = set()
    reopen: set[Path] = set()  # what lies right below a closed directory on the way
    for prefix in prefixes:
        for parent in reversed(prefix.parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                closed.add(parent)
                reopen.add(parent / prefix.relative_to(parent).parts[0])
                break
    if not closed:
        return [*setpriv, *argv]
    bwrap = ["bwrap", "--dev-bind", "/", "/"]
    for c in sorted(closed):
        bwrap += ["--perms", "0755", "--tmpfs", str(c)]
    for r in sorted(reopen):
        bwrap += ["--ro-bind", str(r), str(r)]
    return [*bwrap, "--", *setpriv, *argv]


@contextlib.asynccontextmanager
async def edge(
    world: World, conf: dict[str, Any], *, unprivileged: bool = False
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, Any]]]:
    """tests/apps/edge_stub.py with `MIREN_ADMIN_TOKEN=<marker>` in its initial environment
    (what /proc/<pid>/environ shows), as root or as the sandbox uid; yields it and its report.
    At the end its stdin is closed (it stops its sandbox and exits), or it is killed."""
    conf = {"log": str(world.logs / "stub.log"), **conf}
    argv = [sys.executable, str(STUB), json.dumps(conf)]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MIREN_ADMIN_TOKEN": world.marker,
    }
    proc = await asyncio.create_subprocess_exec(
        *(as_sandbox_uid(argv) if unprivileged else argv),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, (
            (world.logs / "stub.log").read_text()
            if (world.logs / "stub.log").exists()
            else "no output"
        )
        yield proc, json.loads(line)
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


def hostile_conf(world: World, mode: str, **isolation: Any) -> dict[str, Any]:
    return {
        "isolation": {"mode": mode, "hidden_paths": [str(world.edge_data)], **isolation},
        "command": list(HOSTILE_CMD),
        "cwd": str(APPS),
    }


@needs_root
@pytest.mark.parametrize("mode", ["bwrap", "user", "none"])
async def test_the_edges_secret_is_out_of_reach(world: World, mode: str) -> None:
    if mode == "bwrap" and not bwrap_usable_as_sandbox_uid():
        pytest.skip("bubblewrap is not usable here")
    async with edge(world, hostile_conf(world, mode)) as (_, info):
        r = await ask(info["port"], marker=world.marker, pid=info["pid"])
    if mode == "none":
        # The control: unconfined, the sandbox runs as root and finds the token at once.
        assert r["uid"] == 0 and info["pid"] in r["marker_in"]
        return
    assert r["uid"] == UID
    assert r["marker_in"] == []
    assert r["pid_environ"] == {
        "error": "FileNotFoundError" if mode == "bwrap" else "PermissionError"
    }


@needs_root
@pytest.mark.parametrize("mode", ["bwrap", "user"])
async def test_sigkill_of_the_edge_leaves_no_sandbox_behind(world: World, mode: str) -> None:
    if mode == "bwrap" and not bwrap_usable_as_sandbox_uid():
        pytest.skip("bubblewrap is not usable here")
    token = str(900000 + int.from_bytes(os.urandom(3), "big") % 99999)
    command = [*ECHO_SANDBOX_CMD]
    if mode == "bwrap":
        # A daemon that left the process group: only the pid namespace can take it down.
        script = f'setsid sleep {token} & exec "$@"'
        command = ["/bin/sh", "-c", script, "sh", *ECHO_SANDBOX_CMD]
    # (The killed edge cannot remove the `user` sandbox's home: keep it in the world.)
    scratch = str(world.base / "scratch")
    conf = {
        "isolation": {"mode": mode, "ro_paths": [str(APPS)], "scratch_dir": scratch},
        "command": command,
    }
    async with edge(world, conf) as (proc, info):
        assert info.get("error") is None, info
        pids = group_members(info["leader"])
        if mode == "bwrap":
            await wait_until(lambda: bool(sleepers(token)), 5.0, "the daemon to start")
            pids += sleepers(token)
            assert len(pids) == 4
        assert pids and not any(pid_gone(p) for p in pids)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        await wait_until(
            lambda: all(pid_gone(p) for p in pids), 5.0, "every sandbox process to die"
        )


def sleepers(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{name}/cmdline").read_bytes() == f"sleep\0{token}\0".encode():
                    found.append(int(name))
    return found


@needs_root
async def test_an_unprivileged_edge_confines_through_a_user_namespace(
    bwrap_ok: None, world: World
) -> None:
    async with edge(world, hostile_conf(world, "auto"), unprivileged=True) as (_, info):
        assert info["euid"] == UID
        assert info["isolation"].startswith(f"bwrap: the edge's uid {UID} in a user namespace")
        r = await ask(
            info["port"],
            marker=world.marker,
            pid=info["pid"],
            dir=world.edge_data,
        )
    assert_confined_basics(r)  # the same uid as the edge, but in its own namespaces
    assert r["pids"] == [1, 2]
    assert r["marker_in"] == [] and r["pid_environ"] == {"error": "FileNotFoundError"}
    assert r["dir"] == {"error": "FileNotFoundError"}
    assert r["ns"]["user"] != os.readlink("/proc/self/ns/user")


@needs_root
async def test_an_unprivileged_edge_without_bubblewrap_refuses_unless_none(world: World) -> None:
    conf = hostile_conf(world, "auto", bwrap="/nonexistent/bwrap")
    async with edge(world, conf, unprivileged=True) as (_, info):
        assert info["euid"] == UID
        assert info["isolation"].startswith("refused: no sandbox isolation available")
        assert "install bubblewrap" in info["error"]
        assert 'sandbox.isolation = "none"' in info["error"]
    conf = hostile_conf(world, "none", bwrap="/nonexistent/bwrap")
    async with edge(world, conf, unprivileged=True) as (_, info):
        assert info.get("error") is None and info["isolation"].startswith("none: ")
        r = await ask(info["port"])
    assert r["uid"] == UID


@needs_root
@pytest.mark.parametrize("undumpable", [False, True])
async def test_an_undumpable_edge_hides_its_environment_from_its_own_uid(
    world: World, undumpable: bool
) -> None:
    # isolation "none" as the unprivileged uid: the sandbox shares the edge's uid and pid
    # namespace, the worst case that set_undumpable still covers.
    conf = {**hostile_conf(world, "none"), "undumpable": undumpable}
    async with edge(world, conf, unprivileged=True) as (_, info):
        r = await ask(info["port"], marker=world.marker, pid=info["pid"])
    assert r["uid"] == UID == info["euid"]
    if undumpable:
        assert r["marker_in"] == [] and r["pid_environ"] == {"error": "PermissionError"}
    else:
        assert info["pid"] in r["marker_in"] and r["pid_environ"] == {"ok": True}


def test_is_dumpable_reads_the_flag() -> None:
    assert is_dumpable()  # the test process itself was never made undumpable
