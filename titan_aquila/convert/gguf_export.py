"""DCP checkpoint -> one GGUF file (llama.cpp's format, written with the `gguf` package) with the tokenizer embedded.

Architectures: dense without q/k/v bias -> `llama`; dense with q/k/v bias -> `qwen2`; Mixtral-style MoE (an MoE in
every layer, softmax over the top-k logits, no shared expert, no bias) -> `llama` with expert_count (llama.cpp's
Mixtral layout). Tensors keep PyTorch's (out, in) shapes (the writer stores them reversed, as GGML wants); experts
stay stacked: ffn_gate_exps [E, F, D], ffn_down_exps [E, D, F], ffn_up_exps [E, F, D]. For `llama`, llama.cpp
uses interleaved RoPE, so q and k rows are permuted per head from rotate-half (ours, HF):

    w = w.reshape(n, 2, hd // 2, D).swapaxes(1, 2).reshape(n * hd, D)          (gguf.py's unpermute_qk inverts it)

`qwen2` uses rotate-half RoPE in llama.cpp too: no permutation. 1-D tensors (norms, biases) are float32 as in
llama.cpp's converter; matrices are float32, float16 or bfloat16 (`gguf.quants.quantize`).

Tokenizer (`tokenizer.ggml.model` = gpt2): one token per id up to vocab_size: byte tokens as GPT-2 unicode strings
(type normal), special tokens (type control), ids no token uses "[PAD<id>]" (type unused); merges from the
tokenizer.json, or every split of each token for a .tiktoken vocabulary (data/hf_tokenizer.py: tokenizer_json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from titan_aquila.checkpoint.lineage import check_vocab_fits, read_lineage, resolve_tokenizer
from titan_aquila.checkpoint.storage import read_checkpoint_args, read_model_state_dict, resolve_checkpoint_dir
from titan_aquila.convert.card import special_ids
from titan_aquila.convert.progress import Progress
from titan_aquila.errors import UserError
from titan_aquila.logging import logger

GGUF_DTYPES = ("float32", "float16", "bfloat16")
_LAYER = {"attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
          "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
          "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
          "attention.wq.bias": "attn_q.bias", "attention.wk.bias": "attn_k.bias", "attention.wv.bias": "attn_v.bias",
          "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
          "feed_forward.w3.weight": "ffn_up.weight", "moe.router.weight": "ffn_gate_inp.weight",
          "moe.experts.w1": "ffn_gate_exps.weight", "moe.experts.w2": "ffn_down_exps.weight",
          "moe.experts.w3": "ffn_up_exps.weight"}


def gguf_arch(args) -> str:
    """`llama` (dense, or Mixtral-style MoE) or `qwen2` (dense with q/k/v bias); UserError otherwise."""
    if args.is_moe:
        ok = (args.router_order == "topk_softmax" and args.moe_layer_step == 1 and not args.n_shared_experts
              and not args.qkv_bias and args.route_scale == 1.0)
        if not ok:
            raise UserError("export-gguf supports Mixtral-style MoE only (router_order 'topk_softmax', an MoE in every "
                            "layer, no shared expert, no q/k/v bias, route_scale 1); use export-hf --arch qwen2_moe")
        return "llama"
    return "qwen2" if args.qkv_bias else "llama"


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> llama.cpp's interleaved rows, per head (inverse of gguf.unpermute_qk)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_pre(tok) -> str:
    """llama.cpp's name for the tokenizer's split regex (`tokenizer.ggml.pre`); 'default' = GPT-2's rules."""
    from titan_aquila.data.hf_tokenizer import DIGITS_PAT, LLAMA3_PAT, QWEN2_PAT

    names = {DIGITS_PAT[True]: "smollm", LLAMA3_PAT: "llama-bpe", QWEN2_PAT: "qwen2"}
    return names.get(tok.encoding._pat_str, "default")


def _vocab(tok, vocab_size: int):
    """(tokens, token types, merges) for tokenizer.ggml.*, one token per id in 0..vocab_size-1."""
    import gguf

    from titan_aquila.data.hf_tokenizer import bytes_of_char, tokenizer_json

    to_char = {b: c for c, b in bytes_of_char().items()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for raw, i in tok.encoding._mergeable_ranks.items():
        tokens[i], types[i] = "".join(to_char[b] for b in raw), gguf.TokenType.NORMAL
    for text, i in tok.special_tokens.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    model = json.loads(tok.path.read_text())["model"] if tok.path.suffix == ".json" else tokenizer_json(tok)["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def export_gguf(ckpt: str | Path, out: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
                tokenizer: str | None = None) -> Path:
    """Checkpoint -> OUT (a .gguf file), written beside it and renamed into place when complete."""
    import gguf

    step_dir = resolve_checkpoint_dir(ckpt)
    args = read_checkpoint_args(step_dir)
    arch = gguf_arch(args)
    out = Path(out)
    if out.exists() and (out.is_dir() or not overwrite):
        raise UserError(f"output {out} already exists{'' if out.is_dir() else '; pass --overwrite to replace it'}")
    tok = resolve_tokenizer(tokenizer, step_dir, "--tokenizer")
    check_vocab_fits(tok, args.vocab_size, f"checkpoint {step_dir}")
    ids = special_ids(tok, read_lineage(step_dir))
    sd = read_model_state_dict(step_dir)
    if any(n.endswith("expert_bias") and bool(t.ne(0).any()) for n, t in sd.items()):
        raise UserError("the MoE has a non-zero expert_bias (aux-loss-free balancing); llama.cpp's routing has no "
                        "such term")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid():x}")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(step_dir.parent.name)
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.moe_ffn_dim if args.is_moe else args.ffn_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
        w.add_rope_dimension_count(args.head_dim)
        w.add_rope_freq_base(args.rope_theta)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                         "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
        if args.is_moe:
            w.add_expert_count(args.n_experts)
            w.add_expert_used_count(args.top_k)
        tokens, types, merges = _vocab(tok, args.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(llama_cpp_pre(tok))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                         ("pad_token_id", w.add_pad_token_id)):
            v = ids.get(key)
            if v is not None:
                add(int(v[0] if isinstance(v, list) else v))
        w.add_add_bos_token(False)
        progress = Progress(f"export-gguf {out.name}", len(sd))
        qtype = {"float16": gguf.GGMLQuantizationType.F16, "bfloat16": gguf.GGMLQuantizationType.BF16}.get(dtype)
        for name, t in sd.items():
            progress.step()
            if name.endswith("expert_bias"):
                continue
            if name == "tok_embeddings.weight":
                gname = "token_embd.weight"
            elif name == "norm.weight":
                gname = "output_norm.weight"
            elif name == "output.weight":
                gname = "output.weight"
            else:
                _, i, rest = name.split(".", 2)
                gname = f"blk.{i}.{_LAYER[rest]}"
                if arch == "llama" and rest in ("attention.wq.weight", "attention.wk.weight"):
                    t = permute_qk(t, args.n_heads if "wq" in rest else args.n_kv_heads)
            a = t.float().contiguous().numpy()
            if qtype is None or a.ndim == 1:
                w.add_tensor(gname, a.astype(np.float32))
            else:
                w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info(f"exported {step_dir} as GGUF {arch} ({dtype}, {len(tokens)} tokens) in {progress.elapsed():.1f}s -> {out}")
    return out
