"""Training mode of a PeftModel during local training: the whole model, or the adapter parts only.

``model.base_dropout: true`` (the default) is what a PEFT training loop does: ``model.train()``, so the frozen base's
own dropout (BERT's hidden and attention dropout, a classification head's dropout) is active. ``false`` keeps every
module of the frozen base in evaluation mode (deterministic: no random draw in the base) while the adapter parts
train: the LoRA / VeRA layers and their ``lora_A`` / ``lora_B`` / dropout children (so ``lora.dropout`` still
applies and Opacus' hooks, which only record in training mode, still see them) and the trained head's modules
(PEFT ``modules_to_save``) except its dropout modules.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper


def adapter_modules(model: torch.nn.Module) -> set[int]:
    """``id`` of every module that belongs to the adapter: tuner layers (without their ``base_layer`` subtree) and
    trained-head wrappers with their copies, except dropout modules inside those copies."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = getattr(module, "base_layer", None)
            frozen = {id(m) for m in base.modules()} if isinstance(base, torch.nn.Module) else set()
            keep.update(id(m) for m in module.modules() if id(m) not in frozen)
        elif isinstance(module, ModulesToSaveWrapper):
            keep.add(id(module))
            keep.update(id(m) for m in module.modules_to_save.modules() if not isinstance(m, torch.nn.Dropout))
    return keep


def set_train_mode(model: torch.nn.Module, base_dropout: bool) -> None:
    """Put ``model`` in training mode for a local step: all of it (``base_dropout``), or only the adapter parts
    (:func:`adapter_modules`) with every other module in evaluation mode. Undo with ``model.eval()``."""
    model.train()
    if base_dropout:
        return
    keep = adapter_modules(model)
    for module in model.modules():
        if id(module) not in keep:
            module.training = False
