"""AS-LoRA: each round each layer trains and shares ONE factor (A or B), chosen from gradient scores.

Spec: METHODS.md "AS-LoRA". The other factor is frozen and identical on every client, so the weighted
mean of the active factor is an exact aggregate (``linear = True``).

Schedule (``plan``, a pure function of (round, keys, server_state)):

- warm-up, rounds ``1..t_warm`` with ``t_warm = max(1, ceil(warmup_fraction * rounds))``: all layers
  together, B on odd rounds, A on even rounds;
- afterwards, per layer ``l`` (index = position in the sorted layer names):
  ``d_l = (SA_l - SB_l) / (|SA_l| + |SB_l| + 1e-8)`` (a missing EMA counts as 0), choose A with probability
  ``sigmoid(clip(d_l / T, -30, 30))`` with ``T = max(temperature_min, temperature0 * temperature_decay **
  (t - t_warm))``; the uniform draw comes from ``numpy_rng(seed, "as_lora_choice", round, layer_index)``.
- head keys (if any) are SHARED every round.

A factor with no score yet (its EMA is None) counts as score 0. This deviates deliberately from the code published
with the paper (``choose_mode_softmax`` in github.com/myoungjun415/as_lora, which sets p(A) = 0 when only A is
unscored and p(A) = 1 when only B is): after a warm-up that trained only B (one warm-up round, fedsim's minimum for
runs of up to 10 rounds) that rule would never train A again. With score 0 the unscored factor is still chosen with
probability ``sigmoid(-1 / T)`` (about 0.27 at T = 1), so it gets a score; with neither factor scored the choice is
a fair coin. The reference code also uses ``int(0.1 * rounds)`` warm-up rounds (0 for fewer than 10 rounds);
fedsim uses at least one. Tested in tests/methods/test_as_lora.py.

Client signals (``client_signal``), from the last step's privatised gradient ``g`` of the active factor:
``g~ = P g`` (``P``: fixed Gaussian ``[projection_dim, numel]``, entries N(0, 1/projection_dim), seeded by
(seed, layer index, factor), cached per method instance, i.e. per process) or ``g~ = g`` without projection;
``e = max(||g~||^2 - numel * noise_std^2, 0)``. In the last ``curvature_window`` rounds with
``method.as_lora.curvature`` the score is ``e * (1 - lr * kappa / 2)``, otherwise ``e`` (and ``kappa`` is reported as
0).

Curvature, privacy-clean (default): a finite difference of the client's last two PRIVATISED gradients along the
step between them (a secant, ``s = theta_{T-1} - theta_{T-2}``, which for SGD is ``-lr * g_{T-1}``, i.e. along
the privatised gradient): ``kappa = (<P(g_T - g_{T-1}), P s> - c) / ||P s||^2`` with the DP-noise correction
``c = lr * numel * noise_std^2`` for plain SGD (the noise of ``g_{T-1}`` appears in both ``s`` and the difference;
``c`` removes its expected contribution) and ``c = 0`` otherwise; ``kappa = 0`` with fewer than two local steps or
``s = 0``. Everything here is post-processing of DP-SGD output, so the accountant covers it.

Curvature, reference (``method.as_lora.reference_curvature: true``, opt-in): the published code's second difference
of the RAW minibatch loss along the unit gradient ``u = g / ||g||``: ``kappa = (L(+h u) - 2 L(0) + L(-h u)) / h^2`` with
``h = 1e-3`` on the client's last non-empty batch. Raw losses are not privatised, so the reported epsilon does
not cover these uploads: the run warns and summary.json records it (``privacy_caveats``).
Both scalars are uploaded per layer as ``"<layer>:score"`` and ``"<layer>:kappa"``.

Server state (plain JSON data): ``{"layers": [sorted layer names], "ema": {layer: {"A": float | None,
"B": float | None}}, "choices": {str(round): {layer: "A" | "B"}}}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedsim.config.schema import Config
from fedsim.methods.base import Capabilities, Method, register_method
from fedsim.model.keys import factor_of, layer_of, layers_of
from fedsim.partial_sum import PartialSum
from fedsim.seeding import numpy_rng, torch_generator
from fedsim.types import AdapterState, Role, RoundPlan, ServerState, SignalContext

_EPS = 1e-8
_CLIP = 30.0
_FACTOR_INDEX = {"A": 0, "B": 1}


def sigmoid_clipped(x: float) -> float:
    """``sigmoid(clip(x, -30, 30))``."""
    return 1.0 / (1.0 + math.exp(-min(max(x, -_CLIP), _CLIP)))


def score_gap(sa: float | None, sb: float | None) -> float:
    """``d = (SA - SB) / (|SA| + |SB| + 1e-8)``, a missing score counting as 0."""
    a = 0.0 if sa is None else float(sa)
    b = 0.0 if sb is None else float(sb)
    return (a - b) / (abs(a) + abs(b) + _EPS)


def noise_floored_energy(sq_norm: float, numel: int, noise_std: float) -> float:
    """``max(sq_norm - numel * noise_std^2, 0)``: energy above the expected DP noise energy."""
    return max(float(sq_norm) - numel * float(noise_std) ** 2, 0.0)


def choices_of(plan: RoundPlan) -> dict[str, str]:
    """Layer -> its SHARED factor ("A" or "B") in ``plan``; layers with neither factor shared are left out."""
    out: dict[str, str] = {}
    for key, role in plan.roles.items():
        factor = factor_of(key)
        if role == Role.SHARED and factor in ("A", "B"):  # LoRA factors or VeRA vectors alike
            out.setdefault(layer_of(key), factor)
    return {layer: out[layer] for layer in layers_of(list(plan.roles)) if layer in out}


@register_method("as_lora")
class ASLoRA(Method):
    """Adaptive per-layer choice of the trained and shared LoRA factor (see the module docstring). Settings:
    ``method.as_lora.*``, checked by :meth:`settings_problems` when the config is checked."""

    capabilities = Capabilities(privacy_modes=frozenset({"none", "sample"}), signals=True, per_layer_choices=True)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.cfg = cfg.method.as_lora
        self.warmup_rounds = max(1, math.ceil(self.cfg.warmup_fraction * self.rounds))
        self._projections: dict[tuple[int, str, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ schedule
    def temperature(self, round: int) -> float:
        """``T = max(temperature_min, temperature0 * temperature_decay ** (round - t_warm))``."""
        c = self.cfg
        return max(c.temperature_min, c.temperature0 * c.temperature_decay ** (round - self.warmup_rounds))

    def prob_a(self, round: int, ema: Mapping[str, float | None] | None) -> float:
        """Probability of choosing A after warm-up, from one layer's EMA scores ``{"A": SA, "B": SB}``."""
        ema = ema or {}
        return sigmoid_clipped(score_gap(ema.get("A"), ema.get("B")) / self.temperature(round))

    def choose(self, round: int, layer_index: int, ema: Mapping[str, float | None] | None) -> str:
        """The factor ("A" or "B") layer ``layer_index`` trains and shares in ``round`` (deterministic)."""
        if round <= self.warmup_rounds:
            return "B" if round % 2 == 1 else "A"
        u = float(numpy_rng(self.seed, "as_lora_choice", round, layer_index).random())
        return "A" if u < self.prob_a(round, ema) else "B"

    def choices(self, round: int, layers: Sequence[str], server_state: ServerState) -> dict[str, str]:
        """Layer -> chosen factor for all ``layers`` (indexed by their position in sorted order)."""
        ema = server_state.get("ema", {})
        return {layer: self.choose(round, i, ema.get(layer)) for i, layer in enumerate(sorted(layers))}

    def init_server_state(self, global_state: AdapterState) -> ServerState:
        layers = sorted(layers_of(list(global_state)))
        return {"layers": layers, "ema": {layer: {"A": None, "B": None} for layer in layers}, "choices": {}}

    def plan(self, round: int, keys: Sequence[str], server_state: ServerState) -> RoundPlan:
        chosen = self.choices(round, layers_of(list(keys)), server_state)
        roles: dict[str, Role] = {}
        for key in keys:
            factor = factor_of(key)
            if factor == "head":
                roles[key] = Role.SHARED
            else:
                roles[key] = Role.SHARED if chosen[layer_of(key)] == factor else Role.FROZEN
        return RoundPlan(round=round, roles=roles)

    # ------------------------------------------------------------------ client side
    def projection(self, layer_index: int, factor: str, numel: int) -> torch.Tensor:
        """The fixed ``[projection_dim, numel]`` float32 matrix with N(0, 1/projection_dim) entries (cached)."""
        cache_key = (layer_index, factor, numel)
        if cache_key not in self._projections:
            dim = self.cfg.projection_dim
            gen = torch_generator(self.seed, "as_lora_projection", layer_index, _FACTOR_INDEX[factor])
            self._projections[cache_key] = torch.randn(dim, numel, generator=gen) / math.sqrt(dim)
        return self._projections[cache_key]

    def energy(self, grad: torch.Tensor, layer_index: int, factor: str, noise_std: float) -> float:
        """``e = max(||g~||^2 - numel * noise_std^2, 0)`` for one factor's gradient ``grad``."""
        g = grad.detach().reshape(-1).to("cpu", torch.float32)
        if self.cfg.projection:
            g = self.projection(layer_index, factor, g.numel()) @ g
        return noise_floored_energy(float(g.double().pow(2).sum()), grad.numel(), noise_std)

    def in_curvature_window(self, round: int) -> bool:
        """Whether the curvature correction applies in ``round`` (the last ``curvature_window`` rounds)."""
        return self.cfg.curvature and round > self.rounds - self.cfg.curvature_window

    def needs_raw_loss(self, round: int) -> bool:
        """Only the opt-in reference curvature reads raw losses, and only inside the curvature window."""
        return self.cfg.reference_curvature and self.in_curvature_window(round)

    @classmethod
    def privacy_caveats(cls, cfg: Config) -> list[str]:
        settings = cfg.method.as_lora
        if cfg.method.name == cls.name and settings.reference_curvature:
            return [
                "method.as_lora.reference_curvature: AS-LoRA's curvature term uses RAW minibatch losses (the "
                "published code's choice); the reported epsilon does NOT cover the scores clients upload in the last "
                f"{settings.curvature_window} rounds. Set it to false for privacy-clean scores."
            ]
        return []

    @classmethod
    def settings_problems(cls, cfg: Config) -> list[str]:
        """Every out-of-range ``method.as_lora.*`` setting, and ``reference_curvature`` without ``curvature``."""
        m = cfg.method.as_lora
        key = "method.as_lora"
        problems: list[str] = []
        if m.reference_curvature and not m.curvature:
            problems.append(
                f"{key}.reference_curvature: true needs {key}.curvature: true (it replaces the curvature estimate); "
                f"set {key}.curvature: true or drop {key}.reference_curvature."
            )
        if not 0.0 <= m.warmup_fraction <= 1.0:
            problems.append(f"{key}.warmup_fraction: must be in [0, 1], got {m.warmup_fraction}; e.g. 0.1.")
        if not 0.0 <= m.ema_beta < 1.0:
            problems.append(f"{key}.ema_beta: must be in [0, 1), got {m.ema_beta}; e.g. 0.9.")
        if not m.temperature0 > 0:
            problems.append(f"{key}.temperature0: must be > 0, got {m.temperature0}; e.g. 1.0.")
        if not m.temperature_min > 0:
            problems.append(f"{key}.temperature_min: must be > 0, got {m.temperature_min}; e.g. 0.1.")
        if not 0.0 < m.temperature_decay <= 1.0:
            problems.append(f"{key}.temperature_decay: must be in (0, 1], got {m.temperature_decay}; e.g. 0.95.")
        if m.projection and m.projection_dim < 1:
            problems.append(f"{key}.projection_dim: must be >= 1, got {m.projection_dim}; e.g. 64.")
        if m.curvature_window < 0:
            problems.append(f"{key}.curvature_window: must be >= 0, got {m.curvature_window}; e.g. 10.")
        return problems

    def client_signal(self, plan: RoundPlan, grads: AdapterState, context: SignalContext) -> dict[str, float]:
        """``{"<layer>:score": score, "<layer>:kappa": kappa}`` per layer whose active-factor gradient is in
        ``grads``. Without the opt-in reference curvature, uses only privatised gradients, the step between them
        (post-processing of DP-SGD output) and ``context``'s public constants (see the module docstring)."""
        layers = sorted(layers_of(list(plan.roles)))
        active = choices_of(plan)
        signals: dict[str, float] = {}
        by_factor = {(layer_of(k), factor_of(k)): k for k in grads if factor_of(k) in ("A", "B")}
        curved = self.in_curvature_window(plan.round)
        base_loss = context.raw_loss({}) if curved and self.cfg.reference_curvature and context.raw_loss else None
        for index, layer in enumerate(layers):
            factor = active.get(layer)
            key = by_factor.get((layer, factor)) if factor else None
            if key is None:
                continue
            e = self.energy(grads[key], index, factor, context.noise_std)
            kappa = 0.0
            if curved and base_loss is not None:
                kappa = raw_loss_curvature(context.raw_loss, key, grads[key], base_loss)
            elif curved and key in context.prev_grads and key in context.prev_step:
                kappa = self.privatised_curvature(key, grads[key], index, factor, context)
            score = e * (1.0 - 0.5 * context.lr * kappa) if curved else e
            signals[f"{layer}:score"] = float(score)
            signals[f"{layer}:kappa"] = float(kappa)
        return signals

    def privatised_curvature(
        self, key: str, grad: torch.Tensor, layer_index: int, factor: str, context: SignalContext
    ) -> float:
        """Secant curvature from the last two privatised gradients along the step between them (module docstring)."""

        def project(t: torch.Tensor) -> torch.Tensor:
            flat = t.detach().reshape(-1).to("cpu", torch.float32)
            return self.projection(layer_index, factor, flat.numel()) @ flat if self.cfg.projection else flat

        step = project(context.prev_step[key]).double()
        diff = project(grad - context.prev_grads[key].to(grad.device)).double()
        denom = float(step.pow(2).sum())
        if denom == 0.0:
            return 0.0
        correction = context.lr * grad.numel() * context.noise_std**2 if context.plain_sgd else 0.0
        return (float(diff @ step) - correction) / denom

    # ------------------------------------------------------------------ server side

    def aggregate_sums(
        self,
        global_state: AdapterState,
        sums: PartialSum,
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """Weighted mean of the SHARED tensors; EMA of the active factor's mean score per layer.

        Per layer the client scores are averaged with the clients' weights over the clients that sent a finite
        ``"<layer>:score"`` (``sums.signal_mean``; others are ignored; none = no update). The first value
        initialises the EMA, later ones mix ``ema = beta * ema + (1 - beta) * score``. Returns a NEW server state
        (the input is not mutated). Raises ValueError for an empty cohort.
        """
        active = choices_of(plan)
        beta = self.cfg.ema_beta
        old_ema = server_state.get("ema", {})
        ema = {layer: dict(v) for layer, v in old_ema.items()}
        for layer in sorted(active):
            score = sums.signal_mean(f"{layer}:score")
            if score is None:
                continue
            factor = active[layer]
            entry = ema.setdefault(layer, {"A": None, "B": None})
            prev = entry.get(factor)
            entry[factor] = score if prev is None else beta * float(prev) + (1.0 - beta) * score
        choices = {r: dict(c) for r, c in server_state.get("choices", {}).items()}
        choices[str(plan.round)] = {layer: active[layer] for layer in sorted(active)}
        layers = sorted(set(server_state.get("layers", [])) | set(layers_of(list(plan.roles))))
        return sums.mean_of_keys(global_state, plan.uploaded), {"layers": layers, "ema": ema, "choices": choices}


RAW_CURVATURE_STEP = 1e-3


def raw_loss_curvature(
    raw_loss: Callable[[Mapping[str, torch.Tensor]], float], key: str, grad: torch.Tensor, base_loss: float
) -> float:
    """The reference code's ``(L(+h u) - 2 L(0) + L(-h u)) / h^2`` along ``u = grad / ||grad||`` (0 if grad = 0).

    ``raw_loss(offsets)`` is the RAW minibatch loss with ``offsets`` added to the trained tensors: not private."""
    norm = float(grad.double().norm())
    if norm == 0.0:
        return 0.0
    offset = grad * (RAW_CURVATURE_STEP / norm)
    plus, minus = raw_loss({key: offset}), raw_loss({key: -offset})
    return (plus - 2.0 * base_loss + minus) / RAW_CURVATURE_STEP**2
