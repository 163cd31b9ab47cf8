"""The datasets a data source returns (a leaf module: numpy only, so every other data module may import it).

:class:`TextDataset` is the classification form (texts and class ids), :class:`InstructDataset` the prompt/response
form of ``task.kind: causal_lm``; both have ``labels`` (class or group ids ``0..C-1``), ``label_names`` and
``select``, which is all that balancing, subsampling and the client split use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

#: the ``task.kind`` values a data source may serve
TASKS = ("classification", "causal_lm")


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``0..C-1``; ``label_names[c]`` names class ``c``."""

    texts: list[str]
    labels: np.ndarray  # int64, values 0..C-1
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, keep: np.ndarray) -> TextDataset:
        """The examples ``keep`` (in that order)."""
        return TextDataset(
            [self.texts[int(i)] for i in keep], self.labels[np.asarray(keep, dtype=np.int64)], self.label_names
        )


@dataclass(frozen=True)
class InstructDataset:
    """Prompt/response pairs. ``answers[i]``: what a greedy answer must match (the response itself, or the number
    of a GSM8K solution); ``labels[i]``: a group id ``0..G-1`` (topic, operation) used for the client split and the
    stratified test split; ``contexts[i]``: text placed before the prompt and truncated first ("" if none)."""

    prompts: list[str]
    responses: list[str]
    answers: list[str]
    labels: np.ndarray  # int64 group ids
    label_names: tuple[str, ...]
    answer_kind: str = "text"  # "text" | "number"
    contexts: list[str] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def texts(self) -> list[str]:
        """Every text the tokenizer may see (contexts, prompts, responses): a tiny model's vocabulary comes from it."""
        return [*(self.contexts or []), *self.prompts, *self.responses]

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, keep: np.ndarray) -> InstructDataset:
        """The examples ``keep`` (in that order)."""
        pick = [int(i) for i in keep]
        return replace(
            self,
            prompts=[self.prompts[i] for i in pick],
            responses=[self.responses[i] for i in pick],
            answers=[self.answers[i] for i in pick],
            labels=self.labels[np.asarray(pick, dtype=np.int64)],
            contexts=None if self.contexts is None else [self.contexts[i] for i in pick],
        )


#: what balancing and subsampling accept (both have ``labels``, ``num_labels`` and ``select``)
Dataset = TextDataset | InstructDataset
