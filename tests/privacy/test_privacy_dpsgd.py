"""Opacus glue: Poisson sampling, empty-batch DP steps, per-example gradients of partly frozen models."""

from __future__ import annotations

import warnings

import torch

from fedsim.privacy.dpsgd import (
    clear_dp_buffers,
    make_dp_optimizer,
    poisson_indices,
    set_empty_grad_samples,
    wrap_for_dp,
)


def _net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_poisson_indices_deterministic_and_rate():
    a = poisson_indices(20_000, 0.1, torch.Generator().manual_seed(1))
    b = poisson_indices(20_000, 0.1, torch.Generator().manual_seed(1))
    c = poisson_indices(20_000, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and torch.equal(a, a.sort().values) and len(a.unique()) == len(a)
    assert 0 <= int(a.min()) and int(a.max()) < 20_000
    assert abs(len(a) - 2000) < 4 * (20_000 * 0.1 * 0.9) ** 0.5  # binomial mean, 4 standard deviations
    assert len(poisson_indices(50, 0.0, torch.Generator().manual_seed(0))) == 0
    assert torch.equal(poisson_indices(50, 1.0, torch.Generator().manual_seed(0)), torch.arange(50))


def _empty_step(noise_multiplier: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    net = _net()
    wrap_for_dp(net)
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    opt = make_dp_optimizer(
        torch.optim.SGD(params, lr=0.5),
        noise_multiplier,
        clip=1.0,
        expected_batch_size=4,
        generator=torch.Generator().manual_seed(3),
    )
    opt.zero_grad(set_to_none=True)
    set_empty_grad_samples(params)
    opt.step()
    return before, [p.detach().clone() for p in params]


def test_empty_batch_step_adds_only_noise():
    before, after = _empty_step(0.0)
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    before, after = _empty_step(2.0)
    deltas = torch.cat([(a - b).flatten() for b, a in zip(before, after, strict=True)])
    assert torch.count_nonzero(deltas) == deltas.numel()
    # update = -lr * N(0, (sigma * C)^2) / expected_batch: std 0.5 * 2 / 4 = 0.25
    assert 0.1 < float(deltas.std()) < 0.5
    _, again = _empty_step(2.0)
    assert all(torch.equal(x, y) for x, y in zip(after, again, strict=True))  # noise comes from the generator


def test_per_example_gradients_with_a_module_frozen_after_wrapping():
    net = _net()
    wrap_for_dp(net)  # both layers trainable at wrap time
    for p in net[2].parameters():  # freeze the LAST layer: its backward hook still fires (input needs grad)
        p.requires_grad_(False)
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    net.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.nn.functional.cross_entropy(net(x), y).backward()
    w = net[0].weight
    assert net[2].weight.grad_sample is None and net[2].weight.grad is None
    assert w.grad_sample.shape == (6, *w.shape)
    # the per-example gradients are those of single-example losses (computed on an unwrapped twin)
    twin = _net()
    for i in range(6):
        loss = torch.nn.functional.cross_entropy(twin(x[i : i + 1]), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, [twin[0].weight])
        torch.testing.assert_close(w.grad_sample[i], g, rtol=1e-5, atol=1e-7)
    clear_dp_buffers(net)
    assert w.grad is None and w.grad_sample is None
    assert all(not getattr(m, "activations", []) for m in net.modules())
