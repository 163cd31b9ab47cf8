"""Sweep files with a ``search:`` section: parsing, distributions, trial configs and all-at-once validation (pure:
no Ray, no training)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import fedsim.sweep.search as search_mod
from fedsim.cli import main
from fedsim.errors import ConfigError, UserError
from fedsim.sweep.search import Distribution, MetricTracker, parse_distribution, quote_distributions, trial_config
from fedsim.sweep.search_run import check_same_search, write_search_file
from fedsim.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return path


BLOCK = """
base: tiny
set: {federation.rounds: 4}
search:
  algorithm: random
  metric: final_eval_accuracy
  samples: 5
  scheduler: asha
  space:
    federation.lr: loguniform(1e-4, 1)
    lora.r: choice([2, 4, 8])
    federation.local_steps: randint(1, 3)
    lora.alpha: [8, 16]
rules:
  - when: {lora.r: 8}
    set: {lora.alpha: 32}
"""


def test_block_style_search_is_parsed_with_defaults(tmp_path):
    spec = load_sweep(_write(tmp_path, BLOCK))
    s = spec.search
    assert spec.cells == () and s is not None and spec.name == "search"
    assert (s.algorithm, s.metric, s.mode, s.samples) == ("random", "final_eval_accuracy", "max", 5)
    assert s.scheduler == "asha"
    assert (s.seed, s.max_concurrent, s.grace_period, s.reduction_factor) == (0, 1, 1, 2.0)  # seed: the config's
    assert s.space == {
        "federation.lr": Distribution("loguniform", (1e-4, 1)),
        "lora.r": Distribution("choice", (2, 4, 8)),
        "federation.local_steps": Distribution("randint", (1, 3)),
        "lora.alpha": Distribution("choice", (8, 16)),
    }
    assert s.config.federation.rounds == 4 and s.config.runtime.backend == "local"


def test_trial_config_is_base_set_sampled_values_then_rules(tmp_path):
    s = load_sweep(_write(tmp_path, BLOCK.replace("base: tiny", "base: tiny\nset: {runtime.backend: ray}"))).search
    cfg = trial_config(s, {"federation.lr": 0.01, "lora.r": 8, "lora.alpha": 8})
    assert cfg.federation.lr == 0.01 and cfg.lora.r == 8 and cfg.lora.alpha == 32  # the rule wins
    assert cfg.runtime.backend == "local"  # a trial runs in-process
    assert trial_config(s, {"lora.r": 4, "lora.alpha": 8}).lora.alpha == 8


def test_the_issue_flow_style_example_reads_unquoted_distributions(tmp_path):
    text = (
        "base: tiny\nsearch: {algorithm: optuna, metric: final_eval_accuracy, mode: max, samples: 20, "
        "space: {federation.lr: loguniform(0.01, 1), lora.r: choice([4, 8])}, scheduler: asha}\n"
    )
    s = load_sweep(_write(tmp_path, text)).search
    assert s.space == {"federation.lr": Distribution("loguniform", (0.01, 1)), "lora.r": Distribution("choice", (4, 8))}
    assert (s.samples, s.scheduler, s.mode) == (20, "asha", "max")
    quoted = "x: {a: 'uniform(0, 1)', b: \"choice([1, 2])\"}"
    assert quote_distributions(quoted) == quoted  # already quoted: left alone


def test_every_search_problem_is_reported_at_once_naming_its_key(tmp_path):
    text = """
base: tiny
search:
  algorithm: hyperopt
  metric: accuracy
  mode: up
  samples: 0
  scheduler: hyperband
  colour: blue
  space:
    federation.lrr: uniform(0.1, 1)
    federation.lr: loguniform(0, 1)
    lora.r: gaussian(4, 1)
    federation.clients: randint(-2, 3)
"""
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, text))
    problems = err.value.problems
    want = [
        "search.colour: unknown key",
        "search.algorithm: got 'hyperopt'; the choices are optuna, random",
        "search.metric: got 'accuracy'; the choices are final_eval_accuracy, best_eval_accuracy",
        "search.mode: got 'up'; the choices are max, min",
        "search.samples: expected an integer >= 1, got 0",
        "search.scheduler: got 'hyperband'; the choices are none, asha",
        "search.space.federation.lrr: unknown key (did you mean 'federation.lr'?)",
        "search.space.federation.lr: loguniform: both bounds must be > 0",
        "search.space.lora.r: unknown distribution 'gaussian'",
        "search.space.federation.clients: -2 gives a bad config: federation.clients must be >= 1",
    ]
    for line in want:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(want), problems


def test_grid_and_search_together_and_search_only_keys(tmp_path):
    text = "base: tiny\nparallel: 2\ngrid: {seed: [0, 1]}\nsearch: {algorithm: random, metric: final_eval_loss, "
    text += "samples: 2, space: {federation.lr: 'uniform(0.1, 1)'}, scheduler: asha, grace_period: 9}\n"
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, text))
    problems = "\n".join(err.value.problems)
    assert "grid: a sweep has either grid:" in problems and "parallel: not for a search" in problems
    assert "search.grace_period: 9 is more than federation.rounds (3)" in problems


def test_optuna_missing_is_a_config_problem(tmp_path, monkeypatch):
    real = search_mod.importlib.util.find_spec
    monkeypatch.setattr(search_mod.importlib.util, "find_spec", lambda n: None if n == "optuna" else real(n))
    with pytest.raises(ConfigError, match=r"search.algorithm: optuna is not installed; pip install 'fedsim\[tune\]'"):
        load_sweep(_write(tmp_path, BLOCK.replace("algorithm: random", "algorithm: optuna")))


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("uniform(0, 1)", Distribution("uniform", (0, 1))),
        ("quniform(0, 1, 0.25)", Distribution("quniform", (0, 1, 0.25))),
        ("randint(2, 2)", Distribution("randint", (2, 2))),
        ("choice(a, b)", Distribution("choice", ("a", "b"))),
        (["x"], Distribution("choice", ("x",))),
        ("uniform(1, 0)", "the lower bound must be below the upper one"),
        ("randint(1.5, 3)", "expected two integers"),
        ("quniform(0, 1)", "expected 3 numbers"),
        ("quniform(0, 1, 0)", "the step q must be > 0"),
        ("choice([])", "expected at least one value"),
        ("0.5", "expected a distribution"),
        (0.5, "expected a distribution"),
    ],
)
def test_parse_distribution(raw, want):
    got = parse_distribution(raw)
    if isinstance(want, Distribution):
        assert got == want
    else:
        assert isinstance(got, str) and want in got


def test_probe_values_cover_bounds_and_middle():
    assert Distribution("loguniform", (0.01, 1)).probe_values() == pytest.approx([0.01, 0.1, 1.0])
    assert Distribution("randint", (1, 4)).probe_values() == [1, 2, 4]
    assert Distribution("choice", ("a", "b")).probe_values() == ["a", "b"]
    assert str(Distribution("choice", (4, 8))) == "choice([4, 8])"


def test_metric_tracker_latest_best_and_non_finite():
    latest = MetricTracker("final_eval_loss", "min")
    assert latest.update({"eval_loss": None}) is None and latest.value is None  # a round without evaluation
    assert latest.update({"eval_loss": 1.5}) == 1.5
    assert latest.update({"eval_loss": math.nan}) == math.inf  # a diverged run is the worst, not ignored
    best = MetricTracker("best_eval_accuracy", "max")
    assert [best.update({"eval_accuracy": a}) for a in (0.3, 0.5, 0.4)] == [0.3, 0.5, 0.5]


def test_cli_bad_search_exits_2_listing_the_keys(tmp_path, capsys):
    path = _write(tmp_path, "base: tiny\nsearch: {algorithm: grid, metric: final_eval_loss, samples: 1, "
                  "space: {federation.lr: 'uniform(0.1, 1)', nope.key: [1, 2]}}\n")  # fmt: skip
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "search.algorithm: got 'grid'; the choices are optuna, random" in err
    assert "search.space.nope.key: unknown key" in err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_cli_dry_run_lists_the_space(tmp_path, capsys):
    assert main(["sweep", str(_write(tmp_path, BLOCK)), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "search: random, 5 trials, final_eval_accuracy (max), scheduler asha" in out
    assert "federation.lr: loguniform(0.0001, 1)" in out and "lora.r: choice([2, 4, 8])" in out


def test_the_readme_search_example_loads(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- search-example[^>]*-->\s*```yaml\n(.*?)```", text, re.DOTALL)
    assert match, "README.md: no ```yaml block after the search-example marker"
    spec = load_sweep(_write(tmp_path, match.group(1)))
    assert spec.name == "lr-search" and spec.search is not None and spec.search.samples == 20
    assert set(spec.search.space) == {"federation.lr", "lora.r"}


def test_a_rerun_must_give_the_same_search(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    spec = load_sweep(_write(tmp_path, BLOCK)).search
    check_same_search(out, spec)  # a new folder
    write_search_file(out, spec)
    check_same_search(out, spec)
    other_cpus = BLOCK.replace("set: {federation.rounds: 4}", "set: {federation.rounds: 4, runtime.cpus_per_worker: 2}")
    check_same_search(out, load_sweep(_write(tmp_path, other_cpus)).search)  # runtime.* does not count
    for changed in (BLOCK.replace("samples: 5", "samples: 6"), BLOCK.replace("rounds: 4", "rounds: 5")):
        with pytest.raises(UserError, match="holds a search with other settings or another config"):
            check_same_search(out, load_sweep(_write(tmp_path, changed)).search)
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "sweep.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="holds a grid sweep, not a search"):
        check_same_search(grid, spec)


def test_lost_trials_are_dropped_only_once_the_search_has_ended_and_only_those_from_before(tmp_path):
    from fedsim.sweep.search_run import drop_lost_trials, trial_folders

    for sub, cell in [("cells", "kept"), ("tb", "kept"), ("cells", "lost"), ("tb", "lost"), ("tb", "lost-tb-only"),
                      ("cells", "new")]:  # fmt: skip
        (tmp_path / sub / cell).mkdir(parents=True)
        (tmp_path / sub / cell / "file").write_text("x")
    assert trial_folders(tmp_path) == {"kept", "lost", "lost-tb-only", "new"}
    before = {"kept", "lost", "lost-tb-only"}  # "new": made during this session (a trial not listed yet)
    unfinished = [{"cell": "kept", "status": "complete"}, {"cell": "other", "status": "unfinished"}]
    assert drop_lost_trials(tmp_path, unfinished, before, samples=2) == []
    ended = [{"cell": "kept", "status": "complete"}, {"cell": "other", "status": "stopped"}]
    assert drop_lost_trials(tmp_path, ended, before, samples=3) == []  # a trial short: not ended
    assert drop_lost_trials(tmp_path, [], before, samples=2) == []  # no table yet
    assert trial_folders(tmp_path) == {"kept", "lost", "lost-tb-only", "new"}
    assert drop_lost_trials(tmp_path, ended, before, samples=2) == ["lost", "lost-tb-only"]
    assert trial_folders(tmp_path) == {"kept", "new"} and (tmp_path / "tb" / "kept" / "file").is_file()
    assert trial_folders(tmp_path / "nothing") == set()
