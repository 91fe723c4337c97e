"""export-gguf: dense llama and qwen2 give transformers' GGUF loader our logits (float32, 1e-5) and its tokenizer
our ids; a Mixtral-style MoE (which transformers cannot load from GGUF) round-trips exactly through our import."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from titan_aquila.checkpoint.storage import write_model_checkpoint
from titan_aquila.convert.gguf import read_gguf
from titan_aquila.convert.gguf_export import export_gguf
from titan_aquila.data.tokenizer import Tokenizer
from titan_aquila.errors import UserError
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("gguf", "transformers")),
                                reason="needs gguf and transformers")
FIXTURE = sorted((ROOT / "assets" / "text").rglob("*.txt"))
BASE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=640, max_seq_len=64,
            rope_theta=10000.0, norm_eps=1e-5, init_std=0.1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tok")
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train([str(f) for f in FIXTURE], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(out / "tokenizer.json"))
    return out


def _checkpoint(tmp: Path, **overrides):
    args = ModelArgs(**{**BASE, **overrides}).validate()
    model = build_model(args, seed=5)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_model_checkpoint(tmp / "ck", sd, args, {})
    return args, model.eval()


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True, tie_embeddings=True)], ids=["llama", "qwen2"])
def test_dense_gguf_matches_transformers_loader(overrides, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args, model = _checkpoint(tmp_path, **overrides)
    out = export_gguf(tmp_path / "ck", tmp_path / "m.gguf", dtype="float32", tokenizer=str(tokenizer))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)[0]).abs().max().item()
    assert diff <= 1e-5, diff
    ours, theirs = Tokenizer(tokenizer), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for line in [ln for f in FIXTURE for ln in f.read_text().splitlines() if ln.strip()][::40]:
        assert theirs(line, add_special_tokens=False)["input_ids"] == ours.encode(line)


def test_mixtral_gguf_round_trips_through_our_import(tokenizer, tmp_path):
    import gguf

    args, model = _checkpoint(tmp_path, n_experts=4, top_k=2, moe_ffn_dim=24, router_order="topk_softmax")
    export_gguf(tmp_path / "ck", tmp_path / "moe.gguf", dtype="float32", tokenizer=str(tokenizer))
    back_args, sd = read_gguf(tmp_path / "moe.gguf")
    assert (back_args.n_experts, back_args.top_k, back_args.moe_ffn_dim) == (4, 2, 24)
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    reader = gguf.GGUFReader(str(tmp_path / "moe.gguf"))
    assert reader.fields["llama.expert_count"].contents() == 4
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 640  # 600 ids + 40 "[PAD<id>]"
    export_gguf(tmp_path / "ck", tmp_path / "bf16.gguf", tokenizer=str(tokenizer))  # default bfloat16
    _, sd16 = read_gguf(tmp_path / "bf16.gguf")
    w = model.state_dict()["layers.0.moe.experts.w1"]
    assert torch.equal(sd16["layers.0.moe.experts.w1"], w.to(torch.bfloat16).float())


def test_unsupported_moe_is_a_clear_error(tmp_path):
    _checkpoint(tmp_path, n_experts=4, top_k=2, moe_ffn_dim=24, router_order="softmax_topk")
    with pytest.raises(UserError, match="Mixtral-style MoE only"):
        export_gguf(tmp_path / "ck", tmp_path / "x.gguf", tokenizer=None)
    assert not (tmp_path / "x.gguf").exists()
