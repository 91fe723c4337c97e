"""The decoder against independent references: attention, GQA grouping, RoPE, causality, sizes and FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from titan_aquila.models.aquila import Attention, apply_rope, build_model, rope_cos_sin
from titan_aquila.models.args import FLAVORS, ModelArgs, build_model_args


def reference_attention(attn: Attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Per-head loop: query head t reads KV head t // (H/G); RoPE by complex rotation of pairs (i, i + d/2);
    explicit causal softmax."""
    B, T, _ = x.shape
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.wq(x).view(B, T, H, d)
    k = attn.wk(x).view(B, T, G, d)
    v = attn.wv(x).view(B, T, G, d)
    freqs = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    rot = torch.polar(torch.ones(T, d // 2, dtype=torch.float64), torch.arange(T)[:, None] * freqs[None])

    def rope(u):  # u [B, T, d]
        c = torch.complex(u[..., : d // 2].double(), u[..., d // 2:].double()) * rot
        return torch.cat([c.real, c.imag], dim=-1).float()

    mask = torch.full((T, T), float("-inf")).triu(1)
    outs = []
    for t in range(H):
        s = t // (H // G)
        scores = rope(q[:, :, t]) @ rope(k[:, :, s]).transpose(1, 2) / math.sqrt(d) + mask
        outs.append(scores.softmax(-1) @ v[:, :, s])
    return attn.wo(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("n_kv_heads,qkv_bias", [(4, False), (2, True), (1, False)])
def test_attention_matches_per_head_reference(n_kv_heads, qkv_bias):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_heads=4, n_kv_heads=n_kv_heads, qkv_bias=qkv_bias, rope_theta=500.0)
    attn = Attention(args)
    if qkv_bias:
        for lin in (attn.wq, attn.wk, attn.wv):
            torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 9, 32)
    cos, sin = rope_cos_sin(8, 9, 500.0)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, 500.0), atol=2e-6, rtol=1e-5)


def test_gqa_with_all_kv_heads_equals_plain_multi_head_attention():
    torch.manual_seed(1)
    args = ModelArgs(dim=32, n_heads=4, n_kv_heads=4)
    attn = Attention(args)
    x = torch.randn(2, 7, 32)
    cos, sin = torch.ones(7, 8), torch.zeros(7, 8)  # no rotation: compare with torch's own MHA
    mha = torch.nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        mha.out_proj.weight.copy_(attn.wo.weight)
    ref, _ = mha(x, x, x, attn_mask=torch.ones(7, 7, dtype=torch.bool).triu(1), need_weights=False)
    torch.testing.assert_close(attn(x, cos, sin), ref, atol=2e-6, rtol=1e-5)


def test_rope_rotates_pairs_half_apart():
    x = torch.randn(1, 5, 1, 8)
    cos, sin = rope_cos_sin(8, 5, 10000.0)
    y = apply_rope(x, cos, sin)
    p, i = 3, 1  # position 3, frequency index 1 pairs dims (1, 5)
    angle = p * 10000.0 ** (-2 * i / 8)
    a, b = x[0, p, 0, i], x[0, p, 0, i + 4]
    torch.testing.assert_close(y[0, p, 0, i], a * math.cos(angle) - b * math.sin(angle))
    torch.testing.assert_close(y[0, p, 0, i + 4], b * math.cos(angle) + a * math.sin(angle))
    torch.testing.assert_close(y.norm(), x.norm())  # rotations keep the norm


def test_future_tokens_do_not_change_past_logits():
    model = build_model(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64), seed=0)
    a = torch.randint(0, 64, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 64
    la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :7], lb[:, :7])
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


def test_parameter_counts_match_hand_counts_and_the_model():
    a = ModelArgs(dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=100, qkv_bias=True)
    hd = 4
    attn = 16 * 4 * hd + 2 * 16 * 2 * hd + 4 * hd * 16 + (4 * hd + 2 * 2 * hd)
    per_layer = attn + 3 * 16 * 40 + 2 * 16
    assert a.num_params() == 3 * per_layer + 16 + 2 * 100 * 16
    assert a.num_params() == sum(p.numel() for p in build_model(a).parameters())
    moe = a.replace(n_experts=4, top_k=2, moe_ffn_dim=8, moe_layer_step=2)  # layer 1 only
    per_moe = 4 * 16 + 4 * 3 * 16 * 8
    assert moe.num_params() == 2 * per_layer + (attn + 2 * 16 + per_moe) + 16 + 2 * 100 * 16
    assert moe.num_params() == sum(p.numel() for p in build_model(moe).parameters())
    assert moe.num_params(active=True) == moe.num_params() - 2 * 3 * 16 * 8


def test_published_sizes():
    assert build_model_args("smollm2_135m").num_params() == 134_515_008
    assert round(FLAVORS["llama3_8b"].num_params() / 1e9, 2) == 8.03  # Meta's model card: 8.03B
    mixtral = FLAVORS["mixtral_8x7b"]  # Mixtral paper / HF config: 46.70B total, 12.88B active (top-2 of 8)
    assert round(mixtral.num_params() / 1e9, 2) == 46.70 and round(mixtral.num_params(active=True) / 1e9, 2) == 12.88
    # AquilaMoE 8x16B: "about 30B active parameters".
    assert 28e9 < FLAVORS["aquila3_8x16b"].num_params(active=True) < 31e9


def test_flops_per_token_hand_count():
    a = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=100, tie_embeddings=True)
    matmul_params = a.num_params(embedding=False) + 100 * 16  # tied table still costs the output matmul
    assert a.flops_per_token(seq_len=8) == 6 * matmul_params + 12 * 2 * 4 * 4 * 8


def test_meta_build_of_every_flavor():
    for name in FLAVORS:
        model = build_model(build_model_args(name), device="meta")
        assert sum(p.numel() for p in model.parameters()) == FLAVORS[name].num_params()


def test_training_step_reduces_loss_on_a_repeated_batch():
    model = build_model(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    losses = []
    for _ in range(5):
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
