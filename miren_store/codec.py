"""The one JSON converter for entities (store values, admin API bodies, CLI output).

- datetimes: RFC 3339 in UTC with a `Z` (naive input is taken as UTC);
- durations (`timedelta`): Go-style strings (`90s` -> "1m30s"); a number is read as seconds;
- an entity's `revision` is never written: the store supplies it when reading.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.preconf.json import make_converter

from miren_store.durations import DurationError, format_duration, parse_duration
from miren_store.entities import KINDS, Runtime, SandboxStatus

T = TypeVar("T")


def format_time(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    text = value.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


def format_public_time(value: datetime) -> str:
    """A time as the API and the CLI show it: RFC 3339, UTC, whole seconds (`...:05Z`). The
    store keeps the microseconds (`format_time`): ordering by creation time needs them."""
    return format_time(value.replace(microsecond=0))


def parse_time(value: Any, _: Any = None) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"invalid time {value!r}: expected RFC 3339") from exc
    else:
        raise ValueError(f"invalid time {value!r}: expected an RFC 3339 string")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _structure_duration(value: Any, _: Any) -> timedelta:
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except DurationError as exc:
            raise ValueError(str(exc)) from exc
    raise ValueError(f'invalid duration {value!r}: expected a string like "90s"')


def _strict(typ: type[Any], name: str) -> Any:
    """A structure hook that accepts only JSON values of `typ` (no coercion: 5 is not "5")."""

    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, typ) and not (typ is not bool and isinstance(value, bool)):
            return value
        raise TypeError(f"expected {name}, got {_json_type(value)}")

    return hook


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number, got {_json_type(value)}")


def _str_tuple(value: Any, _: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise TypeError(f"expected an array of strings, got {_json_type(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected an array of strings, got an item that is {_json_type(item)}")
    return tuple(value)


def _str_map(value: Any, _: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object of strings, got {_json_type(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise TypeError(f"expected string values, got {_json_type(item)} for {key!r}")
    return dict(value)


def _enum(value: Any, cls: type[enum.Enum]) -> enum.Enum:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_type(value)}")
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in cls)
        raise ValueError(f"{value!r} is not one of: {allowed}") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _make() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(float, _strict_float)
    # A StrEnum is also a str: without its own hook the strict str hook would return a plain str.
    for enum_cls in (Runtime, SandboxStatus):
        conv.register_structure_hook(enum_cls, _enum)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _str_tuple)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, str], _str_map)
    conv.register_unstructure_hook(datetime, format_time)
    conv.register_structure_hook(datetime, parse_time)
    conv.register_unstructure_hook(timedelta, format_duration)
    conv.register_structure_hook(timedelta, _structure_duration)
    for kind in KINDS.values():
        conv.register_unstructure_hook(
            kind, make_dict_unstructure_fn(kind, conv, revision=override(omit=True))
        )
    return conv


converter = _make()


def to_data(value: Any) -> Any:
    """An entity (or any attrs value) as JSON-ready data."""
    return converter.unstructure(value)


def from_data(cls: type[T], data: Any) -> T:
    """Data to an instance of `cls`; raises cattrs' errors (ClassValidationError) on bad input."""
    return converter.structure(data, cls)


def encode(entity: Any) -> bytes:
    """An entity as the compact JSON the store keeps."""
    return json.dumps(converter.unstructure(entity), separators=(",", ":")).encode()


def decode(cls: type[T], raw: bytes | str, revision: int) -> T:
    """Stored JSON back to an entity carrying `revision`."""
    value = converter.structure(json.loads(raw), cls)
    return attrs.evolve(value, revision=revision)  # type: ignore[misc]


def describe_error(exc: BaseException) -> str:
    """A one-line, user-facing description of a structuring error (paths like `spec.command`)."""
    if isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        parts: list[str] = []
        for err, path in _flatten(exc, ""):
            parts.append(f"{path or '(body)'}: {_short(err)}")
        return "; ".join(parts) if parts else str(exc)
    return _short(exc)


def _flatten(exc: BaseException, path: str) -> list[tuple[BaseException, str]]:
    if isinstance(exc, cattrs.BaseValidationError):
        out: list[tuple[BaseException, str]] = []
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            note = next((n for n in notes if hasattr(n, "name") or hasattr(n, "index")), None)
            seg = ""
            if note is not None:
                seg = str(getattr(note, "name", "") or getattr(note, "index", ""))
            sub_path = f"{path}.{seg}" if path and seg else (seg or path)
            out.extend(_flatten(sub, sub_path))
        return out
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return [(exc, path)]
    return [(exc, path)]


def is_shape_error(exc: BaseException) -> bool:
    """True when a structuring error is about the request's shape (a wrong JSON type, a missing or
    unknown field: answered 400), False when every failure is an invalid value (422)."""
    leaves = (
        [e for e, _ in _flatten(exc, "")] if isinstance(exc, cattrs.BaseValidationError) else [exc]
    )
    return any(not _is_value_error(e) for e in leaves)


def _is_value_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and not isinstance(exc, cattrs.ForbiddenExtraKeysError)


def _short(exc: BaseException) -> str:
    if isinstance(exc, AttributeError):
        return "expected an object"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return "unknown field(s) " + ", ".join(sorted(exc.extra_fields))
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, TypeError | ValueError):
        msg = str(exc)
        return msg.split("\n", maxsplit=1)[0] or type(exc).__name__
    return type(exc).__name__
