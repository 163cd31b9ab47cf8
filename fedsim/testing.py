"""Contract checks a user can run on their own method: ``fedsim.testing.check_method(MyMethod)``.

The same properties tests/methods/ checks for every built-in method, on hand-made adapter states (three LoRA layers
of d_out 5, d_in 6, r 2, plus a classification head; no model), with clients simulated by perturbing the tensors
the plan trains. Rounds 1, 2 and 5 are checked, each after running the earlier rounds, so a plan that depends on
server state sees a realistic one. Each failure raises :class:`MethodContractError` naming the property.

Properties (``linear`` = ``capabilities.linear``):

* ``registration``: the class's declarations are consistent (:func:`fedsim.methods.base.registration_problems`).
* ``plan covers every key``: each tensor gets exactly one role; only trained (SHARED) tensors are uploaded.
* ``identical uploads``: when every client uploads the same tensors, the aggregate is that upload (in B A terms).
* ``order independence``: the aggregate does not depend on client order or ids.
* ``weighted mean`` (linear): the aggregate of every uploaded tensor is the weighted mean of the uploads, and the
  streamed aggregate (worker partial sums merged in any order) equals the buffered one.
* ``frozen and kept tensors untouched`` (linear): tensors not uploaded are bit-identical after aggregation.
* ``keys, shapes and dtypes``: the aggregate keeps them (float32 and float64).
* ``client_start``: a client trains from its kept tensors for KEPT keys and from the global state otherwise.
* ``determinism``: two instances built from the same config give identical plans and aggregates.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedsim.config.schema import Config, FederationConfig, MethodConfig
from fedsim.methods.base import Method, registration_problems
from fedsim.model.keys import factor_of, is_residual, layers_of, lora_key, residual_key
from fedsim.partial_sum import PartialSum
from fedsim.types import AdapterState, ClientUpdate, Role, RoundPlan, SignalContext

__all__ = ["MethodContractError", "check_method", "contract_state"]

LAYERS = ("enc.0.query", "enc.0.value", "enc.1.query")
D_IN, D_OUT, R = 6, 5, 2
ROUNDS = (1, 2, 5)
WEIGHTS = [10.0, 30.0, 60.0]


class MethodContractError(AssertionError):
    """A method breaks a property of the method contract; the message names the property and the round."""


def contract_state(seed: int, dtype: torch.dtype = torch.float32) -> AdapterState:
    """A hand-made adapter state: LoRA A/B of three layers and a head, seeded."""
    g = torch.Generator().manual_seed(seed)
    s: AdapterState = {}
    for layer in LAYERS:
        s[lora_key(layer, "A")] = torch.randn(R, D_IN, generator=g)
        s[lora_key(layer, "B")] = torch.randn(D_OUT, R, generator=g)
    s["head.classifier.weight"] = torch.randn(3, D_OUT, generator=g)
    s["head.classifier.bias"] = torch.randn(3, generator=g)
    return {k: v.to(dtype) for k, v in s.items()}


def _client(m: Method, start: AdapterState, plan: RoundPlan, cid: int, weight: float, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    after, grads = dict(start), {}
    for k in plan.trained:
        t = start[k]
        after[k] = t + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        grads[k] = torch.randn(t.shape, generator=g, dtype=t.dtype)
    ctx = SignalContext(round=plan.round, client_id=cid, lr=0.1, batch_size=16.0, noise_std=0.01)
    return ClientUpdate(cid, weight, {k: after[k] for k in plan.uploaded}, m.client_signal(plan, grads, ctx))


def _cohort(m: Method, g: AdapterState, plan: RoundPlan, weights: list[float], seed: int) -> list[ClientUpdate]:
    start = m.client_start(g, None, plan)
    return [_client(m, start, plan, i, w, seed + i) for i, w in enumerate(weights)]


def _at_round(m: Method, t: int, dtype: torch.dtype = torch.float32) -> tuple[AdapterState, Any, RoundPlan]:
    g = contract_state(0, dtype)
    server = m.init_server_state(g)
    for past in range(1, t):
        plan = m.plan(past, sorted(g), server)
        if plan.uploaded:
            g, server = m.aggregate(g, _cohort(m, g, plan, WEIGHTS, seed=1000 * past), plan, server)
    return g, server, m.plan(t, sorted(g), server)


def _delta(m: Method, new: AdapterState, old: AdapterState, layer: str) -> torch.Tensor:
    """The layer's effective B A after aggregation (a dense residual folded into the base counted in, / scale)."""
    got = new[lora_key(layer, "B")].double() @ new[lora_key(layer, "A")].double()
    key = residual_key(layer)
    if key in new:
        s = m.lora.alpha / (m.lora.r if m.lora.variant == "lora" else m.lora.r**0.5)
        r_old = old[key].double() if key in old else torch.zeros_like(got)
        got = got + (new[key].double() - r_old) / s
    return got


def _expected_delta(g: AdapterState, upload: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    a, b = (upload.get(lora_key(layer, f), g[lora_key(layer, f)]) for f in ("A", "B"))
    return b.double() @ a.double()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol))


def check_method(cls: type[Method], config: Config | None = None) -> None:
    """Check the method contract of ``cls`` (a :class:`~fedsim.methods.Method` subclass; registered or not).

    ``config``: the config the method is built from (default: ``Config()`` with 10 rounds; ``method.name`` is
    the class's name). Returns None when every property holds.

    Raises:
        MethodContractError: naming the first property that fails (see the module doc), the round and the tensor.
        TypeError: ``cls`` is not a Method subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"check_method expects a Method subclass, got {cls!r}")
    label = cls.__name__

    def fail(prop: str, detail: str) -> None:
        raise MethodContractError(f"check_method({label}): property '{prop}' failed: {detail}")

    for problem in registration_problems(cls):
        fail("registration", problem)
    cfg = config or Config(method=MethodConfig(name=cls.name or label), federation=FederationConfig(rounds=10))

    def make() -> Method:
        return cls(cfg)

    linear = cls.capabilities.linear
    _check_plans(make(), fail)
    for t in ROUNDS:
        m = make()
        g, server, plan = _at_round(m, t)
        if not plan.uploaded:
            continue
        ups = _cohort(m, g, plan, WEIGHTS, seed=11)
        layers = layers_of(sorted(g))
        base, base_server = m.aggregate(g, ups, plan, server)
        if linear:  # first: the declared rule itself
            _check_linear(m, t, g, server, plan, ups, base, fail)
        # identical uploads
        same = [ClientUpdate(i, w, ups[0].tensors, ups[0].signals) for i, w in enumerate(WEIGHTS)]
        got, _ = m.aggregate(g, same, plan, server)
        for layer in layers:
            if not _close(_delta(m, got, g, layer), _expected_delta(g, ups[0].tensors, layer)):
                fail("identical uploads", f"round {t}, layer {layer}: the aggregate is not the common upload")
        # order independence
        moved = sorted((ClientUpdate((u.client_id + 1) % 3, u.weight, u.tensors, u.signals) for u in ups),
                       key=lambda u: u.client_id)  # fmt: skip
        for other in (moved, list(reversed(ups))):
            got, _ = m.aggregate(g, other, plan, server)
            for layer in layers:
                if not _close(_delta(m, got, g, layer), _delta(m, base, g, layer)):
                    fail("order independence", f"round {t}, layer {layer}: client order or ids change the aggregate")
        # keys, shapes, dtypes
        for dtype in (torch.float32, torch.float64):
            m2 = make()
            g2, s2, p2 = _at_round(m2, t, dtype)
            if not p2.uploaded:
                continue
            new, _ = m2.aggregate(g2, _cohort(m2, g2, p2, WEIGHTS, seed=31), p2, s2)
            extra = {k for k in new if is_residual(k)} - set(g2)
            if set(new) - extra != set(g2) or any(new[k].shape != g2[k].shape for k in g2):
                fail("keys, shapes and dtypes", f"round {t}: the aggregate's keys or shapes differ from the state's")
            if any(new[k].dtype != dtype for k in new):
                fail("keys, shapes and dtypes", f"round {t}: the aggregate does not keep dtype {dtype}")
        # client_start
        kept = {k: v + 100.0 for k, v in g.items()}
        start = m.client_start(g, kept, plan)
        if sorted(start) != sorted(g) or any(not torch.equal(start[k], kept[k] if k in plan.kept else g[k]) for k in g):
            fail("client_start", f"round {t}: a client must start from its kept tensors for KEPT keys only")
        # determinism
        m3 = make()
        g3, s3, p3 = _at_round(m3, t)
        if p3.roles != plan.roles:
            fail("determinism", f"round {t}: two instances of the same config plan differently")
        again, _ = m3.aggregate(g3, _cohort(m3, g3, p3, WEIGHTS, seed=11), p3, s3)
        if sorted(again) != sorted(base) or any(not torch.equal(again[k], base[k]) for k in base):
            fail("determinism", f"round {t}: two instances of the same config aggregate differently")
        del base_server


def _check_plans(m: Method, fail: Callable[[str, str], None]) -> None:
    g = contract_state(0)
    keys = sorted(g)
    server = m.init_server_state(g)
    for t in range(1, 7):
        plan = m.plan(t, keys, server)
        if plan.round != t or sorted(plan.roles) != keys or not all(isinstance(r, Role) for r in plan.roles.values()):
            fail("plan covers every key", f"round {t}: the plan must give every key of the state exactly one Role")
        frozen = set(plan.keys(Role.FROZEN))
        if set(plan.uploaded) & (set(plan.kept) | frozen) or set(plan.trained) != set(keys) - frozen:
            fail("plan covers every key", f"round {t}: only trained (SHARED) tensors may be uploaded")
        if plan.uploaded:
            g, server = m.aggregate(g, _cohort(m, g, plan, WEIGHTS, seed=50 * t), plan, server)


def _check_linear(
    m: Method,
    t: int,
    g: AdapterState,
    server: Any,
    plan: RoundPlan,
    ups: list[ClientUpdate],
    base: AdapterState,
    fail: Callable[[str, str], None],
) -> None:
    total = sum(u.weight for u in ups)
    for k in plan.uploaded:
        want = sum(u.weight / total * u.tensors[k].double() for u in ups)
        if not _close(base[k], want, 1e-6):
            fail(
                "weighted mean",
                f"round {t}, tensor {k}: the declared linear aggregate is not the weighted mean of the client "
                "uploads (declare Capabilities(linear=False) and override aggregate for another rule)",
            )
    order = list(range(len(ups)))
    random.Random(t).shuffle(order)
    a, b = PartialSum(t), PartialSum(t)
    for i, idx in enumerate(order):
        (a if i == 0 else b).add(ups[idx])
    b.merge(a)
    streamed, _ = m.aggregate_sums(g, b, plan, server)
    for k in base:
        if not _close(streamed[k], base[k], 1e-6):
            fail("weighted mean", f"round {t}, tensor {k}: the streamed aggregate differs from the buffered one")
    for k in set(g) - set(plan.uploaded):
        if factor_of(k) != "residual" and not torch.equal(base[k], g[k]):
            fail("frozen and kept tensors untouched", f"round {t}, tensor {k}: changed although not uploaded")
