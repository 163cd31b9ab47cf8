"""The pieces a worker test builds from a config, as a run does: data, the frozen base's blueprint and the initial
adapter state; one tiny-lm client task ready to train; and a one-client trainer on a model."""

from __future__ import annotations

import torch
from peft import PeftModel

from fedsim.client.executors import SingleExecutor
from fedsim.client.live_model import LiveModel
from fedsim.client.step_loop import LocalTrainer
from fedsim.config.schema import Config, FederationConfig, PrivacyConfig
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.data.sources import load_source
from fedsim.methods.base import make_method
from fedsim.model.adapters import attach_adapter, get_state
from fedsim.model.build import BaseBlueprint, blueprint_of, build_base_model, build_tokenizer
from fedsim.types import AdapterState, ClientTask
from fedsim.validation import load_config


def build_world(cfg: Config) -> tuple[BaseBlueprint, FederatedData, AdapterState]:
    """(blueprint, federated data, initial adapter state) of ``cfg``, built as the driver of a run builds them."""
    ds = load_source(cfg.data, cfg.seed)
    tok = build_tokenizer(cfg.model, ds.texts)
    data = build_federated_data(cfg, ds, tok)
    base = build_base_model(cfg.model, data.num_labels, tok, cfg.seed)
    bp = blueprint_of(base)
    return bp, data, get_state(attach_adapter(base, cfg.lora, bp.family, cfg.seed))


def lm_client(
    overrides: list[str], noise_multiplier: float
) -> tuple[Config, BaseBlueprint, FederatedData, AdapterState, ClientTask]:
    """tiny-lm with ``overrides``: (config, blueprint, data, a start state with a non-zero B so every tensor's
    gradient flows through the base, client 0's round-1 task; under DP with ``noise_multiplier`` and rate 0.5)."""
    cfg, _ = load_config("tiny-lm", overrides)
    ds = load_source(cfg.data, cfg.seed, cfg.task.kind)
    tok = build_tokenizer(cfg.model, ds.texts)
    data = build_federated_data(cfg, ds, tok)
    base = build_base_model(cfg.model, data.num_labels, tok, cfg.seed, cfg.task.kind)
    bp = blueprint_of(base)
    state = get_state(attach_adapter(base, cfg.lora, bp.family, cfg.seed, bp.task))
    gen = torch.Generator().manual_seed(3)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    method = make_method(cfg)
    plan = method.first_plan(state)
    dp = cfg.privacy.mode == "sample"
    task = ClientTask(1, 0, plan, noise_multiplier=noise_multiplier if dp else None, sample_rate=0.5 if dp else None)
    return cfg, bp, data, state, task


def trainer_on(
    model: PeftModel,
    federation: FederationConfig,
    privacy: PrivacyConfig,
    seed: int,
    *,
    base_dropout: bool = True,
    keep_gradients: bool = True,
) -> LocalTrainer:
    """The step loop over one client at a time on ``model`` (in place), as a worker builds it."""
    live = LiveModel(model, dp=privacy.mode == "sample", base_dropout=base_dropout)
    return LocalTrainer(SingleExecutor(live), federation, privacy, seed, keep_gradients=keep_gradients)
