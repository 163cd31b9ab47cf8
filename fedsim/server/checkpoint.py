"""Checkpoints of a run: everything needed to continue it exactly after a kill.

Layout (``<run>/checkpoints/``)::

    round-000004/          one complete checkpoint (the state AFTER round 4)
      global.safetensors   the global adapter state (residuals included)
      clients/             every client's kept tensors, one ``client_<id>.safetensors`` per client (when the
                           ClientStore hands over a :class:`StoredClients` snapshot: moved in, never read into memory)
      clients.safetensors  (instead of clients/, when the client states are a plain dict) keys "<id>/<tensor key>"
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedsim.types import AdapterState

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
KEEP = 2  # complete checkpoints kept (the newest first)
CLIENTS_DIR = "clients"


def client_file_name(client_id: int) -> str:
    """The file name of one client's kept tensors, in a spill folder and in a checkpoint's ``clients/``."""
    return f"client_{client_id}.safetensors"


def save_state_atomic(state: AdapterState, path: Path) -> None:
    """Write ``state`` to ``path`` as safetensors: a temporary name in the same folder, then ``os.replace``.

    A reader never sees a half-written file; an existing file at ``path`` is replaced (new inode), so hard links
    to the old file keep the old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (replacing ``dst``); copy where links are impossible (another filesystem)."""
    dst = Path(dst)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


class StoredClients(Mapping[int, AdapterState]):
    """Client id -> kept tensors, backed by a folder of ``client_<id>.safetensors`` files; read on access.

    What :meth:`ClientStore.snapshot <fedsim.server.client_store.ClientStore.snapshot>` returns and what
    :func:`read_checkpoint` gives for a checkpoint's ``clients/`` folder: a few bytes to pass around (Ray pickles
    it), however many clients there are. The files are never modified in place; a value read after its folder was
    deleted (a pruned checkpoint) raises FileNotFoundError.
    """

    def __init__(self, folder: Path, client_ids: list[int]) -> None:
        self.folder = Path(folder)
        self.client_ids = sorted(int(c) for c in client_ids)
        self._ids = frozenset(self.client_ids)

    def path_of(self, client_id: int) -> Path:
        return self.folder / client_file_name(client_id)

    def __getitem__(self, client_id: int) -> AdapterState:
        if client_id not in self._ids:
            raise KeyError(client_id)
        return load_file(str(self.path_of(client_id)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.client_ids)

    def __len__(self) -> int:
        return len(self.client_ids)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._ids

    def __repr__(self) -> str:
        return f"StoredClients({str(self.folder)!r}, {len(self)} clients)"


def _place_clients(clients: StoredClients, dest: Path) -> None:
    """Move a snapshot folder to ``dest`` (one rename); link or copy file by file across filesystems."""
    try:
        os.rename(clients.folder, dest)
        return
    except OSError:
        pass
    dest.mkdir()
    for cid in clients.client_ids:
        link_or_copy(clients.path_of(cid), dest / client_file_name(cid))


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after ``round`` (0 = before the first round).

    ``client_states`` is a plain dict (small stores, tests) or a :class:`StoredClients` snapshot (the ClientStore
    with a spill folder): :func:`write_checkpoint` MOVES a StoredClients folder into the checkpoint."""

    round: int
    global_state: AdapterState
    server_state: dict[str, Any]
    client_states: Mapping[int, AdapterState] = field(default_factory=dict)
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
    """Write ``ckpt`` atomically under ``run_dir/checkpoints``; keep the newest ``keep``; return its folder.

    A :class:`StoredClients` ``ckpt.client_states`` is moved (renamed) into the checkpoint's ``clients/`` folder,
    so a snapshot can be written once only; its tensors are never loaded."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a kill during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    name = _name(ckpt.round)
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in ckpt.global_state.items()}, str(tmp / "global.safetensors"))
    state: dict[str, Any] = {"round": ckpt.round}
    if isinstance(ckpt.client_states, StoredClients):
        _place_clients(ckpt.client_states, tmp / CLIENTS_DIR)
        state["client_files"] = ckpt.client_states.client_ids
    else:
        flat = {
            f"{cid}/{k}": v.detach().contiguous().cpu()
            for cid, cstate in sorted(ckpt.client_states.items())
            for k, v in cstate.items()
        }
        save_file(flat, str(tmp / "clients.safetensors"))
    state |= {
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
    """Load one checkpoint folder (safetensors + JSON only).

    Client tensors in a ``clients/`` folder come back as a lazy :class:`StoredClients` (nothing read yet; valid
    while the checkpoint folder exists); an older ``clients.safetensors`` is read into a dict."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    clients: Mapping[int, AdapterState]
    if "client_files" in state:
        clients = StoredClients(path / CLIENTS_DIR, state["client_files"])
    else:
        loaded: dict[int, AdapterState] = {}
        for key, tensor in load_file(str(path / "clients.safetensors")).items():
            cid, _, name = key.partition("/")
            loaded.setdefault(int(cid), {})[name] = tensor
        clients = loaded
    return Checkpoint(
        round=int(state["round"]),
        global_state=load_file(str(path / "global.safetensors")),
        server_state=state["server_state"],
        client_states=clients,
        ledgers={int(c): led for c, led in state["ledgers"].items()},
        driver=state["driver"],
    )
