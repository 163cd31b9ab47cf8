"""The data-source registry: one table of the sources ``data.source`` can name, built-in and the user's own.

A source is a loader function ``(cfg: DataConfig, seed: int, arg: str | None) -> dataset`` with a declaration
(:class:`DataSource`): its name(s), the ``task.kind`` values it serves, what may follow ``NAME:`` (nothing, a
local file or folder that must exist, any text such as a URI), a cheap availability check (is the package that
holds the corpus installed?) and its config checks (``cfg -> problem lines``). ``data.source: NAME`` or
``NAME:ARG`` picks the entry of that name for the run's task.

Built-in sources register with :func:`register_source` in their own modules (:mod:`fedsim.data.bbc`,
:mod:`~fedsim.data.tweets`, :mod:`~fedsim.data.synthetic`, :mod:`~fedsim.data.files`,
:mod:`~fedsim.data.instruct_files`), exactly as a user's do. The registry imports those modules by name the first
time it is asked (as the method registry does), so it never imports them at module level and they import it:
each data module imports only downward.

User sources reach the same table three ways (docs/extending.md):

* ``@register_source("name", tasks=..., argument=...)`` in the user's module: the name exists once the module is
  imported (in that process: from Python, or the CLI for a module that ``data.source`` names as below);
* ``data.source: module.path:function[:ARG]``: the module is imported; a function decorated with
  :func:`register_source` keeps its declaration (its tasks, argument rule and checks), an undecorated one serves
  every task, takes an optional ``ARG`` and is checked when it returns (:func:`as_dataset`);
* the entry-point group ``fedsim.data`` of an installed package (``name = module:function``), optionally ``:ARG``.

A registered name comes before a ``module:function`` reading of the same text. Sources run on the driver only
(workers get the tokenised data), so nothing here is shipped to Ray workers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.schema import Config, DataConfig
from fedsim.data.types import TASKS, Dataset, InstructDataset, TextDataset
from fedsim.errors import ConfigError, DataError

#: ``(cfg, seed, arg)`` -> a TextDataset / InstructDataset, or for classification a ``(texts, labels)`` pair
Loader = Callable[[DataConfig, int, "str | None"], Any]
#: what may follow ``NAME:`` in ``data.source``: nothing; an optional or a required text (a URI, a name: the source
#: checks it); a local file or folder that must exist (checked at config time, relative to the current directory)
ARGUMENTS = ("none", "optional", "required", "file", "folder")
_USAGE = {"none": "", "optional": "[:ARG]", "required": ":ARG", "file": ":PATH", "folder": ":PATH"}
#: what each task needs from a source, and what to switch to (for the lines that say a source does not fit)
_TASK_TEXT = {
    "classification": ("labelled texts", "a classification model such as tiny-bert"),
    "causal_lm": ("prompt/response data", "a causal LM such as tiny-llama or smollm2-135m"),
}
_BUILTIN_MODULES = ("bbc", "tweets", "synthetic", "files", "instruct_files")


@dataclass(frozen=True)
class DataSource:
    """One registered source: ``load`` under each of ``names``, for each ``task.kind`` in ``tasks``.

    ``available()``: why this machine cannot provide the data (a package missing), or None; it reads no file.
    ``checks(cfg, arg)``: problem lines about the config (each naming its key); cheap, reads no file.
    ``note``: shown after the names in the list of sources (e.g. "with data.prompt_field/response_field").
    """

    names: tuple[str, ...]
    tasks: frozenset[str]
    load: Loader
    argument: str = "none"
    available: Callable[[], str | None] | None = None
    checks: Callable[[DataConfig, str | None], list[str]] | None = None
    note: str = ""

    def usage(self, name: str) -> str:
        """How a config writes this source under ``name``: ``csv:PATH``, ``synthetic``, ``mod:fn[:ARG]``."""
        return name + _USAGE[self.argument]


@dataclass(frozen=True)
class ResolvedSource:
    """What ``data.source`` names: the registered ``name``, the text after ``NAME:`` (None if none), and the
    entry serving each task."""

    name: str
    arg: str | None
    by_task: Mapping[str, DataSource]


_TABLE: dict[str, dict[str, DataSource]] = {}  # name -> task.kind -> declaration
_builtins_state = "no"  # "no" | "loading" | "yes"


def _ensure_builtins() -> None:
    global _builtins_state
    if _builtins_state != "no":
        return
    _builtins_state = "loading"
    try:
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"fedsim.data.{module}")
    except BaseException:
        _builtins_state = "no"
        raise
    _builtins_state = "yes"


def _origin(fn: Callable[..., Any]) -> tuple[str, str]:
    return getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "") or repr(fn)


def register_source(
    *names: str,
    tasks: Sequence[str] = ("classification",),
    argument: str = "none",
    available: Callable[[], str | None] | None = None,
    checks: Callable[[DataConfig, str | None], list[str]] | None = None,
    note: str = "",
) -> Callable[[Loader], Loader]:
    """Decorator: register the loader under ``names`` for ``tasks`` (see :class:`DataSource`); returns it unchanged.

    Registering the same function again (its module imported anew) replaces the entry.

    Raises:
        ValueError: no name, a name that is empty or holds ``:`` or whitespace, an unknown task or argument
            rule, or a (name, task) already taken by another function (a built-in's name included).
    """
    if not names:
        raise ValueError("register_source needs at least one name, e.g. @register_source('my-corpus')")
    for name in names:
        if not isinstance(name, str) or not name or ":" in name or name != name.strip() or " " in name:
            raise ValueError(f"data source name {name!r}: use a non-empty name without ':' or spaces")
    bad = sorted(set(tasks) - set(TASKS))
    if bad or not tasks:
        raise ValueError(f"data source {names[0]!r}: tasks {list(tasks)}; use one or more of {', '.join(TASKS)}")
    if argument not in ARGUMENTS:
        raise ValueError(f"data source {names[0]!r}: argument {argument!r}; use one of {', '.join(ARGUMENTS)}")

    def add(load: Loader) -> Loader:
        if not callable(load):
            raise ValueError(f"data source {names[0]!r}: register a function, not {type(load).__name__}")
        if not _origin(load)[0].startswith("fedsim.data."):  # a user's name may not take a built-in's
            _ensure_builtins()
        source = DataSource(tuple(names), frozenset(tasks), load, argument, available, checks, note)
        for name in names:
            for task in tasks:
                old = _TABLE.get(name, {}).get(task)
                if old is not None and _origin(old.load) != _origin(load):
                    raise ValueError(
                        f"data source {name!r} for task.kind {task} is already registered by "
                        f"{'.'.join(_origin(old.load))}; choose another name"
                    )
        for name in names:
            for task in tasks:
                _TABLE.setdefault(name, {})[task] = source
        return load

    return add


def _listed() -> list[tuple[str, dict[str, DataSource]]]:
    """The table's names (not the ``module:function`` specs), built-ins first in :data:`_BUILTIN_MODULES` order
    (whichever module was imported first), then the user's in registration order."""
    _ensure_builtins()
    modules = [f"fedsim.data.{m}" for m in _BUILTIN_MODULES]

    def rank(item: tuple[str, dict[str, DataSource]]) -> int:
        module = _origin(next(iter(item[1].values())).load)[0]
        return modules.index(module) if module in modules else len(modules)

    return sorted(((n, t) for n, t in _TABLE.items() if ":" not in n), key=rank)


def available_sources(task: str | None = None) -> list[str]:
    """Registered names (built-ins, sources registered so far, installed entry points), in registration order;
    only those serving ``task`` when it is given (entry points, whose tasks are known once loaded, always)."""
    from fedsim.plugins import entry_point_names

    names = [n for n, by_task in _listed() if task is None or task in by_task]
    return list(dict.fromkeys([*names, *entry_point_names("data.source")]))


def source_help(task: str | None = None) -> str:
    """The sources a config can name, as a user writes them (``csv:PATH`` ...), for ``task`` or for every task
    (classification first, then ``(task.kind causal_lm: ...)``), ending with the user's own."""

    def listing(t: str) -> str:
        groups: list[tuple[DataSource, list[str]]] = []  # consecutive names of one declaration share its note
        for name, by_task in _listed():
            if t in by_task:
                src = by_task[t]
                if groups and groups[-1][0] is src:
                    groups[-1][1].append(src.usage(name))
                else:
                    groups.append((src, [src.usage(name)]))
        return ", ".join(", ".join(used) + (f" ({src.note})" if src.note else "") for src, used in groups)

    own = "a source of your own: module.path:function[:ARG] (docs/extending.md)"
    if task is not None:
        return f"{listing(task)}; or {own}"
    rest = "; ".join(f"task.kind {t}: {listing(t)}" for t in TASKS[1:])
    return f"{listing(TASKS[0])} ({rest}); or {own}"


def _plugin_entries(name: str, obj: Any) -> dict[str, DataSource]:
    """The table entry for a user function named by a ``module:function`` spec or an entry point: its own
    declaration when it was registered with :func:`register_source`, else every task with an optional ARG.
    Raises ConfigError (naming data.source) when ``obj`` is not callable."""
    if not callable(obj):
        raise ConfigError(
            [
                f"data.source: {name!r} is {type(obj).__name__}, not a data source; name a function "
                "(cfg: DataConfig, seed: int, arg: str | None) -> TextDataset | (texts, labels) (docs/extending.md)"
            ]
        )
    declared = {task: src for by_task in _TABLE.values() for task, src in by_task.items() if src.load is obj}
    if declared:
        return declared
    old = _TABLE.get(name, {})
    if old and all(src.load is obj for src in old.values()):
        return old
    return {t: DataSource((name,), frozenset(TASKS), obj, "optional") for t in TASKS}


def resolve_source(source: str) -> ResolvedSource:
    """What ``data.source`` names (see the module docstring for the order of the readings); imports the user's
    module for a ``module:function`` spec or an entry point, and records it in the table under that name.

    Raises:
        ConfigError: one line naming data.source: an unknown name (listing the known ones), a module that does
            not import, a missing or non-callable function.
    """
    from fedsim.plugins import entry_point_names, load_object, split_source_spec

    _ensure_builtins()
    name, sep, arg = source.partition(":")
    if name in _TABLE:
        return ResolvedSource(name, arg if sep else None, _TABLE[name])
    spec: tuple[str, str | None] | None = None
    if name in entry_point_names("data.source"):
        spec = (name, arg if sep else None)
    else:
        spec = split_source_spec(source)
    if spec is None:
        raise ConfigError([f"data.source: unknown source {source!r}; use {source_help()}."])
    obj = load_object(spec[0], "data.source", "a data source function")
    _TABLE[spec[0]] = _plugin_entries(spec[0], obj)
    return ResolvedSource(spec[0], spec[1], _TABLE[spec[0]])


def _argument_problem(found: ResolvedSource, src: DataSource, source: str) -> str | None:
    name, arg, kind = found.name, found.arg, src.argument
    if kind == "none":
        return None if arg is None else f"data.source: {name} takes no argument (got {source!r}); write {name}."
    if kind == "optional":
        return None
    if arg is None or not arg.strip():
        what = "no argument" if kind == "required" else "no file"
        return f"data.source: {source!r} names {what}; write {src.usage(name)} with the {_ARG_WORD[kind]}."
    if kind == "required":
        return None
    p = Path(arg).expanduser()
    if not p.exists():
        return (
            f"data.source: {name} path {str(p)!r} does not exist; fix the path "
            f"(relative paths are resolved from the current directory {str(Path.cwd())!r})."
        )
    if kind == "folder" and not p.is_dir():
        return f"data.source: {name}:PATH must be a folder, but {str(p)!r} is a file."
    if kind == "file" and p.is_dir():
        return f"data.source: {name}:PATH must be a file, but {str(p)!r} is a folder."
    return None


_ARG_WORD = {"required": "argument the source needs", "file": "path of your data", "folder": "path of your data"}


def _mismatch(source: str, task: str, serves: frozenset[str]) -> str:
    """The line saying that ``source`` (serving ``serves``) does not fit ``task``."""
    needs, _ = _TASK_TEXT[task]
    if task == "causal_lm":
        return (
            f"task.kind: causal_lm needs {needs}, but data.source {source!r} has none; use {source_help('causal_lm')}."
        )
    other = sorted(serves)[0]
    what, model = _TASK_TEXT[other]
    return (
        f"data.source: {source!r} is {what} for task.kind {other} (got task.kind {task}); set task.kind: "
        f"{other} (with {model}), or use a {task} source: {source_help(task)}."
    )


def _declared(found: ResolvedSource) -> list[DataSource]:
    return list({id(s): s for s in found.by_task.values()}.values())


def source_path_problem(source: str) -> str | None:
    """Why ``data.source`` cannot be used whatever the task (unknown name, user module that does not import, bad
    argument or missing file, corpus package not installed), or None. Reads no file."""
    try:
        found = resolve_source(source)
    except ConfigError as e:
        return e.problems[0]
    for src in _declared(found):
        problem = _argument_problem(found, src, source) or (src.available() if src.available else None)
        if problem:
            return problem
    return None


def task_source_problem(task: str, cfg: DataConfig) -> str | None:
    """Why ``cfg.source`` does not fit ``task`` (the source does not serve it; the source's config checks for that
    task), or None; None too when the source cannot be resolved (:func:`source_path_problem` says why)."""
    problems = _task_problems(task, cfg)
    return problems[0] if problems else None


def _task_problems(task: str, cfg: DataConfig) -> list[str]:
    try:
        found = resolve_source(cfg.source)
    except ConfigError:
        return []
    src = found.by_task.get(task)
    if src is None:
        return [_mismatch(cfg.source, task, frozenset(found.by_task))]
    if src.checks is None or source_path_problem(cfg.source) is not None:  # checks may assume the path exists
        return []
    try:
        return [str(p) for p in src.checks(cfg, found.arg)]
    except Exception as e:  # a user's check that fails is reported, not raised, by fedsim validate
        return [f"data.source: the config checks of {found.name!r} raised {type(e).__name__}: {e}"]


def source_problems(cfg: Config) -> list[str]:
    """Every problem of ``cfg.data.source`` for ``cfg.task.kind`` (one line each, naming its key): the name is
    known or imports (user module), its argument fits (a file or folder exists), its data is installed, it serves
    the task, and its own config checks. Cheap: reads no data file (a user module named by spec is imported)."""
    first = source_path_problem(cfg.data.source)
    out = [first] if first else []
    return out + [p for p in _task_problems(cfg.task.kind, cfg.data) if p not in out]


def load_dataset(cfg: DataConfig, seed: int, task: str) -> Dataset:
    """Call the loader ``cfg.source`` names for ``task`` and check what it returns (:func:`as_dataset`).

    Raises:
        DataError: every problem :func:`source_problems` reports (first line), and what the loader raises.
    """
    problem = source_path_problem(cfg.source) or task_source_problem(task, cfg)
    if problem is not None:
        raise DataError(problem)
    found = resolve_source(cfg.source)
    return as_dataset(found.by_task[task].load(cfg, seed, found.arg), task, cfg.source)


def as_dataset(out: Any, task: str, source: str) -> Dataset:
    """A loader's result as a dataset for ``task``: an InstructDataset for causal_lm; a TextDataset, or a
    non-empty ``(texts, labels)`` pair of equal lengths (string labels map to ids in sorted order, integer labels
    are the ids) with at least 2 classes, for classification. Raises DataError naming data.source otherwise."""
    if task == "causal_lm":
        if isinstance(out, InstructDataset):
            return out
        raise DataError(
            f"data.source: {source!r} returned {type(out).__name__} for task.kind causal_lm; return an "
            "InstructDataset (fedsim.data.types) of prompt/response pairs (docs/extending.md)"
        )
    if isinstance(out, TextDataset):
        return out
    if isinstance(out, tuple) and len(out) == 2 and len(out[0]) == len(out[1]) and len(out[0]) > 0:
        texts, labels = [str(t) for t in out[0]], list(out[1])
        if any(isinstance(v, str) for v in labels):
            names = sorted({str(v) for v in labels})
            ids = np.asarray([names.index(str(v)) for v in labels], dtype=np.int64)
        else:
            ids = np.asarray(labels, dtype=np.int64)
            names = [str(i) for i in range(int(ids.max()) + 1)]
        if len(set(ids.tolist())) < 2:
            raise DataError(f"data.source: {source!r} returned fewer than 2 classes; a classifier needs at least 2")
        return TextDataset(texts, ids, tuple(names))
    raise DataError(
        f"data.source: {source!r} returned {type(out).__name__}; return a TextDataset or a non-empty "
        "(texts, labels) pair of equal lengths (docs/extending.md)"
    )


def forget_source(name: str) -> None:
    """Drop ``name`` from the table (a test's cleanup, or a notebook re-registering under another declaration);
    built-in names are refused with ValueError."""
    by_task = _TABLE.get(name, {})
    if any(_origin(s.load)[0].startswith("fedsim.") for s in by_task.values()):
        raise ValueError(f"data source {name!r} is built in")
    _TABLE.pop(name, None)
