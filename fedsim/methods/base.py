"""The method interface and registry (ARCHITECTURE.md §3).

A method is pure torch over :data:`fedsim.types.AdapterState`: it decides each tensor's
:class:`~fedsim.types.Role` per round (``plan``), what a client trains from (``client_start``)
and how uploads become the new global state (``aggregate``). No model, no Ray.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsim.config.schema import Config
from fedsim.errors import ConfigError
from fedsim.partial_sum import PartialSum
from fedsim.types import AdapterState, ClientUpdate, Role, RoundPlan, ServerState, SignalContext

_REGISTRY: dict[str, type[Method]] = {}
_METHOD_MODULES = (
    "fedavg_lora",
    "ffa_lora",
    "fedsa_lora",
    "as_lora",
    "rolora",
    "flexlora",
    "fedsvd",
    "fedex_lora",
    "flora",
)


PRIVACY_MODES = frozenset({"none", "sample", "client"})
LORA_VARIANTS = frozenset({"lora", "rslora", "vera"})


@dataclass(frozen=True)
class Capabilities:
    """What a method supports, declared by the method and asked by the config checks (``fedsim validate``) before
    any work starts, and by the records and reports (which never test method names)."""

    #: ``privacy.mode`` values the method works with. ``client`` (DP-FedAvg) also needs ``linear`` and no
    #: ``signals``: :func:`register_method` rejects a method that claims it otherwise.
    privacy_modes: frozenset[str] = PRIVACY_MODES
    #: ``lora.variant`` values the method works with (methods that form B @ A products need full LoRA matrices).
    variants: frozenset[str] = LORA_VARIANTS
    #: aggregation is a weighted mean of the SHARED uploads (plus weighted means of scalar signals), so the runtime
    #: streams it: workers pre-sum their clients' uploads into a :class:`PartialSum`, the server merges those and
    #: calls :meth:`Method.aggregate_sums`. ``False``: the method gets the buffered uploads in ``aggregate``.
    linear: bool = True
    #: clients upload scalar signals besides tensors (:meth:`Method.client_signal`; only from privatised
    #: gradients, so only with sample-level DP or none). Workers keep the last steps' gradients only for these.
    signals: bool = False
    #: the plan chooses per layer and round which factor is trained (AS-LoRA); the roles table shows the choices
    per_layer_choices: bool = False
    #: clients keep tensors between rounds (KEPT roles), so the meaningful accuracy is the personalised one
    keeps_client_state: bool = False
    #: the server folds a dense residual into the frozen base weights (FedEx-LoRA, FLoRA): every worker must hold
    #: the whole base weight it adds the residual to, which a ZeRO-3 partitioned base (``runtime.zero``) does not
    folds_into_base: bool = False
    #: a worker may train several of its clients together in one fused pass (``runtime.clients_per_pass > 1``):
    #: false when clients differ in more than their adapter tensors (a residual folded into each client's base)
    batches: bool = True

    def problems(self, cfg: Config, others: Mapping[str, Capabilities] | None = None) -> list[str]:
        """Why ``cfg`` asks for something this method does not support (one line per problem, naming the key);
        ``others`` (name -> capabilities of the other methods) lets each line name the methods that would do."""
        out: list[str] = []
        name = cfg.method.name
        others = others or {}

        def alternatives(ok: Callable[[Capabilities], bool]) -> str:
            names = sorted(n for n, c in others.items() if ok(c))
            return f", or one of the methods that support it: {', '.join(names)}" if names else ""

        if cfg.privacy.mode not in self.privacy_modes:
            why = ""
            if cfg.privacy.mode == "client" and not self.linear:
                why = " (client-level DP noises a weighted mean of the uploads; this method's aggregation is not one)"
            elif cfg.privacy.mode == "client" and self.signals:
                why = " (its clients upload gradient scores that client-level DP does not privatise)"
            supports = alternatives(lambda c: cfg.privacy.mode in c.privacy_modes)
            out.append(
                f"privacy.mode: {cfg.privacy.mode} does not work with method.name {name}{why}; use privacy.mode "
                f"{' or '.join(sorted(self.privacy_modes))}{supports}"
            )
        if cfg.lora.variant not in self.variants:
            supports = alternatives(lambda c: cfg.lora.variant in c.variants)
            out.append(
                f"lora.variant: {cfg.lora.variant} does not work with method.name {name} (it needs full LoRA A and B "
                f"matrices); use lora.variant {' or '.join(sorted(self.variants))}{supports}"
            )
        if self.folds_into_base and cfg.runtime.zero.stage > 0:
            supports = alternatives(lambda c: not c.folds_into_base)
            out.append(
                f"runtime.zero.stage: {cfg.runtime.zero.stage} does not work with method.name {name} (its server folds "
                f"a dense residual into the base weights, which a ZeRO worker group partitions); use "
                f"runtime.zero.stage: 0{supports}"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (sorted lists for the sets), e.g. for ``fedsim methods`` and summary.json."""
        return {
            "privacy_modes": sorted(self.privacy_modes),
            "variants": sorted(self.variants),
            "linear": self.linear,
            "signals": self.signals,
            "per_layer_choices": self.per_layer_choices,
            "keeps_client_state": self.keeps_client_state,
            "folds_into_base": self.folds_into_base,
            "batches": self.batches,
        }


#: methods whose server forms B @ A products (the SVD family): not a weighted mean of the uploads, so no streaming
#: and no client-level DP; full LoRA matrices needed (no VeRA)
PRODUCT_AGGREGATION = Capabilities(
    linear=False, privacy_modes=frozenset({"none", "sample"}), variants=frozenset({"lora", "rslora"})
)


class Method:
    """Base class. Subclasses are registered with :func:`register_method`, declare :attr:`capabilities` and
    implement ``role`` (one tensor's role in a round) or, for plans that look at several tensors at once, ``plan``.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.method  # this method's settings (method.*)
        self.lora = cfg.lora
        self.seed = cfg.seed
        self.rounds = cfg.federation.rounds

    @classmethod
    def settings_problems(cls, cfg: Config) -> list[str]:
        """Out-of-range values of this method's own settings (``method.<name>.*``), one line per problem naming
        the key and the fix; asked by the config checks, so ``fedsim validate`` reports them. Default: none."""
        return []

    def init_server_state(self, global_state: AdapterState) -> ServerState:
        """Server-side state beyond the global adapter (scores, schedules). Default: none."""
        return {}

    def role(self, round: int, key: str, server_state: ServerState) -> Role:
        """The role of one adapter tensor in ``round`` (1-based), for methods whose roles are per tensor."""
        raise NotImplementedError(f"method {self.name!r} defines neither role nor plan")

    def plan(self, round: int, keys: Sequence[str], server_state: ServerState) -> RoundPlan:
        """Every tensor's role in ``round``. Default: :meth:`role` of each key."""
        return RoundPlan(round=round, roles={k: self.role(round, k, server_state) for k in keys})

    def first_plan(self, initial_state: AdapterState) -> RoundPlan:
        """Round 1's plan from the initial adapter state, as the parameter server forms it before any aggregation
        (what the probes that time or size round 1 train)."""
        return self.plan(1, sorted(initial_state), self.init_server_state(initial_state))

    def client_start(
        self, global_state: AdapterState, kept_state: AdapterState | None, plan: RoundPlan
    ) -> AdapterState:
        """What a client trains from: the global state, with its own kept tensors where it has them."""
        start = dict(global_state)
        if kept_state:
            for key in plan.kept:
                if key in kept_state:
                    start[key] = kept_state[key]
        return start

    def broadcast_keys(self, plan: RoundPlan) -> list[str]:
        """Global tensors the server sends to each client of a round (counted in bytes_down).

        Default: the shared tensors (what aggregation changes). A method that also re-sets a client-frozen
        tensor at the server (FedSVD's A) adds it here."""
        return plan.uploaded

    def client_signal(self, plan: RoundPlan, grads: AdapterState, context: SignalContext) -> dict[str, float]:
        """Scalars a client uploads besides its tensors, computed ONLY from its last privatised gradients
        (``grads``: the trained tensors' gradients of the last local step, after DP-SGD noise when DP is on).
        Default: none."""
        return {}

    def needs_raw_loss(self, round: int) -> bool:
        """Whether ``client_signal`` in ``round`` needs ``context.raw_loss`` (raw-data losses, OUTSIDE the DP
        guarantee). Default: never. A method returning True must list the caveat in :meth:`privacy_caveats`."""
        return False

    @classmethod
    def privacy_caveats(cls, cfg: Config) -> list[str]:
        """Ways in which ``cfg`` makes uploads depend on more than DP-SGD output (printed as warnings at the start
        of a run and recorded in summary.json). Default: none."""
        return []

    def aggregate(
        self,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """The new global and server state from the round's uploads (in client-id order).

        Linear methods do not override this: it folds ``updates`` into a :class:`PartialSum` and calls
        :meth:`aggregate_sums`, so the buffered and the streamed path share one definition of the maths.
        Non-linear methods (``capabilities.linear`` false) override it. Raises ValueError for an empty cohort.
        """
        return self.aggregate_sums(global_state, PartialSum.of(plan.round, updates), plan, server_state)

    def aggregate_sums(
        self,
        global_state: AdapterState,
        sums: PartialSum,
        plan: RoundPlan,
        server_state: ServerState,
    ) -> tuple[AdapterState, ServerState]:
        """For linear methods: the new global state from the round's folded uploads (float64
        ``sum_k w_k x_k``, ``sum_k w_k``, weighted signal sums). Default: weighted mean of every SHARED tensor;
        FROZEN and KEPT tensors unchanged. Raises ValueError for an empty cohort.
        """
        return sums.mean_of_keys(global_state, plan.uploaded), server_state


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("ffa_lora")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        for problem in registration_problems(cls):
            raise TypeError(f"method {name!r}: {problem}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registration_problems(cls: type[Method]) -> list[str]:
    """What is inconsistent in a method class's declarations (checked when it registers)."""
    caps = cls.capabilities
    out: list[str] = []
    if caps.linear and cls.aggregate is not Method.aggregate:
        out.append(
            "is linear and overrides aggregate: override aggregate_sums instead (aggregate derives from it; the "
            "runtime streams linear methods), or declare Capabilities(linear=False)"
        )
    if "client" in caps.privacy_modes and (not caps.linear or caps.signals):
        out.append("declares privacy mode 'client' but client-level DP needs a linear method without signals")
    if cls.client_signal is not Method.client_signal and not caps.signals:
        out.append(
            "overrides client_signal without declaring Capabilities(signals=True) (the workers keep the gradients "
            "that signals read only for methods that declare them)"
        )
    if cls.role is Method.role and cls.plan is Method.plan:
        out.append("defines neither role nor plan")
    unknown = (caps.privacy_modes - PRIVACY_MODES) | (caps.variants - LORA_VARIANTS)
    if unknown:
        out.append(f"declares unknown privacy modes or variants {sorted(unknown)}")
    return out


def _ensure_loaded() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"fedsim.methods.{mod}")


def load_plugin_method(spec: str) -> type[Method]:
    """The user method ``spec`` names (``module.path:Name`` or an entry point of group ``fedsim.methods``),
    checked like a built-in (a :class:`Method` subclass without :func:`registration_problems`) and registered
    under ``spec``. Raises ConfigError naming ``method.name`` otherwise."""
    from fedsim.plugins import load_object

    if spec in _REGISTRY:
        return _REGISTRY[spec]
    cls = load_object(spec, "method.name", "a Method subclass")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            [
                f"method.name: {spec!r} is {type(cls).__name__} {cls!r}, not a Method subclass; subclass "
                "fedsim.methods.Method (see docs/extending.md)"
            ]
        )
    problems = registration_problems(cls)
    if problems:
        raise ConfigError([f"method.name: {spec!r} {p}" for p in problems])
    if not cls.name:
        cls.name = spec
    _REGISTRY[spec] = cls
    return cls


def _is_plugin(name: str) -> bool:
    from fedsim.plugins import entry_point_names, is_spec

    return is_spec(name) or name in entry_point_names("method.name")


def all_capabilities() -> dict[str, Capabilities]:
    """Every registered method's declared capabilities, by name (built-ins, plugins loaded so far, and the
    methods of installed packages' ``fedsim.methods`` entry points, loaded here)."""
    _ensure_loaded()
    _load_entry_points()
    return {name: cls.capabilities for name, cls in sorted(_REGISTRY.items())}


def _load_entry_points() -> None:
    from fedsim.plugins import entry_point_names

    for name in entry_point_names("method.name"):
        if name not in _REGISTRY:
            try:
                load_plugin_method(name)
            except ConfigError:
                pass  # a broken installed plugin is reported when a config names it


def available_methods() -> list[str]:
    """The names ``method.name`` accepts without a ``module:Name`` spec (built-ins, entry points, plugins loaded)."""
    _ensure_loaded()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered class for ``name``, or the plugin ``name`` names (``module.path:Name``, an entry point);
    ConfigError (naming method.name and the known names) otherwise."""
    _ensure_loaded()
    if name not in _REGISTRY and _is_plugin(name):
        return load_plugin_method(name)
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            [
                f"method.name: unknown method {name!r}; known methods: {', '.join(known)}.{hint} (a method of your "
                "own: module.path:ClassName)"
            ]
        )
    return _REGISTRY[name]


def make_method(cfg: Config) -> Method:
    """An instance of the method named by ``cfg.method.name`` (ConfigError if unknown)."""
    return get_method(cfg.method.name)(cfg)
