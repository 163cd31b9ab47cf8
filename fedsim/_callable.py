"""``fedsim.sweep(...)`` and ``fedsim.report(...)`` are API functions, but ``fedsim.sweep`` and ``fedsim.report``
are also subpackages (importing a submodule sets the package attribute to the module). So those two packages are
made callable: calling the package calls :func:`fedsim.api.sweep` / :func:`fedsim.api.report`."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

API_MODULE = "fedsim.api"


def make_callable(module_name: str, function: str) -> None:
    """Make the module ``module_name`` callable as :func:`fedsim.api.<function>` (its docstring is the function's
    own, so ``help(fedsim.sweep)`` shows it too)."""

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            # the one upward reference in the package, made on purpose and at call time: calling the sweep or report
            # package is the API facade fedsim.sweep(...) / fedsim.report(...), which lives in the top layer.
            # import-linter does not see an import by name; docs/architecture.md ("Layers") names this exception.
            return getattr(importlib.import_module(API_MODULE), function)(*args, **kwargs)

    _CallablePackage.__name__ = f"CallablePackage[{function}]"
    sys.modules[module_name].__class__ = _CallablePackage
