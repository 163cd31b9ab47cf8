"""AS-LoRA: warm-up, score-driven per-layer choice, temperature, signals, EMA and exact aggregation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsim.config.schema import AsLoraConfig, Config, FederationConfig, MethodConfig
from fedsim.errors import ConfigError
from fedsim.methods.as_lora import ASLoRA, choices_of
from fedsim.methods.base import get_method, make_method
from fedsim.types import ClientUpdate, Role, RoundPlan, SignalContext
from fedsim.validation import load_config
from tests.methods.helpers import LAYERS, delta_w, state, updates_from

WEIGHTS = [10.0, 30.0, 60.0]


def _cfg(seed: int = 0, rounds: int = 20, **kw) -> Config:
    return Config(
        seed=seed,
        federation=FederationConfig(rounds=rounds),
        method=MethodConfig(name="as_lora", as_lora=AsLoraConfig(**kw)),
    )


def _method(seed: int = 0, rounds: int = 20, **kw) -> ASLoRA:
    m = make_method(_cfg(seed, rounds, **kw))
    assert isinstance(m, ASLoRA)
    return m


def _ema_state(sa: float | None, sb: float | None) -> dict:
    return {"layers": sorted(LAYERS), "ema": {layer: {"A": sa, "B": sb} for layer in LAYERS}, "choices": {}}


def _ctx(round: int = 1, noise_std: float = 0.0, lr: float = 0.1) -> SignalContext:
    return SignalContext(round=round, client_id=0, lr=lr, batch_size=16.0, noise_std=noise_std)


def _client_states(global_state, plan, n=3):
    """Clients train the plan's trainable tensors: random perturbations of the start state."""
    out = []
    for i in range(n):
        s = dict(global_state)
        g = torch.Generator().manual_seed(100 + i)
        for k in plan.trained:
            s[k] = s[k] + torch.randn(s[k].shape, generator=g)
        out.append(s)
    return out


def _mixed_plan(m: ASLoRA, keys, server_state):
    """The first post-warm-up plan in which some layers share A and others B."""
    for t in range(m.warmup_rounds + 1, m.rounds + 1):
        plan = m.plan(t, keys, server_state)
        if set(choices_of(plan).values()) == {"A", "B"}:
            return plan
    raise AssertionError("no round with mixed choices")


def test_registered_linear_and_not_personal():
    assert get_method("as_lora") is ASLoRA
    caps = ASLoRA.capabilities
    assert caps.linear and caps.signals and caps.per_layer_choices and not caps.keeps_client_state
    assert caps.privacy_modes == {"none", "sample"}


@pytest.mark.parametrize(("rounds", "fraction", "want"), [(20, 0.1, 2), (25, 0.1, 3), (20, 0.0, 1), (7, 1.0, 7)])
def test_warmup_length(rounds, fraction, want):
    assert _method(rounds=rounds, warmup_fraction=fraction).warmup_rounds == want


def test_warmup_alternates_all_layers_together_ignoring_scores():
    m = _method(rounds=20, warmup_fraction=0.1)
    g = state(0)
    keys = sorted(g)
    for ss in (m.init_server_state(g), _ema_state(100.0, 0.0), _ema_state(0.0, 100.0)):
        for t, active in ((1, "B"), (2, "A")):
            plan = m.plan(t, keys, ss)
            assert choices_of(plan) == {layer: active for layer in LAYERS}
            frozen = "A" if active == "B" else "B"
            assert all(plan.roles[f"{layer}.lora_{frozen}"] == Role.FROZEN for layer in LAYERS)
            assert plan.roles["head.classifier.weight"] == Role.SHARED
            assert plan.roles["head.classifier.bias"] == Role.SHARED
    # round 3 is past warm-up: strong scores now decide
    assert set(choices_of(m.plan(3, keys, _ema_state(0.0, 100.0))).values()) == {"B"}
    assert set(choices_of(m.plan(4, keys, _ema_state(0.0, 100.0))).values()) == {"B"}


@pytest.mark.parametrize(("sa", "sb", "want"), [(100.0, 1.0, "A"), (1.0, 100.0, "B"), (5.0, None, "A")])
def test_dominant_score_at_low_temperature_is_chosen_almost_surely(sa, sb, want):
    keys = sorted(state(0, head=False))
    for seed in range(30):
        m = _method(seed=seed, temperature0=0.01, temperature_min=0.01)
        for t in range(m.warmup_rounds + 1, m.rounds + 1):
            assert set(choices_of(m.plan(t, keys, _ema_state(sa, sb))).values()) == {want}


@pytest.mark.parametrize(("sa", "sb"), [(3.0, 1.0), (-1.0, 2.0)])
def test_empirical_choice_frequency_matches_sigmoid_of_gap_over_temperature(sa, sb):
    t, t_warm = 5, 2  # rounds=20, warmup 0.1
    d = (sa - sb) / (abs(sa) + abs(sb) + 1e-8)
    temp = max(0.1, 1.0 * 0.95 ** (t - t_warm))
    p = 1.0 / (1.0 + math.exp(-d / temp))
    keys = sorted(state(0, head=False))
    hits = n = 0
    for seed in range(1500):
        m = _method(seed=seed)
        assert m.prob_a(t, {"A": sa, "B": sb}) == pytest.approx(p, rel=1e-12)
        chosen = choices_of(m.plan(t, keys, _ema_state(sa, sb)))
        hits += sum(c == "A" for c in chosen.values())
        n += len(chosen)
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_temperature_schedule():
    m = _method(rounds=20, temperature0=2.0, temperature_decay=0.5, temperature_min=0.3)
    assert m.warmup_rounds == 2
    assert [m.temperature(t) for t in (2, 3, 4, 5, 9)] == pytest.approx([2.0, 1.0, 0.5, 0.3, 0.3])
    d = _method(rounds=100)  # defaults: T0 1.0, decay 0.95, floor 0.1, t_warm 10
    assert d.temperature(11) == pytest.approx(0.95)
    assert d.temperature(10 + 44) == pytest.approx(0.95**44)  # 0.1047 > 0.1
    assert d.temperature(10 + 45) == pytest.approx(0.1)  # 0.0994 floored
    assert d.temperature(100) == pytest.approx(0.1)


def test_plan_is_deterministic_and_seed_dependent():
    g = state(0)
    keys = sorted(g)
    ss = _ema_state(1.0, 1.0)  # p = 1/2 everywhere
    a, b, other = _method(seed=3), _method(seed=3), _method(seed=4)
    differs = False
    for t in range(1, 21):
        pa = a.plan(t, keys, ss)
        assert dict(pa.roles) == dict(a.plan(t, keys, ss).roles) == dict(b.plan(t, keys, ss).roles)
        assert dict(pa.roles) == dict(a.plan(t, list(reversed(keys)), ss).roles)  # key order does not matter
        differs |= dict(pa.roles) != dict(other.plan(t, keys, ss).roles)
        if t <= a.warmup_rounds:
            assert dict(pa.roles) == dict(other.plan(t, keys, ss).roles)
    assert differs


def test_ema_updates_only_the_active_factor_with_weighted_mean_scores():
    m = _method(rounds=40, ema_beta=0.9)  # warm-up rounds 1..4: B, A, B, A
    g = state(0, head=False)
    keys = sorted(g)
    ss0 = m.init_server_state(g)
    assert ss0["ema"] == {layer: {"A": None, "B": None} for layer in LAYERS}
    q, v, q1 = (f"{layer}:score" for layer in LAYERS)

    def ups(plan, signals):
        return [
            ClientUpdate(i, w, {k: g[k] for k in plan.uploaded}, s)
            for i, (w, s) in enumerate(zip(WEIGHTS, signals, strict=True))
        ]

    p1 = m.plan(1, keys, ss0)
    sig1 = [{q: 1.0, v: 1.0}, {q: 2.0, v: 2.0}, {q: 4.0, v: float("nan")}]  # client 2's nan is ignored
    _, ss1 = m.aggregate(g, ups(p1, sig1), p1, ss0)
    assert ss0["ema"][LAYERS[0]] == {"A": None, "B": None}  # input not mutated
    assert ss1["ema"][LAYERS[0]] == {"A": None, "B": pytest.approx(0.1 * 1 + 0.3 * 2 + 0.6 * 4)}  # first = init
    assert ss1["ema"][LAYERS[1]] == {"A": None, "B": pytest.approx((10 * 1 + 30 * 2) / 40)}  # renormalised
    assert ss1["ema"][LAYERS[2]] == {"A": None, "B": None}  # nobody sent a score
    p2 = m.plan(2, keys, ss1)
    _, ss2 = m.aggregate(g, ups(p2, [{q: 5.0}] * 3), p2, ss1)
    assert ss2["ema"][LAYERS[0]] == {"A": pytest.approx(5.0), "B": pytest.approx(3.1)}
    p3 = m.plan(3, keys, ss2)
    _, ss3 = m.aggregate(g, ups(p3, [{q: 2.0, q1: 7.0}] * 3), p3, ss2)
    assert ss3["ema"][LAYERS[0]] == {"A": pytest.approx(5.0), "B": pytest.approx(0.9 * 3.1 + 0.1 * 2.0)}
    assert ss3["ema"][LAYERS[1]]["B"] == pytest.approx(1.75)  # no new score: unchanged
    assert ss3["ema"][LAYERS[2]] == {"A": None, "B": pytest.approx(7.0)}
    assert ss3["choices"] == {str(t): {layer: f for layer in LAYERS} for t, f in ((1, "B"), (2, "A"), (3, "B"))}


def test_signal_without_projection_is_noise_floored_squared_norm():
    m = _method(projection=False)
    g = state(0, head=False)
    plan = m.plan(1, sorted(g), m.init_server_state(g))  # B active everywhere
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in g.items()}
    del grads[f"{LAYERS[2]}.lora_B"]  # a layer without its active gradient sends nothing
    sig = m.client_signal(plan, grads, _ctx(noise_std=0.1))
    assert set(sig) == {f"{layer}:{s}" for layer in LAYERS[:2] for s in ("score", "kappa")}
    for layer in LAYERS[:2]:
        gb = grads[f"{layer}.lora_B"].double()
        want = float(gb.pow(2).sum()) - gb.numel() * 0.1**2
        assert want > 0
        assert sig[f"{layer}:score"] == pytest.approx(want, rel=1e-6)
        assert sig[f"{layer}:kappa"] == 0.0
    big = m.client_signal(plan, grads, _ctx(noise_std=10.0))
    assert all(big[f"{layer}:score"] == 0.0 for layer in LAYERS[:2])  # clamped at 0
    # the curvature window keeps the score (kappa = 0 from privatised gradients)
    mc = _method(projection=False, curvature=True, curvature_window=10)
    assert [mc.in_curvature_window(t) for t in (10, 11, 20)] == [False, True, True]
    assert not m.in_curvature_window(20)
    late = RoundPlan(round=20, roles=plan.roles)
    assert mc.client_signal(late, grads, _ctx(round=20, noise_std=0.1)) == pytest.approx(sig)


def _one_layer_plan(factor: str) -> RoundPlan:
    other = "B" if factor == "A" else "A"
    return RoundPlan(round=1, roles={f"l.lora_{factor}": Role.SHARED, f"l.lora_{other}": Role.FROZEN})


def test_projection_is_fixed_cached_and_scaled():
    m = _method(projection_dim=64)
    p = m.projection(0, "A", 256)
    assert p.shape == (64, 256)
    assert m.projection(0, "A", 256) is p  # cached, not regenerated
    assert torch.equal(_method(projection_dim=64).projection(0, "A", 256), p)  # same seed, same matrix
    assert not torch.equal(m.projection(0, "B", 256), p)
    assert not torch.equal(m.projection(1, "A", 256), p)
    assert float(p.double().var()) == pytest.approx(1 / 64, rel=0.05)  # 16384 entries: SE ~1.1%


def test_projected_score_of_pure_noise_is_near_zero_and_of_signal_near_its_energy():
    s, numel = 0.5, 256
    m = _method(projection_dim=64)
    plan = _one_layer_plan("A")
    gen = torch.Generator().manual_seed(11)
    raw, floored = [], []
    for _ in range(400):
        n = {"l.lora_A": s * torch.randn(4, 64, generator=gen)}
        raw.append(m.client_signal(plan, n, _ctx(noise_std=0.0))["l:score"] / (numel * s**2))
        floored.append(m.client_signal(plan, n, _ctx(noise_std=s))["l:score"] / (numel * s**2))
    # E||P n||^2 = numel s^2: per-draw sd sqrt(2/64) = 0.18 -> SE 0.009, plus ~0.011 from the fixed P
    assert sum(raw) / len(raw) == pytest.approx(1.0, abs=0.06)
    assert sum(floored) / len(floored) < 0.15  # E max(X, 0) with sd(X) ~ 0.18: ~0.07
    signal = torch.randn(4, 64, generator=gen)
    signal *= 10 * s * math.sqrt(numel) / signal.norm()  # ||g||^2 = 100 numel s^2
    ratios = []
    for seed in range(60):  # a fresh P per seed: ||P g||^2 / ||g||^2 ~ chi2_64 / 64
        noisy = {"l.lora_A": signal + s * torch.randn(4, 64, generator=gen)}
        e = _method(seed=seed, projection_dim=64).client_signal(plan, noisy, _ctx(noise_std=s))["l:score"]
        ratios.append(e / float(signal.double().pow(2).sum()))
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)  # SE ~0.024


def test_aggregate_is_exact_mean_of_delta_w_and_frozen_factor_is_untouched():
    m = _method()
    g = state(0)
    plan = _mixed_plan(m, sorted(g), _ema_state(1.0, 1.0))
    clients = _client_states(g, plan)
    new, _ = m.aggregate(g, updates_from(clients, plan.uploaded, WEIGHTS), plan, _ema_state(1.0, 1.0))
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    for layer, active in choices_of(plan).items():
        want = sum(pk * delta_w(c, layer) for pk, c in zip(p, clients, strict=True))
        torch.testing.assert_close(delta_w(new, layer), want, rtol=1e-6, atol=1e-6)
        frozen = f"{layer}.lora_{'B' if active == 'A' else 'A'}"
        assert all(torch.equal(c[frozen], g[frozen]) for c in clients)
        assert torch.equal(new[frozen], g[frozen])
        assert not torch.equal(new[f"{layer}.lora_{active}"], g[f"{layer}.lora_{active}"])
    want_head = sum(pk * c["head.classifier.bias"].double() for pk, c in zip(p, clients, strict=True))
    torch.testing.assert_close(new["head.classifier.bias"].double(), want_head, rtol=1e-6, atol=1e-6)


def test_identical_uploads_give_back_the_upload():
    m = _method()
    g = state(0)
    plan = _mixed_plan(m, sorted(g), _ema_state(1.0, 1.0))
    client = _client_states(g, plan, n=1)[0]
    new, _ = m.aggregate(g, updates_from([client] * 3, plan.uploaded, WEIGHTS), plan, _ema_state(1.0, 1.0))
    for k in plan.uploaded:
        torch.testing.assert_close(new[k], client[k], rtol=0, atol=1e-6)
    for k in set(g) - set(plan.uploaded):
        assert torch.equal(new[k], g[k])


def test_aggregate_does_not_depend_on_update_order():
    m = _method()
    g = state(0)
    ss = _ema_state(2.0, 1.0)
    plan = _mixed_plan(m, sorted(g), ss)
    clients = _client_states(g, plan)
    ups = [
        ClientUpdate(i, w, {k: c[k] for k in plan.uploaded}, {f"{layer}:score": 0.7 * i + 0.1 for layer in LAYERS})
        for i, (c, w) in enumerate(zip(clients, WEIGHTS, strict=True))
    ]
    new1, ss1 = m.aggregate(g, ups, plan, ss)
    new2, ss2 = m.aggregate(g, [ups[2], ups[0], ups[1]], plan, ss)
    for k in g:
        torch.testing.assert_close(new1[k], new2[k], rtol=1e-6, atol=1e-6)
    assert ss1["choices"] == ss2["choices"]
    for layer in LAYERS:
        for f in ("A", "B"):
            assert ss1["ema"][layer][f] == pytest.approx(ss2["ema"][layer][f], rel=1e-12)


def test_server_state_is_plain_json_and_round_trips():
    m = _method(rounds=10, warmup_fraction=0.2)  # rounds 1, 2 give both factors a score
    g = state(0)
    keys = sorted(g)
    ss = m.init_server_state(g)
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in g.items()}
    for t in range(1, 11):
        plan = m.plan(t, keys, ss)
        sig = m.client_signal(plan, grads, _ctx(round=t, noise_std=0.01))
        _, ss = m.aggregate(g, [ClientUpdate(0, 1.0, {k: g[k] for k in plan.uploaded}, sig)], plan, ss)
    text = json.dumps(ss, allow_nan=False)
    back = json.loads(text)
    assert back == ss
    assert all(dict(m.plan(t, keys, back).roles) == dict(m.plan(t, keys, ss).roles) for t in range(1, 11))
    assert all(isinstance(ss["ema"][layer][f], float) for layer in LAYERS for f in ("A", "B"))


def test_config_errors_name_the_keys_at_config_time():
    (problem,) = ASLoRA.settings_problems(_cfg(reference_curvature=True))
    assert "method.as_lora.reference_curvature: true needs method.as_lora.curvature: true" in problem
    problems = ASLoRA.settings_problems(_cfg(ema_beta=1.0, temperature_min=0.0))
    assert len(problems) == 2
    assert "method.as_lora.ema_beta" in problems[0] and "method.as_lora.temperature_min" in problems[1]
    assert ASLoRA.settings_problems(_cfg()) == []
    # the config checks ask the method: `fedsim validate` reports them before any work
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["method.name=as_lora", "method.as_lora.ema_beta=1.0", "method.as_lora.temperature_min=0"])
    assert "method.as_lora.ema_beta" in str(err.value) and "method.as_lora.temperature_min" in str(err.value)
    # settings written under their old keys (runs before they moved) are still read, at their new place
    cfg, _ = load_config("tiny", ["method.name=as_lora", "method.ema_beta=0.5"])
    assert cfg.method.as_lora.ema_beta == 0.5


def test_vera_vectors_are_chosen_and_scored_like_factors():
    m = _method(projection=False)
    keys = [f"{layer}.vera_lambda_{s}" for layer in LAYERS for s in ("d", "b")]
    plan = m.plan(1, keys, m.init_server_state({k: torch.zeros(2) for k in keys}))  # warm-up round 1: B side
    assert choices_of(plan) == {layer: "B" for layer in LAYERS}
    grads = {f"{layer}.vera_lambda_b": torch.full((5,), 2.0) for layer in LAYERS}
    ctx = SignalContext(round=1, client_id=0, lr=0.1, batch_size=4.0, noise_std=0.0)
    signals = m.client_signal(plan, grads, ctx)
    assert {k: v for k, v in signals.items() if k.endswith(":score")} == {f"{layer}:score": 20.0 for layer in LAYERS}


def _curvature_case(m: ASLoRA, hess: float, lr: float = 0.1, noise_std: float = 0.0, plain_sgd: bool = True):
    """One layer training B in round 20 (inside the window); a quadratic loss with Hessian ``hess * I``:
    g_T = g_{T-1} + hess * s with s = -lr * g_{T-1} (SGD)."""
    plan = RoundPlan(round=20, roles={"l.lora_A": Role.FROZEN, "l.lora_B": Role.SHARED})
    g_prev = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    step = -lr * g_prev
    g_last = g_prev + hess * step
    ctx = SignalContext(
        round=20,
        client_id=0,
        lr=lr,
        batch_size=8.0,
        noise_std=noise_std,
        prev_grads={"l.lora_B": g_prev},
        prev_step={"l.lora_B": step},
        plain_sgd=plain_sgd,
    )
    return m.client_signal(plan, {"l.lora_B": g_last}, ctx), g_last, step


@pytest.mark.parametrize("projection", [False, True])
def test_privatised_curvature_is_exact_on_a_quadratic(projection):
    m = _method(projection=projection, projection_dim=16, curvature=True, curvature_window=10)
    sig, g_last, _ = _curvature_case(m, hess=3.0)
    assert sig["l:kappa"] == pytest.approx(3.0, rel=1e-5)  # isotropic Hessian: exact even after projection
    e = m.energy(g_last, 0, "B", 0.0)
    assert sig["l:score"] == pytest.approx(e * (1 - 0.5 * 0.1 * 3.0), rel=1e-5)


def test_privatised_curvature_subtracts_the_expected_noise_term_for_sgd_only():
    m = _method(projection=False, curvature=True, curvature_window=10)
    sig, g_last, step = _curvature_case(m, hess=3.0, noise_std=0.05)
    want = 3.0 - 0.1 * g_last.numel() * 0.05**2 / float(step.double().pow(2).sum())
    assert sig["l:kappa"] == pytest.approx(want, rel=1e-5)
    other, _, _ = _curvature_case(m, hess=3.0, noise_std=0.05, plain_sgd=False)
    assert other["l:kappa"] == pytest.approx(3.0, rel=1e-5)


def test_curvature_only_in_the_window_and_zero_without_two_steps():
    m = _method(projection=False, curvature=True, curvature_window=10)
    plan = RoundPlan(round=5, roles={"l.lora_A": Role.FROZEN, "l.lora_B": Role.SHARED})
    g = torch.ones(6, 4)
    ctx = SignalContext(
        round=5,
        client_id=0,
        lr=0.1,
        batch_size=8.0,
        noise_std=0.0,
        prev_grads={"l.lora_B": g},
        prev_step={"l.lora_B": -0.1 * g},
    )
    assert m.client_signal(plan, {"l.lora_B": 2 * g}, ctx)["l:kappa"] == 0.0  # round 5 is outside 11..20
    late = RoundPlan(round=20, roles=plan.roles)
    assert m.client_signal(late, {"l.lora_B": 2 * g}, _ctx(round=20))["l:kappa"] == 0.0  # one local step
    assert not m.needs_raw_loss(20)


def test_reference_curvature_is_the_raw_loss_second_difference_and_is_flagged():
    m = _method(projection=False, curvature=True, curvature_window=10, reference_curvature=True)
    assert m.needs_raw_loss(20) and not m.needs_raw_loss(10)
    (caveat,) = ASLoRA.privacy_caveats(
        _cfg(projection=False, curvature=True, curvature_window=10, reference_curvature=True)
    )
    assert "epsilon does NOT cover" in caveat
    assert ASLoRA.privacy_caveats(_cfg()) == []
    center = torch.randn(6, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    hess = torch.linspace(0.5, 4.0, 24, dtype=torch.float64).reshape(6, 4)  # diagonal Hessian

    def raw_loss(offsets):  # 0.5 * sum(hess * (theta - c)^2) at theta = offsets["l.lora_B"]
        theta = offsets.get("l.lora_B", torch.zeros(6, 4, dtype=torch.float64)).double()
        return float(0.5 * (hess * (theta - center) ** 2).sum())

    plan = RoundPlan(round=20, roles={"l.lora_A": Role.FROZEN, "l.lora_B": Role.SHARED})
    grad = -(hess * center)  # the gradient at theta = 0
    ctx = SignalContext(round=20, client_id=0, lr=0.1, batch_size=8.0, noise_std=0.0, raw_loss=raw_loss)
    sig = m.client_signal(plan, {"l.lora_B": grad.float()}, ctx)
    u = grad / grad.norm()
    assert sig["l:kappa"] == pytest.approx(float((hess * u * u).sum()), rel=1e-3)  # u^T H u


def test_a_factor_without_a_score_counts_as_score_0_a_documented_deviation_from_the_reference_code():
    """After a one-round warm-up (round 1: B) only B has a score. fedsim counts A's missing score as 0, so in
    round 2 each layer still picks A with probability sigmoid(-1 / T) (about 0.27 at T = 1): A gets scored in
    later rounds. The reference code (myoungjun415/as_lora, choose_mode_softmax) sets p(A) = 0 when A has no score,
    which after a B-only warm-up would never train A; fedsim deliberately does not follow it (module docstring)."""
    m = _method(rounds=8)  # warm-up: max(1, ceil(0.1 * 8)) = 1 round
    assert m.warmup_rounds == 1
    after_warmup = _ema_state(None, 2.5)  # what round 1 (B shared everywhere) leaves
    assert m.prob_a(2, after_warmup["ema"][LAYERS[0]]) == pytest.approx(1 / (1 + math.exp(1 / m.temperature(2))))
    keys = sorted(state(0, head=False))
    picks = [
        factor
        for seed in range(300)
        for factor in choices_of(_method(seed=seed, rounds=8).plan(2, keys, after_warmup)).values()
    ]
    freq = picks.count("A") / len(picks)
    p = 1 / (1 + math.exp(1 / m.temperature(2)))
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / len(picks))  # A is explored, at the predicted rate
    # and with no score on either factor the choice is a fair coin
    assert m.prob_a(2, {"A": None, "B": None}) == pytest.approx(0.5)
