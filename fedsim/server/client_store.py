"""Per-client state kept between rounds: FedSA's B, a personal head, and each client's privacy ledger.

Holds up to ``max_in_memory`` clients' tensors in memory (least recently used first out) and
spills the rest to ``spill_dir`` as safetensors files, so memory stays flat with many clients.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedsim.types import AdapterState


class ClientStore:
    """Mapping client id -> AdapterState. ``get`` returns None for a client never stored."""

    def __init__(self, max_in_memory: int | None = None, spill_dir: Path | None = None) -> None:
        if max_in_memory is not None and spill_dir is None:
            raise ValueError("a bounded ClientStore needs a spill_dir")
        self._mem: OrderedDict[int, AdapterState] = OrderedDict()
        self._on_disk: set[int] = set()
        self._max = max_in_memory
        self._dir = Path(spill_dir) if spill_dir is not None else None
        self._ledgers: dict[int, dict] = {}  # client id -> PrivacyLedger.to_json() (small; kept in memory)

    def _path(self, client_id: int) -> Path:
        assert self._dir is not None
        return self._dir / f"client_{client_id}.safetensors"

    def put(self, client_id: int, state: AdapterState) -> None:
        self._mem[client_id] = {k: v.detach().clone().contiguous() for k, v in state.items()}
        self._mem.move_to_end(client_id)
        self._on_disk.discard(client_id)
        while self._max is not None and len(self._mem) > self._max:
            old_id, old_state = self._mem.popitem(last=False)
            self._dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            save_file(old_state, str(self._path(old_id)))
            self._on_disk.add(old_id)

    def get(self, client_id: int) -> AdapterState | None:
        if client_id in self._mem:
            self._mem.move_to_end(client_id)
            return dict(self._mem[client_id])
        if client_id in self._on_disk:
            return load_file(str(self._path(client_id)))
        return None

    def put_ledger(self, client_id: int, ledger: dict) -> None:
        """Store a client's accountant state (a JSON-able dict)."""
        self._ledgers[client_id] = dict(ledger)

    def get_ledger(self, client_id: int) -> dict | None:
        return self._ledgers.get(client_id)

    def get_client(self, client_id: int, tensors: bool) -> tuple[AdapterState | None, dict | None]:
        """(kept tensors if ``tensors`` else None, ledger): what a worker needs for one client, in one call."""
        return (self.get(client_id) if tensors else None), self.get_ledger(client_id)

    def put_client(self, client_id: int, state: AdapterState | None, ledger: dict | None) -> None:
        if state is not None:
            self.put(client_id, state)
        if ledger is not None:
            self.put_ledger(client_id, ledger)

    def snapshot(self) -> tuple[dict[int, AdapterState], dict[int, dict]]:
        """(every client's kept tensors, every ledger): for a checkpoint (spilled clients are read back)."""
        states = {cid: state for cid in self.client_ids() if (state := self.get(cid)) is not None}
        return states, {cid: dict(led) for cid, led in self._ledgers.items()}

    def restore(self, states: dict[int, AdapterState], ledgers: dict[int, dict]) -> None:
        """Replace the whole content with a snapshot (spilled files of dropped clients are deleted)."""
        for cid in list(self._on_disk):
            self._path(cid).unlink(missing_ok=True)
        self._mem.clear()
        self._on_disk.clear()
        for cid, state in sorted(states.items()):
            self.put(cid, state)
        self._ledgers = {cid: dict(led) for cid, led in ledgers.items()}

    def client_ids(self) -> list[int]:
        return sorted(set(self._mem) | self._on_disk)

    def __len__(self) -> int:
        return len(set(self._mem) | self._on_disk)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._mem or client_id in self._on_disk
