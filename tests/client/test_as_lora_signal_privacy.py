"""AS-LoRA's uploaded scores are a function of the client's PRIVATISED gradients alone (curvature on).

DP-SGD's output is pinned (Opacus' ``add_noise`` replaced by a fixed, step-indexed tensor), so two different raw
datasets produce the same privatised gradients and the same trajectory. The privacy-clean scores must then be equal;
the opt-in reference curvature (raw losses) must differ, which shows the check can fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedsim.client.worker import ClientWorker
from fedsim.methods.base import make_method
from fedsim.types import ClientTask
from fedsim.validation import load_config
from tests.client.world import build_world

ROUNDS = 4


def _pinned_add_noise(self: DPOptimizer) -> None:
    """Privatised gradient := a fixed tensor depending only on (step, parameter index): raw data has no effect."""
    self._pinned_step = getattr(self, "_pinned_step", 0) + 1
    for i, p in enumerate(self.params):
        gen = torch.Generator().manual_seed(1000 * self._pinned_step + i)
        p.grad = torch.randn(p.shape, generator=gen).to(p.device) * self.expected_batch_size  # scale_grad divides


def _signals(monkeypatch, reference: bool) -> tuple[dict, dict]:
    overrides = [
        "method.name=as_lora",
        f"federation.rounds={ROUNDS}",
        "federation.local_steps=3",
        "privacy.mode=sample",
        "privacy.noise_multiplier=1.0",
        "method.as_lora.curvature=true",
        f"method.as_lora.curvature_window={ROUNDS}",
        f"method.as_lora.reference_curvature={str(reference).lower()}",
        "method.as_lora.projection_dim=16",
    ]
    cfg, _ = load_config("tiny", overrides)
    bp, data, state = build_world(cfg)
    method = make_method(cfg)
    plan = method.plan(ROUNDS, sorted(state), method.init_server_state(state))
    monkeypatch.setattr(DPOptimizer, "add_noise", _pinned_add_noise)
    task = ClientTask(ROUNDS, 0, plan, noise_multiplier=1.0, sample_rate=0.2)

    rng = np.random.default_rng(5)  # a different raw dataset of the same shape: other tokens, other labels
    other = dataclasses.replace(
        data, input_ids=rng.permutation(data.input_ids, axis=1), labels=(data.labels + 1) % data.num_labels
    )
    out = []
    for d in (data, other):
        res = ClientWorker(0, cfg, bp, d).train(task, state, None, None)
        assert res.result.status == "ok", res.result.error
        out.append(dict(res.upload.signals))
    return out[0], out[1]


def test_privacy_clean_scores_depend_only_on_privatised_gradients(monkeypatch):
    real, other = _signals(monkeypatch, reference=False)
    assert real and set(real) == set(other)
    assert any(abs(v) > 0 for k, v in real.items() if k.endswith(":kappa"))  # the curvature term is active
    assert real == other  # bit-identical: raw data does not reach the upload


def test_reference_curvature_reads_raw_losses(monkeypatch):
    real, other = _signals(monkeypatch, reference=True)
    kappas = [k for k in real if k.endswith(":kappa")]
    assert any(real[k] != pytest.approx(other[k], rel=1e-3, abs=1e-6) for k in kappas)
