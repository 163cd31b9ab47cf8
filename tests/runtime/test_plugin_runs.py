"""docs/extending.md's plugins (method, data source, model) from a module outside the package, on the Ray backend
with and without DP: the method module is not installed, so the backend ships it with its actors' runtime_env.
The data source also runs by the name it registers (``text-folder``), which exists in the driver only: sources run
on the driver and the workers get the tokenised data."""

from __future__ import annotations

import sys

import pytest

import fedsim
from fedsim.data.registry import forget_source
from tests.test_plugins import MODULE, SOURCE, plugin_overrides, write_example


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "sample-dp"])
def test_the_docs_example_runs_on_the_ray_backend(tmp_path, monkeypatch, ray_cluster, dp):
    folder = tmp_path / "user_code"
    folder.mkdir()
    news = write_example(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    overrides = plugin_overrides(news) | {"runtime.backend": "ray", "runtime.workers": 2}
    if dp:
        overrides |= {"privacy.mode": "sample", "privacy.epsilon": 8}
    try:
        result = fedsim.run("tiny", overrides=overrides, out=tmp_path / "run", progress=False)
        from fedsim.runtime.resources import plugin_runtime_env

        shipped = plugin_runtime_env(f"{MODULE}:MedianB")  # the module file, uploaded for the actors
        assert [uri.split("://")[0] for uri in shipped["py_modules"]] == ["gcs"]
        assert plugin_runtime_env("ffa_lora") == {}
    finally:
        sys.modules.pop(MODULE, None)
    assert result.rounds.num_rows == 2
    assert set(result.clients.column("status").to_pylist()) == {"ok"}
    assert set(result.clients.column("worker_id").to_pylist()) <= {0, 1}
    assert (result.summary["epsilon"] is not None) == dp


@pytest.mark.ray
def test_the_registered_source_runs_by_name_on_the_ray_backend(tmp_path, monkeypatch, ray_cluster):
    folder = tmp_path / "user_code"
    folder.mkdir()
    news = write_example(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    try:
        import my_fedsim_ext  # noqa: F401  (registers text-folder in this process only)

        overrides = plugin_overrides(news) | {
            "data.source": f"{SOURCE}:{news}",
            "runtime.backend": "ray",
            "runtime.workers": 2,
        }
        result = fedsim.run("tiny", overrides=overrides, out=tmp_path / "run", progress=False)
    finally:
        sys.modules.pop(MODULE, None)
        forget_source(SOURCE)
    assert result.rounds.num_rows == 2
    assert set(result.clients.column("status").to_pylist()) == {"ok"}
    assert set(result.clients.column("worker_id").to_pylist()) <= {0, 1}
    assert result.summary["method"] == f"{MODULE}:MedianB"
