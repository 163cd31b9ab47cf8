"""Load run configs from presets or YAML files, apply ``--set`` overrides, convert and validate.

Every problem is collected and reported at once in one :class:`~fedsim.errors.ConfigError`
(unknown keys with a "did you mean", wrong types, disallowed choices, bad ``--set`` syntax and
semantic problems such as ``federation.clients_per_round > federation.clients``). Each problem
line starts with the dotted key it is about and says how to fix it.

YAML keys are the dotted field paths of :class:`~fedsim.config.schema.Config`; a mapping may
also use dotted keys directly (``federation.rounds: 20`` at top level equals
``federation: {rounds: 20}``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim.config.checks import validate
from fedsim.config.fields import (
    BadValue,
    convert,
    is_section,
    known_keys,
    schema_fields,
    show,
    suggest,
    unknown_key,
)
from fedsim.config.schema import LEGACY_METHOD_KEYS, Config
from fedsim.errors import ConfigError

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS_DIR",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "flatten_dotted",
    "known_keys",
    "list_presets",
    "load_config",
    "merge_nested",
    "validate",
]

PRESETS_DIR = Path(__file__).with_name("presets")
DEFAULT_PRESET = "quickstart"
#: checks a layer above config/ adds to the config's own (:func:`fedsim.validation.cross_package_problems`): a
#: function from a converted config to its problem lines
Checks = Callable[[Config], list[str]]
_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")  # a dotted key in --set key.path=value


def expand_dotted(data: Mapping[Any, Any]) -> dict[Any, Any]:
    """Turn ``{"a.b": 1}`` into ``{"a": {"b": 1}}`` (recursively; later keys win)."""
    out: dict[Any, Any] = {}
    for k, v in data.items():
        v = expand_dotted(v) if isinstance(v, Mapping) else v
        if isinstance(k, str) and "." in k:
            head, rest = k.split(".", 1)
            v = expand_dotted({rest: v})
            k = head
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_nested(out[k], v)
        else:
            out[k] = v
    return out


def merge_nested(base: Mapping[Any, Any], extra: Mapping[Any, Any]) -> dict[Any, Any]:
    """``base`` with ``extra`` laid over it, section by section (nested mappings merge; other values replace)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_nested(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def flatten_dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"federation.rounds": 10, ...}`` (leaves as they are; the inverse of dotted keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _build(cls: type, data: Any, prefix: str, problems: list[str], failed: set[str]) -> Any:
    """Build section ``cls`` from ``data``; bad values fall back to defaults and are recorded."""
    if data is None:  # an empty section in YAML ("lora:")
        return cls()
    if not isinstance(data, Mapping):
        where = prefix[:-1] or "the config"
        problems.append(f"{where}: expected a mapping of keys, got {show(data)}")
        failed.add(prefix[:-1])
        return cls()
    fields = {f.name: tp for f, tp in schema_fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            problems.append(unknown_key(key))
        elif is_section(fields[name]):
            kwargs[name] = _build(fields[name], value, key + ".", problems, failed)
        else:
            try:
                kwargs[name] = convert(value, fields[name], key)
            except BadValue as e:
                problems.append(str(e))
                failed.add(key)
    return cls(**kwargs)


def _mentions(problem: str, keys: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", problem) for k in keys)


def _moved_keys(data: Mapping[Any, Any]) -> dict[Any, Any]:
    """``data`` with settings written under their old keys (:data:`LEGACY_METHOD_KEYS`, e.g. ``method.ema_beta``)
    moved to their new place (``method.as_lora.ema_beta``); a value given at the new place wins."""
    method = data.get("method")
    if not isinstance(method, Mapping) or not any(f"method.{k}" in LEGACY_METHOD_KEYS for k in method):
        return dict(data)
    method = dict(method)
    for old, new in LEGACY_METHOD_KEYS.items():
        name, section = old.split(".", 1)[1], new.split(".")[1]
        if name in method:
            value = method.pop(name)
            moved = dict(method.get(section) or {})
            moved.setdefault(name, value)
            method[section] = moved
    return {**data, "method": method}


def _from_dict(data: Any, problems: list[str], checks: Checks | None) -> Config:
    failed: set[str] = set()
    data = _moved_keys(expand_dotted(data)) if isinstance(data, Mapping) else data
    cfg = _build(Config, data, "", problems, failed)
    # semantic checks on fields that failed conversion would judge the substituted default
    problems.extend(p for p in validate(cfg) if not _mentions(p, failed))
    if checks is not None:
        problems.extend(p for p in checks(cfg) if not _mentions(p, failed))
    return cfg


def config_from_dict(d: Mapping[str, Any], checks: Checks | None = None) -> Config:
    """Convert a nested (or dotted-key) mapping to a :class:`Config` and validate it.

    Missing keys take the schema defaults. Raises :class:`ConfigError` with every problem
    (unknown keys, wrong types, disallowed choices, everything :func:`validate` finds and, when given, what
    ``checks`` finds: :func:`fedsim.validation.config_from_dict` passes the cross-package checks).
    """
    problems: list[str] = []
    cfg = _from_dict(d, problems, checks)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested plain dict (YAML-safe; round-trips through :func:`config_from_dict`)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` as YAML to ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


# ----------------------------------------------------------------------------- presets and loading


def list_presets() -> list[tuple[str, str]]:
    """Shipped presets as ``(name, description)``, sorted by name; the description is the file's
    first line ``# <description>``."""
    out = []
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        desc = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
        out.append((path.stem, desc))
    return out


def resolve_source(source: str) -> tuple[Path, str]:
    """Map a preset name or a file path to ``(path, label)``; raise ConfigError if neither exists."""
    preset = PRESETS_DIR / f"{source}.yaml"
    looks_like_path = "/" in source or "\\" in source or source.endswith((".yaml", ".yml"))
    if not looks_like_path and preset.is_file():
        return preset, source
    path = Path(source).expanduser()
    if path.is_file():
        return path, path.stem
    names = [n for n, _ in list_presets()]
    if not looks_like_path:
        msg = f"unknown preset '{source}'{suggest(source, names)}; available presets: {', '.join(names)}"
        raise ConfigError([msg + " (or give a path to a YAML file)"])
    what = "is not a file" if path.exists() else "not found; check the path"
    raise ConfigError([f"config file {source}: {what}, or use a preset name ({', '.join(names)})"])


def read_yaml(path: Path) -> Any:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {path}: not valid YAML ({' '.join(str(e).split())})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"config file {path}: cannot be read ({e})"]) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"config file {path}: expected a mapping of sections (model:, data:, ...), got {show(data)}"]
        )
    return data


def _apply_override(data: dict[Any, Any], text: str, problems: list[str]) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        problems.append(f"--set {text!r}: expected key.path=value, e.g. --set federation.rounds=20")
        return
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        problems.append(f"--set {key}: cannot parse value {raw!r} as YAML; quote it, e.g. {key}='\"{raw}\"'")
        return
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            return
        node = child
    node[parts[-1]] = value


def load_config(
    source: str | None = None, overrides: Sequence[str] = (), checks: Checks | None = None
) -> tuple[Config, str]:
    """Load a preset (name) or YAML file (path), apply ``key.path=value`` overrides, validate.

    ``source=None`` means the ``quickstart`` preset. Override values are parsed with
    ``yaml.safe_load`` (``3`` -> int, ``0.5`` -> float, ``[a,b]`` -> list, ``null`` -> None).
    Returns ``(config, label)``: the label is the preset name or the file stem.
    Raises :class:`ConfigError` listing every problem (source, overrides, keys, types, semantics; with ``checks``,
    also theirs: :func:`fedsim.validation.load_config` passes the cross-package checks).
    """
    path, label = resolve_source(DEFAULT_PRESET if source is None else str(source))
    data = expand_dotted(read_yaml(path))
    problems: list[str] = []
    for text in overrides:
        _apply_override(data, text, problems)
    cfg = _from_dict(data, problems, checks)
    if problems:
        raise ConfigError(problems)
    return cfg, label


# ----------------------------------------------------------------------------- semantic validation
