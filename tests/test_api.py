"""The Python API (fedsim.run / load_run / validate, lazy import), the README's example run as written, and the
TensorBoard events of a run equal to its rounds.parquet."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim
from fedsim.cli import main
from fedsim.metrics.observers import RunObserver
from fedsim.metrics.tensorboard import TAGS
from fedsim.validation import load_config

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- python-api-example"


def readme_example() -> str:
    """The README's Python API code block (the ```python block after the marker)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(MARKER) :]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, "README.md: no ```python block after the python-api-example marker"
    return match.group(1)


def test_import_fedsim_is_light():
    code = (
        "import sys, fedsim; print(sorted(m for m in ('torch', 'ray', 'transformers', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_sweep_and_report_are_callable_even_after_their_subpackages_are_imported():
    import fedsim.report.build  # noqa: F401  (sets fedsim.report to the subpackage)
    import fedsim.sweep.runner  # noqa: F401

    assert callable(fedsim.sweep) and callable(fedsim.report)
    with pytest.raises(fedsim.UserError):
        fedsim.sweep("no-such-sweep.yaml")


def test_validate_takes_a_preset_a_dict_or_a_config_with_overrides():
    want = load_config("tiny", ["federation.rounds=2", "lora.targets=[query]"])[0]
    got = fedsim.validate("tiny", overrides={"federation.rounds": 2, "lora.targets": ["query"]})
    assert got == want
    assert fedsim.validate(want) == want
    assert fedsim.validate({"seed": 3, "federation.rounds": 2}).seed == 3
    assert fedsim.validate(want, overrides={"seed": 5}).seed == 5


def test_bad_overrides_raise_a_config_error_naming_the_keys():
    with pytest.raises(fedsim.ConfigError) as e:
        fedsim.validate("tiny", overrides={"federation.rounds": 0, "federation.nope": 1})
    text = str(e.value)
    assert "federation.rounds" in text and "federation.nope" in text


def test_run_refuses_a_non_empty_out_before_any_work(tmp_path):
    (tmp_path / "x").write_text("something")
    with pytest.raises(fedsim.UserError, match="refusing to overwrite"):
        fedsim.run("tiny", out=tmp_path, progress=False)


def _scalars(tb: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _assert_events_equal_rounds(result) -> None:
    events = _scalars(result.tb)
    rows = result.rounds.to_pylist()
    assert rows
    checked = 0
    for column, tag in TAGS.items():
        for row in rows:
            value = row.get(column)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                assert row["round"] not in events.get(tag, {}), (tag, row["round"])
                continue
            assert events[tag][row["round"]] == pytest.approx(float(value), rel=1e-6, abs=1e-9), (tag, row["round"])
            checked += 1
    assert checked >= 8 * len(rows)


class Rows(RunObserver):
    """Keeps what a run tells its observers: the first round it runs, each round's row, whether it ended."""

    def __init__(self) -> None:
        self.first_round: int | None = None
        self.rows: list[dict] = []
        self.summary: dict | None = None

    def on_start(self, start) -> None:
        self.first_round = start.first_round

    def on_round(self, record) -> None:
        self.rows.append(dict(record.row))

    def on_end(self, summary) -> None:
        self.summary = summary


def test_run_returns_the_tables_and_tensorboard_events_equal_rounds_parquet(tmp_path):
    seen = Rows()
    result = fedsim.run(
        "tiny",
        overrides={"federation.rounds": 2, "privacy.mode": "sample", "privacy.epsilon": 8},
        out=tmp_path / "r",
        progress=False,
        observers=[seen],
    )
    assert seen.first_round == 1 and seen.rows == result.rounds.to_pylist() and seen.summary == result.summary
    assert result.rounds.num_rows == 2 and result.clients.num_rows == 8
    assert result.summary["rounds"] == 2 and result.out == str(tmp_path / "r")
    assert (Path(result.adapter) / "adapter_config.json").is_file()
    _assert_events_equal_rounds(result)  # epsilon_max / median included (DP on)
    again = fedsim.load_run(tmp_path / "r")
    assert again.rounds.equals(result.rounds) and again.summary == result.summary
    with pytest.raises(fedsim.UserError, match="not a run folder"):
        fedsim.load_run(tmp_path)


def test_cli_run_tensorboard_prints_the_command(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["run", "tiny", "--out", str(out), "--set", "federation.rounds=1", "--tensorboard"]) == 0
    assert f"tensorboard --logdir {out / 'tb'}" in capsys.readouterr().out
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md:python-api-example", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "runs" / "api-demo" / "summary.json").is_file()
    assert "TensorBoard: tensorboard --logdir" in capsys.readouterr().out


def test_after_a_resume_the_events_still_equal_rounds_parquet(tmp_path):
    import shutil

    full = fedsim.run(
        "tiny",
        overrides={"federation.rounds": 4, "runtime.checkpoint_every": 2},
        out=tmp_path / "full",
        progress=False,
    )
    stopped = tmp_path / "stopped"
    shutil.copytree(full.out, stopped)
    # as if killed during round 4 after its events were written: no summary, newest checkpoint round 2
    (stopped / "summary.json").unlink()
    shutil.rmtree(stopped / "checkpoints" / "round-000004")
    (stopped / "checkpoints" / "LATEST").write_text("round-000002")
    seen = Rows()
    resumed = fedsim.resume(stopped, progress=False, observers=[seen])
    assert resumed.summary["resumed_from_round"] == 2 and resumed.rounds.num_rows == 4
    assert seen.first_round == 3 and seen.rows == resumed.rounds.to_pylist()[2:]
    assert resumed.rounds.column("wall_s") != full.rounds.column("wall_s")  # rounds 3-4 ran again
    _assert_events_equal_rounds(resumed)


def test_sweep_and_report_from_python_with_tensorboard_hparams_per_cell(tmp_path):
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        "base: tiny\nset: {federation.rounds: 1, data.synthetic_examples: 300}\n"
        "grid:\n  method.name: [fedavg_lora, ffa_lora]\n"
    )
    table = fedsim.sweep(sweep_file, out=tmp_path / "sweep")
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["complete", "complete"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for row in rows:
        acc = EventAccumulator(str(tmp_path / "sweep" / "tb" / row["cell"]))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["method.name"].string_value == row["grid:method.name"]
        (metric,) = (e.value for e in acc.Scalars("hparam/final_accuracy"))
        assert metric == pytest.approx(row["final_accuracy"], rel=1e-6)
    path = fedsim.report(tmp_path / "sweep")
    assert Path(path).name == "report.md" and Path(path).is_file()


def test_a_run_to_s3_mirrors_tb_and_load_run_reads_it_back(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = s3.uri("runs/api")
    result = fedsim.run("tiny", overrides={"federation.rounds": 2}, out=uri, progress=False)
    assert result.out == uri and result.tb == f"{uri}/tb" and result.adapter == f"{uri}/adapter"
    assert any(f.startswith("tb/events.out.tfevents.") for f in s3.files("runs/api")), s3.files("runs/api")
    again = fedsim.load_run(uri)
    assert again.rounds.equals(result.rounds) and again.summary == result.summary and again.clients.num_rows == 8
    assert not list(tmp_path.iterdir())  # nothing left behind locally
