"""docs/extending.md's plugins (method, data source, model) from a module outside the package, on the Ray backend
with and without DP: the method module is not installed, so the backend ships it with its actors' runtime_env."""

from __future__ import annotations

import sys

import pytest

import fedsim
from tests.test_plugins import MODULE, plugin_overrides, write_example


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
