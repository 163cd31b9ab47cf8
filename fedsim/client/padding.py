"""Dynamic padding: a batch loses the columns that are padding in every one of its rows.

Rows are tokenised to ``data.max_length`` (right-padded for encoders, left-padded for causal LMs), so a batch of
short texts carries columns no row uses. Every model fedsim trains masks padding out of attention and reads no
output at padded positions (classification: the first token; causal LM: response tokens, with position ids counted
over real tokens), so dropping them changes a row's outputs only by float rounding and saves their compute.
"""

from __future__ import annotations

import torch


def trim_padding(
    ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, labels)`` restricted to the columns from the first to the last that holds a real token in any
    row (``mask`` 1); token-level ``labels`` ``[B, L]`` (causal LM) lose the same columns, class labels ``[B]`` are
    kept. Returns the inputs unchanged when no column can go (or the batch has no real token)."""
    real = mask.any(0)
    cols = torch.nonzero(real).flatten().tolist()
    if not cols or (cols[0] == 0 and cols[-1] == mask.shape[1] - 1):
        return ids, mask, labels
    keep = slice(cols[0], cols[-1] + 1)
    return ids[:, keep], mask[:, keep], labels[:, keep] if labels.dim() == 2 else labels


def trimmed_on(
    batch: tuple[torch.Tensor, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` (CPU tensors) trimmed by :func:`trim_padding` on the CPU, then moved to ``device``: the trim's column
    scan never waits on a GPU, and the dropped columns are never copied to it."""
    ids, mask, labels = (t.to(device) for t in trim_padding(*batch))
    return ids, mask, labels
