"""Scale-Up depth growth: `stack`, `interpolate`, `zero` (field n_layers), and `aki_pro` (AKI width + interpolation).

Target layer l (of L2) is a copy of source layer src(l) (of L1); embeddings, final norm and output are unchanged:
    stack        src(l) = l mod L1            [0..L1-1, 0..L1-1, ...]  (StackBERT, bert2BERT, G_stack, AquilaMoE)
    interpolate  src(l) = (l * L1) // L2      3 -> 6: [0,0,1,1,2,2]; 24 -> 32: every 3rd layer doubled (Apollo
                 `extend_meta_layer`, AquilaMoE Eq. 3 with its typo corrected; integer arithmetic, no float rounding)
    zero         LLaMA-Pro block expansion, exact: n = L2 - L1 blocks are inserted evenly, block j right after
                 source layer e_j = ceil((j+1) L1 / n) - 1 (32 -> 40: after every 4th layer; 30 -> 36: after
                 layers 4, 9, ..., 29), as a copy of that layer with attention.wo and feed_forward.w2 set to 0. A
                 pre-norm block with zero residual writers is the identity (h + 0 + 0), so the model is unchanged.
                 (With wo = 0 the first step gives q/k/v no gradient; wo and w2 get one and training proceeds.)
stack and interpolate are not function-preserving (a copied block f turns x + f(x) into x + f(x) + f(x + f(x))).

aki_pro (AquilaMoE EfficientScale Scale-Up) = `aki` width growth on the L1-layer model, then `interpolate` depth.

Noise (growth.noise_std > 0): every duplicate after a layer's first copy gets + N(0, noise_std^2) on its 2-D weights
(seeded by growth.seed and the target tensor name; the zeroed wo/w2 of `zero` stay zero so the block stays identity).
"""

from __future__ import annotations

from titan_aquila.errors import UserError
from titan_aquila.growth import GrowthMethod, GrowthOptions, register
from titan_aquila.growth.maps import interpolate_map, stack_map, zero_map
from titan_aquila.growth.width import FIELDS as WIDTH_FIELDS
from titan_aquila.growth.width import add_noise, apply_width, check_dense, keep_eps, plan_width
from titan_aquila.models.args import ModelArgs

ZEROED = ("attention.wo.weight", "feed_forward.w2.weight")


def plan_depth(name: str, before: ModelArgs, target: ModelArgs, opts: GrowthOptions) -> ModelArgs:
    check_dense(name, before)
    if target.n_layers < before.n_layers:
        raise UserError(f"{name}: cannot shrink n_layers ({before.n_layers} -> {target.n_layers})")
    if opts.noise_std < 0:
        raise UserError(f"{name}: growth.noise_std must be >= 0, got {opts.noise_std}")
    return keep_eps(name, before, target).validate()


def depth_map(name: str, L1: int, L2: int) -> list[tuple[int, bool]]:
    """[(source layer, zero its residual writers)] for each target layer."""
    if name == "zero":
        return zero_map(L1, L2) if L2 > L1 else [(l, False) for l in range(L1)]
    src = stack_map(L1, L2) if name == "stack" else interpolate_map(L1, L2)
    return [(s, False) for s in src]


def apply_depth(name: str, a: ModelArgs, sd: dict, b: ModelArgs, opts: GrowthOptions) -> dict:
    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    layer_keys: dict[int, list[str]] = {}
    for k in sd:
        if k.startswith("layers."):
            i, rest = k[len("layers."):].split(".", 1)
            layer_keys.setdefault(int(i), []).append(rest)
    seen: set[int] = set()
    noisy: list[str] = []
    for l, (s, zero) in enumerate(depth_map(name, a.n_layers, b.n_layers)):
        first = s not in seen and not zero
        seen.add(s)
        for rest in layer_keys[s]:
            t = sd[f"layers.{s}.{rest}"]
            dst = f"layers.{l}.{rest}"
            if zero and rest in ZEROED:
                out[dst] = t.new_zeros(t.shape)
                continue
            out[dst] = t if first else t.clone()  # duplicates are distinct tensors (saved and trained apart)
            if not first:
                noisy.append(dst)
    add_noise(out, noisy, opts)
    return out


def _depth_method(name: str, doc: str) -> GrowthMethod:
    return GrowthMethod(name=name, fields=("n_layers", "norm_eps"), plan=lambda a, t, o: plan_depth(name, a, t, o),
                        apply=lambda a, sd, b, o: apply_depth(name, a, sd, b, o), doc=doc)


register(_depth_method("stack", "depth: src(l) = l mod L1 (whole-model stacking)"))
register(_depth_method("interpolate", "depth: src(l) = (l*L1)//L2 (Apollo / AquilaMoE interpolation)"))
register(_depth_method("zero", "depth: LLaMA-Pro, evenly inserted identity copies (wo = w2 = 0), exact"))


# ---- aki_pro --------------------------------------------------------------------------------------------------
def _plan_aki_pro(a: ModelArgs, t: ModelArgs, o: GrowthOptions) -> ModelArgs:
    wide = plan_width("aki", a, t.replace(n_layers=a.n_layers), o)
    return plan_depth("aki_pro", wide, wide.replace(n_layers=t.n_layers), o)


def _apply_aki_pro(a: ModelArgs, sd: dict, b: ModelArgs, o: GrowthOptions) -> dict:
    wide = b.replace(n_layers=a.n_layers)
    return apply_depth("interpolate", wide, apply_width("aki", a, sd, wide, o), b, o)


register(GrowthMethod(name="aki_pro", fields=WIDTH_FIELDS + ("n_layers",), plan=_plan_aki_pro, apply=_apply_aki_pro,
                      doc="AquilaMoE AKI-Pro: AKI width growth, then interpolated depth (src(l) = (l*L1)//L2)"))
