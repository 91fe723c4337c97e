"""The Aquila3/Llama/Qwen2-family decoder: RMSNorm, RoPE, GQA attention (+ optional QKV bias), SwiGLU or MoE.

    h_0     = E[tokens]
    a_l     = h_l + Attention(RMSNorm(h_l))
    h_{l+1} = a_l + FFN_l(RMSNorm(a_l))            FFN_l is SwiGLU, or an MoE of SwiGLU experts
    logits  = RMSNorm(h_L) W_out^T                 W_out = E when embeddings are tied

`Transformer.forward` returns `(logits, aux)`, or `(head(RMSNorm(h_L), W_out), aux)` when given a `head` (the fused
chunked output + loss of titan_aquila/losses.py, which never builds the full logits), where `aux = [load_balance, router_z]` is the mean of the MoE layers'
auxiliary losses (zeros for a dense model), so the trainer adds them to the loss with its own coefficients.
This file knows nothing of parallelism: TP/EP/FSDP/compile are applied from the outside by `parallel/`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_aquila.models.args import ModelArgs
from titan_aquila.models.feed_forward import FeedForward
from titan_aquila.models.moe import MoE


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (HF LlamaRMSNorm numerics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] of angle(p, i) = p * theta^(-2i/head_dim), i < head_dim/2, repeated
    twice along the last dim to match the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BTHd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama): pairs (x_i, x_{i+d/2}) rotate by angle(p, i):  x*cos + rotate_half(x)*sin."""
    half = x_BTHd.shape[-1] // 2
    rotated = torch.cat([-x_BTHd[..., half:], x_BTHd[..., :half]], dim=-1)
    cos, sin = cos_Td[None, :, None, :], sin_Td[None, :, None, :]
    return (x_BTHd.float() * cos + rotated.float() * sin).to(x_BTHd.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention: H query heads share G key/value heads, query head t uses KV head t // (H/G)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x_BTD).view(B, T, -1, self.head_dim)
        k = self.wk(x_BTD).view(B, T, -1, self.head_dim)
        v = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(group, dim=2)  # KV head s serves query heads s*group ... s*group + group-1
        v = v.repeat_interleave(group, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block; `forward` returns the new residual and this layer's [load_balance, z] aux losses.
    Its feed-forward is `self.moe` when `moe_enabled`, else `self.feed_forward` (the state-dict names differ)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.moe_enabled = args.is_moe_layer(layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if self.moe_enabled:
            self.moe = MoE(args)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        if self.moe_enabled:
            y, aux = self.moe(self.ffn_norm(h))
        else:
            y, aux = self.feed_forward(self.ffn_norm(h)), h.new_zeros(2, dtype=torch.float32)
        return h + y, aux


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by str(layer_id) keeps FQNs stable when parallel code wraps or removes blocks.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if not args.tie_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> None:
        """Embeddings and input projections ~ N(0, init_std^2); residual writers (wo, w2, expert w2) ~
        N(0, (init_std / sqrt(2L))^2) so the residual stream's variance does not grow with depth (GPT-2);
        norms = 1; router ~ N(0, init_std^2); RoPE tables recomputed (they are lost on the meta device).
        Each tensor is drawn from generators seeded by (seed, its name) (models/init.py), so a sharded model
        initialised shard by shard gets the same values. seed None: drawn from torch's global generator."""
        from titan_aquila.models.init import initial_value

        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        with torch.no_grad():
            for name, t in self.state_dict(keep_vars=True).items():
                t.copy_(initial_value(name, t, self.args, seed).build())
        self.init_buffers()

    def init_buffers(self) -> None:
        """The non-persistent buffers (RoPE tables, expert token counters), which no checkpoint restores."""
        self.reset_rope()
        for module in self.modules():
            if isinstance(module, MoE):
                module.tokens_per_expert.zero_()
                module.tokens_dropped.zero_()

    def reset_rope(self) -> None:
        device = self.rope_cos.device
        if device.type == "meta":
            return
        cos, sin = rope_cos_sin(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.args.tie_embeddings else self.output.weight

    def forward(self, tokens_BT: torch.Tensor, head=None) -> tuple[object, torch.Tensor]:
        """`head(h_BTD, W_out)`, if given, replaces the output projection; it is called here, inside forward, so
        that wrappers which gather parameters around forward (FSDP2) have W_out gathered for it."""
        T = tokens_BT.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens_BT)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        aux = torch.zeros(2, device=h.device, dtype=torch.float32)
        for block in self.layers.values():
            h, layer_aux = block(h, cos, sin)
            aux = aux + layer_aux
        h = self.norm(h)
        n_moe = len(self.args.moe_layer_ids)
        if head is not None:
            return head(h, self.output_weight()), aux / max(n_moe, 1)
        if hasattr(self, "output"):
            logits = self.output(h)
        else:
            logits = F.linear(h, self.tok_embeddings.weight)
        return logits, aux / max(n_moe, 1)


def build_model(args: ModelArgs, device: str | torch.device = "cpu", seed: int | None = None) -> Transformer:
    """Build and initialise a model; on the meta device only shapes are made (call `init_weights` after `to_empty`)."""
    with torch.device(device):
        model = Transformer(args)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
