"""Plugins: methods, data sources and model builders from the user's own code.

A config names a plugin as ``module.path:Name`` (``method.name``, ``data.source``, ``model.name``; a data source
may add ``:ARG``, e.g. ``mysources:text_folder:/data/news``), or by the name an installed package declares in the
entry-point groups ``fedsim.methods``, ``fedsim.data`` and ``fedsim.models``. Each registry resolves these names
into its own table (:func:`fedsim.methods.base.get_method`, :func:`fedsim.data.registry.resolve_source`,
:func:`fedsim.model.registry.resolve_model_config`); a data source may also be named by the name it registered with
:func:`fedsim.data.registry.register_source`.

Contracts:

* :func:`load_object` imports the module (from ``sys.path``: the current directory, ``PYTHONPATH``, an installed
  package) and returns ``Name``; it raises :class:`~fedsim.errors.ConfigError` naming the config key and the fix
  when the module does not import or has no such name. Nothing is unpickled.
* :func:`plugin_modules` lists what a Ray worker needs to import the run's method plugin when it is not installed
  (the package folder or ``.py`` file it came from on the driver); the Ray backend ships them with its actors'
  ``runtime_env`` ``py_modules``, so the worker imports the plugin (by name, in ``get_method``) before it builds
  the method. :func:`run_plugin_modules` adds the data source's and model's modules, for a process that runs a
  whole driver (a parallel sweep's cell).
* This module imports neither torch nor Ray (``fedsim validate`` stays fast), and no fedsim package but
  :mod:`fedsim.errors`: the registries (data, methods, model) import it, never the other way.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError

GROUPS = {"method.name": "fedsim.methods", "data.source": "fedsim.data", "model.name": "fedsim.models"}
_SPEC_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_spec(text: str) -> bool:
    """Whether ``text`` has the form ``module.path:Name`` (a plugin named by its module)."""
    return bool(_SPEC_RE.match(text))


def split_source_spec(text: str) -> tuple[str, str | None] | None:
    """``"mod:fn"`` -> ``("mod:fn", None)``; ``"mod:fn:ARG"`` -> ``("mod:fn", "ARG")``; None if not a spec."""
    parts = text.split(":", 2)
    if len(parts) >= 2 and is_spec(f"{parts[0]}:{parts[1]}"):
        return f"{parts[0]}:{parts[1]}", parts[2] if len(parts) == 3 else None
    return None


def entry_point_names(key: str) -> dict[str, str]:
    """name -> ``module:attr`` of the installed packages' entry points for ``key`` (``method.name`` ...); read
    once per process (the installed packages do not change while it runs)."""
    return dict(_entry_points(GROUPS[key]))


@functools.cache
def _entry_points(group: str) -> tuple[tuple[str, str], ...]:
    return tuple((ep.name, ep.value) for ep in entry_points(group=group))


def load_object(spec: str, key: str, what: str) -> Any:
    """The object ``spec`` (``module.path:Name``, or an entry-point name of ``key``'s group) names.

    Raises ConfigError (one line naming ``key``) when the module does not import or has no such attribute."""
    target = entry_point_names(key).get(spec, spec)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is a config problem here
        raise ConfigError(
            [
                f"{key}: {spec!r}: module {module_name!r} does not import ({type(e).__name__}: {e}); put its "
                f"folder on PYTHONPATH (or run from it), or install the package that provides {what}"
            ]
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError([f"{key}: {spec!r}: module {module_name!r} has no {attr!r}; name {what} in it"])
        obj = getattr(obj, part)
    return obj


def _site_dirs() -> set[Path]:
    paths = sysconfig.get_paths()
    return {Path(paths[k]).resolve() for k in ("purelib", "platlib") if k in paths}


def module_path(spec: str, key: str) -> str | None:
    """What a Ray worker started elsewhere needs to import ``spec``'s module: the top-level package folder or the
    single ``.py`` file it was imported from on the driver; None for installed modules (site-packages), modules
    not imported yet, and non-specs."""
    target = entry_point_names(key).get(spec, spec) if key in GROUPS else spec
    if not is_spec(target):
        return None
    top = target.split(":", 1)[0].split(".", 1)[0]
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    shipped = path.parent if path.name == "__init__.py" else path
    site = _site_dirs()
    if any(p in site for p in shipped.parents):
        return None
    return str(shipped)


def plugin_modules(method_name: str) -> list[str]:
    """Paths (a package folder or a ``.py`` file) a Ray worker needs for the run's method plugin, for the actors'
    ``runtime_env`` ``py_modules`` (Ray uploads them with the job, so they import on any node); empty for built-in
    and installed methods. Data sources and model builders run on the driver only (workers get the tokenised data
    and the weights)."""
    path = module_path(method_name, "method.name")
    return [path] if path else []


def run_plugin_modules(method_name: str, data_source: str, model_name: str) -> list[str]:
    """What a process that runs a whole driver (a parallel sweep's cell) needs: the modules of the method, data
    source and model plugins that are not installed (see :func:`plugin_modules`), without repeats."""
    source = split_source_spec(data_source)
    specs = [("method.name", method_name), ("data.source", source[0] if source else data_source)]
    paths = [module_path(spec, key) for key, spec in [*specs, ("model.name", model_name)]]
    return list(dict.fromkeys(p for p in paths if p))
