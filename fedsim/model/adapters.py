"""PEFT LoRA injection and AdapterState get/set: THE one module that maps PEFT parameters to adapter keys.

(The key strings themselves are spelled by :mod:`fedsim.model.keys`, torch-free, so methods can use them.)
Canonical :data:`~fedsim.types.AdapterState` keys:

* ``"<module path>.lora_A"`` / ``"<module path>.lora_B"`` -- the module path as in the BASE model
  (``bert.encoder.layer.0.attention.self.query``); values are PEFT's weights, ``lora_A`` ``[r, d_in]``,
  ``lora_B`` ``[d_out, r]``.
* ``"head.<param path>"`` -- trained classification-head parameters (``head.classifier.weight``), present only
  when ``lora.train_head`` is true.

* VeRA (``lora.variant: vera``): ``"<module path>.vera_lambda_d"`` (``[r]``, factor "A") and
  ``"<module path>.vera_lambda_b"`` (``[d_out]``, factor "B"). The random projections ``vera_A`` / ``vera_B`` are
  frozen buffers shared by all layers (PEFT slices the largest shape per layer), drawn by PEFT from
  ``projection_prng_key = derive_seed(seed, "vera_projection") & 0x7FFFFFFF``, so they are identical in every
  process and never part of the state. VeRA has no alpha (``lora.alpha`` is ignored); PEFT's defaults are kept:
  ``lambda_d`` starts at ``d_initial = 0.1`` everywhere, ``lambda_b`` at zero (so the adapter starts as a no-op).

With ``train_head`` false the head is not wrapped by PEFT at all (PEFT's SEQ_CLS task type would add it to
``modules_to_save``), so it stays frozen at its seeded init, is not in the state and is not exported.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, VeraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel

from fedsim.config.schema import LoraConfig
from fedsim.errors import ConfigError
from fedsim.model.keys import HEAD_PREFIX, factor_of, layer_of, lora_key, vera_key
from fedsim.seeding import derive_seed
from fedsim.types import AdapterState, state_bytes

__all__ = [
    "adapter_key",
    "adapter_keys",
    "attach_adapter",
    "export_peft",
    "factor_of",
    "get_state",
    "layer_of",
    "parameters_for",
    "set_state",
    "set_trainable",
    "state_bytes",
]

ADAPTER = "default"
DEFAULT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "llama": ["q_proj", "v_proj"]}
#: task.kind causal_lm: LoRA on all four attention projections (the MLP only when lora.targets names it)
CAUSAL_LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HEAD_MODULES = {"bert": "classifier", "roberta": "classifier", "llama": "score"}
_PEFT_PREFIX = "base_model.model."
_LORA_MARK = {f".lora_{f}.{ADAPTER}.weight": f for f in ("A", "B")}
_VERA_MARK = {f".vera_lambda_{s}.{ADAPTER}": f for s, f in (("d", "A"), ("b", "B"))}
_HEAD_MARK = f".modules_to_save.{ADAPTER}."


def attach_adapter(
    base: PreTrainedModel, cfg: LoraConfig, family: str, seed: int, task: str = "classification"
) -> PeftModel:
    """Inject LoRA (or VeRA) into ``base`` (in place) and return the PeftModel; every adapter tensor requires grad.

    ``task`` causal_lm: PEFT task type CAUSAL_LM, [auto] targets = :data:`CAUSAL_LM_TARGETS`, no head
    (``cfg.train_head`` is ignored: the LM head stays frozen and is never part of the state).

    The LoRA A init is drawn under ``derive_seed(seed, "lora_init")`` inside ``fork_rng``, so every process gets the
    same A for the same seed (B starts at zero); VeRA's frozen projections come from a PRNG key derived from
    ``seed``. Raises ConfigError naming ``lora.targets`` if a target matches
    no module of the model.
    """
    auto = CAUSAL_LM_TARGETS if task == "causal_lm" else DEFAULT_TARGETS[family]
    targets = list(auto) if list(cfg.targets) == ["auto"] else list(cfg.targets)
    head = {"task_type": TaskType.SEQ_CLS, "modules_to_save": [HEAD_MODULES[family]]}
    head = head if cfg.train_head else {"task_type": None, "modules_to_save": None}
    if task == "causal_lm":
        head = {"task_type": TaskType.CAUSAL_LM, "modules_to_save": None}
    if cfg.variant == "vera":
        peft_cfg = VeraConfig(
            r=cfg.r,
            target_modules=targets,
            vera_dropout=cfg.dropout,
            projection_prng_key=derive_seed(seed, "vera_projection") & 0x7FFFFFFF,
            save_projection=True,
            bias="none",
            **head,
        )
    else:
        peft_cfg = PeftLoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            use_rslora=cfg.variant == "rslora",
            bias="none",
            **head,
        )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(derive_seed(seed, "lora_init"))
        try:
            model = get_peft_model(base, peft_cfg)
        except ValueError as e:
            raise ConfigError(
                [
                    f"lora.targets: {targets} do not match the modules of this model ({e}); use [auto] or names of "
                    "Linear modules of the base model."
                ]
            ) from e
    for p in _params(model).values():
        p.requires_grad_(True)
    return model


def _canonical(name: str) -> str | None:
    """Canonical key of a PEFT parameter name, or None if the parameter is not an adapter tensor."""
    if not name.startswith(_PEFT_PREFIX):
        return None
    name = name[len(_PEFT_PREFIX) :]
    for mark, factor in _LORA_MARK.items():
        if name.endswith(mark):
            return lora_key(name[: -len(mark)], factor)
    for mark, factor in _VERA_MARK.items():
        if name.endswith(mark):
            return vera_key(name[: -len(mark)], factor)
    if _HEAD_MARK in name:
        module, param = name.split(_HEAD_MARK, 1)
        return f"{HEAD_PREFIX}{module}.{param}"
    return None


def adapter_key(parameter_name: str) -> str | None:
    """The canonical key of the PEFT parameter named ``parameter_name`` (as in ``model.named_parameters()``), or
    None if it is not an adapter tensor."""
    return _canonical(parameter_name)


def _params(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Canonical key -> the live adapter Parameter."""
    out = {}
    for name, p in model.named_parameters():
        key = _canonical(name)
        if key is not None:
            out[key] = p
    return out


def _lookup(model: PeftModel, keys: Iterable[str]) -> list[tuple[str, torch.nn.Parameter]]:
    params = _params(model)
    keys = list(keys)
    unknown = [k for k in keys if k not in params]
    if unknown:
        more = "..." if len(unknown) > 5 else ""
        raise KeyError(f"unknown adapter keys {unknown[:5]}{more}; this model has e.g. {sorted(params)[:3]}")
    return [(k, params[k]) for k in keys]


def adapter_keys(model: PeftModel) -> list[str]:
    """All canonical adapter keys of ``model``, sorted."""
    return sorted(_params(model))


def get_state(model: PeftModel, keys: Iterable[str] | None = None) -> AdapterState:
    """Detached CPU clones of the adapter tensors (all of them, or ``keys``). KeyError for unknown keys."""
    keys = adapter_keys(model) if keys is None else keys
    return {k: p.detach().to("cpu", copy=True) for k, p in _lookup(model, keys)}


@torch.no_grad()
def set_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the live adapter tensors in place (other tensors untouched).

    Raises KeyError naming unknown keys, ValueError on a shape mismatch (nothing is copied then).
    """
    pairs = _lookup(model, state)
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in pairs if state[k].shape != p.shape]
    if bad:
        raise ValueError(f"adapter state shape mismatch: {bad[:5]}")
    for k, p in pairs:
        p.copy_(state[k])


def parameters_for(model: PeftModel, keys: Iterable[str]) -> list[torch.nn.Parameter]:
    """The live Parameters of ``keys``, in the order of ``keys``. KeyError for unknown keys."""
    return [p for _, p in _lookup(model, keys)]


def set_trainable(model: PeftModel, keys: Iterable[str]) -> None:
    """requires_grad True exactly for the adapter tensors ``keys``; False for every other parameter."""
    chosen = {id(p) for p in parameters_for(model, keys)}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


def export_peft(model: PeftModel, state: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """Write ``out_dir/adapter_config.json`` + ``adapter_model.safetensors`` holding ``state``.

    ``PeftModel.from_pretrained(base, out_dir)`` on an identical base reproduces ``state``. ``state`` must hold
    every adapter key of ``model`` (KeyError otherwise); the model's own tensors are restored afterwards.
    """
    missing = sorted(set(adapter_keys(model)) - set(state))
    if missing:
        raise KeyError(f"export_peft needs every adapter key; missing {missing[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = get_state(model)
    try:
        set_state(model, state)
        with warnings.catch_warnings():  # a GGUF base folder has no config.json for PEFT's vocabulary check
            warnings.filterwarnings("ignore", message="Could not find a config file")
            tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    finally:
        set_state(model, saved)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.inference_mode = True
    config.save_pretrained(str(out_dir))  # adapter_config.json, in PEFT's own format
