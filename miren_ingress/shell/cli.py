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
    """A failure to report on stderr (exit status 1)."""


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
            raise CliError(_server_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the miren server at {self.server}: {reason}") from None
        if not raw:
            return None
        return json.loads(raw)


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        err = body["error"]
        return f"{err['message']} ({err['code']}, HTTP {exc.code})"
    except Exception:
        return f"server answered HTTP {exc.code} {exc.reason}"


def q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


# -- output -------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def human_delta(seconds: float) -> str:
    """Floored: <1 min `Ns`, <1 h `Nm`, <24 h `Nh`, else `Nd`."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


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
            local = parse_time(exp).astimezone().strftime("%Y-%m-%d %H:%M:%S") if exp else "-"
            rows.append([v["id"], v.get("ephemeral_label", ""), ago(v["created_at"], now), local])
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
            print(f"  Expires: {answer['expires_at']}")
    else:
        print(f"Deployed version {version['id']} (active).")
    for url in answer.get("urls", []):
        print(f"  URL:   {url}")


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
    elif args.action == "versions":
        query = {"limit": str(args.limit)}
        if args.ephemeral:
            query["ephemeral"] = "true"
        versions = c.call("GET", f"/v1/apps/{q(args.app)}/versions?{urllib.parse.urlencode(query)}")
        print_versions(versions or [], args.ephemeral, args.format)


def cmd_route(args: argparse.Namespace, c: Client) -> None:
    if args.action == "set":
        body: dict[str, Any] = {"app": args.app, "default": args.default, "service": args.service}
        if args.timeout:
            body["request_timeout"] = args.timeout
        route = c.call("PUT", f"/v1/routes/{q(args.host)}", body)
        _out(args, route, f"Route {route['host']} -> app {route['app']}.")
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
        body["spec"] = spec
    if args.ephemeral is not None:
        try:
            label = normalize_branch(args.ephemeral)
        except InvalidLabel as exc:
            raise CliError(str(exc)) from None
        body["ephemeral"] = {"label": label, "ttl": args.ttl}
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
            rows = [["SANDBOX", "VERSION", "STATUS", "URL", "PID"]]
            rows += [
                [b["id"], b["version"], b["status"], b.get("url") or "-", str(b.get("pid") or "-")]
                for b in boxes
            ]
            print(table(rows))
    else:
        logs = c.call("GET", f"/v1/sandboxes/{q(args.id)}/logs?tail={args.tail}")
        if args.format == "json":
            print(json.dumps(logs, indent=2))
        else:
            for line in logs.get("lines", []):
                print(line)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miren", description="Miren edge: previews at the edge.")
    p.add_argument(
        "--server",
        default=os.environ.get("MIREN_SERVER", DEFAULT_SERVER),
        help="admin API address (env MIREN_SERVER; default %(default)s)",
    )
    p.add_argument(
        "--token-file",
        dest="token_file",
        help="file holding the admin token (default: $MIREN_ADMIN_TOKEN, else "
        "./.miren/admin-token, which `miren serve` writes on its first start)",
    )
    sub = p.add_subparsers(dest="command_name", required=True)

    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--format", choices=["text", "json"], default="text")

    # The keys' defaults and help are written once, with the config classes: `miren config`
    # prints them (importing them here would slow every other command down).
    s = sub.add_parser(
        "serve",
        help="run the edge proxy and the admin API",
        epilog="Every key, its default, its MIREN_* variable and its meaning: `miren config`.",
    )
    s.add_argument("--config", help="TOML config file")
    s.add_argument("--listen", metavar="HOST:PORT", help="proxy listener (key listen)")
    s.add_argument(
        "--admin-listen", dest="admin_listen", metavar="HOST:PORT", help="(key admin_listen)"
    )
    s.add_argument("--store", help="memory | embedded | etcd://h1:2379,h2:2379 (key store)")
    s.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="(key data_dir)")
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

    a = sub.add_parser("app", help="apps and their versions")
    asub = a.add_subparsers(dest="action", required=True)
    x = asub.add_parser("create", parents=[fmt])
    x.add_argument("name")
    asub.add_parser("list", parents=[fmt])
    x = asub.add_parser("delete", parents=[fmt])
    x.add_argument("name")
    x = asub.add_parser("versions", parents=[fmt])
    x.add_argument("--app", "-a", required=True)
    x.add_argument("--ephemeral", action="store_true", help="only preview versions")
    x.add_argument("--limit", "-n", type=int, default=20)

    r = sub.add_parser("route", help="host routes")
    rsub = r.add_subparsers(dest="action", required=True)
    x = rsub.add_parser("set", parents=[fmt])
    x.add_argument("host")
    x.add_argument("--app", "-a", required=True)
    x.add_argument("--default", action="store_true")
    x.add_argument("--service", default="web")
    x.add_argument("--timeout", help="request timeout, e.g. 60s")
    rsub.add_parser("list", parents=[fmt])
    x = rsub.add_parser("rm", parents=[fmt])
    x.add_argument("host")

    d = sub.add_parser("deploy", parents=[fmt], help="deploy a version (active or preview)")
    d.add_argument("--app", "-a", required=True)
    d.add_argument("--ephemeral", metavar="LABEL_OR_BRANCH", help="deploy as a preview")
    d.add_argument("--ttl", default="24h", help="preview lifetime (default 24h)")
    d.add_argument("--env", "-e", action="append", default=[], metavar="K=V")
    d.add_argument("--upstream", action="append", metavar="URL", help="serve from running URL(s)")
    d.add_argument("--version", "-V", help="redeploy (or preview) an existing version")
    d.add_argument("--health-path", dest="health_path", help="'' for a TCP check")
    d.add_argument(
        "--cwd",
        help="directory the command runs in, on the server (default: this one, absolute)",
    )
    d.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... to run")

    e = sub.add_parser("ephemeral", help="manage previews")
    esub = e.add_subparsers(dest="action", required=True)
    x = esub.add_parser("extend", parents=[fmt])
    x.add_argument("label")
    x.add_argument("--app", "-a", required=True)
    x.add_argument("--ttl", required=True)
    x = esub.add_parser("rm", parents=[fmt])
    x.add_argument("label")
    x.add_argument("--app", "-a", required=True)

    b = sub.add_parser("sandbox", help="running sandboxes")
    bsub = b.add_subparsers(dest="action", required=True)
    x = bsub.add_parser("list", parents=[fmt])
    x.add_argument("--app", "-a", required=True)
    x = bsub.add_parser("logs", parents=[fmt])
    x.add_argument("id")
    x.add_argument("--tail", type=int, default=200)
    return p


COMMANDS = {
    "app": cmd_app,
    "route": cmd_route,
    "deploy": cmd_deploy,
    "ephemeral": cmd_ephemeral,
    "sandbox": cmd_sandbox,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command_name == "serve":
        return cmd_serve(args)
    if args.command_name == "config":
        return cmd_config(args)
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
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
