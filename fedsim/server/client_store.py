"""Per-client state kept between rounds: FedSA's B, a personal head, and each client's privacy ledger.

Memory-bounded: the store counts the bytes (``numel * element_size``) of the tensors it holds in memory and, when
they pass ``memory_mb``, spills the least recently used clients to ``spill_dir`` as safetensors files (written
atomically: a temporary name in the same folder, then ``os.replace``). A single state larger than the budget goes
straight to disk; ``memory_mb=0`` keeps every client on disk. Ledgers are small JSON dicts and stay in memory.

Round versions: ``put_client(..., round=t)`` keeps the version from before the client's first write in round ``t``
(for the newest round only), and ``get_client(..., round=t)`` returns it, so a client re-run in the same round
(its worker crashed) starts from the same tensors and its privacy ledger is not charged twice.

Checkpoints stream: :meth:`ClientStore.snapshot` writes the in-memory clients that changed since they were last
written, hard-links every client's file into a snapshot folder and returns a lazy
:class:`~fedsim.server.checkpoint.StoredClients` (a path and ids), which ``write_checkpoint`` moves into the
checkpoint; :meth:`ClientStore.restore` links such a folder back. No step reads the whole store into memory.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load_file

from fedsim.config.schema import Config
from fedsim.server.checkpoint import StoredClients, client_file_name, link_or_copy, save_state_atomic
from fedsim.types import AdapterState

SPILL_DIR = "client_store"  # under the run directory
_SNAPSHOTS = ".snapshots"


def _nbytes(state: AdapterState) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _cur(client_id: int) -> str:
    return f"client_{client_id}"


def _prev(client_id: int) -> str:
    return f"prev_{client_id}"


class _SpillingDict:
    """name -> AdapterState: at most ``budget`` bytes in memory (LRU), the rest as files.

    A name is in memory, on file, or both (written and unchanged since: evicting it costs nothing). The file of a
    name exists exactly when the name is in ``on_file``."""

    def __init__(self, budget: int | None, folder: Path | None) -> None:
        self.budget, self.folder = budget, folder
        self.mem: OrderedDict[str, AdapterState] = OrderedDict()
        self.sizes: dict[str, int] = {}
        self.used = 0
        self.on_file: set[str] = set()

    def path(self, name: str) -> Path:
        if self.folder is None:
            raise RuntimeError("this ClientStore has no spill folder")
        return self.folder / f"{name}.safetensors"

    def _write(self, name: str, state: AdapterState) -> None:
        self.path(name).parent.mkdir(parents=True, exist_ok=True)
        save_state_atomic(state, self.path(name))
        self.on_file.add(name)

    def put(self, name: str, state: AdapterState) -> None:
        self.drop(name)
        size = _nbytes(state)
        if self.budget is not None and size > self.budget:
            self._write(name, state)  # larger than the whole budget: straight to disk
            return
        self.mem[name], self.sizes[name] = state, size
        self.used += size
        while self.budget is not None and self.used > self.budget:
            old, old_state = self.mem.popitem(last=False)
            self.used -= self.sizes.pop(old)
            if old not in self.on_file:
                self._write(old, old_state)

    def get(self, name: str) -> AdapterState | None:
        if name in self.mem:
            self.mem.move_to_end(name)
            return dict(self.mem[name])
        if name in self.on_file:
            return load_file(str(self.path(name)))
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.mem or name in self.on_file

    def drop(self, name: str) -> None:
        if name in self.mem:
            del self.mem[name]
            self.used -= self.sizes.pop(name)
        if name in self.on_file:
            self.on_file.discard(name)
            self.path(name).unlink(missing_ok=True)

    def rename(self, old: str, new: str) -> None:
        """Move ``old``'s value to ``new`` (no copy: a dict key or a file rename)."""
        self.drop(new)
        if old in self.mem:
            self.mem[new] = self.mem.pop(old)
            self.sizes[new] = self.sizes.pop(old)
        if old in self.on_file:
            self.path(old).replace(self.path(new))
            self.on_file.discard(old)
            self.on_file.add(new)

    def flush(self, names: list[str]) -> None:
        """Write those of ``names`` that are only in memory (they stay in memory, now also on file)."""
        for name in names:
            if name not in self.on_file and name in self.mem:
                self._write(name, self.mem[name])

    def adopt(self, name: str, src: Path) -> None:
        """Make the file ``src`` (hard-linked or copied) the value of ``name``."""
        self.drop(name)
        self.path(name).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src, self.path(name))
        self.on_file.add(name)

    def clear(self) -> None:
        for name in list(self.mem) + list(self.on_file):
            self.drop(name)


class ClientStore:
    """Mapping client id -> AdapterState (+ ledger). ``get`` returns None for a client never stored.

    ``memory_mb``: in-memory budget in MiB (None = unbounded). A bounded store spills to ``spill_dir`` (None: a
    temporary folder removed by :meth:`close` or when the store is garbage-collected). Leftover files of an earlier
    store in ``spill_dir`` are removed at construction. Raises ValueError for a negative budget.
    """

    def __init__(self, memory_mb: float | None = None, spill_dir: Path | None = None) -> None:
        if memory_mb is not None and memory_mb < 0:
            raise ValueError(f"ClientStore memory_mb must be >= 0 (got {memory_mb})")
        bounded = memory_mb is not None
        self._cleanup: weakref.finalize | None = None
        if spill_dir is None and bounded:
            spill_dir = Path(tempfile.mkdtemp(prefix="fedsim-client-store-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(spill_dir), True)
        self._dir = Path(spill_dir) if spill_dir is not None else None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
        budget = None if memory_mb is None else int(memory_mb * 2**20)
        self._tier = _SpillingDict(budget, self._dir)
        self._ids: set[int] = set()  # clients with kept tensors
        self._ledgers: dict[int, dict] = {}  # client id -> PrivacyLedger.to_json() (small; kept in memory)
        self._round: int | None = None  # newest round seen by put_client(round=...)
        self._prev_state: dict[int, bool] = {}  # written in _round: True = its pre-round tensors are kept
        self._prev_ledger: dict[int, dict | None] = {}  # ledger written in _round: its pre-round ledger
        self._snapshots = 0

    def _remove_leftovers(self) -> None:
        assert self._dir is not None
        for pattern in ("client_*.safetensors", "prev_*.safetensors", ".*.tmp"):
            for path in self._dir.glob(pattern):
                path.unlink(missing_ok=True)
        shutil.rmtree(self._dir / _SNAPSHOTS, ignore_errors=True)

    # ------------------------------------------------------------------ current state

    def put(self, client_id: int, state: AdapterState) -> None:
        """Store a copy of ``state`` (on CPU) as the client's kept tensors (replacing any earlier version)."""
        self._tier.put(_cur(client_id), {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()})
        self._ids.add(client_id)

    def get(self, client_id: int) -> AdapterState | None:
        """The client's current kept tensors (read from disk if spilled), or None."""
        return self._tier.get(_cur(client_id))

    def put_ledger(self, client_id: int, ledger: dict) -> None:
        """Store a client's accountant state (a JSON-able dict)."""
        self._ledgers[client_id] = dict(ledger)

    def get_ledger(self, client_id: int) -> dict | None:
        return self._ledgers.get(client_id)

    # ------------------------------------------------------------------ round-versioned access

    def get_client(
        self, client_id: int, tensors: bool, round: int | None = None
    ) -> tuple[AdapterState | None, dict | None]:
        """(kept tensors if ``tensors`` else None, ledger): what a worker needs for one client, in one call.

        With ``round``: the state AS OF THE START of that round, even if ``put_client(..., round=round)`` already
        wrote this client. Raises ValueError for a round older than the newest one written (not kept)."""
        if round is not None and self._round is not None and round < self._round:
            raise ValueError(f"ClientStore keeps versions for round {self._round} only; asked for round {round}")
        versioned = round is not None and round == self._round
        state = None
        if tensors:
            if versioned and client_id in self._prev_state:
                state = self._tier.get(_prev(client_id)) if self._prev_state[client_id] else None
            else:
                state = self.get(client_id)
        if versioned and client_id in self._prev_ledger:
            return state, self._prev_ledger[client_id]
        return state, self.get_ledger(client_id)

    def put_client(
        self, client_id: int, state: AdapterState | None, ledger: dict | None, round: int | None = None
    ) -> None:
        """Store what a client keeps; with ``round``, first keep its pre-round version (see :meth:`get_client`).

        A put for a newer round drops the versions of the older one. A put for an older round than the newest
        seen is applied without versioning."""
        if round is not None:
            if self._round is None or round > self._round:
                for cid, kept in self._prev_state.items():
                    if kept:
                        self._tier.drop(_prev(cid))
                self._prev_state.clear()
                self._prev_ledger.clear()
                self._round = round
            if round == self._round:
                if state is not None and client_id not in self._prev_state:
                    had = _cur(client_id) in self._tier
                    if had:
                        self._tier.rename(_cur(client_id), _prev(client_id))
                    self._prev_state[client_id] = had
                if ledger is not None and client_id not in self._prev_ledger:
                    self._prev_ledger[client_id] = self._ledgers.get(client_id)
        if state is not None:
            self.put(client_id, state)
        if ledger is not None:
            self.put_ledger(client_id, ledger)

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> tuple[Mapping[int, AdapterState], dict[int, dict]]:
        """(every client's kept tensors, every ledger) for a checkpoint.

        With a spill folder: in-memory clients not yet on disk are written, every client's file is hard-linked
        into a fresh snapshot folder, and the tensors come back as a lazy StoredClients (a path; nothing is read).
        An earlier snapshot folder not consumed by ``write_checkpoint`` is deleted. Without one (unbounded store):
        a dict of the in-memory tensors."""
        ledgers = {cid: dict(led) for cid, led in self._ledgers.items()}
        ids = self.client_ids()
        if self._dir is None:
            return {cid: state for cid in ids if (state := self.get(cid)) is not None}, ledgers
        self._tier.flush([_cur(c) for c in ids])
        root = self._dir / _SNAPSHOTS
        shutil.rmtree(root, ignore_errors=True)
        self._snapshots += 1
        folder = root / f"snap-{self._snapshots:06d}"
        folder.mkdir(parents=True)
        for cid in ids:
            link_or_copy(self._tier.path(_cur(cid)), folder / client_file_name(cid))
        return StoredClients(folder, ids), ledgers

    def restore(self, states: Mapping[int, AdapterState], ledgers: dict[int, dict]) -> None:
        """Replace the whole content with a snapshot; versions are dropped.

        A StoredClients snapshot is linked (or copied) file by file into the spill folder: nothing is read until a
        client is asked for. Spilled files of dropped clients are deleted."""
        self._tier.clear()
        self._ids.clear()
        self._prev_state.clear()
        self._prev_ledger.clear()
        self._round = None
        if isinstance(states, StoredClients) and self._dir is not None:
            for cid in states.client_ids:
                self._tier.adopt(_cur(cid), states.path_of(cid))
                self._ids.add(cid)
        else:
            for cid in sorted(states):
                self.put(cid, states[cid])
        self._ledgers = {cid: dict(led) for cid, led in ledgers.items()}

    # ------------------------------------------------------------------ inspection

    def client_ids(self) -> list[int]:
        return sorted(self._ids)

    def spilled_client_ids(self) -> list[int]:
        """Clients whose kept tensors are on disk only (not in memory)."""
        return sorted(c for c in self._ids if _cur(c) not in self._tier.mem)

    def memory_bytes(self) -> int:
        """Bytes of tensors held in memory (current and pre-round versions)."""
        return self._tier.used

    @property
    def spill_dir(self) -> Path | None:
        return self._dir

    def close(self) -> None:
        """Delete the spilled files (and a temporary spill folder). The store is empty afterwards."""
        self._tier.clear()
        self._ids.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir / _SNAPSHOTS, ignore_errors=True)
        if self._cleanup is not None:
            self._cleanup()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._ids


def client_store_args(cfg: Config, run_dir: Path | None) -> tuple[float, Path | None]:
    """(memory_mb, spill_dir) for ``ClientStore(*args)`` (also for a Ray actor's ``.remote(*args)``).

    The spill folder is ``<run_dir>/client_store/``; None (no run folder) gives a temporary one."""
    return float(cfg.runtime.client_store.memory_mb), (Path(run_dir) / SPILL_DIR if run_dir is not None else None)
