"""The ``search:`` section of a sweep file: a Ray Tune search over config keys (pure: parsing and validation).

Format (YAML)::

    base: tiny
    set: {federation.rounds: 8}
    search:
      algorithm: optuna            # optuna (Tune's OptunaSearch, TPE; needs fedsim[tune]) | random
      metric: final_eval_accuracy  # what the search optimises; see METRICS
      mode: max                    # max | min (default: the metric's natural direction)
      samples: 20                  # trials
      scheduler: asha              # none | asha (stops poor trials early on the per-round metric)
      space:                       # dotted config keys, as --set takes them
        federation.lr: loguniform(0.01, 1)
        lora.r: choice([4, 8, 16])
      seed: 0                      # the search's own seed (default: the config's seed)
      max_concurrent: 1            # trials at once (an integer, or auto: as many as the Ray cluster fits)
      grace_period: 1              # asha: rounds a trial runs before it can be stopped
      reduction_factor: 2          # asha: keep the best 1/reduction_factor at each rung

Distributions: ``loguniform(a, b)``, ``uniform(a, b)``, ``quniform(a, b, q)``, ``randint(a, b)`` (an integer from a
to b, both included) and ``choice([x, y, ...])`` (a plain YAML list means the same). They may stand unquoted in a
flow mapping too (``search: {space: {federation.lr: loguniform(0.01, 1)}, ...}``): :func:`quote_distributions`
quotes them before the file is read as YAML.

A trial's config is base, then ``set:``, then the sampled values, then ``rules:``; trials run in-process
(``runtime.backend: local``) inside their Tune trial. Every problem is reported at once (ConfigError), before any
work: unknown keys, algorithm, metric, mode, scheduler, a malformed distribution, a space key that is not a config
key, and values of the space that make a bad config (each distribution's bounds and middle, each choice).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedsim.config.fields import known_keys, unknown_key
from fedsim.config.load import config_to_dict
from fedsim.config.schema import Config
from fedsim.errors import ConfigError
from fedsim.sweep.settings import Rule, run_data, set_dotted
from fedsim.validation import config_from_dict

ALGORITHMS = ("optuna", "random")
SCHEDULERS = ("none", "asha")
MODES = ("max", "min")
SEARCH_KEYS = (
    "algorithm", "metric", "mode", "samples", "space", "scheduler", "seed", "max_concurrent", "grace_period",
    "reduction_factor",
)  # fmt: skip
DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "randint", "choice")
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.DOTALL)
_NAMES = "|".join(DISTRIBUTIONS)
_UNQUOTED = re.compile(rf"(?<=[\s:,\[{{])((?:{_NAMES})\([^()'\"\n]*\))")  # an unquoted call in a YAML text
_HOW = "loguniform(a, b), uniform(a, b), quniform(a, b, q), randint(a, b) or choice([x, y, ...])"


@dataclass(frozen=True)
class Metric:
    """A search metric: the summary.json key it names, the rounds.parquet column it is read from after each
    evaluated round, its natural direction, and whether it is the best value so far (else the latest)."""

    name: str
    column: str
    mode: str
    best: bool = False


#: metrics a search can optimise (summary.json names); each is reported to Tune after every evaluated round
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("final_eval_accuracy", "eval_accuracy", "max"),
        Metric("best_eval_accuracy", "eval_accuracy", "max", best=True),
        Metric("final_eval_loss", "eval_loss", "min"),
        Metric("final_eval_perplexity", "eval_perplexity", "min"),
        Metric("final_personal_accuracy", "personal_accuracy", "max"),
    )
}


@dataclass(frozen=True)
class Distribution:
    """One key's distribution: ``kind`` (one of :data:`DISTRIBUTIONS`) and its arguments (the choices for
    ``choice``)."""

    kind: str
    args: tuple[Any, ...]

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole range when checking configs: bounds and middle, or every choice."""
        if self.kind == "choice":
            return list(self.args)
        lo, hi = self.args[0], self.args[1]
        if self.kind == "randint":
            return sorted({lo, (lo + hi) // 2, hi})
        mid = math.sqrt(lo * hi) if self.kind == "loguniform" else (lo + hi) / 2
        return [float(lo), float(mid), float(hi)]

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"choice({yaml.safe_dump(list(self.args), default_flow_style=True).strip()})"
        return f"{self.kind}({', '.join(str(a) for a in self.args)})"


@dataclass(frozen=True)
class SearchSpec:
    """A validated ``search:`` section with what each trial's config is built from.

    ``base``/``common``/``rules``: the base config data, the sweep's ``set:`` and ``rules:``; ``config``: the config
    of a trial before its sampled values (base + set + rules, validated); ``space``: dotted key -> distribution."""

    algorithm: str
    metric: str
    mode: str
    samples: int
    space: Mapping[str, Distribution]
    scheduler: str
    seed: int
    max_concurrent: int | str
    grace_period: int
    reduction_factor: float
    config: Config
    base: Mapping[str, Any] = field(default_factory=dict)
    common: Mapping[str, Any] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    def fingerprint(self) -> dict[str, Any]:
        """What makes two searches the same experiment (JSON-able): everything but ``max_concurrent``."""
        return {
            "algorithm": self.algorithm, "metric": self.metric, "mode": self.mode, "samples": self.samples,
            "space": {k: str(d) for k, d in self.space.items()}, "scheduler": self.scheduler, "seed": self.seed,
            "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "rules": [[w, s] for w, s in self.rules],
        }  # fmt: skip


def _trial_data(
    base: Mapping[str, Any], common: Mapping[str, Any], params: Mapping[str, Any], rules: Sequence[Rule]
) -> dict[str, Any]:
    data = run_data(base, common, list(params.items()), rules)
    set_dotted(data, "runtime.backend", "local")
    return data


def trial_config(spec: SearchSpec, params: Mapping[str, Any]) -> Config:
    """A trial's validated config: base, ``set:``, the sampled ``params`` (dotted keys), ``rules:``, and
    ``runtime.backend: local`` (a trial runs its simulation in its own process). Raises ConfigError."""
    return config_from_dict(_trial_data(spec.base, spec.common, params, spec.rules))


class MetricTracker:
    """The search metric of one run, round by round (:meth:`update` with each rounds.parquet row)."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric = METRICS[metric]
        self.worst = -math.inf if mode == "max" else math.inf
        self.value: float | None = None

    def update(self, row: Mapping[str, Any]) -> float | None:
        """The metric after this round, or None when the round was not evaluated. A non-finite value (a diverged
        run's loss) counts as the worst possible, so a scheduler stops such a trial rather than ignoring it."""
        raw = row.get(self.metric.column)
        if raw is None:
            return None
        value = float(raw)
        if not math.isfinite(value):
            value = self.worst
        if self.metric.best and self.value is not None:
            better = max if self.worst == -math.inf else min
            value = better(self.value, value)
        self.value = value
        return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_number(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse_distribution(raw: Any) -> Distribution | str:
    """A distribution from its YAML value (``"loguniform(0.01, 1)"``, or a list for a choice); a problem text
    (without the key) when it is malformed."""
    if isinstance(raw, list):
        return Distribution("choice", tuple(raw)) if raw else "choice: expected at least one value"
    match = _CALL.match(raw) if isinstance(raw, str) else None
    if match is None:
        return f"expected a distribution: {_HOW}, got {raw!r}"
    kind, text = match.group(1), match.group(2)
    if kind not in DISTRIBUTIONS:
        return f"unknown distribution {kind!r}; use {_HOW}"
    try:
        args = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        example = "[4, 8]" if kind == "choice" else "0.1, 1"
        return f"{kind}(...): cannot read the arguments {text!r}; e.g. {kind}({example})"
    if kind == "choice":
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        return Distribution("choice", tuple(values)) if values else "choice: expected at least one value"
    args = [_as_number(a) for a in args]  # YAML 1.1 reads 1e-4 (no dot) as a string
    want = 3 if kind == "quniform" else 2
    if len(args) != want or not all(_number(a) for a in args):
        names = "a, b, q" if kind == "quniform" else "a, b"
        return f"{kind}({names}): expected {want} numbers, got {raw!r}"
    lo, hi = args[0], args[1]
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        return f"randint(a, b): expected two integers, got {raw!r}"
    if (hi < lo) if kind == "randint" else (hi <= lo):
        return f"{kind}: the lower bound must be below the upper one, got {raw!r}"
    if kind == "loguniform" and lo <= 0:
        return f"loguniform: both bounds must be > 0, got {raw!r}"
    if kind == "quniform" and args[2] <= 0:
        return f"quniform: the step q must be > 0, got {raw!r}"
    return Distribution(kind, tuple(args))


def quote_distributions(text: str) -> str:
    """A sweep file's text with each unquoted distribution call (``loguniform(0.01, 1)``, ``choice([4, 8])``)
    single-quoted, so that YAML reads it as one string even inside a flow mapping, where a comma ends a value."""
    return _UNQUOTED.sub(lambda m: "'" + m.group(1) + "'", text)


def _int_at_least(raw: Mapping[str, Any], key: str, default: int | None, least: int, problems: list[str]) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        problems.append(f"search.{key}: expected an integer >= {least}, got {v!r}")
        return least
    return v


def _choice(raw: Mapping[str, Any], key: str, default: str | None, choices: Sequence[str], problems: list[str]) -> str:
    v = raw.get(key, default)
    if v not in choices:
        got = "missing" if v is None else f"got {v!r}"
        problems.append(f"search.{key}: {got}; the choices are {', '.join(choices)}")
        return choices[0]
    return str(v)


def _space(raw: Any, problems: list[str]) -> dict[str, Distribution]:
    if not isinstance(raw, Mapping) or not raw:
        problems.append(f"search.space: expected a mapping of config keys to distributions ({_HOW}), got {raw!r}")
        return {}
    keys, space = set(known_keys()), {}
    for key, value in raw.items():
        key = str(key)
        if key not in keys:
            problems.append(f"search.space.{unknown_key(key)}; the space takes dotted config keys, as --set does")
            continue
        dist = parse_distribution(value)
        if isinstance(dist, str):
            problems.append(f"search.space.{key}: {dist}")
        else:
            space[key] = dist
    return space


def _space_problems(spec: SearchSpec) -> list[str]:
    """Each value that stands for a key's range (:meth:`Distribution.probe_values`), put into the trial config:
    the problems it gives, as ``search.space.<key>`` lines."""
    problems: list[str] = []
    for key, dist in spec.space.items():
        for value in dist.probe_values():
            try:
                trial_config(spec, {key: value})
            except ConfigError as e:
                problems.extend(f"search.space.{key}: {value!r} gives a bad config: {p}" for p in e.problems)
                break
    return problems


def parse_search(raw: Any, base: Mapping[str, Any], common: Mapping[str, Any], rules: Sequence[Rule]) -> SearchSpec:
    """The ``search:`` section, checked against the sweep's base config, ``set:`` and ``rules:``.

    Raises ConfigError listing every problem (each line names its ``search.*`` key)."""
    if not isinstance(raw, Mapping):
        raise ConfigError([f"search: expected a mapping with {', '.join(SEARCH_KEYS[:5])}, ..., got {raw!r}"])
    problems = [f"search.{k}: unknown key; the keys are {', '.join(SEARCH_KEYS)}" for k in raw if k not in SEARCH_KEYS]
    algorithm = _choice(raw, "algorithm", None, ALGORITHMS, problems)
    if raw.get("algorithm") == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append(
            "search.algorithm: optuna is not installed; pip install 'fedsim[tune]', or use algorithm: random"
        )
    metric = _choice(raw, "metric", None, tuple(METRICS), problems)
    mode = _choice(raw, "mode", METRICS[metric].mode, MODES, problems)
    samples = _int_at_least(raw, "samples", None, 1, problems)
    space = _space(raw.get("space"), problems)
    scheduler = _choice(raw, "scheduler", "none", SCHEDULERS, problems)
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        problems.append(f"search.seed: expected an integer, got {seed!r}")
        seed = None
    concurrent = raw.get("max_concurrent", 1)
    if concurrent != "auto":
        concurrent = _int_at_least(raw, "max_concurrent", 1, 1, problems)
    grace = _int_at_least(raw, "grace_period", 1, 1, problems)
    factor = raw.get("reduction_factor", 2)
    if not _number(factor) or factor <= 1:
        problems.append(f"search.reduction_factor: expected a number > 1, got {factor!r}")
        factor = 2
    try:
        config = config_from_dict(_trial_data(base, common, {}, rules))
    except ConfigError as e:  # the trials' shared settings are bad: every trial would be
        raise ConfigError([*problems, *e.problems]) from None
    if scheduler == "asha":
        if "federation.rounds" in space:
            problems.append("search.space.federation.rounds: not with scheduler asha (its rungs are rounds)")
        if grace > config.federation.rounds:
            problems.append(f"search.grace_period: {grace} is more than federation.rounds ({config.federation.rounds})")
    if metric == "final_eval_perplexity" and config.task.kind != "causal_lm":
        problems.append("search.metric: final_eval_perplexity is recorded for task.kind causal_lm only")
    spec = SearchSpec(
        algorithm=algorithm, metric=metric, mode=mode, samples=samples, space=space, scheduler=scheduler,
        seed=config.seed if seed is None else seed, max_concurrent=concurrent, grace_period=grace,
        reduction_factor=float(factor), config=config, base=dict(base), common=dict(common), rules=tuple(rules),
    )  # fmt: skip
    problems.extend(_space_problems(spec))
    if problems:
        raise ConfigError(problems)
    return spec


def same_base(done: Mapping[str, Any], spec: SearchSpec) -> bool:
    """Whether a config written by an earlier run of this search (its trials' shared config, as a dict) means
    ``spec.config``, compared as configs like grid cells are (``runtime.*`` and keys added later do not count)."""
    try:
        old = config_from_dict(done)
    except ConfigError:
        return False
    return dataclasses.replace(old, runtime=spec.config.runtime) == spec.config


def shared_config(spec: SearchSpec) -> dict[str, Any]:
    """The trials' shared config as a plain dict (for ``search.json``)."""
    return config_to_dict(spec.config)
