"""fedsim: federated LoRA fine-tuning under differential privacy, simulated on Ray.

The Python API (imported lazily, so ``import fedsim`` and the command line stay fast)::

    import fedsim
    result = fedsim.run("quickstart", overrides={"federation.rounds": 3})
    result.summary["final_eval_accuracy"], result.rounds.to_pandas()

``run``, ``resume``, ``load_run``, ``sweep``, ``report``, ``validate`` and ``RunResult`` live in
:mod:`fedsim.api`; ``Config`` in :mod:`fedsim.config.schema`; ``Method`` and ``Capabilities`` in
:mod:`fedsim.methods.base`; ``check_method`` in :mod:`fedsim.testing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedsim.api import RunResult, load_run, report, resume, run, sweep, validate  # noqa: F401
    from fedsim.config.schema import Config
    from fedsim.errors import ConfigError, UserError

__all__ = [
    "Config",
    "ConfigError",
    "RunResult",
    "UserError",
    "__version__",
    "load_run",
    "report",
    "resume",
    "run",
    "sweep",
    "validate",
]

_LAZY = {
    "RunResult": "fedsim.api",
    "load_run": "fedsim.api",
    "resume": "fedsim.api",
    "run": "fedsim.api",
    "validate": "fedsim.api",
    "Config": "fedsim.config.schema",
    "ConfigError": "fedsim.errors",
    "UserError": "fedsim.errors",
}


def __getattr__(name: str) -> Any:
    """Import the API's names on first use (PEP 562), keeping ``import fedsim`` light."""
    import importlib

    if name in ("sweep", "report"):  # callable subpackages (fedsim._callable): fedsim.api.sweep / .report
        return importlib.import_module(f"fedsim.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "sweep", "report"])
