"""The filesystem Tune writes a search's experiment through: copies arrive whole, a kill or a failed write mid-file
leaves the previous file, and the filesystem survives pickling (Tune ships it to trial actors)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.fs
import pytest

from fedsim.runtime.tune_storage import drop_partial_writes, replacing_local_filesystem

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_copy_files_into_it_reproduces_the_tree_and_overwrites_in_place(tmp_path):
    src, dst = tmp_path / "staging", tmp_path / "storage"
    (src / "trial_0").mkdir(parents=True)
    (src / "experiment_state-1.json").write_text('{"trials": 3}')
    (src / "trial_0" / "result.json").write_bytes(bytes(range(256)) * 100)
    fs = pickle.loads(pickle.dumps(replacing_local_filesystem()))  # as a trial actor receives it
    pyarrow.fs.copy_files(str(src), str(dst), destination_filesystem=fs)
    assert _tree(dst) == _tree(src)
    (src / "experiment_state-1.json").write_text('{"trials": 4}')
    pyarrow.fs.copy_files(str(src), str(dst), destination_filesystem=fs)
    assert _tree(dst) == _tree(src)  # replaced, and no temporary file left beside it
    assert fs.get_file_info(str(dst / "trial_0" / "result.json")).size == 25600
    plain = tmp_path / "plain"
    plain.write_text("")
    assert (dst / "experiment_state-1.json").stat().st_mode == plain.stat().st_mode  # the umask's, like open()'s


KILLED_MID_WRITE = """
import os, signal, sys
import pyarrow.fs
from fedsim.runtime.tune_storage import replacing_local_filesystem
fs = replacing_local_filesystem() if sys.argv[2] == "replacing" else pyarrow.fs.LocalFileSystem()
stream = fs.open_output_stream(sys.argv[1])
stream.write(b'{"searcher": ')
stream.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["replacing", "plain"])
def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path, kind):
    target = tmp_path / "search_gen_state-2026.json"
    target.write_text('{"searcher": "complete"}')
    script = textwrap.dedent(KILLED_MID_WRITE)
    proc = subprocess.run([sys.executable, "-c", script, str(target), kind], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    if kind == "plain":  # what Tune's own local storage leaves: the restore then reads a truncated file
        assert target.read_text() == '{"searcher": '
        return
    assert target.read_text() == '{"searcher": "complete"}'
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and not leftovers[0].match("search_gen_state-*")
    assert drop_partial_writes(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


class _FullDisk:
    """A file that takes 10 bytes and then fails each write as a full disk does."""

    def __init__(self, file):
        self.file, self.taken = file, 0

    def write(self, data):
        if self.taken + len(data) > 10:
            raise OSError(28, "No space left on device")
        self.taken += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_write_that_fails_keeps_the_previous_file_and_drops_the_partial_one(tmp_path, monkeypatch):
    import fedsim.runtime.tune_storage as tune_storage

    real_fdopen = tune_storage.os.fdopen
    monkeypatch.setattr(tune_storage.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k)))
    target = tmp_path / "experiment_state-1.json"
    target.write_text("old")
    stream = replacing_local_filesystem().open_output_stream(str(target))
    stream.write(b"half of")
    with pytest.raises(OSError, match="No space left"):
        stream.write(b" the new state")
    stream.close()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_appending_is_refused_with_the_reason(tmp_path):
    with pytest.raises(NotImplementedError, match="replaced whole"):
        replacing_local_filesystem().open_append_stream(str(tmp_path / "progress.csv"))
