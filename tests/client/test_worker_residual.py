"""The worker folds "<layer>.base_residual" into its frozen base: W = W0 + R (total), never W0 + R1 + R2."""

from __future__ import annotations

import torch

from fedsim.client.worker import ClientWorker
from fedsim.model.keys import layers_of, residual_key
from fedsim.types import EvalTask
from fedsim.validation import load_config
from tests.client.world import build_world


def test_residual_is_folded_as_w0_plus_total_residual():
    cfg, _ = load_config("tiny", ["runtime.backend=local", "data.synthetic_examples=120"])
    bp, data, state = build_world(cfg)
    worker = ClientWorker(0, cfg, bp, data)
    layer = layers_of(sorted(state))[0]
    w0 = worker.live.base_weight(layer).detach().clone()
    task = EvalTask("global", tuple(int(i) for i in data.test_indices[:8]))

    before = worker.evaluate(task, state)
    r1 = torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))  # (a constant would vanish after LayerNorm)
    with_r1 = worker.evaluate(task, {**state, residual_key(layer): r1})
    assert torch.equal(worker.live.base_weight(layer), w0 + r1)
    assert with_r1.loss_sum != before.loss_sum  # the residual changes the model
    r2 = -0.5 * r1
    worker.evaluate(task, {**state, residual_key(layer): r2})
    assert torch.equal(worker.live.base_weight(layer), w0 + r2)  # total residual, not accumulated
    again = worker.evaluate(task, {**state, residual_key(layer): r1})
    assert again.loss_sum == with_r1.loss_sum  # same state -> same numbers
