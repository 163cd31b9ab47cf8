"""How a sweep builds one run's config data: base + ``set:`` + the run's own values + ``rules:`` (pure).

Shared by grid cells (:mod:`fedsim.sweep.spec`, the run's values are its grid values) and search trials
(:mod:`fedsim.sweep.search`, the values Ray Tune sampled from the space).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from fedsim.config.load import flatten_dotted

#: a ``rules:`` entry: (when: {dotted key: value}, set: {dotted key: value})
Rule = tuple[dict[str, Any], dict[str, Any]]


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key`` "a.b.c", creating (or replacing non-mapping) sections."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def parse_rules(raw: Any, problems: list[str]) -> list[Rule]:
    """The ``rules:`` list of a sweep file; problems (naming ``rules[i]``) are appended to ``problems``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append("rules: expected a list of {when: {...}, set: {...}} entries")
        return []
    out = []
    for i, r in enumerate(raw):
        if (
            not isinstance(r, Mapping)
            or not isinstance(r.get("when"), Mapping)
            or not isinstance(r.get("set"), Mapping)
        ):
            problems.append(f"rules[{i}]: expected {{when: {{key: value}}, set: {{key: value}}}}, got {r!r}")
            continue
        out.append(({str(k): v for k, v in r["when"].items()}, {str(k): v for k, v in r["set"].items()}))
    return out


def run_data(
    base: Mapping[str, Any], common: Mapping[str, Any], values: Iterable[tuple[str, Any]], rules: Sequence[Rule]
) -> dict[str, Any]:
    """A new nested config dict: ``base``, then ``common`` (the sweep's ``set:``), then ``values`` ((dotted key,
    value) pairs, in order), then every rule whose ``when`` matches the result so far, in order. ``base`` is not
    modified."""
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(base)))  # deep copy through YAML
    for k, v in common.items():
        set_dotted(data, str(k), v)
    for k, v in values:
        set_dotted(data, str(k), v)
    for when, sets in rules:
        flat = flatten_dotted(data)
        if all(flat.get(k) == v for k, v in when.items()):
            for k, v in sets.items():
                set_dotted(data, k, v)
    return data
