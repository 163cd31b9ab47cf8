"""The run's final adapter directory: a PEFT adapter, plus the folded base residual where a method has one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file

from fedsim.model.adapters import export_peft
from fedsim.model.keys import is_residual

RESIDUAL_FILE = "base_residual.safetensors"


def export_adapter(model: PeftModel, state: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """Write ``out_dir`` so ``PeftModel.from_pretrained(base, out_dir)`` loads the adapter.

    Methods that fold a dense residual into the frozen base (FedEx-LoRA, FLoRA) also get
    ``out_dir/base_residual.safetensors`` ("<module path>.base_residual" -> [d_out, d_in]): add each tensor
    to that module's base weight before loading the adapter to reproduce the trained model exactly.
    """
    out_dir = Path(out_dir)
    export_peft(model, {k: v for k, v in state.items() if not is_residual(k)}, out_dir)
    residual = {k: v.detach().cpu().contiguous() for k, v in state.items() if is_residual(k)}
    if residual:
        save_file(residual, str(out_dir / RESIDUAL_FILE), metadata={"format": "pt"})
