"""Resume: a run continued from a checkpoint ends exactly where an uninterrupted run ends (local backend)."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from fedsim.cli import main
from fedsim.errors import RunStopped
from fedsim.simulation import run_simulation
from fedsim.validation import load_config

METRICS = ("round", "train_loss", "eval_loss", "eval_accuracy", "epsilon_max", "bytes_up", "bytes_down", "clients")


def _cfg(*extra: str):
    cfg, _ = load_config(
        "tiny",
        [
            "method.name=as_lora",  # server state (EMA, choices) must survive the resume
            "privacy.mode=sample",
            "privacy.epsilon=8",  # ledgers must survive it
            "federation.rounds=6",
            "federation.eval_every=1",
            "runtime.checkpoint_every=3",
            *extra,
        ],
    )
    return cfg


def _metrics(run_dir) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in pq.read_table(run_dir / "rounds.parquet").to_pylist()]


def test_resume_from_a_middle_checkpoint_equals_the_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    run_simulation(_cfg(), full, progress=False)
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    # as if killed during round 6: no summary, newest complete checkpoint = round 3 (checkpoints 3 and 6 are kept)
    (stopped / "summary.json").unlink()
    assert sorted(p.name for p in (stopped / "checkpoints").glob("round-*")) == ["round-000003", "round-000006"]
    shutil.rmtree(stopped / "checkpoints" / "round-000006")
    assert main(["resume", str(stopped)]) == 0
    assert _metrics(stopped) == _metrics(full)  # rounds 4-6 recomputed, rounds 1-3 kept, nothing doubled
    drop = ("seconds",)  # wall time differs; every other client column must match
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in pq.read_table(d / "clients.parquet").to_pylist()]
            for d in (stopped, full)]  # fmt: skip
    assert rows[0] == rows[1]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, stopped))
    assert b["resumed_from_round"] == 3
    for key in ("final_eval_accuracy", "final_eval_loss", "best_eval_accuracy", "epsilon", "bytes_up", "bytes_down",
                "initial_eval_accuracy", "initial_eval_loss"):  # fmt: skip
        assert a[key] == b[key], key


def test_resume_refuses_complete_and_non_runs(tmp_path, capsys):
    run = tmp_path / "done"
    run_simulation(_cfg("federation.rounds=1"), run, progress=False)
    assert main(["resume", str(run)]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["run", "tiny", "--out", str(run)]) == 2  # a finished run is not overwritten ...
    assert "--overwrite" in capsys.readouterr().err
    assert main(["run", "tiny", "--set", "federation.rounds=1", "--out", str(run), "--overwrite"]) == 0  # ... unless


def test_too_many_failed_clients_stop_the_run_resumably(tmp_path, monkeypatch):
    from fedsim.client import worker as worker_mod

    real = worker_mod.LocalTrainer.train

    def fails_in_round_3(self, *args, **kwargs):
        if kwargs.get("round") == 3:
            raise FloatingPointError("loss is nan")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(worker_mod.LocalTrainer, "train", fails_in_round_3)
    out = tmp_path / "run"
    with pytest.raises(RunStopped, match=r"round 3: 4 of 4 clients failed .* loss is nan.*round-000000"):
        run_simulation(_cfg(), out, progress=False)
    monkeypatch.undo()
    assert main(["resume", str(out)]) == 0
    full = tmp_path / "full"
    run_simulation(_cfg(), full, progress=False)
    assert _metrics(out) == _metrics(full)


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    from fedsim.server import checkpoint as ck

    real = ck.save_file

    def dies_writing_round_4(tensors, path):  # the process "dies" half-way through checkpoint 4
        if ".tmp-round-000004" in str(path):
            raise KeyboardInterrupt("killed during the checkpoint write")
        real(tensors, path)

    monkeypatch.setattr(ck, "save_file", dies_writing_round_4)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_simulation(_cfg("runtime.checkpoint_every=2"), out, progress=False)
    monkeypatch.undo()
    assert not (out / "summary.json").exists()
    assert (out / "checkpoints" / ".tmp-round-000004").is_dir()  # the half-written one
    assert ck.latest_checkpoint_dir(out).name == "round-000002"  # the previous one, intact
    assert main(["resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_round"] == 2
    full = tmp_path / "full"
    run_simulation(_cfg("runtime.checkpoint_every=2"), full, progress=False)
    assert _metrics(out) == _metrics(full)


def test_checkpoint_every_0_writes_only_the_last_round_and_a_resume_starts_over(tmp_path):
    """runtime.checkpoint_every: 0 writes no checkpoint before round 1 (none until the last round); a run stopped
    before then resumes from the start and still equals the uninterrupted run."""
    cfg = _cfg("runtime.checkpoint_every=0", "federation.rounds=3")
    full = tmp_path / "full"
    run_simulation(cfg, full, progress=False)
    assert sorted(p.name for p in (full / "checkpoints").glob("round-*")) == ["round-000003"]
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    (stopped / "summary.json").unlink()  # as if killed during round 3: rounds 1-2 recorded, no checkpoint yet
    shutil.rmtree(stopped / "checkpoints")
    assert main(["resume", str(stopped)]) == 0
    assert _metrics(stopped) == _metrics(full)
    assert json.loads((stopped / "summary.json").read_text())["resumed_from_round"] == 0
    # without a checkpoint before round 1 the initial evaluation runs after round 1's training: the same result
    every = tmp_path / "every"
    run_simulation(_cfg("runtime.checkpoint_every=1", "federation.rounds=3"), every, progress=False)
    a, b, c = (json.loads((d / "summary.json").read_text()) for d in (full, stopped, every))
    for key in ("initial_eval_accuracy", "initial_eval_loss", "final_eval_loss", "epsilon"):
        assert a[key] == b[key] == c[key], key
