"""Plugins from a module OUTSIDE the package: docs/extending.md's example (method, data source, model), written
out as the docs show it into a temporary folder put on sys.path; check_method on it and on broken methods; the
config-time checks of a plugin method's capabilities; entry points; bad specs (exit 2 naming the key); the
registered data source's declaration (config checks by name and by spec); tiny runs on the local backend with and
without DP, and by the source's registered name (the Ray backend: tests/runtime/test_plugin_runs.py)."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fedsim
from fedsim.cli import main
from fedsim.data.registry import forget_source
from fedsim.methods.base import Method, get_method
from fedsim.testing import MethodContractError, check_method
from fedsim.types import Role

ROOT = Path(__file__).resolve().parents[1]
MODULE = "my_fedsim_ext"
SOURCE = "text-folder"  # the name docs/extending.md's data source registers
BLOCKS = ("method", "data", "model")


def docs_block(name: str) -> str:
    """The ```python block after ``<!-- extending:NAME -->`` in docs/extending.md."""
    text = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    after = text[text.index(f"<!-- extending:{name} -->") :]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, f"docs/extending.md: no python block after extending:{name}"
    return match.group(1)


def write_example(folder: Path, texts_per_label: int = 40) -> Path:
    """``folder/my_fedsim_ext.py`` from the docs' blocks, and ``folder/news/<label>/<i>.txt`` (3 labels whose
    texts differ by their words, so a model can learn them); returns the text folder."""
    (folder / f"{MODULE}.py").write_text("\n\n".join(docs_block(b) for b in BLOCKS), encoding="utf-8")
    news = folder / "news"
    words = {"sport": "goal match team score", "tech": "chip code data cloud", "money": "bank rate stock fund"}
    for i, (label, vocab) in enumerate(words.items()):
        (news / label).mkdir(parents=True)
        for j in range(texts_per_label):
            pick = vocab.split()
            text = " ".join(pick[(j + k) % len(pick)] for k in range(3 + j % 3)) + f" {i}{j % 7}"
            (news / label / f"{j:03d}.txt").write_text(text, encoding="utf-8")
    return news


@pytest.fixture
def example(tmp_path, monkeypatch) -> Path:
    """The example module on sys.path (removed again after the test, with the imported module)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    news = write_example(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield news
    sys.modules.pop(MODULE, None)
    forget_source(SOURCE)


def plugin_overrides(news: Path) -> dict[str, object]:
    return {
        "method.name": f"{MODULE}:MedianB",
        "data.source": f"{MODULE}:text_folder:{news}",
        "model.name": f"{MODULE}:char_bert",
        "federation.rounds": 2,
        "federation.clients": 4,
        "federation.clients_per_round": 3,
    }


def test_the_docs_method_passes_check_method(example):
    check_method(get_method(f"{MODULE}:MedianB"))
    import my_fedsim_ext

    exec(compile(docs_block("check"), "docs/extending.md:check", "exec"), {"MedianB": my_fedsim_ext.MedianB})


def _caps(**kw):
    from fedsim.methods.base import Capabilities

    return Capabilities(**kw)


class _Shared(Method):
    def role(self, round, key, server_state):
        return Role.SHARED


def test_check_method_names_the_failed_property_of_a_broken_method():
    class Lying(_Shared):  # declares the (default) linear aggregate, divides by the client count, not the weights
        def aggregate_sums(self, global_state, sums, plan, server_state):
            new = dict(global_state)
            for k in plan.uploaded:
                new[k] = (sums.sums[k] / len(sums.client_ids)).to(global_state[k].dtype)
            return new, server_state

    with pytest.raises(MethodContractError, match=r"check_method\(Lying\): property 'weighted mean' failed: round 1"):
        check_method(Lying)

    class Plain(_Shared):  # the unweighted mean as a buffered rule, but declared linear (the default)
        def aggregate(self, global_state, updates, plan, server_state):
            new = dict(global_state)
            for k in plan.uploaded:
                new[k] = torch.stack([u.tensors[k] for u in updates]).mean(0)
            return new, server_state

    with pytest.raises(MethodContractError, match=r"property 'registration' failed"):
        check_method(Plain)  # a linear method may not override aggregate

    class HonestPlain(Plain):
        capabilities = _caps(linear=False, privacy_modes=frozenset({"none", "sample"}))

    check_method(HonestPlain)  # declared as what it is: the contract holds

    class Partial(_Shared):  # plans only the LoRA factors, forgets the head
        def plan(self, round, keys, server_state):
            from fedsim.types import RoundPlan

            return RoundPlan(round=round, roles={k: Role.SHARED for k in keys if not k.startswith("head.")})

    with pytest.raises(MethodContractError, match=r"property 'plan covers every key' failed"):
        check_method(Partial)
    with pytest.raises(TypeError):
        check_method(object)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["method.name=my_fedsim_ext:MedianB", "privacy.mode=client", "privacy.epsilon=8"], "privacy.mode"),
        (["method.name=my_fedsim_ext:MedianB", "lora.variant=vera"], "lora.variant"),
        (["method.name=my_fedsim_ext:Nope"], "method.name"),
        (["method.name=no_such_module_xyz:M"], "method.name"),
        (["method.name=my_fedsim_ext:text_folder"], "method.name"),
        (["data.source=my_fedsim_ext:Nope"], "data.source"),
        (["data.source=my_fedsim_ext:MedianB.capabilities"], "data.source"),
        (["model.name=my_fedsim_ext:nope"], "model.name"),
    ],
)
def test_validate_refuses_bad_plugin_input_naming_the_key(example, capsys, sets, key):
    args = ["validate", "tiny"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^\s+- {re.escape(key)}", err, re.M), err


def test_validate_accepts_the_plugins(example, capsys):
    args = ["validate", "tiny"]
    for k, v in plugin_overrides(example).items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0, capsys.readouterr().err


def test_entry_points_name_a_plugin_and_fedsim_methods_lists_it(example, tmp_path, monkeypatch, capsys):
    dist = tmp_path / "dists" / "my_fedsim_ext-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-fedsim-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
        [fedsim.methods]
        median_b = {MODULE}:MedianB
        [fedsim.data]
        textdir = {MODULE}:text_folder
        {SOURCE} = {MODULE}:text_folder
        """)
    )
    monkeypatch.syspath_prepend(str(dist.parent))
    from fedsim.plugins import _entry_points

    _entry_points.cache_clear()
    try:
        assert main(["methods"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^median_b\s+none,sample\s+lora,rslora\s+buffered", out, re.M), out
        assert (
            main(["validate", "tiny", "--set", "method.name=median_b", "--set", f"data.source=textdir:{example}"]) == 0
        )
        assert main(["validate", "tiny", "--set", "method.name=median_b", "--set", "privacy.mode=client",
                     "--set", "privacy.epsilon=8"]) == 2  # fmt: skip
        sys.modules.pop(MODULE, None)  # as in a fresh process: the entry point imports it when a config names it
        forget_source(SOURCE)
        assert main(["validate", "tiny", "--set", f"data.source={SOURCE}:{example}"]) == 0
        from fedsim.data.registry import resolve_source

        assert set(resolve_source(f"{SOURCE}:x").by_task) == {"classification"}  # its declaration, not every task
    finally:
        _entry_points.cache_clear()
        forget_source("textdir")


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "sample-dp"])
def test_the_docs_example_runs_end_to_end_on_the_local_backend(example, tmp_path, dp):
    overrides = plugin_overrides(example)
    if dp:
        overrides |= {"privacy.mode": "sample", "privacy.epsilon": 8}
    result = fedsim.run("tiny", overrides=overrides, out=tmp_path / "run", progress=False)
    assert result.rounds.num_rows == 2
    assert result.summary["method"] == f"{MODULE}:MedianB"
    assert result.summary["method_capabilities"]["linear"] is False
    assert (result.summary["epsilon"] is not None) == dp
    assert set(result.clients.column("status").to_pylist()) == {"ok"}
    assert "char-bert" not in (tmp_path / "run" / "config.yaml").read_text()  # the config keeps the plugin name


def _validate_problems(capsys, sets: list[str]) -> tuple[int, str]:
    args = ["validate", "tiny"]
    for item in sets:
        args += ["--set", item]
    code = main(args)
    return code, capsys.readouterr().err


def test_the_registered_source_declaration_holds_at_config_time(example, tmp_path, capsys):
    """``my_fedsim_ext:text_folder:PATH`` keeps what ``register_source`` declared: the folder argument, the
    source's own checks, its task; each refusal names data.source (or task.kind) before any work."""
    one_label = tmp_path / "one"
    (one_label / "only").mkdir(parents=True)
    spec = f"{MODULE}:text_folder"
    cases = [
        ([f"data.source={spec}:{tmp_path / 'missing'}"], r"^\s+- data\.source: \S+ path .*missing' does not exist"),
        ([f"data.source={spec}"], r"^\s+- data\.source: 'my_fedsim_ext:text_folder' names no file"),
        ([f"data.source={spec}:{one_label}"], r"^\s+- data\.source: .*one has 1 label subfolder\(s\)"),
        ([f"data.source={spec}:{example}", "task.kind=causal_lm"], r"^\s+- task\.kind: causal_lm needs prompt/"),
    ]
    for sets, line in cases:
        code, err = _validate_problems(capsys, sets)
        assert code == 2 and re.search(line, err, re.M), (sets, err)
    code, err = _validate_problems(capsys, [f"data.source={spec}:{example}"])
    assert code == 0, err


def test_a_registered_source_is_named_like_a_built_in(example):
    """Once the module is imported its source is in the same table as the built-ins: listed, checked, loaded."""
    from fedsim.config.schema import Config, DataConfig
    from fedsim.data.registry import available_sources, source_problems
    from fedsim.data.sources import load_source

    assert SOURCE not in available_sources()
    import my_fedsim_ext  # noqa: F401  (registers text-folder)

    assert SOURCE in available_sources("classification") and SOURCE not in available_sources("causal_lm")
    assert source_problems(Config(data=DataConfig(source=f"{SOURCE}:{example}"))) == []
    ds = load_source(DataConfig(source=f"{SOURCE}:{example}", max_examples=30), seed=0)
    assert len(ds) == 30 and ds.label_names == ("money", "sport", "tech")
    with pytest.raises(ValueError, match="already registered"):
        from fedsim.data.registry import register_source

        register_source("csv")(my_fedsim_ext.text_folder)


def test_the_registered_source_runs_by_name_on_the_local_backend(example, tmp_path):
    import my_fedsim_ext  # noqa: F401  (registers text-folder)

    overrides = plugin_overrides(example) | {"data.source": f"{SOURCE}:{example}"}
    result = fedsim.run("tiny", overrides=overrides, out=tmp_path / "run", progress=False)
    assert result.rounds.num_rows == 2
    assert set(result.clients.column("status").to_pylist()) == {"ok"}
    assert f"{SOURCE}:" in (tmp_path / "run" / "config.yaml").read_text()
