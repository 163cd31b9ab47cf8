"""Poisson sampling arithmetic of sample-level DP-SGD (torch only, no Opacus): the sampling rate, the expected batch
size, the sampled indices and the marker of an empty batch. Imported by the trainer, the privacy budget and the
workers without pulling in Opacus (whose import also loads scipy and torch.distributed: seconds per process);
:mod:`fedsim.privacy.dpsgd` re-exports them."""

from __future__ import annotations

import torch


def poisson_rate(batch_size: int, n: int) -> float:
    """THE per-step sampling rate of a client with ``n`` examples: q = min(1, batch_size / n) (0 if n == 0).

    Sampling (trainer), calibration and accounting (privacy.budget) all use this one function, so the rate
    a client is sampled at is the rate its epsilon is computed for."""
    return min(1.0, batch_size / n) if n > 0 else 0.0


def expected_batch_size(batch_size: int, n: int) -> int:
    """q * n = min(batch_size, n): the denominator of the DP-SGD average (batch_size for an empty shard)."""
    return min(batch_size, n) if n > 0 else batch_size


def poisson_indices(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices in ``[0, n)`` kept independently with probability ``sample_rate`` (sorted, int64, may be empty)."""
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    draws = torch.rand(n, generator=generator)
    return torch.nonzero(draws < sample_rate, as_tuple=False).flatten()


def set_empty_grad_samples(params: list[torch.nn.Parameter]) -> None:
    """Mark an empty Poisson batch: zero per-example gradients, so a DPOptimizer step adds noise only."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
