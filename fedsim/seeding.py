"""Every random draw derives from (seed, purpose, round, client, ...): never from global state.

This is what makes results independent of the worker count and of the backend.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def derive_seed(seed: int, purpose: str, *parts: int) -> int:
    """A 63-bit seed for ``purpose`` (e.g. "train", "cohort") at ``parts`` (round, client, ...)."""
    tag = zlib.crc32(purpose.encode())
    ss = np.random.SeedSequence([int(seed), tag, *(int(p) for p in parts)])
    hi, lo = (int(x) for x in ss.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def numpy_rng(seed: int, purpose: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *parts))


def torch_generator(seed: int, purpose: str, *parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` (torch is imported here: the data layer and the
    config checks use this module without it)."""
    import torch

    g = torch.Generator()
    g.manual_seed(derive_seed(seed, purpose, *parts))
    return g
