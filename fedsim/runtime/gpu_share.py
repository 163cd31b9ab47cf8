"""``runtime.gpus_per_worker: auto``: how many workers share one GPU, from one probe client's memory.

Pure arithmetic (no Ray, no CUDA): :func:`workers_per_gpu` turns a :class:`~fedsim.client.memory_probe.MemoryProbe`
(the device's total memory and the peak the caching allocator reserved while one worker built its model and trained
the largest client) into a count, and :func:`gpu_share` into the fractional ``num_gpus`` Ray schedules with.

Per worker process the GPU holds: the CUDA context and library workspaces (not seen by torch's allocator;
:data:`CONTEXT_BYTES`) + what the probe reserved (frozen base, adapter, optimizer state, activations and Opacus
per-example gradients of one batch). ``margin`` keeps a share of the device free for allocator fragmentation and
Poisson batches larger than the probe's.
"""

from __future__ import annotations

import math

from fedsim.errors import ConfigError

#: CUDA context + cuBLAS/cuDNN workspaces of one process, outside torch's allocator (typically 300-600 MiB)
CONTEXT_BYTES = 600 * 2**20
#: fraction of the device left free
MARGIN = 0.15
#: never more workers per GPU than this (beyond it they only queue on the same SMs)
MAX_WORKERS_PER_GPU = 16
_GIB = 2**30


def workers_per_gpu(
    total_bytes: int,
    peak_bytes: int,
    *,
    margin: float = MARGIN,
    context_bytes: int = CONTEXT_BYTES,
    cap: int = MAX_WORKERS_PER_GPU,
) -> int:
    """How many workers fit on one GPU of ``total_bytes`` when each needs ``peak_bytes + context_bytes``.

    Raises ConfigError (``runtime.gpus_per_worker``) when not even one fits, and ValueError for non-positive sizes
    or a margin outside [0, 1)."""
    if total_bytes <= 0 or peak_bytes < 0 or context_bytes < 0 or peak_bytes + context_bytes == 0:
        raise ValueError(f"sizes must be positive: total {total_bytes}, peak {peak_bytes}, context {context_bytes}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    usable = total_bytes * (1 - margin)
    need = peak_bytes + context_bytes
    k = math.floor(usable / need)
    if k < 1:
        raise ConfigError(
            [
                f"runtime.gpus_per_worker: auto: one worker needs {need / _GIB:.2f} GiB (its probe client peaked at "
                f"{peak_bytes / _GIB:.2f} GiB + {context_bytes / _GIB:.2f} GiB CUDA context), more than "
                f"{1 - margin:.0%} of the GPU's {total_bytes / _GIB:.2f} GiB; use a smaller federation.batch_size or "
                "data.max_length, or a larger GPU (runtime.accelerator_type)"
            ]
        )
    return min(k, cap)


def gpu_share(workers: int) -> float:
    """The ``num_gpus`` of each of ``workers`` workers on one GPU: 1/workers rounded DOWN to Ray's resource
    precision (1e-4), so that ``workers`` shares always fit on one device. Raises ValueError for workers < 1."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return math.floor(10_000 / workers) / 10_000
