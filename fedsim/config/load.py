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
import difflib
import functools
import importlib
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsim.config.schema import Config
from fedsim.errors import ConfigError

PRESETS_DIR = Path(__file__).with_name("presets")
DEFAULT_PRESET = "quickstart"
_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# PyYAML (YAML 1.1) reads "1e-3" as a string; float fields accept such literals.
_SCI_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_NO = object()  # "does not convert"


class _Bad(Exception):
    """A value that does not fit its field's type (message is the full problem line)."""


# ----------------------------------------------------------------------------- schema walking


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    for f, tp in _fields(cls):
        if _is_section(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _sections(cls: type = Config, prefix: str = "") -> Iterator[str]:
    for f, tp in _fields(cls):
        if _is_section(tp):
            yield f"{prefix}{f.name}"
            yield from _sections(tp, f"{prefix}{f.name}.")


def known_keys() -> list[str]:
    """All dotted leaf keys of the config, in schema order (e.g. ``"data.partition.alpha"``)."""
    return [key for key, _, _ in _leaves()]


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- conversion


def _show(value: Any) -> str:
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
        return f"{_describe(inner[0], plural)} or null"
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


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert one YAML value to the field type ``tp``; raise :class:`_Bad` naming ``key`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = _Bad(f"{key}: expected {_describe(tp)}, got {_show(value)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _convert(value, inner[0], key)
        except _Bad as e:
            if isinstance(value, (list, tuple)):  # keep the precise element-level message
                raise
            raise bad from e
    if tp in _NAMES:
        converted = _scalar(value, tp)
        if converted is _NO:
            raise bad
        return converted
    if origin is list:
        if args[0] is str and isinstance(value, str):  # "query,value"
            return [s.strip() for s in value.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Bad(
                f"{key}: expected {_describe(tp)}, got {_show(value)}"
                + (" (or one comma-separated string)" if args[0] is str else "")
            )
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    raise _Bad(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - schema bug


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(key: str) -> str:
    keys = known_keys()
    last = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if len(same_leaf) == 1 and "." not in key:  # "rounds" at top level -> "federation.rounds"
        hint = f" (did you mean '{same_leaf[0]}'?)"
    else:
        hint = _suggest(key, keys + list(_sections()))
    if not hint:
        hint = "; run `fedsim validate quickstart` to see every key"
    return f"{key}: unknown key{hint}"


def _expand_dotted(data: Mapping[Any, Any]) -> dict[Any, Any]:
    """Turn ``{"a.b": 1}`` into ``{"a": {"b": 1}}`` (recursively; later keys win)."""
    out: dict[Any, Any] = {}
    for k, v in data.items():
        v = _expand_dotted(v) if isinstance(v, Mapping) else v
        if isinstance(k, str) and "." in k:
            head, rest = k.split(".", 1)
            v = _expand_dotted({rest: v})
            k = head
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _merge(base: dict[Any, Any], extra: Mapping[Any, Any]) -> dict[Any, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: Any, prefix: str, problems: list[str], failed: set[str]) -> Any:
    """Build section ``cls`` from ``data``; bad values fall back to defaults and are recorded."""
    if data is None:  # an empty section in YAML ("lora:")
        return cls()
    if not isinstance(data, Mapping):
        where = prefix[:-1] or "the config"
        problems.append(f"{where}: expected a mapping of keys, got {_show(data)}")
        failed.add(prefix[:-1])
        return cls()
    fields = {f.name: tp for f, tp in _fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            problems.append(_unknown_key(key))
        elif _is_section(fields[name]):
            kwargs[name] = _build(fields[name], value, key + ".", problems, failed)
        else:
            try:
                kwargs[name] = _convert(value, fields[name], key)
            except _Bad as e:
                problems.append(str(e))
                failed.add(key)
    return cls(**kwargs)


def _mentions(problem: str, keys: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", problem) for k in keys)


def _from_dict(data: Any, problems: list[str]) -> Config:
    failed: set[str] = set()
    data = _expand_dotted(data) if isinstance(data, Mapping) else data
    cfg = _build(Config, data, "", problems, failed)
    # semantic checks on fields that failed conversion would judge the substituted default
    problems.extend(p for p in validate(cfg) if not _mentions(p, failed))
    return cfg


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Convert a nested (or dotted-key) mapping to a :class:`Config` and validate it.

    Missing keys take the schema defaults. Raises :class:`ConfigError` with every problem
    (unknown keys, wrong types, disallowed choices and everything :func:`validate` finds).
    """
    problems: list[str] = []
    cfg = _from_dict(d, problems)
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


def _resolve_source(source: str) -> tuple[Path, str]:
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
        msg = f"unknown preset '{source}'{_suggest(source, names)}; available presets: {', '.join(names)}"
        raise ConfigError([msg + " (or give a path to a YAML file)"])
    what = "is not a file" if path.exists() else "not found; check the path"
    raise ConfigError([f"config file {source}: {what}, or use a preset name ({', '.join(names)})"])


def _read_yaml(path: Path) -> Any:
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
            [f"config file {path}: expected a mapping of sections (model:, data:, ...), got {_show(data)}"]
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


def load_config(source: str | None = None, overrides: Sequence[str] = ()) -> tuple[Config, str]:
    """Load a preset (name) or YAML file (path), apply ``key.path=value`` overrides, validate.

    ``source=None`` means the ``quickstart`` preset. Override values are parsed with
    ``yaml.safe_load`` (``3`` -> int, ``0.5`` -> float, ``[a,b]`` -> list, ``null`` -> None).
    Returns ``(config, label)``: the label is the preset name or the file stem.
    Raises :class:`ConfigError` listing every problem (source, overrides, keys, types, semantics).
    """
    path, label = _resolve_source(DEFAULT_PRESET if source is None else str(source))
    data = _expand_dotted(_read_yaml(path))
    problems: list[str] = []
    for text in overrides:
        _apply_override(data, text, problems)
    cfg = _from_dict(data, problems)
    if problems:
        raise ConfigError(problems)
    return cfg, label


# ----------------------------------------------------------------------------- semantic validation


def _proportion_problems(rows: list[list[float]] | None, required: bool) -> list[str]:
    key = "data.partition.proportions"
    if not rows:
        if required:
            return [
                f"{key}: required when data.partition.kind is label_proportions; give one label "
                "distribution per client, e.g. [[0.9, 0.1], [0.1, 0.9]]"
            ]
        return []
    out = []
    for i, row in enumerate(rows):
        if not row or any(not math.isfinite(x) or x < 0 for x in row) or sum(row) <= 0:
            out.append(
                f"{key}[{i}]: must be a non-empty list of non-negative numbers with a positive sum "
                f"(got {row}); e.g. [0.9, 0.1]"
            )
    if len({len(r) for r in rows}) > 1:
        out.append(
            f"{key}: rows have different lengths {sorted({len(r) for r in rows})}; "
            "give one share per class in every row"
        )
    return out


def _external_problems(cfg: Config) -> list[str]:
    """Checks owned by other packages; each is skipped if its module is not available."""
    out: list[str] = []
    try:
        from fedsim.methods.base import available_methods
    except ImportError:
        pass
    else:
        known = list(available_methods())
        if cfg.method.name not in known:
            out.append(
                f"method.name: unknown method '{cfg.method.name}'{_suggest(cfg.method.name, known)}; "
                f"known methods: {', '.join(known)}"
            )
    for key, module, func in (
        ("model.name", "fedsim.model.build", "model_name_problem"),
        ("data.source", "fedsim.data.sources", "source_path_problem"),
    ):
        try:
            check = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            continue
        problem = check(_get(cfg, key))
        if problem:
            out.append(problem if problem.startswith(key) else f"{key}: {problem}")
    return out


def validate(cfg: Config) -> list[str]:
    """Every semantic problem of ``cfg`` (empty list = valid); each line names the key and the fix.

    Checks value types, declared choices, numeric ranges, cross-key constraints, and (when those
    modules are importable) the method registry, the model name and the data source.
    """
    problems: list[str] = []
    for key, _, tp in _leaves():
        try:
            _convert(_get(cfg, key), tp, key)
        except _Bad as e:
            problems.append(str(e))
    if problems:  # range checks below assume the right types
        return problems
    for key, f, _ in _leaves():
        choices = f.metadata.get("choices")
        value = _get(cfg, key)
        if choices and value not in choices:
            hint = _suggest(value, choices) if isinstance(value, str) else ""
            problems.append(f"{key}: {_show(value)} is not one of {', '.join(map(str, choices))}{hint}")

    def need(key: str, ok: bool, rule: str, fix: str) -> None:
        if not ok:
            problems.append(f"{key} must be {rule} (got {_show(_get(cfg, key))}); {fix}")

    lo, da, pa, fe, pr, rt = cfg.lora, cfg.data, cfg.data.partition, cfg.federation, cfg.privacy, cfg.runtime
    need("seed", cfg.seed >= 0, ">= 0", "use any non-negative integer, e.g. 0")
    need("lora.r", lo.r >= 1, ">= 1", "the LoRA rank is a positive integer, e.g. 8")
    need("lora.alpha", lo.alpha > 0, "> 0", "the LoRA scale is alpha / r, e.g. alpha 16 with r 8")
    need("lora.dropout", 0 <= lo.dropout < 1, "in [0, 1)", "use 0 for no dropout")
    need("lora.targets", len(lo.targets) > 0, "non-empty", "use [auto] for the model family's query/value projections")
    need("data.text_field", bool(da.text_field), "non-empty", "name the text column, e.g. text")
    need("data.label_field", bool(da.label_field), "non-empty", "name the label column, e.g. label")
    need("data.max_length", da.max_length >= 8, ">= 8", "e.g. 128 tokens")
    need("data.test_fraction", 0 < da.test_fraction < 1, "in (0, 1)", "e.g. 0.2")
    need("data.personal_fraction", 0 <= da.personal_fraction < 1, "in [0, 1)", "use 0 to skip personalised evaluation")
    need("data.max_examples", da.max_examples is None or da.max_examples >= 1, ">= 1 or null", "null keeps all")
    need("data.synthetic_examples", da.synthetic_examples >= 1, ">= 1", "e.g. 2000")
    need("data.synthetic_classes", da.synthetic_classes >= 2, ">= 2", "e.g. 4")
    need("data.partition.alpha", pa.alpha > 0, "> 0", "smaller values mean more heterogeneous clients, e.g. 0.5")
    need("data.partition.min_examples", pa.min_examples >= 0, ">= 0", "e.g. 2")
    problems.extend(_proportion_problems(pa.proportions, pa.kind == "label_proportions"))
    need("federation.clients", fe.clients >= 1, ">= 1", "e.g. 10")
    if fe.clients >= 1 and not 1 <= fe.clients_per_round <= fe.clients:
        problems.append(
            f"federation.clients_per_round must be between 1 and federation.clients (got clients_per_round="
            f"{fe.clients_per_round}, clients={fe.clients}); set federation.clients_per_round to at most "
            f"{fe.clients} or raise federation.clients"
        )
    for key in ("federation.rounds", "federation.local_steps", "federation.batch_size", "federation.eval_every"):
        need(key, _get(cfg, key) >= 1, ">= 1", "use a positive integer")
    need("federation.lr", fe.lr > 0, "> 0", "e.g. 0.5 for SGD or 5e-4 for AdamW")
    need("privacy.clip", pr.clip > 0, "> 0", "the per-example clipping norm, e.g. 2.0")
    need("privacy.noise_multiplier", pr.noise_multiplier >= 0, ">= 0", "e.g. 1.0")
    need("runtime.workers", rt.workers >= 1, ">= 1", "e.g. 2")
    need("runtime.cpus_per_worker", rt.cpus_per_worker > 0, "> 0", "e.g. 1")
    need("runtime.gpus_per_worker", rt.gpus_per_worker >= 0, ">= 0", "0 for CPU only, 0.25 for a quarter GPU")
    need("runtime.eval_batch_size", rt.eval_batch_size >= 1, ">= 1", "e.g. 64")
    problems.extend(_external_problems(cfg))
    return problems
