"""Checkpoints of a run: everything needed to continue it exactly after a kill.

Layout (``<run>/checkpoints/``)::

    round-000004/          one complete checkpoint (the state AFTER round 4)
      global.safetensors   the global adapter state (residuals included)
      clients.safetensors  every client's kept tensors, keys "<client id>/<tensor key>"
      state.json           round, the method's server state, per-client privacy ledgers, driver state (written last)
    LATEST                 the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``.tmp-round-NNNNNN/`` and renamed into place only when complete, then ``LATEST``
is replaced; a kill at any moment leaves the previous checkpoint intact and ``LATEST`` pointing at a complete one.
Random draws are functions of (seed, round, client), so no RNG state needs saving. Only safetensors and JSON are
read back: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedsim.types import AdapterState

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
KEEP = 2  # complete checkpoints kept (the newest first)


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``round`` (0 = before the first round)."""

    round: int
    global_state: AdapterState
    server_state: dict[str, Any]
    client_states: dict[int, AdapterState] = field(default_factory=dict)
    ledgers: dict[int, dict] = field(default_factory=dict)
    driver: dict[str, Any] = field(default_factory=dict)  # tracker state, totals, best accuracy, last evaluation


def _name(round: int) -> str:
    return f"round-{round:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, ckpt: Checkpoint, keep: int = KEEP) -> Path:
    """Write ``ckpt`` atomically under ``run_dir/checkpoints``; keep the newest ``keep``; return its folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a kill during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    name = _name(ckpt.round)
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in ckpt.global_state.items()}, str(tmp / "global.safetensors"))
    flat = {
        f"{cid}/{k}": v.detach().contiguous().cpu()
        for cid, state in sorted(ckpt.client_states.items())
        for k, v in state.items()
    }
    save_file(flat, str(tmp / "clients.safetensors"))
    state = {
        "round": ckpt.round,
        "server_state": ckpt.server_state,
        "ledgers": {str(c): led for c, led in sorted(ckpt.ledgers.items())},
        "driver": ckpt.driver,
    }
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    complete = sorted(p for p in root.glob("round-*") if (p / "state.json").is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint_dir(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (LATEST, or else the highest complete round), or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        d = root / pointer.read_text(encoding="utf-8").strip()
        if (d / "state.json").is_file():
            return d
    complete = sorted(p for p in root.glob("round-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def read_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder (safetensors + JSON only)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    clients: dict[int, AdapterState] = {}
    for key, tensor in load_file(str(path / "clients.safetensors")).items():
        cid, _, name = key.partition("/")
        clients.setdefault(int(cid), {})[name] = tensor
    return Checkpoint(
        round=int(state["round"]),
        global_state=load_file(str(path / "global.safetensors")),
        server_state=state["server_state"],
        client_states=clients,
        ledgers={int(c): led for c, led in state["ledgers"].items()},
        driver=state["driver"],
    )
