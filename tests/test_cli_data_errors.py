"""Data problems found while reading the data: exit 2, a message naming the key, nothing written."""

from __future__ import annotations

import pytest

from fedsim.cli import main


def _csv(path):
    path.write_text("sentence,target\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20)))
    return path


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.text_field=body"], "data.text_field"),
        (["data.label_field=category"], "data.label_field"),
        (["federation.clients=50", "federation.clients_per_round=5"], "federation.clients"),
    ],
)
def test_data_errors_exit_2_before_any_output(tmp_path, capsys, overrides, key):
    data = _csv(tmp_path / "d.csv")
    out = tmp_path / "out"
    base = [f"data.source=csv:{data}", "data.text_field=sentence", "data.label_field=target", "runtime.backend=local"]
    args = ["run", "tiny", "--out", str(out)]
    for o in [*base, *overrides]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["data.prompt_field=question"], "data.prompt_field"), (["data.response_field=answer"], "data.response_field")],
)
def test_causal_lm_jsonl_missing_field_exits_2_naming_the_key(tmp_path, capsys, overrides, key):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "say {i}", "response": "{i}"}}\n' for i in range(20)))
    out = tmp_path / "out"
    args = ["run", "tiny-lm", "--out", str(out), "--set", f"data.source=jsonl:{data}"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err
    assert not out.exists()
