"""The federated view of a dataset: one tokenised table, a global test split and per-client index shards.

Every example (train and test) is tokenised once into ``[N, max_length]`` arrays; clients and
evaluation chunks are plain index arrays into them, so a client's data is a cheap row gather
(:meth:`FederatedData.client_arrays`) and nothing is copied per client up front.

Storage is compact and Arrow-backed: ``datasets`` writes the token ids as int32 and the attention mask as
int8 (5 bytes per token instead of 16), and the two arrays are zero-copy, read-only numpy views of that Arrow
table's buffers; only the rows a client or an evaluation chunk uses are widened to int64 (what torch's
embedding wants), at gather time. Under Ray the data is put into the object store once (``ray.put``) and
workers read the token arrays from its shared memory (Ray deserialises numpy arrays zero-copy).

``task.kind: causal_lm``: the rows are prompt + response sequences, left-padded (see :mod:`fedsim.data.instruct`);
``labels`` holds each example's group id (topic, operation: what the split is skewed and stratified by) and
:attr:`FederatedData.lm` what causal-LM training and evaluation need besides: where each response starts, the
reference answers, and the tokenizer (to decode greedy answers on the workers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from fedsim.config.schema import Config
from fedsim.data.instruct import eos_id, prompt_format, tokenize_instruct
from fedsim.data.partition import apportion, partition
from fedsim.data.types import InstructDataset, TextDataset
from fedsim.errors import DataError
from fedsim.seeding import numpy_rng

QUIET_BELOW = 20_000  # no datasets progress bar when tokenising fewer texts than this


@dataclass(frozen=True, eq=False)
class ClientShards(Sequence[np.ndarray]):
    """Every client's row indices as ONE flat int64 array and an offsets array: client ``k``'s rows are
    ``flat[offsets[k]:offsets[k + 1]]``. A read-only sequence of per-client arrays (``shards[k]`` is a view, no
    copy), so ``data.client_train[k]``, ``len`` and iteration work as on a tuple of arrays; it pickles as two arrays
    (cheap in Ray's object store, which hands numpy buffers to the workers zero-copy) instead of one small array
    object per client, which at 100,000 clients cost every worker hundreds of MB.
    """

    flat: np.ndarray  # [total] int64, read-only
    offsets: np.ndarray  # [clients + 1] int64, offsets[0] == 0, non-decreasing, offsets[-1] == len(flat)

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(self.flat):
            raise ValueError(f"offsets must run from 0 to len(flat) = {len(self.flat)}")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        for name, arr in (("flat", np.asarray(self.flat, dtype=np.int64)), ("offsets", offsets)):
            arr.flags.writeable = False  # shared by every view handed out
            object.__setattr__(self, name, arr)

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> ClientShards:
        """The shards of ``arrays`` (one index array per client, in client order)."""
        sizes = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) else np.zeros(0)
        return cls(flat.astype(np.int64, copy=False), offsets)

    @property
    def sizes(self) -> np.ndarray:
        """Each client's number of rows, ``[clients]`` int64."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, k: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, k: slice) -> tuple[np.ndarray, ...]: ...

    def __getitem__(self, k: int | slice) -> np.ndarray | tuple[np.ndarray, ...]:
        if isinstance(k, slice):
            return tuple(self[i] for i in range(*k.indices(len(self))))
        n = len(self)
        i = int(k)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"client {k} out of range (0..{n - 1})")
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        flat, offsets = self.flat, self.offsets
        for i in range(len(self)):
            yield flat[offsets[i] : offsets[i + 1]]

    def __add__(self, other: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """``shards + other``: a tuple of both's arrays (as with the tuple of arrays this class replaces)."""
        return (*self, *other)

    def __radd__(self, other: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        return (*other, *self)

    def __repr__(self) -> str:
        return f"ClientShards({len(self)} clients, {len(self.flat)} rows)"


@dataclass(frozen=True)
class LMData:
    """The causal-LM side of a :class:`FederatedData`: ``response_start[i]`` is the first response position of row
    ``i`` (its labels are -100 before it), ``answers[i]`` what its greedy answer must match (``answer_kind`` text or
    number, see :func:`fedsim.data.instruct.exact_match`); the tokenizer decodes generated ids."""

    response_start: np.ndarray  # [N] int32
    answers: tuple[str, ...]
    answer_kind: str
    tokenizer: Any
    pad_id: int
    eos_id: int
    chat_template: bool  # whether prompts were formatted with the tokenizer's chat template


@dataclass(frozen=True)
class FederatedData:
    """Tokenised examples plus the split: ``test_indices`` / ``client_train[k]`` / ``client_holdout[k]``.

    All index arrays are sorted int64 rows of ``input_ids``; the test split, every client's train
    shard and every client's holdout are pairwise disjoint and together cover all ``N`` rows. ``client_train`` and
    ``client_holdout`` are :class:`ClientShards` (read-only per-client views of one flat array each).
    """

    input_ids: np.ndarray  # [N, L] int32 (read-only view of the tokenised Arrow table)
    attention_mask: np.ndarray  # [N, L] int8
    labels: np.ndarray  # [N] int64
    label_names: tuple[str, ...]
    test_indices: np.ndarray
    client_train: ClientShards
    client_holdout: ClientShards
    lm: LMData | None = None  # task.kind causal_lm only

    def __post_init__(self) -> None:
        for name in ("client_train", "client_holdout"):  # a tuple / list of arrays is accepted and converted
            shards = getattr(self, name)
            if not isinstance(shards, ClientShards):
                object.__setattr__(self, name, ClientShards.from_arrays(shards))

    @property
    def client_sizes(self) -> np.ndarray:
        """Each client's number of training examples, ``[clients]`` int64."""
        return self.client_train.sizes

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def client_arrays(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``indices`` as ``(input_ids, attention_mask, labels)`` (fresh writable int64 copies).

        Classification: ``labels`` ``[n]`` class ids. causal_lm: ``labels`` ``[n, L]`` token ids at response
        positions and -100 at prompt and padding positions."""
        idx = np.asarray(indices, dtype=np.int64)
        ids = self.input_ids[idx].astype(np.int64)
        if self.lm is not None:
            from fedsim.data.instruct import response_labels

            labels = response_labels(ids, self.lm.response_start[idx])
        else:
            labels = self.labels[idx].astype(np.int64)
        return ids, self.attention_mask[idx].astype(np.int64), labels


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise ``texts`` once through ``datasets`` (in memory, no cache files): padded/truncated to ``max_length``.

    ``tokenizer`` is any transformers tokenizer (it must have a pad token). Returns ``(input_ids, attention_mask)``
    of shape ``[len(texts), max_length]``: int32 ids and int8 mask, read-only views of the Arrow table
    ``datasets`` wrote (each batch is cast as it is written, so no int64 copy of the whole corpus ever exists).

    Raises:
        ValueError: the tokenizer did not pad every text to ``max_length``.
    """
    import datasets
    import pyarrow as pa

    n = len(texts)
    if n == 0:
        return np.zeros((0, max_length), dtype=np.int32), np.zeros((0, max_length), dtype=np.int8)

    def encode(batch: dict[str, list[str]]) -> dict[str, Any]:
        enc = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    ds = datasets.Dataset.from_dict({"text": list(texts)})
    # A cheap explicit fingerprint: datasets would otherwise hash (pickle) the whole tokenizer.
    fp = hashlib.sha256(f"fedsim-tokenize|{n}|{type(tokenizer).__name__}|{id(tokenizer)}|{max_length}".encode())
    quiet = n < QUIET_BELOW and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        out = ds.map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=["text"],
            features=datasets.Features(
                {
                    "input_ids": datasets.Sequence(datasets.Value("int32")),
                    "attention_mask": datasets.Sequence(datasets.Value("int8")),
                }
            ),
            keep_in_memory=True,
            new_fingerprint=fp.hexdigest()[:32],
            desc="tokenising",
        )
    finally:
        if quiet:
            datasets.enable_progress_bars()
    table = out.with_format("arrow")[:]

    def dense(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        if isinstance(col, pa.ChunkedArray):  # pragma: no cover - older pyarrow
            col = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
        flat = col.flatten().to_numpy(zero_copy_only=False)  # a view of the Arrow buffer (no nulls)
        if flat.size != n * max_length:
            raise ValueError(f"tokenizer returned ragged {name!r}; it must pad to max_length={max_length}")
        return flat.reshape(n, max_length)

    ids, mask = dense("input_ids"), dense("attention_mask")  # views: they keep ``table``'s buffers alive
    del ds, out
    # Arrow's allocator (mimalloc / jemalloc) keeps the pages that the text column and map's batches held: at
    # 800,000 texts ~350 MB of the driver's RSS for the whole run; give them back to the OS.
    release_freed_memory()
    return ids, mask


def release_freed_memory() -> None:
    """Give the pages Arrow's allocator kept after its buffers were freed (a dropped token table, for one) back to
    the OS; mimalloc / jemalloc otherwise hold them for reuse, in this process's RSS for the rest of the run."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _test_split(labels: np.ndarray, n_cls: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted global test indices: ``round(N * fraction)`` (at least 1, at most N-1), stratified when possible."""
    n = len(labels)
    n_test = min(max(int(round(n * fraction)), 1), n - 1)
    rng = numpy_rng(seed, "test_split")
    counts = np.bincount(labels, minlength=n_cls)
    present = counts[counts > 0]
    if present.size and present.min() >= 2:  # stratified: every class keeps >= 1 training example
        quota = apportion(n_test, counts.astype(np.float64), caps=np.maximum(counts - 1, 0))
        parts = [rng.choice(np.flatnonzero(labels == c), size=int(quota[c]), replace=False) for c in range(n_cls)]
        return np.sort(np.concatenate(parts)).astype(np.int64)
    return np.sort(rng.choice(n, size=n_test, replace=False)).astype(np.int64)


def _personal_split(shard: np.ndarray, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) of one client's shard: floor(fraction * size) held out, >= 1 if size >= 2, keeps >= 1."""
    size = len(shard)
    h = int(np.floor(size * fraction))
    if fraction > 0 and size >= 2:
        h = max(h, 1)
    h = min(h, max(size - 1, 0))
    if h == 0:
        return shard, np.zeros(0, dtype=np.int64)
    rng = numpy_rng(seed, "personal_split", client)
    pick = np.zeros(size, dtype=bool)
    pick[rng.choice(size, size=h, replace=False)] = True
    return shard[~pick], shard[pick]


def build_federated_data(cfg: Config, dataset: TextDataset | InstructDataset, tokenizer: Any) -> FederatedData:
    """Split ``dataset`` into a global test set and client shards (train + personal holdout), then tokenise.

    Steps: seeded test split of ``data.test_fraction`` (stratified if every class has >= 2 examples);
    ``partition`` of the rest over ``federation.clients``; per client a seeded ``data.personal_fraction``
    holdout; one ``tokenize`` pass over all texts (last, after every check). An :class:`InstructDataset` (task.kind
    causal_lm) is split the same way by its group ids and tokenised by
    :func:`~fedsim.data.instruct.tokenize_instruct` (``FederatedData.lm`` set).

    Raises:
        DataError: fewer than 2 examples, more clients than training examples, or any partition error.
    """
    labels = np.asarray(dataset.labels, dtype=np.int64).reshape(-1)
    n = len(labels)
    if n != len(dataset):
        raise ValueError(f"dataset has {len(dataset)} examples but {n} labels")
    if n < 2:
        raise DataError(f"data.source: only {n} usable example(s); a train/test split needs at least 2.")
    seed = int(cfg.seed)
    test = _test_split(labels, dataset.num_labels, float(cfg.data.test_fraction), seed)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), test, assume_unique=True)
    k = int(cfg.federation.clients)
    if k > len(train):
        raise DataError(
            f"federation.clients: {k} clients but only {len(train)} training examples; lower federation.clients "
            "or use more data."
        )
    shards = partition(labels[train], k, cfg.data.partition, seed, num_classes=dataset.num_labels)
    client_train, client_holdout = [], []
    for cid, local in enumerate(shards):
        tr, ho = _personal_split(train[local], float(cfg.data.personal_fraction), seed, cid)
        client_train.append(tr)
        client_holdout.append(ho)
    lm = None
    if isinstance(dataset, InstructDataset):
        chat = bool(cfg.task.chat_template)
        input_ids, attention_mask, start = tokenize_instruct(dataset, tokenizer, int(cfg.data.max_length), chat)
        lm = LMData(
            response_start=start,
            answers=tuple(dataset.answers),
            answer_kind=dataset.answer_kind,
            tokenizer=tokenizer,
            pad_id=int(tokenizer.pad_token_id),
            eos_id=eos_id(tokenizer),
            chat_template=prompt_format(tokenizer, chat).chat,
        )
    else:
        input_ids, attention_mask = tokenize(dataset.texts, tokenizer, int(cfg.data.max_length))
    return FederatedData(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        label_names=tuple(dataset.label_names),
        test_indices=test,
        client_train=ClientShards.from_arrays(client_train),
        client_holdout=ClientShards.from_arrays(client_holdout),
        lm=lm,
    )
