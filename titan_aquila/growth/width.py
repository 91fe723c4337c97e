"""Scale-Up width growth: `fpi`, `aki`, `exact` (fields dim, n_heads, ffn_dim; n_kv_heads and head_dim stay fixed).

Notation: d -> D hidden, H -> H' query heads in G fixed KV groups (r = H/G, r' = H'/G),
F -> F' FFN units, head_dim fixed. Maps (maps.py): g(i) = i mod d, h(f) = f mod F, pi(t) = (t//r')*r + (t mod r') mod r,
with multiplicities c_j, e_j, m_s. The residual stream becomes x' = x o g (a replicated copy of x).

FPI (`fpi`, bert2BERT FPI with AquilaMoE's left-to-right copy):
    consumers divide by the multiplicity of what they read:
        wq'[(t,a), i] = wq[(pi(t),a), g(i)] / c_g(i)      wk', wv'[(s,a), i] = w[(s,a), g(i)] / c_g(i)
        w1', w3'[f, i] = w[h(f), g(i)] / c_g(i)           output'[v, i] = output[v, g(i)] / c_g(i)  (untied)
        wo'[i, (t,a)] = wo[g(i), (pi(t),a)] / m_pi(t)     w2'[i, f] = w2[g(i), h(f)] / e_h(f)
    producers copy rows: tok_embeddings'[v, i] = E[v, g(i)], and the g(i) row mapping of wo and w2 above.
    biases copy: bq'[(t,a)] = bq[(pi(t),a)]; bk, bv unchanged.  Norms: gamma'_i = gamma_g(i), eps unchanged.
    Tied embeddings (uniform k = D/d): E' = [E, ..., E] (a producer copy) is also the output layer, so logits are
    k * E (x^ gamma); the final norm is set to gamma'_i = gamma_g(i) / k, which makes the logits exact.
    Exactness: duplicated q heads attend identically and wo's 1/m recombines them; FFN growth is exact for any F'
    (no norm inside the MLP). RMSNorm is exact iff every c_j = k = D/d (integer ratio): mean(x'^2) = mean(x^2).
    A non-integer ratio (e.g. 4096 -> 5120) is allowed but NOT exact: every norm output is off by the per-token
    factor sqrt(mean_c(x^2)/mean(x^2)) (AquilaMoE Table 2: 1.85 -> 1.96). Tied + non-integer ratio is refused
    (UserError): the copy/divide conflict has no exact fix; use `exact`.

AKI (`aki`, bert2BERT Advanced Knowledge Initialization, as AquilaMoE applies it): layer l's NEW internal output
    units come from layer l+1's in-dimension-expanded (FPI) weights, old units from layer l's own FPI weights:
        new FFN units f >= F:  w1', w3' rows f and the matching w2' columns f (already / e_h(f)) from layer l+1
                               (a whole neuron of layer l+1: its gate, up and down; bert2BERT's literal rule keeps
                               layer l's down projection, we keep neurons coherent);
        new query heads t (t mod r' >= r, inside the same KV group):  wq' rows, bq' entries and wo' columns
                               (already / m_pi(t)) of head t from layer l+1;
        hidden (residual-stream) units, embeddings, norms, k/v: FPI (the residual stream stays a replicated copy, so
                               the norms keep their statistics).
    The donor layer l+1 is grown with layer l's split shares (below), so own and donated copies of a unit share one
    set of shares summing to 1: AKI equals FPI wherever layers l and l+1 are equal.
    The top layer (no l+1) is plain FPI (zxhcelestes/bert2BERT fallback). AKI equals FPI on every old unit and is
    not function-preserving (the new units' w2/wo contributions come from another layer).

Exact (`exact`, LEMON / G_random zero padding, any D >= d):  x' = [x, ..., x (k = D//d copies), 0_r], r = D - k*d.
    Consumers read the copies / k and ignore the padding (zero columns); producers write zeros into the r padded
    dims; norms gamma' = sqrt(c) [gamma, ..., gamma, 0_r] and eps' = c * eps with c = k*d/D, so
    RMSNorm'(x') = [RMSNorm(x) x k, 0] exactly (the plan returns norm_eps' = c * eps). Tied: final norm also / k.
    Heads and FFN as FPI (copies + 1/m, 1/e splits are exact for any ratio). With D a multiple of d it equals FPI.

Symmetry breaking (default on, growth.split_spread = s in [0, 1), symmetry.py): every "/ c" (and "/ m", "/ e")
    above is replaced by per-element shares alpha[o, i] = u[o, i] / sum_{i' copy of the same unit} u[o, i'] with
    u ~ U(1 - s, 1 + s), so the copies' outgoing weights sum to the source weight (still exact: the copies carry
    equal values) but differ, and the copies get different gradients. Tied: the final norm carries the split,
    gamma'_i = gamma_g(i) * alpha_i. `exact` padding: producers stay 0, consumer columns ~ N(0, std(W)^2), padded
    gamma = mean unit gamma (exact at step 0, and the padding learns). s = 0 restores the equal 1/c split and the
    all-zero padding, under which copies train identically forever.

Noise (growth.noise_std = s > 0, off by default): after growth every 2-D weight W gets + N(0, s^2) (absolute std, as
    in `upcycle`), drawn from a generator seeded by (growth.seed, crc32(tensor name)), so reruns are identical.
    Noise breaks exactness; it is an extra on top of the split.
"""

from __future__ import annotations

import math
import zlib

import torch

from titan_aquila.errors import UserError
from titan_aquila.growth import GrowthMethod, GrowthOptions, register
from titan_aquila.growth.maps import UnitMap, cyclic_map, head_map, new_heads, padded_map
from titan_aquila.growth.symmetry import (draw_device, fill_padding_gamma_, generator, init_padding_columns_,
                                         split_)
from titan_aquila.models.args import ModelArgs

FIELDS = ("dim", "n_heads", "ffn_dim", "n_kv_heads", "head_dim", "norm_eps", "moe_ffn_dim")
"""n_kv_heads/head_dim are owned only to give a precise error; moe_ffn_dim because a dense model derives it from
ffn_dim (unused by dense layers; `upcycle` sets it); norm_eps so that `exact` can rescale it and the other
methods keep the source's value when the target restates it up to float rounding (a GGUF stores eps as float32)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ---- plan -----------------------------------------------------------------------------------------------------
def check_dense(name: str, before: ModelArgs) -> None:
    _need(not before.is_moe, f"{name}: the source is a MoE ({before.n_experts} experts); Scale-Up grows dense "
          "models only: grow the dense model first, then upcycle (methods = [..., 'upcycle'])")


def keep_eps(name: str, before: ModelArgs, target: ModelArgs) -> ModelArgs:
    """The target with the source's norm_eps (UserError if the target asks for a really different one)."""
    _need(math.isclose(target.norm_eps, before.norm_eps, rel_tol=1e-6),
          f"{name}: target norm_eps {target.norm_eps} differs from the source's {before.norm_eps}; growth keeps it")
    return target.replace(norm_eps=before.norm_eps)


def plan_width(mode: str, before: ModelArgs, target: ModelArgs, opts: GrowthOptions) -> ModelArgs:
    check_dense(mode, before)
    _need(opts.noise_std >= 0, f"{mode}: growth.noise_std must be >= 0, got {opts.noise_std}")
    _need(0 <= opts.split_spread < 1, f"{mode}: growth.split_spread must be in [0, 1), got {opts.split_spread}")
    hd = before.head_dim
    _need(target.n_kv_heads == before.n_kv_heads,
          f"{mode}: n_kv_heads must stay {before.n_kv_heads} (got {target.n_kv_heads}); width growth adds query "
          "heads inside the fixed KV groups (AquilaMoE GQA rule)")
    _need(target.head_dim == hd, f"{mode}: head_dim must stay {hd} (got {target.head_dim}: dim {target.dim} / "
          f"n_heads {target.n_heads}); growth adds heads, it cannot change RoPE or the softmax scale")
    for f in ("dim", "n_heads", "ffn_dim"):
        _need(getattr(target, f) >= getattr(before, f),
              f"{mode}: cannot shrink {f} ({getattr(before, f)} -> {getattr(target, f)})")
    _need(target.dim % hd == 0, f"{mode}: target dim {target.dim} is not a multiple of head_dim {hd}")
    _need(target.n_heads % target.n_kv_heads == 0,
          f"{mode}: target n_heads {target.n_heads} is not a multiple of n_kv_heads {target.n_kv_heads}")
    if mode == "exact":
        c = (target.dim // before.dim) * before.dim / target.dim
        eps = before.norm_eps * c
        _need(math.isclose(target.norm_eps, before.norm_eps, rel_tol=1e-6) or math.isclose(target.norm_eps, eps),
              f"exact: target norm_eps {target.norm_eps} must equal the source's {before.norm_eps} (the plan "
              f"sets it to c*eps = {eps:g})")
        return target.replace(norm_eps=eps).validate()
    if before.tie_embeddings and target.dim % before.dim:
        raise UserError(f"{mode}: tied embeddings with a non-integer width ratio ({before.dim} -> {target.dim}) "
                        "cannot be grown by copies; use methods ['exact'] (zero padding, exact at any ratio) or an "
                        "integer multiple of dim")
    return keep_eps(mode, before, target).validate()


# ---- apply ----------------------------------------------------------------------------------------------------
class _Maps:
    def __init__(self, mode: str, a: ModelArgs, b: ModelArgs, opts: GrowthOptions):
        self.g: UnitMap = (padded_map if mode == "exact" else cyclic_map)(a.dim, b.dim)
        self.h = cyclic_map(a.ffn_dim, b.ffn_dim)
        self.q = head_map(a.n_heads, b.n_heads, a.n_kv_heads).expand(a.head_dim)
        self.new_q = new_heads(a.n_heads, b.n_heads, a.n_kv_heads).repeat_interleave(a.head_dim)
        self.new_f = torch.arange(b.ffn_dim) >= a.ffn_dim
        k = b.dim // a.dim
        self.norm_scale = math.sqrt(k * a.dim / b.dim) if mode == "exact" else 1.0
        self.k = k
        self.seed, self.spread = opts.seed, opts.split_spread

    def gen(self, purpose: str, name: str) -> torch.Generator | None:
        """The generator of one tensor's draws; None when symmetry breaking is off (split_spread = 0)."""
        return generator(self.seed, purpose, name) if self.spread > 0 else None

    def split(self, w: torch.Tensor, g: UnitMap, name: str) -> torch.Tensor:
        """Columns of w read the copies of g: unequal shares summing to 1 per source unit (symmetry.py)."""
        return split_(w, g, 1, self.spread, self.gen("split", name))


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Growth arithmetic runs in float32 (float64 for a float64 source): every output is a gathered weight times
    at most one 1/multiplicity factor, exact for power-of-two multiplicities and within one float32 ulp otherwise,
    at a quarter of float64's memory traffic (no widening copy). bf16/fp16 sources are widened so that the factors
    are not rounded to 8 bits before the final cast."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scale_(w: torch.Tensor, factor: torch.Tensor, dim: int) -> torch.Tensor:
    """In place: w * factor along `dim` (skipped when every factor is 1, the common integer-copy case)."""
    if bool((factor == 1).all()):
        return w
    shape = [1] * w.dim()
    shape[dim] = -1
    return w.mul_(factor.to(w.dtype).view(shape))


def _consume(w: torch.Tensor, m: _Maps, name: str) -> torch.Tensor:
    """Columns (in-dimension) read the replicated stream: W[:, g(i)] * alpha (random columns on padding)."""
    out = m.split(w.index_select(1, m.g.src), m.g, name)
    return init_padding_columns_(out, w, m.g, m.gen("pad", name))


def _produce(w: torch.Tensor, g: UnitMap) -> torch.Tensor:
    """Rows (out-dimension on the residual stream) are copied: W[g(i)] (zero on padding)."""
    return _scale_(w.index_select(0, g.src), g.live, 0)


def _norm(w: torch.Tensor, m: _Maps, name: str, tied_output: bool = False) -> torch.Tensor:
    """gamma'_i = sqrt(c) gamma_g(i) (padding: the mean unit gamma); a tied final norm also carries the output's
    split, gamma'_i * alpha_i with sum over the copies of alpha = 1 (symmetry.py)."""
    out = w[m.g.src] * m.g.live.to(w.dtype) * m.norm_scale
    if tied_output:
        out = split_(out, m.g, 0, m.spread, m.gen("split", name))
    return fill_padding_gamma_(out, m.g, m.spread > 0)


def grow_layer(sd: dict, l: int, m: _Maps, bias: bool, shares_of: int | None = None) -> dict[str, torch.Tensor]:
    """FPI/exact tensors of layer l (names relative to `layers.{l}.`), computed in _work_dtype. The split shares
    are those of layer `shares_of` (default l): AKI's donor layer l+1 is grown with layer l's shares, so a unit's
    own copy and its donated copy still split one set of shares (AKI = FPI wherever layers l and l+1 agree)."""
    get = lambda n: sd[f"layers.{l}.{n}"].to(_work_dtype(sd[f"layers.{l}.{n}"]))  # noqa: E731
    p = f"layers.{l if shares_of is None else shares_of}."  # names the generators of the shares
    out = {"attention_norm.weight": _norm(get("attention_norm.weight"), m, p + "attention_norm.weight"),
           "ffn_norm.weight": _norm(get("ffn_norm.weight"), m, p + "ffn_norm.weight")}
    for n in ("attention.wk.weight", "attention.wv.weight"):
        out[n] = _consume(get(n), m, p + n)
    out["attention.wq.weight"] = _consume(get("attention.wq.weight").index_select(0, m.q.src), m,
                                          p + "attention.wq.weight")
    for n in ("feed_forward.w1.weight", "feed_forward.w3.weight"):  # gate and up share h (the same units)
        out[n] = _consume(get(n).index_select(0, m.h.src), m, p + n)
    out["attention.wo.weight"] = m.split(_produce(get("attention.wo.weight"), m.g).index_select(1, m.q.src), m.q,
                                         p + "attention.wo.weight")
    out["feed_forward.w2.weight"] = m.split(_produce(get("feed_forward.w2.weight"), m.g).index_select(1, m.h.src),
                                            m.h, p + "feed_forward.w2.weight")
    if bias:
        out["attention.wq.bias"] = get("attention.wq.bias")[m.q.src]
        out["attention.wk.bias"] = get("attention.wk.bias")
        out["attention.wv.bias"] = get("attention.wv.bias")
    return out


def _aki_splice(own: dict, nxt: dict, m: _Maps) -> dict:
    """New FFN units and new query heads of layer l from layer l+1's FPI tensors (see the module docstring)."""
    out = dict(own)
    f, q = m.new_f, m.new_q
    for n in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
        out[n] = torch.where(f[:, None], nxt[n], own[n])
    out["feed_forward.w2.weight"] = torch.where(f[None, :], nxt["feed_forward.w2.weight"], own["feed_forward.w2.weight"])
    out["attention.wq.weight"] = torch.where(q[:, None], nxt["attention.wq.weight"], own["attention.wq.weight"])
    out["attention.wo.weight"] = torch.where(q[None, :], nxt["attention.wo.weight"], own["attention.wo.weight"])
    if "attention.wq.bias" in own:
        out["attention.wq.bias"] = torch.where(q, nxt["attention.wq.bias"], own["attention.wq.bias"])
    return out


def add_noise(sd: dict, names, opts: GrowthOptions) -> None:
    """In place: + N(0, noise_std^2) on the named 2-D weights, one generator per name (seed, crc32(name))."""
    if opts.noise_std <= 0:
        return
    for n in names:
        w = sd[n]
        if w.dim() != 2:
            continue
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + zlib.crc32(n.encode()))
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float32, device=draw_device(w))
        sd[n] = w + (noise * opts.noise_std).to(w.dtype)


def apply_width(mode: str, a: ModelArgs, sd: dict, b: ModelArgs, opts: GrowthOptions) -> dict:
    m = _Maps(mode, a, b, opts)
    dtype_of = {n: t.dtype for n, t in sd.items()}
    out: dict[str, torch.Tensor] = {}
    for l in range(a.n_layers):  # layer by layer: at most two grown layers alive (AKI needs l+1)
        layer = grow_layer(sd, l, m, a.qkv_bias)
        if mode == "aki" and l + 1 < a.n_layers:
            layer = _aki_splice(layer, grow_layer(sd, l + 1, m, a.qkv_bias, shares_of=l), m)
        for n, t in layer.items():
            out[f"layers.{l}.{n}"] = t.to(dtype_of[f"layers.{l}.{n}"])
    emb = sd["tok_embeddings.weight"]
    out["tok_embeddings.weight"] = _scale_(emb.to(_work_dtype(emb)).index_select(1, m.g.src), m.g.live, 1).to(
        emb.dtype)  # a producer copy along the hidden (column) dimension
    norm = sd["norm.weight"]
    out["norm.weight"] = _norm(norm.to(_work_dtype(norm)), m, "norm.weight", tied_output=a.tie_embeddings).to(
        norm.dtype)
    if not a.tie_embeddings:
        w = sd["output.weight"]
        out["output.weight"] = _consume(w.to(_work_dtype(w)), m, "output.weight").to(w.dtype)
    missing = set(sd) - set(out)
    assert not missing, f"width growth dropped {sorted(missing)}"
    add_noise(out, list(out), opts)
    return out


def _method(mode: str, doc: str) -> GrowthMethod:
    return GrowthMethod(name=mode, fields=FIELDS,
                        plan=lambda a, t, o: plan_width(mode, a, t, o),
                        apply=lambda a, sd, b, o: apply_width(mode, a, sd, b, o), doc=doc)


register(_method("fpi", "width: bert2BERT/AquilaMoE FPI, cyclic copies + 1/multiplicity splits (exact for integer "
                        "ratios)"))
register(_method("aki", "width: bert2BERT AKI, new FFN units / query heads from layer l+1 (top layer FPI)"))
register(_method("exact", "width: zero-padded copies, RMSNorm gamma*sqrt(c), eps*c (exact at any ratio)"))
