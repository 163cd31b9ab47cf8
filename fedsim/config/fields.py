"""Walking the schema: dotted keys, value conversion and the wording of problems."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fedsim.config.schema import Config

# PyYAML (YAML 1.1) reads "1e-3" as a string; float fields accept such literals.
_SCI_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_NO = object()  # "does not convert"


class BadValue(Exception):
    """A value that does not fit its field's type (message is the full problem line)."""


# ----------------------------------------------------------------------------- schema walking


@functools.cache
def schema_fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaves(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    for f, tp in schema_fields(cls):
        if is_section(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _sections(cls: type = Config, prefix: str = "") -> Iterator[str]:
    for f, tp in schema_fields(cls):
        if is_section(tp):
            yield f"{prefix}{f.name}"
            yield from _sections(tp, f"{prefix}{f.name}.")


def known_keys() -> list[str]:
    """All dotted leaf keys of the config, in schema order (e.g. ``"data.partition.alpha"``)."""
    return [key for key, _, _ in leaves()]


def get_value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- conversion


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
}


def _describe(tp: Any, plural: bool = False) -> str:
    """Human wording of a field type: ``list[list[float]] | None`` -> "a list of lists of numbers or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        words = [_describe(a, plural) for a in inner] + (["null"] if len(inner) < len(args) else [])
        return " or ".join(words)
    if origin is typing.Literal:
        return " or ".join(show(a) for a in args)
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], plural=True)}"
    return _NAMES[tp][1 if plural else 0] if tp in _NAMES else str(tp)


def _scalar(value: Any, tp: type) -> Any:
    """``value`` as ``tp`` (bool/int/float/str), or ``_NO``: no bools as numbers, no fractional ints."""
    if isinstance(value, bool) or tp is bool:
        return value if isinstance(value, bool) and tp is bool else _NO
    if tp is int:
        return int(value) if isinstance(value, int) or (isinstance(value, float) and value.is_integer()) else _NO
    if tp is float:
        ok = isinstance(value, (int, float)) or (isinstance(value, str) and _SCI_RE.match(value.strip()))
        return float(value) if ok else _NO
    return value if isinstance(value, str) else _NO


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert one YAML value to the field type ``tp``; raise :class:`BadValue` naming ``key`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = BadValue(f"{key}: expected {_describe(tp)}, got {show(value)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, member in enumerate(inner):  # the first member the value fits (int | Literal["auto"])
            try:
                return convert(value, member, key)
            except BadValue as e:
                if i + 1 < len(inner):
                    continue
                if isinstance(value, (list, tuple)):  # keep the precise element-level message
                    raise
                raise bad from e
        raise bad
    if origin is typing.Literal:
        if isinstance(value, bool) or value not in args:
            raise bad
        return value
    if tp in _NAMES:
        converted = _scalar(value, tp)
        if converted is _NO:
            raise bad
        return converted
    if origin is list:
        if args[0] is str and isinstance(value, str):  # "query,value"
            return [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)):
            raise BadValue(
                f"{key}: expected {_describe(tp)}, got {show(value)}"
                + (" (or one comma-separated string)" if args[0] is str else "")
            )
        return [convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    raise BadValue(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - schema bug


def suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key(key: str) -> str:
    keys = known_keys()
    last = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if len(same_leaf) == 1 and "." not in key:  # "rounds" at top level -> "federation.rounds"
        hint = f" (did you mean '{same_leaf[0]}'?)"
    else:
        hint = suggest(key, keys + list(_sections()))
    if not hint:
        hint = "; run `fedsim validate quickstart` to see every key"
    return f"{key}: unknown key{hint}"
