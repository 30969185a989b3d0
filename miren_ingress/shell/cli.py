"""`miren`: the command line. `miren serve` runs the edge; every other command calls the admin API.

Library code raises; only this module exits, mapping errors to a message on stderr and a non-zero
status. `--format json` prints JSON only (`[]` when empty), so scripts can parse stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8081"


class CliError(Exception):
    """A failure to report on stderr (exit status 1); `details` are printed below it."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


# -- HTTP client ----------------------------------------------------------------------------------


class Client:
    def __init__(self, server: str, token: str, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _server_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(
                f"cannot reach the miren server at {self.server} (set by --server or "
                f"MIREN_SERVER): {reason}"
            ) from None
        if not raw:
            return None
        return json.loads(raw)


def _server_error(exc: urllib.error.HTTPError) -> CliError:
    """The admin API's `{"error": {"code", "message", "details"?}}` as a CliError."""
    try:
        err = json.loads(exc.read())["error"]
        message = f"{err['message']} ({err['code']}, HTTP {exc.code})"
        details = err.get("details") or {}
    except Exception:
        return CliError(f"server answered HTTP {exc.code} {exc.reason}")
    lines: list[str] = []
    if err.get("code") == "boot_failed":
        message = f"deploy failed: {message}"
        sandbox = details.get("sandbox")
        log = details.get("log") or []
        if sandbox:
            lines.append(
                f"Last {len(log)} lines of its log (all of it: miren sandbox logs {sandbox}):"
                if log
                else f"Its log is empty (miren sandbox logs {sandbox})."
            )
            lines += [f"  {printable(line)}" for line in log]
    return CliError(message, lines)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F)}
_CONTROL.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})


def printable(line: str) -> str:
    """A sandbox's log line made safe for a terminal: a preview's code writes it, so control
    characters (escape sequences that could retitle, recolour or rewrite the screen) are shown
    escaped (`\\x1b`), tabs kept."""
    return line.translate(_CONTROL)


def q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


# -- output -------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_delta(seconds: float) -> str:
    """The two largest units, floored, a zero second unit left out: `45s`, `1m 5s`, `23h 59m`,
    `1d 23h` (47h59m), `1d` (24h00m)."""
    s = max(0, int(seconds))
    if s == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in _UNITS:
        if s >= size or parts:
            n, s = divmod(s, size)
            parts.append(f"{n}{unit}")
            if len(parts) == 2:
                break
    if len(parts) == 2 and parts[1].startswith("0"):
        parts.pop()
    return " ".join(parts)


def show_time(text: str) -> str:
    """A time from the API as the CLI prints it: RFC 3339, UTC, whole seconds."""
    return parse_time(text).astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(text: str, now: datetime) -> str:
    return human_delta(max(0.0, (now - parse_time(text)).total_seconds())) + " ago"


def label_column(v: dict[str, Any], now: datetime) -> str:
    label = str(v.get("ephemeral_label") or "")
    if not label:
        return ""
    expires = v.get("expires_at")
    if not expires:
        return label
    left = (parse_time(expires) - now).total_seconds()
    return f"{label} (expired)" if left <= 0 else f"{label} (expires in {human_delta(left)})"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def print_versions(versions: list[dict[str, Any]], ephemeral_only: bool, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(versions, indent=2))
        return
    now = datetime.now(UTC)
    if not versions:
        print("No ephemeral versions found." if ephemeral_only else "No versions found.")
        return
    if ephemeral_only:
        rows = [["VERSION", "LABEL", "CREATED", "EXPIRES"]]
        for v in versions:
            exp = v.get("expires_at")
            shown = show_time(exp) if exp else "-"
            rows.append([v["id"], v.get("ephemeral_label", ""), ago(v["created_at"], now), shown])
    else:
        rows = [["VERSION", "STATUS", "CREATED", "LABEL"]]
        for v in versions:
            rows.append([v["id"], v["status"], ago(v["created_at"], now), label_column(v, now)])
    print(table(rows))


def print_deploy(answer: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(answer, indent=2))
        return
    version = answer["version"]
    if answer.get("status") == "ephemeral":
        print(f"Ephemeral version {version['id']} created.")
        print(f"  Label: {version.get('ephemeral_label', '')}")
        print(f"  TTL:   {version.get('ephemeral_ttl', '')}")
        if answer.get("expires_at"):
            print(f"  Expires: {show_time(answer['expires_at'])}")
    else:
        print(f"Deployed version {version['id']} (active).")
    ready = answer.get("ready")
    if ready:
        print(f"  Ready: sandbox {ready['sandbox']} healthy after {ready['seconds']:.2f}s")
    for url in answer.get("urls", []):
        print(f"  URL:   {url}")
    for gone in answer.get("evicted", []):
        print(f"  Evicted: {gone['id']} ({gone['label']}): over the app's preview limit")


# -- commands -----------------------------------------------------------------------------------


def cmd_app(args: argparse.Namespace, c: Client) -> None:
    if args.action == "create":
        app = c.call("POST", "/v1/apps", {"name": args.name})
        _out(args, app, f"App {app['name']} created.")
    elif args.action == "list":
        apps = c.call("GET", "/v1/apps")
        if args.format == "json":
            print(json.dumps(apps, indent=2))
        elif not apps:
            print("No apps found.")
        else:
            rows = [["NAME", "ACTIVE VERSION", "CREATED"]]
            now = datetime.now(UTC)
            rows += [
                [a["name"], a["active_version"] or "-", ago(a["created_at"], now)] for a in apps
            ]
            print(table(rows))
    elif args.action == "delete":
        c.call("DELETE", f"/v1/apps/{q(args.name)}")
        _out(args, {"deleted": args.name}, f"App {args.name} deleted.")
    elif args.action == "protect":
        body: dict[str, Any] = {"mode": args.mode}
        for key, source in (("password", args.password_file), ("bypass_token", args.token_file_in)):
            if source is not None:
                body[key] = _read_secret(source)
        p = c.call("PUT", f"/v1/apps/{q(args.name)}/protection", body)
        _out(args, p, f"App {p['app']}: protection {p['mode']} (password "
             f"{'set' if p['password_set'] else 'not set'}, bypass token "
             f"{'set' if p['bypass_token_set'] else 'not set'}).")  # fmt: skip
    elif args.action == "versions":
        query = {"limit": str(args.limit)}
        if args.ephemeral:
            query["ephemeral"] = "true"
        versions = c.call("GET", f"/v1/apps/{q(args.app)}/versions?{urllib.parse.urlencode(query)}")
        print_versions(versions or [], args.ephemeral, args.format)


def _read_secret(source: str) -> str:
    """A secret from a file, or from stdin for `-` (never from the command line: `ps` shows it)."""
    try:
        if source == "-":
            text = sys.stdin.readline()
        else:
            with open(source) as f:
                text = f.readline()
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None
    return text.rstrip("\r\n")


def cmd_route(args: argparse.Namespace, c: Client) -> None:
    if args.action == "set":
        body: dict[str, Any] = {"app": args.app, "default": args.default, "service": args.service}
        if args.timeout:
            body["request_timeout"] = args.timeout
        if args.force:
            body["force"] = True
        route = c.call("PUT", f"/v1/routes/{q(args.host)}", body)
        taken = f" (taken from app {route['taken_from']})" if route.get("taken_from") else ""
        _out(args, route, f"Route {route['host']} -> app {route['app']}{taken}.")
    elif args.action == "list":
        routes = c.call("GET", "/v1/routes")
        if args.format == "json":
            print(json.dumps(routes, indent=2))
        elif not routes:
            print("No routes found.")
        else:
            rows = [["HOST", "APP", "DEFAULT", "SERVICE"]]
            rows += [
                [r["host"], r["app"], "yes" if r["default"] else "", r["service"]] for r in routes
            ]
            print(table(rows))
    elif args.action == "rm":
        c.call("DELETE", f"/v1/routes/{q(args.host)}")
        _out(args, {"deleted": args.host}, f"Route {args.host} removed.")


def cmd_deploy(args: argparse.Namespace, c: Client) -> None:
    from miren_store.deploy.errors import InvalidLabel
    from miren_store.deploy.labels import normalize_branch

    body: dict[str, Any] = {}
    sources = [bool(args.command), bool(args.upstream), bool(args.version)]
    if sum(sources) != 1:
        raise CliError("give exactly one of: -- COMMAND..., --upstream URL, --version ID")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    if args.version and args.boot_timeout is not None:
        raise CliError("--boot-timeout cannot be combined with --version (its spec is reused)")
    if args.version:
        if env:
            raise CliError("--env cannot be combined with --version (the version's spec is reused)")
        body["from_version"] = args.version
    else:
        spec: dict[str, Any] = {"env": env}
        if args.command:
            command = args.command[1:] if args.command[0] == "--" else args.command
            # The command runs where the user is: its relative paths name their files. (For a
            # remote server, give the directory the files have there: --cwd.)
            spec.update(runtime="process", command=command, cwd=args.cwd or os.getcwd())
        else:
            spec.update(runtime="upstream", urls=args.upstream)
        if args.health_path is not None:
            spec["health_path"] = None if args.health_path == "" else args.health_path
        if args.boot_timeout is not None:
            spec["boot_timeout"] = args.boot_timeout
        body["spec"] = spec
    if args.ephemeral is not None:
        try:
            label = normalize_branch(args.ephemeral)
        except InvalidLabel as exc:
            raise CliError(str(exc)) from None
        body["ephemeral"] = {"label": label, "ttl": args.ttl}
    if args.wait:
        body["wait"] = True
    answer = c.call("POST", f"/v1/apps/{q(args.app)}/deploys", body)
    print_deploy(answer, args.format)


def cmd_ephemeral(args: argparse.Namespace, c: Client) -> None:
    path = f"/v1/apps/{q(args.app)}/ephemeral/{q(args.label)}"
    if args.action == "extend":
        v = c.call("PATCH", path, {"ttl": args.ttl})
        _out(args, v, f"Preview {args.label} now expires at {v.get('expires_at')}.")
    else:
        c.call("DELETE", path)
        _out(args, {"deleted": args.label}, f"Preview {args.label} deleted.")


def cmd_sandbox(args: argparse.Namespace, c: Client) -> None:
    if args.action == "list":
        boxes = c.call("GET", f"/v1/apps/{q(args.app)}/sandboxes")
        if args.format == "json":
            print(json.dumps(boxes, indent=2))
        elif not boxes:
            print("No sandboxes found.")
        else:
            rows = [["SANDBOX", "VERSION", "STATUS", "REASON", "URL", "PID"]]
            rows += [
                [
                    b["id"],
                    b["version"],
                    b["status"],
                    b.get("reason") or "-",
                    b.get("url") or "-",
                    str(b.get("pid") or "-"),
                ]
                for b in boxes
            ]
            print(table(rows))
    else:
        logs = c.call("GET", f"/v1/sandboxes/{q(args.id)}/logs?tail={args.tail}")
        if args.format == "json":
            print(json.dumps(logs, indent=2))
        else:
            for line in logs.get("lines", []):
                print(printable(line))


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "format", "text") == "json" else text)


def cmd_serve(args: argparse.Namespace) -> int:
    from miren_ingress.shell.config import ConfigError, load_config, parse_set
    from miren_ingress.shell.serve import run

    overrides: dict[str, Any] = parse_set(args.set or [])
    for key in ("listen", "admin_listen", "store", "data_dir"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"miren serve: {exc}", file=sys.stderr)
        return 2
    return run(config, config_path=args.config)


def cmd_config(args: argparse.Namespace) -> int:
    """`miren config`: every key of the serve configuration, its default and its help."""
    from miren_ingress.shell import reference

    if args.format == "json":
        print(reference.as_json())
    elif args.format == "markdown":
        print(reference.markdown_table(), end="")
    else:
        print(reference.text(), end="")
    return 0


# -- parser -------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("miren-edge")
    except PackageNotFoundError:
        return "unknown"


def _client_flags(*, suppress: bool) -> argparse.ArgumentParser:
    """--server, --token-file and --format, accepted before and after the subcommand: the
    top-level parser holds the defaults, each subcommand's copy (`suppress`) sets only what is
    given there."""
    flags = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS
    flags.add_argument(
        "--server",
        metavar="URL",
        default=default if suppress else os.environ.get("MIREN_SERVER", DEFAULT_SERVER),
        help=f"admin API address (env MIREN_SERVER; default {DEFAULT_SERVER})",
    )
    flags.add_argument(
        "--token-file",
        dest="token_file",
        metavar="FILE",
        default=default if suppress else None,
        help="file holding the admin token (default: $MIREN_ADMIN_TOKEN, else "
        "./.miren/admin-token, which `miren serve` writes on its first start)",
    )
    flags.add_argument(
        "--format",
        choices=["text", "json"],
        default=default if suppress else "text",
        help="text tables, or JSON only on stdout (`[]` when empty) for scripts",
    )
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="miren",
        description="Miren edge: previews at the edge. `miren serve` runs it; every other "
        "command calls its admin API.",
        parents=[_client_flags(suppress=False)],
    )
    p.add_argument("--version", action="version", version=f"miren {_version()}")
    sub = p.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    client = [_client_flags(suppress=True)]

    def command(
        parent: Any, name: str, text: str, *, flags: bool = True
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name, help=text, description=text, parents=client if flags else []
        )
        return parser

    # The keys' defaults and help are written once, with the config classes: `miren config`
    # prints them (importing them here would slow every other command down).
    s = sub.add_parser(
        "serve",
        help="run the edge proxy and the admin API",
        description="Run the edge proxy and the admin API until SIGTERM or Ctrl-C.",
        epilog="Every key, its default, its MIREN_* variable and its meaning: `miren config`.",
    )
    s.add_argument("--config", metavar="FILE", help="TOML config file")
    s.add_argument("--listen", metavar="HOST:PORT", help="proxy listener (key listen)")
    s.add_argument(
        "--admin-listen", dest="admin_listen", metavar="HOST:PORT", help="admin API listener"
    )
    s.add_argument("--store", help="memory | embedded | etcd://h1:2379,h2:2379 (key store)")
    s.add_argument(
        "--data-dir", dest="data_dir", metavar="DIR", help="state, token and logs (key data_dir)"
    )
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, e.g. --set ephemeral.max_ttl=7d",
    )

    c = sub.add_parser(
        "config",
        help="list the keys of the serve configuration, their defaults and help",
        description="Every key of `miren serve`'s configuration, with its default, its "
        "environment variable and its meaning.",
    )
    c.add_argument(
        "--format",
        choices=["text", "json", "markdown"],
        default="text",
        help="markdown: the README's table",
    )

    a = command(sub, "app", "apps and their versions", flags=False)
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = command(asub, "create", "create an app")
    x.add_argument("name", help="lowercase letters, digits and dashes")
    command(asub, "list", "list the apps and their active versions")
    x = command(asub, "delete", "delete an app with its routes, versions and sandboxes")
    x.add_argument("name", help="the app")
    x = command(asub, "protect", "protect an app's previews (or all its hosts) with a password")
    x.add_argument("name", help="the app")
    x.add_argument(
        "--mode", choices=["none", "previews", "all"], required=True, help="what is protected"
    )
    x.add_argument(
        "--password-file", dest="password_file", metavar="FILE",
        help="the shared password, from FILE ('-': stdin)",
    )  # fmt: skip
    x.add_argument(
        "--bypass-token-file", dest="token_file_in", metavar="FILE",
        help="a token CI sends as X-Miren-Bypass, from FILE ('-': stdin)",
    )  # fmt: skip
    x = command(asub, "versions", "list an app's versions, newest first")
    x.add_argument("--app", "-a", required=True, help="the app")
    x.add_argument("--ephemeral", action="store_true", help="only preview versions")
    x.add_argument(
        "--limit", "-n", type=int, default=20, help="at most this many (default 20; 0: all)"
    )

    r = command(sub, "route", "host routes", flags=False)
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = command(rsub, "set", "route a host (exact, or *.base) to an app")
    x.add_argument("host", help="app.example.com or *.example.com")
    x.add_argument("--app", "-a", required=True, help="the app that serves it")
    x.add_argument("--default", action="store_true", help="also serve hosts nothing else routes")
    x.add_argument("--service", default="web", help="the app's service (default web)")
    x.add_argument("--timeout", help="request timeout, e.g. 60s")
    x.add_argument(
        "--force", action="store_true", help="take the host from the app that has it now"
    )
    command(rsub, "list", "list the routes")
    x = command(rsub, "rm", "remove a host's route")
    x.add_argument("host", help="the route's host")

    d = command(sub, "deploy", "deploy a version (active) or a preview (--ephemeral)")
    d.add_argument("--app", "-a", required=True, help="the app")
    d.add_argument("--ephemeral", metavar="LABEL_OR_BRANCH", help="deploy as a preview")
    d.add_argument("--ttl", help="preview lifetime, e.g. 2h or 7d (default: the server's, 24h)")
    d.add_argument(
        "--wait",
        action="store_true",
        help="boot one sandbox and wait until it is healthy; on failure print why and its "
        "log, exit 1, and keep the previous version active",
    )
    d.add_argument(
        "--boot-timeout",
        dest="boot_timeout",
        metavar="DURATION",
        help="how long a sandbox may take to pass its health check (default 60s)",
    )
    d.add_argument(
        "--env", "-e", action="append", default=[], metavar="K=V", help="environment variable"
    )
    d.add_argument("--upstream", action="append", metavar="URL", help="serve from running URL(s)")
    d.add_argument("--version", "-V", help="redeploy (or preview) an existing version")
    d.add_argument(
        "--health-path", dest="health_path", help="health check path (default /; '' for TCP)"
    )
    d.add_argument(
        "--cwd",
        help="directory the command runs in, on the server (default: this one, absolute)",
    )
    d.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... to run")

    e = command(sub, "ephemeral", "manage previews", flags=False)
    esub = e.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = command(esub, "extend", "give a preview a new lifetime, from now")
    x.add_argument("label", help="the preview's label")
    x.add_argument("--app", "-a", required=True, help="the app")
    x.add_argument("--ttl", required=True, help="the new lifetime from now, e.g. 48h")
    x = command(esub, "rm", "delete a preview now")
    x.add_argument("label", help="the preview's label")
    x.add_argument("--app", "-a", required=True, help="the app")

    b = command(sub, "sandbox", "running and recently ended sandboxes", flags=False)
    bsub = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = command(bsub, "list", "an app's sandboxes, with why each ended")
    x.add_argument("--app", "-a", required=True, help="the app")
    x = command(bsub, "logs", "the end of a sandbox's log")
    x.add_argument("id", help="the sandbox (sb-...)")
    x.add_argument("--tail", type=int, default=200, help="lines (default 200)")
    return p


def value_options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(the option strings that take a value, every option string) of a parser and its
    subcommands."""
    takes: set[str] = set()
    every: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                t, e = value_options(child)
                takes |= t
                every |= e
            continue
        every.update(action.option_strings)
        if action.option_strings and action.nargs is None and action.const is None:
            takes.update(action.option_strings)
    return takes, every


def attach_dashed_values(argv: Sequence[str], takes: set[str], every: set[str]) -> list[str]:
    """`--ttl -1h` as `--ttl=-1h`: argparse would read a value that starts with a dash as a
    missing one, so a negative value never reached the server's validation. Stops at `--`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in takes and nxt is not None and nxt.startswith("-") and nxt not in every:
            if nxt == "--":
                out.append(arg)
            else:
                out.append(f"{arg}={nxt}")
                i += 2
                continue
        else:
            out.append(arg)
        i += 1
    return out


COMMANDS = {
    "app": cmd_app,
    "route": cmd_route,
    "deploy": cmd_deploy,
    "ephemeral": cmd_ephemeral,
    "sandbox": cmd_sandbox,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # here, so a reader that went away is seen now
    except BrokenPipeError:
        # `miren ... | head -1`: the reader has what it wanted. End quietly, as a C tool does
        # (128 + SIGPIPE), with stdout pointed elsewhere so the interpreter's last flush is too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status


def _main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_dashed_values(argv, *value_options(parser)))
    if args.command_name == "serve":
        return cmd_serve(args)
    if args.command_name == "config":
        return cmd_config(args)
    if args.command_name == "deploy" and args.ttl is not None and args.ephemeral is None:
        parser.error("--ttl applies to previews only: give --ephemeral LABEL too")
    from miren_ingress.admin.token import cli_token

    try:
        token = cli_token(os.environ, args.token_file)
    except OSError as exc:
        print(f"miren: cannot read --token-file: {exc}", file=sys.stderr)
        return 1
    client = Client(args.server, token)
    try:
        COMMANDS[args.command_name](args, client)
    except CliError as exc:
        print(f"miren: {exc}", file=sys.stderr)
        for line in exc.details:
            print(line, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
