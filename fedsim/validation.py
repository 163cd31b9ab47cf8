"""Application-level config validation: the config's own checks (:mod:`fedsim.config.checks`) plus the checks that
ask other packages what they declare. This is what ``fedsim validate``, ``fedsim run``, sweeps and the Python API
load configs with.

config/ sits near the bottom of the layers and imports nothing above it, so the checks that need the method
registry (does the method support this privacy mode, this LoRA variant, several clients per pass? its own
settings), the model names, the data sources and the form of a cluster address live here, one layer above
everything they ask. :func:`load_config` and :func:`config_from_dict` hand :func:`cross_package_problems` to the
config loader, so one :class:`~fedsim.errors.ConfigError` still lists every problem at once.

Imports stay light: no torch model libraries, PEFT, Opacus or Ray are imported to validate (the registries' name
checks are light; the method registry imports a user method's module only when the config names one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsim.config import load as config_load
from fedsim.config.checks import type_problems
from fedsim.config.checks import validate as own_problems
from fedsim.config.fields import suggest
from fedsim.config.schema import Config
from fedsim.errors import ConfigError

__all__ = ["config_from_dict", "cross_package_problems", "load_config", "validate"]


def _method_problems(cfg: Config) -> list[str]:
    """The method registry: the method's name (or ``module.path:ClassName`` of a user method, imported here), its
    declared capabilities against the privacy mode and the LoRA variant, and its own settings."""
    from fedsim.methods.base import all_capabilities, available_methods, get_method
    from fedsim.plugins import is_spec

    out: list[str] = []
    known = available_methods()
    method = None
    if is_spec(cfg.method.name) and cfg.method.name not in known:  # a user method: imported and checked here
        try:
            method = get_method(cfg.method.name)
        except ConfigError as e:
            out.extend(e.problems)
    elif cfg.method.name not in known:
        out.append(
            f"method.name: unknown method '{cfg.method.name}'{suggest(cfg.method.name, known)}; "
            f"known methods: {', '.join(known)} (a method of your own: module.path:ClassName)"
        )
    else:
        method = get_method(cfg.method.name)
    if method is not None:  # what the method declares it supports, and its own settings
        out.extend(method.capabilities.problems(cfg, all_capabilities()))
        out.extend(method.settings_problems(cfg))
    return out


def _name_problems(cfg: Config) -> list[str]:
    """The model name (a known name, a plugin spec, a readable path) and the data source (the data registry's
    :func:`~fedsim.data.registry.source_problems`: resolution, argument, availability, task fit, its own checks)."""
    from fedsim.data.registry import source_problems
    from fedsim.model.registry import model_name_problem

    out: list[str] = []
    problem = model_name_problem(cfg.model.name)
    if problem:
        out.append(problem if problem.startswith("model.name") else f"model.name: {problem}")
    out.extend(source_problems(cfg))
    return out


def _task_problems(cfg: Config) -> list[str]:
    """task.kind against the model: causal_lm needs a decoder with a causal-LM head (the source's fit to the task is
    the data registry's check, in :func:`_name_problems`)."""
    from fedsim.model.registry import task_model_problem

    problem = task_model_problem(cfg.task.kind, cfg.model.name)
    return [problem] if problem else []


def cross_package_problems(cfg: Config) -> list[str]:
    """The problems of ``cfg`` that other packages' declarations show (empty list = none); each line names the key
    and the fix. In order: task against model and source, ``runtime.clients_per_pass`` > 1 against what a fused
    pass allows (:func:`fedsim.methods.batching.clients_per_pass_problems`), the form of ``runtime.address`` (no
    network, no Ray: :func:`fedsim.runtime.cluster.address_problem`), the method registry, model name, data
    source."""
    from fedsim.methods.batching import clients_per_pass_problems
    from fedsim.runtime.cluster import address_problem

    out = _task_problems(cfg)
    out.extend(clients_per_pass_problems(cfg))
    address = address_problem(cfg.runtime.address.strip())
    if address:
        out.append(address)
    out.extend(_method_problems(cfg))
    out.extend(_name_problems(cfg))
    return out


def validate(cfg: Config) -> list[str]:
    """Every problem of ``cfg``: its own (:func:`fedsim.config.checks.validate`), then :func:`cross_package_problems`
    (only when the own checks found no wrongly typed value: the cross-package checks assume the right types).
    Empty list = valid."""
    if type_problems(cfg):
        return own_problems(cfg)  # the type problems
    return [*own_problems(cfg), *cross_package_problems(cfg)]


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """:func:`fedsim.config.load.config_from_dict` with the cross-package checks. Raises ConfigError listing every
    problem."""
    return config_load.config_from_dict(d, checks=cross_package_problems)


def load_config(source: str | None = None, overrides: Sequence[str] = ()) -> tuple[Config, str]:
    """:func:`fedsim.config.load.load_config` (a preset name or YAML path, ``key.path=value`` overrides) with the
    cross-package checks; returns ``(config, label)``. Raises ConfigError listing every problem."""
    return config_load.load_config(source, overrides, checks=cross_package_problems)
