"""Hugging Face checkpoints: config.json <-> ModelArgs and state-dict key maps for Llama, Qwen2, Mistral, Mixtral
and Qwen2-MoE (the on-disk safetensors names, as on the Hub; transformers 5 fuses experts only in memory).

Our layout equals HF's up to names: HF RoPE is rotate-half like ours and q heads are group-major in both, so
every tensor maps 1:1 with no permutation, except stacked experts: our `experts.w1 [E, Fe, D]` is E HF tensors
`experts.{e}.w1.weight` (Mixtral: w1 gate, w2 down, w3 up; Qwen2-MoE: gate_proj, down_proj, up_proj).

Routing maps exactly only where the math agrees:
    Mixtral    softmax over top-k logits                    = router_order 'topk_softmax' (route_scale 1)
    Qwen2-MoE  softmax over all, top-k, renormalised iff     norm_topk_prob = (router_order == 'topk_softmax')
               (renormalised top-k softmax == softmax of the top-k logits), shared expert sigmoid-gated.
Our aux-loss-free `expert_bias` changes which experts are picked; HF has no such term, so export needs it zero.
route_scale s (G after fine-grained upcycling of granularity G) has no HF field; the routed output is linear in each
expert's down projection, s * sum_i w_i W2_i h_i(x) = sum_i w_i (s W2_i) h_i(x), so export folds it into the
experts' W_down (`experts.w2` times s; the shared expert is not scaled by s and is left alone). Import reads s = 1.
"""

from __future__ import annotations

import torch

from titan_aquila.errors import UserError
from titan_aquila.logging import logger
from titan_aquila.models.args import ModelArgs

ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
              "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
CLASS_ARCH = {v: k for k, v in ARCH_CLASS.items()}
MOE_ARCHS = ("mixtral", "qwen2_moe")


# ---- config.json -> ModelArgs -------------------------------------------------------------------------------
def arch_of(cfg: dict) -> str:
    names = list(cfg.get("architectures") or [])
    for n in names:
        if n in CLASS_ARCH:
            return CLASS_ARCH[n]
    mt = cfg.get("model_type")
    if mt in ARCH_CLASS and not names:
        return mt
    shown = names[0] if names else (mt or "unknown")
    raise UserError(f"unsupported architecture '{shown}' (supported: {', '.join(ARCH_CLASS.values())})")


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling and rope_type != "default":
        raise UserError(f"RoPE scaling '{rope_type}' is not supported (only plain RoPE)")
    return float(cfg.get("rope_theta", rp.get("rope_theta", 10000.0)))


# config.json keys we read: required ones, and the type each must have (a JSON string "64" is not a number).
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
REQUIRED_MOE = {"mixtral": ("num_local_experts", "num_experts_per_tok"),
                "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size")}
POSITIVE_INTS = REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings", "num_local_experts",
                            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                            "sliding_window")
NUMBERS = ("rms_norm_eps", "rope_theta", "initializer_range")
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob", "use_sliding_window", "qkv_bias")


def check_hf_config(cfg: dict, arch: str) -> None:
    """UserError naming the first key of config.json that is missing or has the wrong type or range."""
    for key in REQUIRED + REQUIRED_MOE.get(arch, ()):
        if key not in cfg:
            raise UserError(f"config.json lacks '{key}'")
    for key in POSITIVE_INTS + NUMBERS + FLAGS:
        v = cfg.get(key)
        if v is None:
            continue
        if key in FLAGS:
            ok, want = isinstance(v, bool), "true or false"
        elif key in NUMBERS:
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"
        else:
            ok, want = isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"
        if not ok:
            raise UserError(f"config.json: '{key}' is {json_repr(v)}, expected {want}")


def json_repr(v) -> str:
    import json

    return json.dumps(v)[:60]


def args_from_hf_config(cfg: dict) -> tuple[str, ModelArgs]:
    """(arch, ModelArgs) for an HF config.json dict; UserError for what our model cannot represent exactly."""
    if not isinstance(cfg, dict):
        raise UserError(f"config.json holds a {type(cfg).__name__}, not a JSON object")
    arch = arch_of(cfg)
    check_hf_config(cfg, arch)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{cfg['hidden_act']}' is not supported (SwiGLU with silu only)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("attention_bias / mlp_bias (a bias on o_proj or the MLP) is not supported")
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    kw = dict(dim=D, n_layers=cfg["num_hidden_layers"], n_heads=H, n_kv_heads=cfg.get("num_key_value_heads") or H,
              head_dim=cfg.get("head_dim") or D // H, ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
              norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
              max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
              init_std=float(cfg.get("initializer_range", 0.02)),
              qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and cfg.get("qkv_bias", True)))
    window = cfg.get("sliding_window") if (arch in ("mistral", "mixtral") or cfg.get("use_sliding_window")) else None
    if window and window < kw["max_seq_len"]:
        # Inside the window sliding-window attention is full causal attention: exact up to that length.
        logger.info(f"note: sliding_window {window} < max_position_embeddings; max_seq_len set to {window}")
        kw["max_seq_len"] = int(window)
    if arch == "mixtral":
        kw.update(n_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"], moe_ffn_dim=cfg["intermediate_size"],
                  router_order="topk_softmax")
    elif arch == "qwen2_moe":
        fe, shared = cfg["moe_intermediate_size"], cfg.get("shared_expert_intermediate_size", 0)
        if cfg.get("mlp_only_layers"):
            raise UserError("Qwen2-MoE mlp_only_layers is not supported (use decoder_sparse_step)")
        if shared % fe:
            raise UserError(f"shared_expert_intermediate_size {shared} is not a multiple of moe_intermediate_size {fe}")
        kw.update(n_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"], moe_ffn_dim=fe,
                  moe_layer_step=cfg.get("decoder_sparse_step", 1), n_shared_experts=shared // fe,
                  shared_expert_gate=shared > 0,
                  router_order="topk_softmax" if cfg.get("norm_topk_prob", False) else "softmax_topk")
    return arch, ModelArgs(**kw).validate()


# ---- ModelArgs -> arch + config.json ------------------------------------------------------------------------
def export_arch(args: ModelArgs, arch: str | None = None) -> str:
    """The HF architecture that represents `args` exactly (or check the requested one); UserError if none."""
    if arch is not None and arch not in ARCH_CLASS:
        raise UserError(f"unknown HF architecture '{arch}' (choose from {', '.join(ARCH_CLASS)})")
    if not args.is_moe:
        arch = arch or ("qwen2" if args.qkv_bias else "llama")
        if arch in MOE_ARCHS:
            raise UserError(f"a dense model cannot be exported as {arch}")
        if args.qkv_bias != (arch == "qwen2"):
            raise UserError(f"{ARCH_CLASS[arch]} {'has' if arch == 'qwen2' else 'has no'} q/k/v bias but the model "
                            f"{'has' if args.qkv_bias else 'has no'}; use {'qwen2' if args.qkv_bias else 'llama'}")
        return arch
    if args.n_shared_experts and not args.shared_expert_gate:
        raise UserError("a shared expert without shared_expert_gate has no HF equivalent: Qwen2-MoE always gates "
                        "its shared expert by sigmoid(x . w); train with model.shared_expert_gate = true to export")
    mixtral_ok = (args.router_order == "topk_softmax" and args.moe_layer_step == 1 and not args.n_shared_experts
                  and not args.qkv_bias)
    arch = arch or ("mixtral" if mixtral_ok else "qwen2_moe")
    if arch == "mixtral" and not mixtral_ok:
        raise UserError("Mixtral needs router_order 'topk_softmax', an MoE in every layer (moe_layer_step 1), no "
                        "shared expert and no q/k/v bias; export as qwen2_moe instead")
    if arch != "mixtral" and arch != "qwen2_moe":
        raise UserError(f"an MoE model cannot be exported as {arch}")
    return arch


def hf_config(args: ModelArgs, arch: str, dtype: str = "float32") -> dict:
    """config.json for `args` as `arch` (transformers 4.x reads rope_theta, 5.x rope_parameters: both given)."""
    a = args
    cfg = {"architectures": [ARCH_CLASS[arch]], "model_type": arch, "vocab_size": a.vocab_size, "hidden_size": a.dim,
           "intermediate_size": a.ffn_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
           "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
           "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
           "tie_word_embeddings": a.tie_embeddings, "initializer_range": a.init_std, "attention_dropout": 0.0,
           "use_cache": True, "torch_dtype": dtype, "dtype": dtype}
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch in ("qwen2", "qwen2_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=a.n_layers)
    elif arch in ("mistral", "mixtral"):
        cfg.update(sliding_window=None)
    if arch == "mixtral":
        cfg.update(num_local_experts=a.n_experts, num_experts_per_tok=a.top_k, router_jitter_noise=0.0)
        cfg["intermediate_size"] = a.moe_ffn_dim
    elif arch == "qwen2_moe":
        cfg.update(num_experts=a.n_experts, num_experts_per_tok=a.top_k, moe_intermediate_size=a.moe_ffn_dim,
                   shared_expert_intermediate_size=a.n_shared_experts * a.moe_ffn_dim,
                   decoder_sparse_step=a.moe_layer_step, norm_topk_prob=a.router_order == "topk_softmax",
                   mlp_only_layers=[], qkv_bias=a.qkv_bias)
    return cfg


# ---- key maps ---------------------------------------------------------------------------------------------
def key_map(args: ModelArgs, arch: str) -> list[tuple[str, str | list[str]]]:
    """(our name, HF name) pairs; for stacked experts the HF side is the list of E per-expert names."""
    out: list[tuple[str, str | list[str]]] = [("tok_embeddings.weight", "model.embed_tokens.weight"),
                                              ("norm.weight", "model.norm.weight")]
    if not args.tie_embeddings:
        out.append(("output.weight", "lm_head.weight"))
    for i in range(args.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out += [(ours + "attention_norm.weight", hf + "input_layernorm.weight"),
                (ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight")]
        for o, h in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out.append((f"{ours}attention.{o}.weight", f"{hf}self_attn.{h}.weight"))
            if args.qkv_bias and o != "wo":
                out.append((f"{ours}attention.{o}.bias", f"{hf}self_attn.{h}.bias"))
        mlp = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
        if not args.is_moe_layer(i):
            out += [(f"{ours}feed_forward.{w}.weight", f"{hf}mlp.{h}.weight") for w, h in mlp.items()]
            continue
        E = args.n_experts
        if arch == "mixtral":
            blk = hf + "block_sparse_moe."
            out.append((ours + "moe.router.weight", blk + "gate.weight"))
            out += [(f"{ours}moe.experts.{w}", [f"{blk}experts.{e}.{w}.weight" for e in range(E)]) for w in mlp]
        else:
            blk = hf + "mlp."
            out.append((ours + "moe.router.weight", blk + "gate.weight"))
            out += [(f"{ours}moe.experts.{w}", [f"{blk}experts.{e}.{h}.weight" for e in range(E)]) for w, h in mlp.items()]
            if args.n_shared_experts:
                out += [(f"{ours}moe.shared_expert.{w}.weight", f"{blk}shared_expert.{h}.weight") for w, h in mlp.items()]
                out.append((ours + "moe.shared_expert_gate.weight", blk + "shared_expert_gate.weight"))
    return out


def check_expert_bias(get, args: ModelArgs, drop_expert_bias: bool) -> None:
    for i in args.moe_layer_ids:
        bias = get(f"layers.{i}.moe.expert_bias")
        if bias is not None and bool(bias.ne(0).any()) and not drop_expert_bias:
            raise UserError(f"layer {i} has a non-zero expert_bias (aux-loss-free balancing); HF routing has no such "
                            "term so the exported model would route differently; pass --drop-expert-bias to accept")


def titan_to_hf_groups(names: set[str], args: ModelArgs, arch: str, dtype: torch.dtype):
    """[(our name or None, f)]: f(our tensor) -> [(HF name, tensor)], in export order (our name None: the
    zero-width Qwen2-MoE shared experts of `dtype`, made from nothing). An exporter reads one tensor at a time."""
    out = []
    for ours, theirs in key_map(args, arch):
        if ours not in names:
            raise UserError(f"checkpoint lacks tensor {ours}")
        # fold the routing scale into W_down (module docstring)
        scale = args.route_scale if ours.endswith("moe.experts.w2") and args.route_scale != 1.0 else 1.0

        def convert(t, theirs=theirs, scale=scale):
            t = t * scale if scale != 1.0 else t
            if isinstance(theirs, list):
                return [(n, t[e].contiguous()) for e, n in enumerate(theirs)]
            return [(theirs, t.contiguous())]

        out.append((ours, convert))
    if arch == "qwen2_moe" and not args.n_shared_experts:
        # Qwen2-MoE always has a gated shared expert: a zero-width one adds exactly 0.
        def zero_width(i: int):
            blk = f"model.layers.{i}.mlp."
            F0 = torch.zeros(0, args.dim, dtype=dtype)
            return [(blk + "shared_expert.gate_proj.weight", F0), (blk + "shared_expert.up_proj.weight", F0),
                    (blk + "shared_expert.down_proj.weight", F0.T.contiguous()),
                    (blk + "shared_expert_gate.weight", torch.zeros(1, args.dim, dtype=dtype))]
        out += [(None, lambda _, i=i: zero_width(i)) for i in args.moe_layer_ids]
    return out


def titan_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs, arch: str, drop_expert_bias: bool = False) -> dict:
    """Our state dict -> HF tensors (contiguous, ready for safetensors)."""
    check_expert_bias(sd.get, args, drop_expert_bias)
    hf: dict[str, torch.Tensor] = {}
    for ours, convert in titan_to_hf_groups(set(sd), args, arch, sd["tok_embeddings.weight"].dtype):
        hf.update(convert(sd[ours] if ours else None))
    return hf


def hf_to_titan_lazy(get, names: set[str], args: ModelArgs, arch: str) -> dict:
    """Our name -> a function that reads (with `get(name)`, one HF tensor at a time) and returns that one tensor;
    UserError naming a missing HF tensor, raised when the function runs. Also accepts transformers-5 fused expert
    tensors (`experts.gate_up_proj` [E, 2Fe, D], `experts.down_proj`)."""

    def need(name: str) -> torch.Tensor:
        if name not in names:
            raise UserError(f"safetensors files lack tensor '{name}'")
        return get(name)

    def convert(ours: str, theirs) -> torch.Tensor:
        if isinstance(theirs, str):
            return need(theirs)
        prefix = theirs[0].split("experts.")[0] + "experts."
        if theirs[0] not in names and prefix + "gate_up_proj" in names:  # fused in-memory layout
            w = ours.rsplit(".", 1)[1]
            if w == "w2":
                return need(prefix + "down_proj")
            gate, up = need(prefix + "gate_up_proj").chunk(2, dim=1)
            return (gate if w == "w1" else up).contiguous()
        return torch.stack([need(n) for n in theirs])

    sd = {ours: (lambda ours=ours, theirs=theirs: convert(ours, theirs)) for ours, theirs in key_map(args, arch)}
    for i in args.moe_layer_ids:
        sd[f"layers.{i}.moe.expert_bias"] = lambda: torch.zeros(args.n_experts, dtype=torch.float32)
    return sd


def hf_to_titan(get, names: set[str], args: ModelArgs, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors (read one at a time with `get(name)`) -> our state dict; UserError naming a missing tensor."""
    return {k: f() for k, f in hf_to_titan_lazy(get, names, args, arch).items()}
