"""The body of a sweep cell's Ray task runs the runner it is handed (the pool knows nothing of sweeps) and turns a
failure into the cell's error text. No Ray cluster is started."""

from __future__ import annotations

from fedsim.config.schema import Config
from fedsim.runtime.sweep_pool import run_cell_task


def test_the_cell_task_runs_the_given_runner_and_returns_its_error_text():
    calls = []

    def ok(cfg: Config, where: str, label: str) -> None:
        calls.append((where, label))

    def boom(cfg: Config, where: str, label: str) -> None:
        raise ValueError(f"cell {label} broke")

    assert run_cell_task(ok, Config(), "/tmp/x", "c1") is None
    assert calls == [("/tmp/x", "c1")]
    error = run_cell_task(boom, Config(), "/tmp/x", "c2")
    assert error is not None and error.startswith("ValueError: cell c2 broke\n") and "Traceback" in error
