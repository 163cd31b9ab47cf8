"""Causal-LM losses and evaluation over left-padded rows (labels -100 outside the response), shared by the
step loop's executors (one client, a fused pass, a ZeRO group) and evaluation.

The loss of one example is the MEAN negative log-likelihood over ITS response tokens; a batch's loss is the mean of
those per-example losses, so under Opacus (``loss_reduction="mean"``) each example's per-sample gradient is the
gradient of its own sequence loss and clipping is per sequence. Logits are computed only for the batch's last
positions that hold a response token (``logits_to_keep``); position ids count real tokens only (left padding does
not shift them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.data.federated import LMData


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses of a causal LM.

    ``logits`` ``[B, K, V]``: the model's logits at the LAST ``K`` positions of sequences of length ``L``;
    ``labels`` ``[B, L]``: target token ids at scored positions, -100 elsewhere (the positions before
    ``L - K + 1`` must all be -100). Returns ``(per_example_mean_nll [B], token_nll_sum [B], tokens [B])``; an
    example without scored tokens has loss 0. Raises ValueError if a scored position lies outside the kept logits.
    """
    batch, keep, vocab = logits.shape
    length = labels.shape[1]
    if keep < 2 or bool((labels[:, : length - keep + 1] != -100).any()):
        raise ValueError(f"logits of the last {keep} positions do not cover every scored label")
    targets = labels[:, length - keep + 1 :]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(batch, keep - 1)
    tokens = (targets != -100).sum(1)
    summed = nll.sum(1)
    return summed / tokens.clamp(min=1), summed, tokens


def causal_lm_forward(
    module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`causal_lm_losses` of ``module`` (a causal LM, PEFT- or Opacus-wrapped) on one left-padded batch:
    logits only for the positions from the batch's first response token on, position ids from the mask."""
    scored = (labels != -100).any(0)
    first = int(torch.nonzero(scored).min()) if bool(scored.any()) else labels.shape[1] - 1
    keep = labels.shape[1] - first + 1
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = module(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    return causal_lm_losses(logits, labels)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a causal LM takes its key/value cache by: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The key/value cache a causal LM's forward returned (``cache`` or, in older transformers, ``past_key_values``)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    ids: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    response_start: np.ndarray,
    answers: Sequence[str],
    lm: LMData,
    batch_size: int,
    max_new_tokens: int,
) -> tuple[float, int, int, float, int]:
    """Causal-LM evaluation of ``model`` on left-padded rows (put in eval() mode; no grad): ``(sum over
    examples of the per-example mean response NLL, exact matches of the greedy answers, count, summed response
    NLL, response tokens)``. The greedy answer is generated from the prompt alone (the row up to
    ``response_start``), at most ``max_new_tokens`` tokens, cut at the end-of-sequence token, decoded with
    ``lm.tokenizer`` and compared by :func:`fedsim.data.instruct.exact_match`. ``labels`` (-100 outside the
    response) decide which response tokens are scored.

    Each batch's prompts are run ONCE: the key/value cache of that pass serves both the teacher-forced
    response loss and the greedy decoding (what ``generate`` would compute, without a second prompt pass)."""
    from fedsim.data.instruct import exact_match

    model.eval()
    device = next(model.parameters()).device
    loss_sum, tok_sum, tokens, correct, n = 0.0, 0.0, 0, 0, len(ids)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        b_ids = torch.as_tensor(np.asarray(ids[sl]), dtype=torch.long, device=device)
        b_mask = torch.as_tensor(np.asarray(mask[sl]), dtype=torch.long, device=device)
        b_y = torch.as_tensor(np.asarray(labels[sl]), dtype=torch.long, device=device)
        per, summed, count, generated = prompt_pass(model, b_ids, b_mask, b_y, response_start[sl], lm, max_new_tokens)
        loss_sum += float(per.sum())
        tok_sum += float(summed.sum())
        tokens += int(count.sum())
        for row, answer in zip(generated, answers[sl], strict=True):
            text = lm.tokenizer.decode(row, skip_special_tokens=True)
            correct += exact_match(text, answer, lm.answer_kind)
    return loss_sum, correct, n, tok_sum, tokens


@torch.no_grad()
def prompt_pass(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    start: np.ndarray,
    lm: LMData,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """One batch: ``(per-example mean response NLL, summed NLL, scored tokens, greedy token ids cut before the
    end-of-sequence token)``. Prompts are re-packed left-padded ``[B, P]``, responses right-padded ``[B, R]``
    after them; position ids count real tokens only."""
    import copy

    device = ids.device
    key = _cache_kwarg(model)
    batch, length = ids.shape
    first = length - mask.sum(1).cpu().numpy()  # first real token of each row
    start = np.asarray(start, dtype=np.int64)
    plen, rlen = start - first, length - start
    width, rwidth = int(plen.max()), int(rlen.max())
    prompts = torch.full((batch, width), lm.pad_id, dtype=torch.long, device=device)
    pmask = torch.zeros_like(prompts)
    resp = torch.full((batch, rwidth), lm.pad_id, dtype=torch.long, device=device)
    target = torch.full((batch, rwidth), -100, dtype=torch.long, device=device)
    rmask = torch.zeros_like(resp)
    for i in range(batch):
        prompts[i, width - plen[i] :] = ids[i, int(first[i]) : int(start[i])]
        pmask[i, width - plen[i] :] = 1
        resp[i, : rlen[i]] = ids[i, int(start[i]) :]
        target[i, : rlen[i]] = labels[i, int(start[i]) :]
        rmask[i, : rlen[i]] = 1
    lengths = torch.as_tensor(plen, dtype=torch.long, device=device)
    out = model(
        input_ids=prompts,
        attention_mask=pmask,
        position_ids=(pmask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache, last = _cache_of(out), out.logits[:, -1]
    # teacher-forced response loss, from a copy of the prompt cache
    forced = model(
        input_ids=resp,
        attention_mask=torch.cat([pmask, rmask], 1),
        position_ids=lengths[:, None] + torch.arange(rwidth, device=device)[None, :],
        **{key: copy.deepcopy(cache)},
        use_cache=True,
    ).logits
    logits = torch.cat([last[:, None], forced[:, :-1]], 1)  # position j predicts response token j
    per, summed, count = causal_lm_losses(
        torch.cat([logits, logits[:, -1:]], 1), torch.cat([target.new_full((batch, 1), -100), target], 1)
    )
    # greedy decoding from the prompt cache
    tokens = last.argmax(-1)
    done = tokens == lm.eos_id
    steps, gmask, position = [tokens], pmask, lengths
    for _ in range(int(max_new_tokens) - 1):
        if bool(done.all()):
            break
        gmask = torch.cat([gmask, torch.ones_like(gmask[:, :1])], 1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=gmask,
            position_ids=position[:, None],
            **{key: cache},
            use_cache=True,
        )
        cache, position = _cache_of(out), position + 1
        tokens = torch.where(done, lm.eos_id, out.logits[:, -1].argmax(-1))
        done |= tokens == lm.eos_id
        steps.append(tokens)
    generated = []
    for row in torch.stack(steps, 1).tolist():
        generated.append(row[: row.index(lm.eos_id)] if lm.eos_id in row else row)
    return per, summed, count, generated
