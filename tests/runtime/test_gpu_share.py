"""Sizing arithmetic of ``runtime.gpus_per_worker: auto`` (fedsim.runtime.gpu_share); no GPU needed."""

from __future__ import annotations

import pytest

from fedsim.errors import ConfigError
from fedsim.runtime.gpu_share import CONTEXT_BYTES, MAX_WORKERS_PER_GPU, gpu_share, workers_per_gpu

GIB = 2**30


@pytest.mark.parametrize(
    "total, peak, margin",
    [(80 * GIB, 3 * GIB, 0.15), (24 * GIB, 5 * GIB, 0.1), (141 * GIB, 20 * GIB, 0.15), (16 * GIB, 13 * GIB, 0.1)],
)
def test_workers_per_gpu_is_the_most_that_fit_within_the_margin(total, peak, margin):
    k = workers_per_gpu(total, peak, margin=margin)
    need = peak + CONTEXT_BYTES
    assert k * need <= total * (1 - margin)
    assert k == MAX_WORKERS_PER_GPU or (k + 1) * need > total * (1 - margin)


def test_the_context_of_each_process_is_counted():
    # 10 GiB usable: 4 x 2 GiB fit without the context, 3 x (2 GiB + 600 MiB) with it
    assert workers_per_gpu(10 * GIB, 2 * GIB, margin=0.0, context_bytes=0) == 5
    assert workers_per_gpu(10 * GIB, 2 * GIB, margin=0.0) == 3


def test_tiny_clients_are_capped():
    assert workers_per_gpu(141 * GIB, 10 * 2**20, context_bytes=0) == MAX_WORKERS_PER_GPU
    assert workers_per_gpu(141 * GIB, 10 * 2**20, context_bytes=0, cap=4) == 4


def test_a_worker_larger_than_the_gpu_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        workers_per_gpu(24 * GIB, 23 * GIB)
    assert "runtime.gpus_per_worker" in str(err.value) and "batch_size" in str(err.value)


@pytest.mark.parametrize("bad", [dict(total_bytes=0, peak_bytes=1), dict(total_bytes=GIB, peak_bytes=-1)])
def test_nonsense_sizes_raise(bad):
    with pytest.raises(ValueError):
        workers_per_gpu(**bad)
    with pytest.raises(ValueError):
        workers_per_gpu(GIB, 1, margin=1.0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 7, 8, 12, 16])
def test_k_shares_always_fit_one_gpu_and_k_plus_one_do_not(k):
    share = gpu_share(k)
    assert k * share <= 1.0
    assert (k + 1) * share > 1.0
    assert round(share, 4) == share  # Ray's resource precision
    with pytest.raises(ValueError):
        gpu_share(0)
