from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fedsim.process_lifecycle import ImportAhead


def test_import_ahead_imports_in_a_thread_and_leaves_a_failing_import_to_the_caller(tmp_path, monkeypatch):
    (tmp_path / "ahead_ok.py").write_text("import threading\nTHREAD = threading.current_thread().name\n")
    (tmp_path / "ahead_bad.py").write_text("raise ImportError('broken on purpose')\n")
    (tmp_path / "ahead_never.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("ahead_ok", "ahead_bad", "ahead_never"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    ahead = ImportAhead(["ahead_ok", "ahead_bad", "ahead_never"])
    ahead.join()  # never raises
    assert sys.modules["ahead_ok"].THREAD == "fedsim-import-ahead"
    assert "ahead_bad" not in sys.modules and "ahead_never" not in sys.modules  # stops at the first failure
    with pytest.raises(ImportError, match="broken on purpose"):
        import ahead_bad  # noqa: F401


def test_freeze_gc_at_exit_registers_once_and_freezes_before_earlier_handlers_run():
    code = textwrap.dedent(
        """
        import atexit, gc
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))  # runs after later ones
        from fedsim.process_lifecycle import freeze_gc_at_exit
        before = atexit._ncallbacks()
        freeze_gc_at_exit(); freeze_gc_at_exit()
        print("registered:", atexit._ncallbacks() - before, "frozen now:", gc.get_freeze_count() > 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["registered: 1 frozen now: False", "frozen at exit: True"]
