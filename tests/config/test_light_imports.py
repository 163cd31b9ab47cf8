"""Validating a config (what `fedsim validate`, `load_config` and `config_from_dict` do before a run) imports
neither transformers' models, PEFT nor Opacus: they cost seconds of start-up and the run's own processes import
them where they are used."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys
from fedsim.validation import load_config
load_config("tiny", ["privacy.mode=sample", "privacy.epsilon=8"])
heavy = [m for m in ("peft", "opacus", "transformers.modeling_utils", "datasets") if m in sys.modules]
print(",".join(heavy))
"""


def test_config_validation_does_not_import_the_model_libraries():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
