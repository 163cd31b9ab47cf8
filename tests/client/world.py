"""The pieces a worker test builds from a config, as a run does: data, the frozen base's blueprint and the initial
adapter state; and a one-client trainer on a model."""

from __future__ import annotations

from peft import PeftModel

from fedsim.client.executors import SingleExecutor
from fedsim.client.live_model import LiveModel
from fedsim.client.step_loop import LocalTrainer
from fedsim.config.schema import Config, FederationConfig, PrivacyConfig
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.data.sources import load_source
from fedsim.model.adapters import attach_adapter, get_state
from fedsim.model.build import BaseBlueprint, blueprint_of, build_base_model, build_tokenizer
from fedsim.types import AdapterState


def build_world(cfg: Config) -> tuple[BaseBlueprint, FederatedData, AdapterState]:
    """(blueprint, federated data, initial adapter state) of ``cfg``, built as the driver of a run builds them."""
    ds = load_source(cfg.data, cfg.seed)
    tok = build_tokenizer(cfg.model, ds.texts)
    data = build_federated_data(cfg, ds, tok)
    base = build_base_model(cfg.model, data.num_labels, tok, cfg.seed)
    bp = blueprint_of(base)
    return bp, data, get_state(attach_adapter(base, cfg.lora, bp.family, cfg.seed))


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
