"""Growth and upcycling: one registry of named transforms on `(ModelArgs, state_dict)`, composed in order.

A stage names its methods, e.g. ``methods = ["aki_pro", "upcycle"]``. Each method owns some `ModelArgs` fields
(width: dim/n_heads/ffn_dim, depth: n_layers, upcycle: the MoE fields). `plan_growth` walks the methods in order,
moving the fields each one owns from the source value to the target value, validates every step (a `UserError`
before any tensor is touched) and returns the final `ModelArgs` (a method may adjust a field it owns, e.g. the
exact any-ratio width rescales `norm_eps`). `apply_growth` then runs the transforms on the state dict.

Transforms know nothing of sharding or files. Expert weights may come back as `LazyExperts`, so that the
checkpoint loader builds only the experts a rank holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from titan_aquila.errors import UserError, did_you_mean
from titan_aquila.growth.lazy import LazyExperts, materialize  # noqa: F401  (re-exported)
from titan_aquila.models.args import RUNTIME_FIELDS, ModelArgs


@dataclass
class GrowthOptions:
    """Knobs shared by the transforms (filled from the `[growth]` config section)."""

    noise_std: float = 0.0
    """Std of symmetry-breaking Gaussian noise added to copied weights (0 = exact copies)."""
    split_spread: float = 0.5
    """Exact symmetry breaking of width growth: copies' outgoing shares u / sum(u), u ~ U(1-s, 1+s) per element
    (0 = equal 1/c shares, under which copies train identically); see growth/symmetry.py."""
    seed: int = 0
    """Seed of every random choice a transform makes (router init, Drop-Upcycling indices, noise)."""
    router_init_std: float = 0.02
    """Std of the new router weights N(0, std^2); AquilaMoE's 'variance 0.02' reading is std = sqrt(0.02)."""
    drop_ratio: float = 0.0
    """Drop-Upcycling: fraction r of each expert's intermediate units re-initialised (0 = sparse upcycling)."""
    drop_index_sets: str = "shared"
    """'shared': one index set for gate/up/down (paper); 'per_matrix': one per matrix (released code)."""
    granularity: int = 1
    """Fine-grained upcycling: split each dense FFN into G expert shards (E = expansion * G)."""


StateDict = dict  # str -> Tensor | LazyExperts


@dataclass
class GrowthMethod:
    name: str
    fields: tuple[str, ...]
    """ModelArgs fields this method moves from source to target."""
    plan: Callable[[ModelArgs, ModelArgs, GrowthOptions], ModelArgs]
    """(args before, args after with this method's fields at the target values, opts) -> final args after
    (validated; may adjust fields it owns). Raises UserError for impossible growth."""
    apply: Callable[[ModelArgs, StateDict, ModelArgs, GrowthOptions], StateDict]
    """(args before, state dict before, args after, opts) -> state dict after."""
    doc: str = ""


REGISTRY: dict[str, GrowthMethod] = {}


def register(method: GrowthMethod) -> GrowthMethod:
    assert method.name not in REGISTRY, method.name
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> GrowthMethod:
    _load_builtin_methods()
    if name not in REGISTRY:
        raise UserError(f"unknown growth method '{name}'"
                        + did_you_mean(name, REGISTRY, f"; known methods: {', '.join(sorted(REGISTRY))}"))
    return REGISTRY[name]


@dataclass
class GrowthPlan:
    src_args: ModelArgs
    dst_args: ModelArgs
    steps: list[tuple[GrowthMethod, ModelArgs, ModelArgs]] = field(default_factory=list)

    def describe(self) -> str:
        return " -> ".join(step[0].name for step in self.steps) or "(identity)"


def plan_growth(methods: list[str], src_args: ModelArgs, target_args: ModelArgs, opts: GrowthOptions) -> GrowthPlan:
    """Validate the whole chain and return the final args. Every field that differs between source and target must
    be owned by one of the methods, else the target cannot be reached (a clear error, not a silent mismatch)."""
    if not methods:
        raise UserError("growth.methods is empty: name at least one method (e.g. ['fpi'], ['aki_pro', 'upcycle'])")
    steps, args = [], src_args
    owned: set[str] = set()
    for name in methods:
        method = get_method(name)
        target_for_step = args.replace(**{f: getattr(target_args, f) for f in method.fields})
        after = method.plan(args, target_for_step, opts)
        steps.append((method, args, after))
        owned.update(method.fields)
        # A field a method adjusted on purpose (exact's norm_eps = c * eps) is the target of the later methods
        # too, so ['exact', 'zero'] plans like ['zero', 'exact'].
        target_args = target_args.replace(**{f: getattr(after, f) for f in method.fields
                                             if getattr(after, f) != getattr(target_for_step, f)})
        args = after
    for f in dataclasses.fields(ModelArgs):
        if f.name in RUNTIME_FIELDS or f.name in owned:
            continue
        if getattr(args, f.name) != getattr(target_args, f.name):
            raise UserError(
                f"source and target differ in '{f.name}' ({getattr(args, f.name)} vs {getattr(target_args, f.name)})"
                f" but no growth method in {methods} changes it")
    # Fields that are runtime choices follow the target config.
    args = args.replace(**{k: getattr(target_args, k) for k in RUNTIME_FIELDS})
    return GrowthPlan(src_args=src_args, dst_args=args, steps=steps)


def apply_growth(plan: GrowthPlan, src_sd: StateDict, opts: GrowthOptions) -> StateDict:
    sd = src_sd
    for method, before, after in plan.steps:
        sd = method.apply(before, sd, after, opts)
    return sd


_LOADED = False


def _load_builtin_methods() -> None:
    """Import the modules whose `register(...)` calls fill REGISTRY (kept lazy to avoid import cycles)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for mod in ("width", "depth", "upcycle"):
        importlib.import_module(f"titan_aquila.growth.{mod}")
