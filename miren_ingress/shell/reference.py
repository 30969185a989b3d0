"""Every config key with its default and help, for `miren config` and the README.

Rendered from the declarations (`miren_ingress.shell.config.KEYS`), never written by hand: the
README's configuration table is `markdown_table()`, and a test keeps the two equal.
"""

from __future__ import annotations

import json
import re
import textwrap

from miren_ingress.shell.config import KEYS, Key

# `<label>.<cluster_hostname>`: a placeholder would be an HTML tag in Markdown.
_PLACEHOLDER = re.compile(r"[^\s(]*<[^>]+>[^\s),;]*")

HOW_TO_SET = (
    "Set a key in the TOML file given to `miren serve --config` (`[section]` tables), as "
    "MIREN_<SECTION>_<KEY> in the environment, or with `--set section.key=value`; "
    "durations are written 30s, 2m, 24h, 7d."
)


def _markdown_default(key: Key) -> str:
    if key.setting.shown is not None:
        return key.setting.shown  # prose, not a value
    value = key.default()
    if value is None:
        return "none"
    shown = key.setting.show(value)
    return f"`{shown}`" if shown else '`""`'


def markdown_table() -> str:
    """The README's table: one row per key, in the order of the config file."""
    lines = ["| key | default | |", "|---|---|---|"]
    for key in KEYS:
        text = _PLACEHOLDER.sub(lambda m: f"`{m.group(0)}`", key.setting.help.replace("|", "\\|"))
        lines.append(f"| `{key.name}` | {_markdown_default(key)} | {text} |")
    return "\n".join(lines) + "\n"


def text() -> str:
    """`miren config`: each key with its default, then its help and environment variable."""
    width = max(len(k.name) for k in KEYS)
    out = [*textwrap.wrap(HOW_TO_SET, 100), ""]
    for key in KEYS:
        out.append(f"{key.name.ljust(width)}  {key.shown_default()}")
        out.append(f"    {key.setting.help} [{key.env}]")
    return "\n".join(out) + "\n"


def as_json() -> str:
    """`miren config --format json`: a list of {key, default, env, help}."""
    return json.dumps(
        [
            {"key": k.name, "default": k.shown_default(), "env": k.env, "help": k.setting.help}
            for k in KEYS
        ],
        indent=2,
    )
