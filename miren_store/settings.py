"""Settings: a config field declared once, with its default, one line of help and its bounds.

A component's config class (the proxy's `ProxyConfig`, the activator's `ActivatorConfig`, the
GC's `GcConfig`, ...) declares every field as `attrs.field(default=..., metadata=setting(...))`
(a config key) or `metadata=internal(...)` (set in code, never from the configuration). The
edge's config loader (`miren_ingress.shell.config`) reads nothing else: it turns user input into
the field's type ("30s" into a float of seconds when `duration`, or a `timedelta`), refuses
values out of bounds naming the key, and prints every key with its default and help (`miren
config`, the README's table). Pure data and pure functions; no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import attrs

from miren_store.durations import format_duration

__all__ = [
    "METADATA_KEY",
    "Setting",
    "configured",
    "internal",
    "one_of",
    "setting",
    "setting_of",
    "show_duration",
]

METADATA_KEY: Final = "miren.setting"
_DAY: Final = 86400


@attrs.frozen(kw_only=True)
class Setting:
    """The metadata of one config field (see `setting()`)."""

    help: str
    key: bool = True  # False: documented, but set in code, never from the configuration
    duration: bool = False  # a float of seconds written as a duration ("30s", "2m")
    minimum: float | None = None  # inclusive; in seconds for durations
    maximum: float | None = None  # inclusive
    positive: bool = False  # must be greater than 0
    choices: tuple[str, ...] = ()
    shown: str | None = None  # the default as documented, where its value is not (host name)

    def problem(self, value: Any) -> str | None:
        """Why `value` (already of the field's type) is not allowed, or None."""
        if value is None:
            return None
        if self.choices and value not in self.choices:
            return f"{value!r} is not {one_of(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
            return None
        number = value.total_seconds() if isinstance(value, timedelta) else value
        if self.positive and number <= 0:
            return "must be greater than 0"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not low <= number <= high:
            return f"must be between {self._bound(low)} and {self._bound(high)}"
        if low is not None and number < low:
            return f"must be at least {self._bound(low)}"
        if high is not None and number > high:
            return f"must be at most {self._bound(high)}"
        return None

    def show(self, value: Any) -> str:
        """`value` as one writes it in a config file (`30s`, `none`, `true`)."""
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, enum.Enum):
            return str(value.value)
        if isinstance(value, timedelta):
            return show_duration(value)
        if self.duration and isinstance(value, int | float):
            return show_duration(timedelta(seconds=value))
        if isinstance(value, Path):
            return str(value)
        return str(value)

    def _bound(self, number: float) -> str:
        if self.duration:
            return show_duration(timedelta(seconds=number))
        return f"{number:g}" if isinstance(number, float) else str(number)


def show_duration(value: timedelta) -> str:
    """In the largest unit that keeps it whole and short: `75s`, `2m`, `24h`, `30d`."""
    seconds = value.total_seconds()
    for unit, size, least in (("d", _DAY, 2 * _DAY), ("h", 3600, 3600), ("m", 60, 120)):
        if seconds >= least and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds.is_integer():
        return f"{int(seconds)}s"
    return format_duration(value)


def one_of(choices: Sequence[str]) -> str:
    """`a, b or c`."""
    if len(choices) == 1:
        return choices[0]
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def setting(
    help: str,
    *,
    duration: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    choices: tuple[str, ...] = (),
    shown: str | None = None,
) -> dict[str, Setting]:
    """The metadata of an attrs field that is a config key: one line of `help`, and what the
    loader checks (`minimum`/`maximum` inclusive, `positive`, `choices`). `duration`: a number
    of seconds, written and shown as a duration. `shown`: the default as the docs write it when
    the value itself would mislead (a host name, a path under the data dir).

        header_timeout: float = attrs.field(
            default=30.0, metadata=setting("a request head must arrive within this", duration=True)
        )
    """
    return _metadata(
        Setting(
            help=help,
            duration=duration,
            minimum=minimum,
            maximum=maximum,
            positive=positive,
            choices=choices,
            shown=shown,
        )
    )


def internal(help: str) -> dict[str, Setting]:
    """The metadata of a field of a config class that is not a config key (it is set in code);
    documented all the same, so every field of a config class says what it is."""
    return _metadata(Setting(help=help, key=False))


def _metadata(meta: Setting) -> dict[str, Setting]:
    if not meta.help.strip():
        raise ValueError("a setting needs its help text")
    return {METADATA_KEY: meta}


def setting_of(field: attrs.Attribute[Any]) -> Setting | None:
    """The `Setting` a field was declared with (None: a plain attrs field)."""
    found = field.metadata.get(METADATA_KEY)
    return found if isinstance(found, Setting) else None


def configured(instance: Any) -> Mapping[str, Any]:
    """The values of the config keys of a config object (its `internal()` fields left out)."""
    out: dict[str, Any] = {}
    for field in attrs.fields(type(instance)):
        meta = setting_of(field)
        if meta is not None and meta.key:
            out[field.name] = getattr(instance, field.name)
    return out
