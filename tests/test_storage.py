"""Storage URIs (fedsim.storage): ``--out``, ``resume``, ``report`` and ``sweep`` on local paths, file:// and s3://.

The s3:// tests run against a real S3-compatible server (SeaweedFS on 127.0.0.1, tests/s3_server.py), never a mock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsim import storage
from fedsim.cli import main
from fedsim.errors import UserError
from fedsim.server import checkpoint as ck
from fedsim.server.client_store import SPILL_DIR
from fedsim.simulation import run_simulation
from fedsim.storage import Location, RunMirror, is_uri, parse_location
from fedsim.validation import load_config

TINY = ["--set", "federation.rounds=4", "--set", "runtime.checkpoint_every=2", "--set", "federation.eval_every=1",
        "--set", "method.name=fedsa_lora", "--set", "privacy.mode=sample", "--set", "privacy.epsilon=8"]  # fmt: skip
# (fedsa_lora keeps client tensors and sample-level DP keeps per-client ledgers: both must survive a resume)
METRICS = ("round", "train_loss", "eval_loss", "eval_accuracy", "personal_accuracy", "epsilon_max", "bytes_up")


def _metrics(table: pa.Table) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in table.to_pylist()]


def _s3_table(s3, path: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(s3.read(path)))


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, so a stray local folder (e.g. `s3:`) would show."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pa.Table:
    """rounds.parquet of the uninterrupted local run of the TINY config."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", "tiny", *TINY, "--out", str(out)]) == 0
    return pq.read_table(out / "rounds.parquet")


# --- parsing, without a server ---------------------------------------------------------------------------------------


def test_plain_paths_and_file_uris_are_local_folders(tmp_path):
    assert parse_location("runs/x", "--out") == Location("runs/x", local=Path("runs/x"))
    loc = parse_location(f"file://{tmp_path}/run", "--out")
    assert loc.local == tmp_path / "run" and not loc.remote and loc.name == "run"
    assert is_uri("s3://b/k") and is_uri("gs://b") and not is_uri("/abs/path") and not is_uri("s3:relative")


def test_remote_locations_keep_bucket_and_prefix(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # else pyarrow asks AWS for the bucket's region
    loc = parse_location("s3://bucket/runs/exp1", "--out", check=False)
    assert loc.remote and loc.path == "bucket/runs/exp1" and loc.name == "exp1"
    cell = loc.child("cells", "c1")
    assert str(cell) == "s3://bucket/runs/exp1/cells/c1" and cell.path == "bucket/runs/exp1/cells/c1"


@pytest.mark.parametrize(
    "text, words",
    [("foo://bucket/run", "pyarrow cannot open foo:// URIs"), ("s3://", "no bucket in the URI"),
     ("file://relative/run", "pyarrow cannot open file:// URIs")],
)  # fmt: skip
def test_uris_pyarrow_cannot_open_are_user_errors_naming_the_flag(text, words):
    with pytest.raises(UserError) as err:
        parse_location(text, "--out")
    assert str(err.value).startswith(f"--out {text}: ") and words in str(err.value)


def test_the_module_constants_match_the_writers():
    assert (storage.SPILL_DIR, storage.CHECKPOINTS, storage.LATEST) == (SPILL_DIR, ck.CHECKPOINTS, ck.LATEST)


def test_bad_scheme_exits_2_naming_out_and_writes_nothing(cwd, capsys):
    assert main(["run", "tiny", "--out", "foo://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out foo://bucket/run: pyarrow cannot open foo:// URIs") and "s3://" in err
    assert list(cwd.iterdir()) == []


def test_unreachable_endpoint_exits_2(cwd, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert main(["run", "tiny", "--out", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "error: --out s3://bucket/run: cannot reach the storage" in err and "AWS_ENDPOINT_URL" in err
    assert list(cwd.iterdir()) == []


def test_storage_that_does_not_answer_is_refused_after_the_check_timeout():
    loc = parse_location("gs://fedsim-no-such-bucket/run", "--out", check=False)  # GCS: retries for many minutes
    assert loc.remote and loc.path == "fedsim-no-such-bucket/run"
    with pytest.raises(UserError, match=r"^--out gs://fedsim-no-such-bucket/run: (cannot reach|bucket)"):
        storage.check_access(loc, "--out", timeout=2)


# --- against the S3 server -------------------------------------------------------------------------------------------


def test_missing_bucket_exits_2_and_says_how_to_create_it(s3, cwd, capsys):
    for argv in (["run", "tiny", "--out", "s3://no-such-bucket/run"], ["resume", "s3://no-such-bucket/run"],
                 ["report", "s3://no-such-bucket/run"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "bucket 'no-such-bucket' does not exist" in err and "aws s3 mb s3://no-such-bucket" in err, argv
    assert list(cwd.iterdir()) == []


def test_run_to_s3_writes_every_output_and_refuses_to_overwrite_it(s3, cwd, capsys, reference):
    uri = s3.uri("runs/tiny")
    assert main(["run", "tiny", *TINY, "--out", uri]) == 0
    assert f"outputs: {uri}" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []  # no local `s3:` folder
    files = s3.files("runs/tiny")
    for name in ("config.yaml", "rounds.parquet", "clients.parquet", "roles.parquet", "summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/LATEST",
                 "checkpoints/round-000004/state.json", "checkpoints/round-000004/global.safetensors"):  # fmt: skip
        assert name in files, (name, files)
    assert not [f for f in files if f.startswith(SPILL_DIR) or ".tmp" in f or "/." in f]
    # the local run keeps the newest two checkpoints; the mirror deleted the pruned one
    assert sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/round-")}) == [
        "round-000002", "round-000004"]  # fmt: skip
    assert s3.read("runs/tiny/checkpoints/LATEST").decode().strip() == "round-000004"
    assert json.loads(s3.read("runs/tiny/summary.json"))["out_dir"] == uri
    assert _metrics(_s3_table(s3, "runs/tiny/rounds.parquet")) == _metrics(reference)

    assert main(["run", "tiny", "--out", uri]) == 2  # a finished run is not overwritten ...
    err = capsys.readouterr().err
    assert f"output {uri} holds a finished run; refusing to overwrite" in err and "--overwrite" in err
    assert main(["resume", uri]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["run", "tiny", "--set", "federation.rounds=1", "--out", uri, "--overwrite"]) == 0  # ... unless
    assert json.loads(s3.read("runs/tiny/summary.json"))["rounds"] == 1
    assert not [f for f in s3.files("runs/tiny") if f.startswith("checkpoints/round-000004")]


def test_non_empty_prefix_that_is_no_run_is_refused(s3, cwd, capsys):
    s3.server.filesystem().open_output_stream(f"{s3.bucket}/data/x.csv").close()
    assert main(["run", "tiny", "--out", s3.uri("data")]) == 2
    assert "exists and is not empty; refusing to overwrite" in capsys.readouterr().err
    assert s3.files("data") == ["x.csv"]


def test_a_stopped_s3_run_resumes_to_the_uninterrupted_result(s3, cwd, capsys, monkeypatch, reference):
    from fedsim.client import worker as worker_mod

    real = worker_mod.LocalTrainer.train

    def fails_in_round_3(self, *args, **kwargs):
        if kwargs.get("round") == 3:
            raise FloatingPointError("loss is nan")
        return real(self, *args, **kwargs)

    uri = s3.uri("stopped")
    with monkeypatch.context() as patch:
        patch.setattr(worker_mod.LocalTrainer, "train", fails_in_round_3)
        assert main(["run", "tiny", *TINY, "--out", uri]) == 2  # RunStopped after round 2's checkpoint
    err = capsys.readouterr().err
    assert f"`fedsim resume {uri}` continues from round-000002" in err
    files = s3.files("stopped")
    assert "summary.json" not in files and s3.read("stopped/checkpoints/LATEST").decode().strip() == "round-000002"
    assert main(["run", "tiny", "--out", uri]) == 2  # a stopped run is not overwritten either
    assert f"`fedsim resume {uri}` to continue it" in capsys.readouterr().err
    # a checkpoint folder that LATEST does not name (a half-uploaded one) is never read, and is deleted
    s3.server.filesystem().open_output_stream(f"{s3.bucket}/stopped/checkpoints/round-000003/state.json").close()

    assert main(["resume", uri]) == 0
    assert "from round-000002" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    assert _metrics(_s3_table(s3, "stopped/rounds.parquet")) == _metrics(reference)
    assert any(f.startswith("checkpoints/round-000004/clients/client_") for f in s3.files("stopped"))
    assert json.loads(s3.read("stopped/summary.json"))["resumed_from_round"] == 2
    rounds = {f.split("/")[1] for f in s3.files("stopped") if f.startswith("checkpoints/round-")}
    assert rounds == {"round-000002", "round-000004"}


def test_report_reads_an_s3_run_and_writes_to_s3_or_a_local_folder(s3, cwd, tmp_path, capsys):
    uri = s3.uri("r/run1")
    assert main(["run", "tiny", "--set", "federation.rounds=2", "--out", uri]) == 0
    assert main(["report", uri]) == 0  # default --out: the input
    assert f"report: {uri}/report.md" in capsys.readouterr().out
    files = s3.files("r/run1")
    assert "report.md" in files and any(f.endswith(".png") for f in files)
    text = s3.read("r/run1/report.md").decode()
    assert f"`{uri}` (run)" in text and "/tmp" not in text
    assert main(["report", uri, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").read_text() == text  # the same report, wherever it is written
    assert list(cwd.iterdir()) == []
    assert main(["report", s3.uri("r/nothing")]) == 2
    assert "s3://" in capsys.readouterr().err


def test_unfinished_s3_run_report_error_names_the_uri(s3, cwd, capsys, monkeypatch):
    uri = s3.uri("unfinished")
    s3.server.filesystem().open_output_stream(f"{s3.bucket}/unfinished/config.yaml").close()
    assert main(["report", uri]) == 2
    err = capsys.readouterr().err
    assert f"{uri}: has config.yaml but no summary.json" in err and "fedsim-report" not in err


SWEEP = """
base: tiny
set: {federation.rounds: 1, federation.local_steps: 2, data.synthetic_examples: 200}
grid:
  method.name: [fedavg_lora, ffa_lora]
"""


def test_sweep_to_s3_resumes_and_reports(s3, cwd, tmp_path, capsys):
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(SWEEP)
    uri = s3.uri("sweeps/grid")
    assert main(["sweep", str(sweep_file), "--out", uri]) == 0
    assert list(cwd.iterdir()) == []
    rows = _s3_table(s3, "sweeps/grid/sweep.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["complete", "complete"]
    files = s3.files("sweeps/grid")
    for row in rows:
        assert f"{row['run_dir']}/summary.json" in files and f"{row['run_dir']}/rounds.parquet" in files
    capsys.readouterr()

    # a cell lost (as if killed mid-way: no summary.json) is run again; the complete one is kept
    s3.server.filesystem().delete_file(f"{s3.bucket}/sweeps/grid/{rows[1]['run_dir']}/summary.json")
    assert main(["sweep", str(sweep_file), "--out", uri, "--dry-run"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["done", "todo"]
    kept = s3.read(f"sweeps/grid/{rows[0]['run_dir']}/summary.json")
    assert main(["sweep", str(sweep_file), "--out", uri]) == 0
    assert "2 cells, 1 complete, 1 to run" in capsys.readouterr().out
    assert s3.read(f"sweeps/grid/{rows[0]['run_dir']}/summary.json") == kept
    assert [r["status"] for r in _s3_table(s3, "sweeps/grid/sweep.parquet").to_pylist()] == ["complete"] * 2

    assert main(["report", uri, "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert f"`{uri}` (sweep: 2 cells, 2 complete, 0 not complete)" in text


def test_file_uris_work_like_paths(tmp_path, cwd, capsys):
    run = tmp_path / "run"
    assert main(["run", "tiny", "--set", "federation.rounds=1", "--out", f"file://{run}"]) == 0
    assert (run / "summary.json").is_file() and list(cwd.iterdir()) == []
    assert main(["run", "tiny", "--out", f"file://{run}"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(["resume", f"file://{run}"]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["report", f"file://{run}"]) == 0
    assert (run / "report.md").is_file()


def test_mirror_uploads_checkpoint_files_before_latest_and_summary_last(s3, tmp_path, monkeypatch):
    cfg, _ = load_config("tiny", ["federation.rounds=2"])
    sent: list[str] = []
    real = Location.upload

    def recording(self, src, rel):
        sent.append(rel)
        real(self, src, rel)

    monkeypatch.setattr(Location, "upload", recording)
    loc = parse_location(s3.uri("ordered"), "--out")
    with RunMirror.staged(loc) as mirror:
        run_simulation(cfg, mirror.folder, progress=False, mirror=mirror)
        staging = mirror.folder
    assert not staging.exists()  # the staging folder is removed
    assert sent[-1] == "summary.json" and sent.count("summary.json") == 1
    latest = [i for i, rel in enumerate(sent) if rel == "checkpoints/LATEST"]
    assert len(latest) == 3  # rounds 0, 1 (checkpoint_every=1 in tiny) and 2
    for i in latest:  # every file of the checkpoint LATEST names was uploaded before it
        name = f"checkpoints/round-{len([j for j in latest if j <= i]) - 1:06d}/"
        assert any(rel.startswith(name) for rel in sent[:i]) and not any(rel.startswith(name) for rel in sent[i:])
    assert "config.yaml" in sent[: latest[0]] and sent.count("config.yaml") == 1  # unchanged files are sent once
