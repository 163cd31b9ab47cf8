"""Prompt -> response data for ``task.kind: causal_lm``: formatting, tokenisation, answer matching.

The prompt/response sources register in the data-source registry (:mod:`fedsim.data.registry`):
``bbc-news-instruct`` (:mod:`fedsim.data.bbc`), ``synthetic-arithmetic`` (:mod:`fedsim.data.synthetic`), and
``gsm8k:PATH`` and ``jsonl:/parquet:/csv:PATH`` with ``data.prompt_field`` / ``data.response_field``
(:mod:`fedsim.data.instruct_files`). They return an :class:`~fedsim.data.types.InstructDataset`.

Formatting: the tokenizer's chat template when it has one (and ``task.chat_template``), the user turn being
``context + "\\n\\n" + prompt``; otherwise the plain template ``prompt + "\\n"``. The response is followed by the
end-of-sequence token. Only the context is truncated to fit ``data.max_length`` (the question and the response are
kept whole; a response longer than half of max_length is cut, keeping its end-of-sequence token).

Storage (:func:`tokenize_instruct`): every example LEFT-padded to ``max_length`` as
``[pad ... pad][prompt][response][eos]``, with ``response_start[i]`` the index of its first response token, so the
response tokens of a batch are its last positions (the causal-LM loss needs logits only there) and a prompt is
``ids[i, pads:response_start[i]]``. Labels (:func:`response_labels`) are the token ids at response positions and
-100 everywhere else (prompt and padding).

Exact match (:func:`exact_match`): ``text`` answers compare after :func:`normalise_answer` (case, punctuation and
whitespace folded); ``number`` answers compare the number :func:`extract_number` finds (after the last ``####`` if
there is one, else the last number in the text).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.data.types import InstructDataset

ANSWER_KINDS = ("text", "number")
IGNORE = -100  # label of a position that is not scored (prompt, padding)
_MARK = "\x00FEDSIM_USER\x00"


# ----------------------------------------------------------------------------- answers


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed and stripped: ``" Sport.\\n"`` -> ``"sport"``."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The answer number of ``text``: the first number after the last ``####`` if there is one, else the last
    number in the text; thousands separators dropped, ``12.0`` -> ``12``. None if there is no number."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        found = found[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    value = found[0].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def exact_match(prediction: str, answer: str, kind: str = "text") -> bool:
    """Whether ``prediction`` matches ``answer`` (``kind`` text: normalised strings equal; number: the extracted
    numbers equal and present). Raises ValueError for an unknown ``kind``."""
    if kind == "text":
        return normalise_answer(prediction) == normalise_answer(answer)
    if kind == "number":
        want = extract_number(answer)
        return want is not None and extract_number(prediction) == want
    raise ValueError(f"unknown answer kind {kind!r}; use one of {ANSWER_KINDS}")


# ----------------------------------------------------------------------------- formatting and tokenisation


@dataclass(frozen=True)
class PromptFormat:
    """How a user turn becomes prompt text: ``prefix + user + suffix`` (a rendered chat template split around the
    user's content, or "" and "\\n" for the plain template)."""

    prefix: str
    suffix: str
    chat: bool


def prompt_format(tokenizer: Any, use_chat_template: bool) -> PromptFormat:
    """The chat template of ``tokenizer`` (one user turn, generation prompt added) when it has one and
    ``use_chat_template``, else the plain template."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
        )
        if isinstance(rendered, str) and rendered.count(_MARK) == 1:
            prefix, suffix = rendered.split(_MARK)
            return PromptFormat(prefix, suffix, True)
    return PromptFormat("", "\n", False)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def eos_id(tokenizer: Any) -> int:
    """The end-of-sequence id (eos, else sep). Raises ValueError if the tokenizer has neither."""
    for tid in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no end-of-sequence token (eos or sep); causal_lm responses need one")


def tokenize_instruct(
    ds: InstructDataset, tokenizer: Any, max_length: int, use_chat_template: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids int32 [N, L], attention_mask int8 [N, L], response_start int32 [N])``, left-padded as described
    in the module docstring. Every example keeps at least one response token (its end-of-sequence token).

    Raises ValueError if the tokenizer has no pad or end-of-sequence token, or max_length < 4.
    """
    if max_length < 4:
        raise ValueError(f"max_length {max_length} is too short for a prompt and a response")
    pad, eos = tokenizer.pad_token_id, eos_id(tokenizer)
    if pad is None:
        raise ValueError("the tokenizer has no pad token")
    fmt = prompt_format(tokenizer, use_chat_template)
    n, L = len(ds), int(max_length)
    ids = np.full((n, L), pad, dtype=np.int32)
    mask = np.zeros((n, L), dtype=np.int8)
    start = np.zeros(n, dtype=np.int32)
    resp_cap = max(1, L // 2)
    responses = _encode(tokenizer, ds.responses)
    contexts = ds.contexts or [""] * n
    ctx_ids = _encode(tokenizer, contexts) if ds.contexts else [[] for _ in range(n)]
    questions = [fmt.prefix + ("\n\n" if c else "") + p + fmt.suffix for c, p in zip(contexts, ds.prompts, strict=True)]
    bare = _encode(tokenizer, questions)  # the prompt without its context: its length bounds the context's budget
    for i in range(n):
        resp = (responses[i][: resp_cap - 1] + [eos])[-resp_cap:]
        budget = L - len(resp)
        prompt = _fit_prompt(tokenizer, fmt, contexts[i], ctx_ids[i], ds.prompts[i], len(bare[i]), budget)
        seq = prompt + resp
        ids[i, L - len(seq) :] = seq
        mask[i, L - len(seq) :] = 1
        start[i] = L - len(resp)
    return ids, mask, start


def _fit_prompt(
    tokenizer: Any, fmt: PromptFormat, context: str, context_ids: list[int], prompt: str, bare: int, budget: int
) -> list[int]:
    """The prompt's token ids within ``budget``: the context cut (from its end) until it fits; as a last resort
    (no context left) the prompt's first tokens are dropped, keeping the end next to the response."""

    def encode(ctx: str) -> list[int]:
        user = f"{ctx}\n\n{prompt}" if ctx else prompt
        return _encode(tokenizer, [fmt.prefix + user + fmt.suffix])[0]

    keep = min(len(context_ids), max(0, budget - bare - 2))
    ctx = context if keep == len(context_ids) else tokenizer.decode(context_ids[:keep]).strip()
    out = encode(ctx)
    while len(out) > budget and keep > 0:  # re-tokenising the joined text may merge differently
        keep = max(0, keep - max(4, len(out) - budget))
        ctx = tokenizer.decode(context_ids[:keep]).strip() if keep else ""
        out = encode(ctx)
    return out[-budget:] if len(out) > budget else out


def response_labels(ids: np.ndarray, response_start: np.ndarray) -> np.ndarray:
    """int64 ``[n, L]``: the token id at response positions (``j >= response_start[i]``), -100 elsewhere."""
    cols = np.arange(ids.shape[1])[None, :]
    return np.where(cols >= np.asarray(response_start)[:, None], ids.astype(np.int64), IGNORE)
