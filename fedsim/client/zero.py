"""The engine of one rank of a ZeRO worker group (torch + DeepSpeed, no Ray): a frozen base partitioned over G
processes.

A group of G processes (one torch.distributed group: gloo on CPU, NCCL on GPU) holds ONE frozen base model between
them. The base is built under ``deepspeed.zero.Init`` (every parameter is partitioned as it is created; each rank
keeps ``1/G`` of every tensor in ``param.ds_tensor``) and the blueprint's weights are copied slice by slice into
each rank's own partition: while it trains, a rank keeps only its partitions (and one gathered module at a time).
Loading still reads every weight of the blueprint (shipped whole to every rank; bfloat16 weights are copied whole),
so a rank's peak memory is not 1/G of the base (benchmarks/perf/zero.py). The LoRA tensors are ordinary (small,
replicated) tensors, identical on every rank: every rank applies the same all-reduced update.

Computing with a partitioned base (what DeepSpeed's ZeRO-3 engine does with its hooks, here without its
optimizer, which would partition the trainable LoRA tensors too and bypass Opacus):

* forward: a pre-hook on every module that owns base parameters all-gathers them (``param.all_gather``), a post-hook
  frees them again (``param.partition``): one module's weights are whole at a time;
* backward: the weights autograd saved for backward are packed as a reference to their parameter
  (``torch.autograd.graph.saved_tensors_hooks``) and re-gathered when backward needs them (then freed).

Every rank runs the same modules in the same order, so the collectives match. A client's batch (drawn from the
same seeded schedule on every rank) is split into G contiguous slices, one per rank; a rank whose slice is empty
runs one example with its loss multiplied by zero (zero per-example gradients), so its collectives still match.

* Without DP: each rank backpropagates ``sum of its examples' losses / batch size``; the gradients are summed over
  the ranks (all-reduce), so every rank steps with the full batch's mean gradient.
* Under DP-SGD (Opacus, hooks mode): each rank computes and clips the per-example gradients of its own examples;
  the clipped sums are all-reduced; then ONE Gaussian draw per step from the generator seeded by
  ``(seed, "dp_noise", round, client)`` (the same on every rank, so every rank adds the same draw) is added, and
  the sum is divided by the expected batch size, as in the one-process trainer.

A client's result therefore does not depend on G (up to float rounding of the sums). Limits: ``lora.dropout`` > 0
draws dropout masks per rank slice, so results then depend on G; methods with dense residual keys (FedEx-LoRA,
FLoRA) would write the partitioned base and are refused.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fedsim.client.causal_lm import causal_lm_forward
from fedsim.client.engine import Engine
from fedsim.client.executors import SingleExecutor, Starts
from fedsim.client.live_model import Batch, LiveModel
from fedsim.client.padding import trimmed_on
from fedsim.client.step_loop import isolated_rng
from fedsim.config.schema import Config
from fedsim.model.adapters import attach_adapter
from fedsim.model.build import BaseBlueprint
from fedsim.types import AdapterState


def ds_config(stage: int, offload: str = "none") -> dict[str, Any]:
    """The DeepSpeed config of a worker group's ``zero.Init`` (the base is partitioned for every stage >= 1)."""
    zero: dict[str, Any] = {"stage": 3}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}


def init_group(rank: int, world: int, master_addr: str, master_port: int, use_cuda: bool) -> None:
    """Join the group's torch.distributed process group (gloo on CPU, NCCL with CUDA) through DeepSpeed.

    Sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for this process. Blocks until all ``world``
    ranks have joined. Idempotent in a process that has already joined."""
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK="0" if use_cuda else str(rank),  # each Ray GPU actor sees its own device as cuda:0
        WORLD_SIZE=str(world),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)


def _zero_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]


def partitioned_base(bp: BaseBlueprint, stage: int, offload: str = "none") -> torch.nn.Module:
    """The frozen base of ``bp`` built under ``deepspeed.zero.Init`` in the current process group: each rank
    holds only its slice of every parameter (``ds_tensor``), copied from the blueprint's weights. Tied weights are
    re-tied. Raises RuntimeError when a blueprint weight has no parameter or a parameter no weight."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(bp.config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with warnings.catch_warnings():  # numpy arrays mapped read-only from Ray's shared memory: only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        weights = {k: torch.as_tensor(v) for k, v in bp.weights.items()}  # numpy (zero-copy from Ray) or tensors
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride
    from transformers.modeling_utils import PreTrainedModel

    # no random init (it would index partitioned tensors, and every weight is overwritten below)
    init, PreTrainedModel.initialize_weights = PreTrainedModel.initialize_weights, lambda self: None
    try:
        with isolated_rng(None):  # construction draws (the weights are overwritten below)
            # no dtype override: buffers computed at construction (rotary inv_freq) come out as in the plain model
            zero_init = deepspeed.zero.Init(
                config_dict_or_path=ds_config(stage, offload),
                mem_efficient_linear=False,
                dtype=dtype,
                remote_device="cpu" if offload == "cpu" else None,
                tensor_overrides=[DeepSpeedTensorOverride.device] if torch.cuda.is_available() else [],
            )
            with zero_init:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        PreTrainedModel.initialize_weights = init
    if bp.tied:
        model.tie_weights()
    rank = dist.get_rank()
    names = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [k for k in names if k not in weights and k not in bp.tied]
    unexpected = [k for k in weights if k not in names and k not in buffers]
    if missing or unexpected:
        raise RuntimeError(
            f"blueprint weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, p in names.items():
            if name not in weights:
                continue
            flat = weights[name].reshape(-1)  # a view: only this rank's slice is read
            part = p.ds_tensor.numel()
            chunk = flat[rank * part : (rank + 1) * part]
            p.ds_tensor.zero_()
            p.ds_tensor[: chunk.numel()].copy_(chunk.to(p.ds_tensor.dtype))
        for name, b in buffers.items():
            if name in weights:
                b.copy_(weights[name])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class PartitionedCompute:
    """Gathers a module's base parameters around its forward and re-gathers saved weights in backward (see the
    module docstring). ``resident_bytes`` is the base partition this rank holds."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._live: dict[int, torch.nn.Parameter] = {}  # storage data_ptr -> gathered parameter (forward only)
        self.handles: list[Any] = []
        for module in model.modules():
            params = _zero_params(module)
            if params:
                self.handles.append(module.register_forward_pre_hook(self._pre(params)))
                self.handles.append(module.register_forward_hook(self._post(params)))

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if hasattr(p, "ds_id")]

    def resident_bytes(self) -> int:
        """Bytes of base parameters this rank holds (its partitions), when no module is gathered."""
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.params)

    @staticmethod
    def _gather(params: list[torch.nn.Parameter]) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if todo:
            todo[0].all_gather(param_list=todo)

    @staticmethod
    def _release(params: list[torch.nn.Parameter]) -> None:
        params[0].partition(param_list=params, has_been_updated=False)

    def _pre(self, params: list[torch.nn.Parameter]) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any) -> None:
            self._gather(params)
            for p in params:
                self._live[p.data.untyped_storage().data_ptr()] = p

        return hook

    def _post(self, params: list[torch.nn.Parameter]) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
            for p in params:
                self._live.pop(p.data.untyped_storage().data_ptr(), None)
            self._release(params)

        return hook

    def _pack(self, t: torch.Tensor) -> Any:
        p = self._live.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if p is None:
            return t
        return ("zero", p, t.size(), t.stride(), t.storage_offset())

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and len(packed) == 5 and packed[0] == "zero"):
            return packed
        _, p, size, stride, offset = packed
        self._gather([p])
        whole = p.data.clone()
        self._release([p])
        return whole.as_strided(size, stride, offset)

    @contextmanager
    def training(self) -> Iterator[None]:
        """Forward + backward inside: base weights saved for backward are re-gathered when backward needs them."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield


class ZeroExecutor:
    """One client per call whose every batch is split over the ranks of the current process group (module
    docstring); ``compute`` gathers the partitioned base. Loading, clean-up and trained state are the
    one-client executor's (``single``, on the same live model)."""

    max_clients = 1
    dp_across_group = True  # the clipped sums of every rank, then one noise draw

    def __init__(self, single: SingleExecutor, compute: PartitionedCompute) -> None:
        self.single, self.compute, self.live = single, compute, single.live
        self.pending: torch.Tensor | None = None  # this rank's loss of the last forward

    def open(self, keys: Sequence[str], starts: Starts) -> list[list[torch.Tensor]]:
        return self.single.open(keys, starts)

    def forward(self, batches: Sequence[tuple[int, Batch]]) -> list[float]:
        """This rank's slice of the batch forward; returns the WHOLE batch's mean loss (all-reduced: the same on
        every rank, so every rank takes the same branch after the finiteness check)."""
        ((_, batch),) = batches
        batch = trimmed_on(batch, self.live.device)
        rank, world = dist.get_rank(), dist.get_world_size()
        n = int(batch[0].shape[0])
        bounds = np.linspace(0, n, world + 1).round().astype(int)
        lo, hi = int(bounds[rank]), int(bounds[rank + 1])
        dummy = hi <= lo
        ids, mask, labels = (t[:1] if dummy else t[lo:hi] for t in batch)
        if labels.dim() != 2:
            raise ValueError("ZeRO worker groups train causal LMs only (labels [n, L])")
        with self.compute.training():
            per_example = causal_lm_forward(self.live.forward_module, ids, mask, labels)[0]
        if self.live.dp:  # Opacus: the mean over this rank's examples -> one per-example gradient per example
            loss = per_example.mean() * (0.0 if dummy else 1.0)
        else:  # this rank's share of the full batch's mean
            loss = per_example.sum() * (0.0 if dummy else 1.0 / n)
        self.pending = loss
        total = torch.tensor([0.0 if dummy else float(per_example.detach().sum())], dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return [float(total[0]) / n]

    def backward(self, finite: Sequence[bool]) -> None:
        """Backpropagate this rank's share; without DP the gradients are summed over the ranks (every rank then
        steps with the full batch's mean gradient)."""
        if self.pending is None:
            return
        loss, self.pending = self.pending, None
        if not finite[0]:
            return
        with self.compute.training():
            loss.backward()
        if not self.live.dp:
            for p in self.single.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def trained(self, client: int, keys: Sequence[str]) -> AdapterState:
        return self.single.trained(client, keys)

    def close(self) -> None:
        self.pending = None
        self.single.close()


def zero_engine(cfg: Config, blueprint: BaseBlueprint) -> Engine:
    """A worker's engine over a base partitioned across the ranks of the current process group (:func:`init_group`
    first, in every rank). Every rank must then make the same calls with the same arguments: they compute
    together and return the same results. Raises ValueError for a base that is not a causal LM."""
    if blueprint.task != "causal_lm":
        raise ValueError("ZeRO worker groups need a causal-LM base (task.kind: causal_lm)")
    zero = cfg.runtime.zero
    use_cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    base = partitioned_base(blueprint, max(1, zero.stage), zero.offload)
    model = attach_adapter(base, cfg.lora, blueprint.family, cfg.seed, blueprint.task)
    for p in model.parameters():  # the adapter (not partitioned) onto this rank's device
        if not hasattr(p, "ds_id"):
            p.data = p.data.to(device)
    compute = PartitionedCompute(model)
    live = LiveModel(model, dp=cfg.privacy.mode == "sample", base_dropout=cfg.model.base_dropout, folds_residuals=False)
    return Engine(live, ZeroExecutor(SingleExecutor(live), compute), None, compute.resident_bytes)
