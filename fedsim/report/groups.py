"""Complete runs -> groups of seeds: one group per (task, partition, other settings, privacy, method).

Runs whose configs differ in anything but the seed never share a group: a config key that varies
across the reported runs and is not already one of the core columns (task, partition, privacy,
method) becomes an extra group column (e.g. ``lora.r`` in a sweep over ranks).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# config keys shown through the core columns (task, partition, privacy, method) or ignored (seed)
CORE_KEYS = frozenset(
    {
        "seed",
        "method.name",
        "privacy.mode",
        "privacy.epsilon",
        "privacy.noise_multiplier",
        "data.source",
        "data.partition.kind",
        "data.partition.alpha",
    }
)


def show_value(v: Any) -> str:
    """A config value as shown in tables and titles (JSON for None/bools, ``%g`` for floats)."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def privacy_label(mode: str, epsilon: float | None, sigma: float | None) -> str:
    """``none``, ``ε=8 (sample)``, ``σ=1.1 (client)``."""
    if mode == "none":
        return "none"
    if epsilon is not None:
        return f"ε={epsilon:g} ({mode})"
    return f"σ={sigma:g} ({mode})" if sigma is not None else f"{mode}"


def _privacy_order(mode: str, epsilon: float | None, sigma: float | None) -> tuple[Any, ...]:
    return (mode != "none", mode, epsilon if epsilon is not None else math.inf, sigma or 0.0)


@dataclass(frozen=True)
class Group:
    """The seeds of one setting; ``runs`` are complete records sorted by (seed, path)."""

    task: str
    partition: str
    extras: tuple[tuple[str, str], ...]  # (config key, shown value) of the varying non-core keys
    privacy_mode: str
    epsilon_target: float | None
    noise_multiplier: float | None
    method: str
    runs: tuple[dict[str, Any], ...]
    #: varying keys constant within each (task, partition, privacy, method), e.g. learning rates tuned per method:
    #: shown as columns, but they do not split figures (methods with different tuned lr share a plot)
    tuned: tuple[tuple[str, str], ...] = ()

    @property
    def privacy(self) -> str:
        return privacy_label(self.privacy_mode, self.epsilon_target, self.noise_multiplier)

    @property
    def panel_key(self) -> tuple[Any, ...]:
        """What one figure covers: task, partition and the extra settings."""
        return (self.task, self.partition, self.extras)

    def sort_key(self) -> tuple[Any, ...]:
        pr = _privacy_order(self.privacy_mode, self.epsilon_target, self.noise_multiplier)
        return (self.task, self.partition, self.extras, pr, self.method)


def varying_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Sorted non-core config keys whose value differs between the records' ``settings``."""
    keys = sorted({k for r in records for k in r["settings"]} - CORE_KEYS)
    missing = object()
    out = []
    for k in keys:
        values = {json.dumps(r["settings"].get(k, missing), default=repr) for r in records}
        if len(values) > 1:
            out.append(k)
    return out


def _core(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["task"], r["partition"], r["privacy_mode"], r["epsilon_target"], r.get("noise_multiplier"), r["method"])


def per_setting_keys(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The ``keys`` with one value within every (task, partition, privacy, method): settings chosen per method and
    privacy level (tuned learning rates), not separate experimental conditions."""
    out = []
    for k in keys:
        seen: dict[tuple[Any, ...], str] = {}
        if all(
            seen.setdefault(_core(r), show_value(r["settings"].get(k))) == show_value(r["settings"].get(k))
            for r in records
        ):
            out.append(k)
    return out


def group_records(records: Sequence[dict[str, Any]]) -> tuple[list[Group], list[str]]:
    """Group complete records by setting; returns (groups in report order, the extra keys).

    Only records with status "complete" are used.
    """
    done = [r for r in records if r["status"] == "complete"]
    extra_keys = varying_keys(done)
    tuned_keys = per_setting_keys(done, extra_keys)
    buckets: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in done:
        extras = tuple((k, show_value(r["settings"].get(k))) for k in extra_keys if k not in tuned_keys)
        tuned = tuple((k, show_value(r["settings"].get(k))) for k in tuned_keys)
        key = (
            r["task"],
            r["partition"],
            extras,
            r["privacy_mode"],
            r["epsilon_target"],
            r.get("noise_multiplier"),
            r["method"],
            tuned,
        )
        buckets.setdefault(key, []).append(r)
    groups = [
        Group(*key[:-1], runs=tuple(sorted(runs, key=lambda r: (r["seed"], r["path"]))), tuned=key[-1])
        for key, runs in buckets.items()
    ]
    return sorted(groups, key=Group.sort_key), extra_keys


def slug(*parts: str, limit: int = 80) -> str:
    """A file-name-safe, deterministic name from ``parts`` (``dirichlet(0.5)`` -> ``dirichlet-0.5``,
    ``ε=4 (sample)`` -> ``eps-4-sample``); long names are cut and end in a short hash."""
    parts = tuple(p.replace("ε", "eps").replace("σ", "sigma") for p in parts)
    text = "__".join(re.sub(r"[^A-Za-z0-9.]+", "-", p).strip("-.") or "x" for p in parts)
    if len(text) > limit:
        text = f"{text[: limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return text
