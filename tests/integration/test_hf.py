"""HF safetensors export/import checked against transformers itself (fp32, logits not argmax).

Export: a random tiny titan model -> DCP checkpoint -> export-hf -> transformers *ForCausalLM gives the same
logits (max |diff| <= 1e-5) for dense Llama (GQA, tied and untied), Qwen2 (q/k/v bias), Mixtral, Qwen2-MoE
(gated shared expert, softmax_topk, interleaved dense layers) and Qwen2-MoE without shared expert.
Import: an HF-created random model -> import-hf -> our model gives HF's logits; export again -> every tensor
byte-identical to the original safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titan_aquila.checkpoint.storage import read_checkpoint_args, read_model_state_dict, write_model_checkpoint
from titan_aquila.convert.hf import export_hf, import_hf
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers not installed (test extra: pip install -e .[test])")
TOL = 1e-5
BASE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=96, max_seq_len=64,
            rope_theta=10000.0, norm_eps=1e-5, init_std=0.1)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


def _titan_logits(args: ModelArgs, sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = build_model(args, "meta")
    model.to_empty(device="cpu")
    model.load_state_dict(sd)
    model.reset_rope()
    with torch.no_grad():
        return model(tokens)[0]


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


CASES = {
    "llama_gqa_untied": (dict(), "LlamaForCausalLM"),
    "llama_gqa_tied": (dict(tie_embeddings=True), "LlamaForCausalLM"),
    "qwen2_bias_tied_mha": (dict(qkv_bias=True, tie_embeddings=True, n_kv_heads=4), "Qwen2ForCausalLM"),
    "qwen2_bias_untied_gqa": (dict(qkv_bias=True, n_kv_heads=1), "Qwen2ForCausalLM"),
    "mixtral": (dict(n_experts=4, top_k=2, moe_ffn_dim=24), "MixtralForCausalLM"),
    "qwen2_moe_shared": (dict(n_experts=4, top_k=2, moe_ffn_dim=16, n_shared_experts=2, shared_expert_gate=True,
                              router_order="softmax_topk", moe_layer_step=2, qkv_bias=True, n_layers=3),
                         "Qwen2MoeForCausalLM"),
    "qwen2_moe_no_shared_bias": (dict(n_experts=4, top_k=2, moe_ffn_dim=16, qkv_bias=True, tie_embeddings=True),
                                 "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_logits(case, tmp_path):
    overrides, hf_class = CASES[case]
    args = ModelArgs(**{**BASE, **overrides}).validate()
    model = build_model(args, seed=3)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_model_checkpoint(tmp_path / "ckpt", sd, args, {})
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    assert config["tie_word_embeddings"] == args.tie_embeddings
    tokens = _tokens(args.vocab_size)
    ours, ref = _titan_logits(args, sd, tokens), _hf_logits(out, tokens)
    diff = (ours - ref).abs().max().item()
    print(f"\n{case}: export -> {hf_class}: max |logit diff| = {diff:.2e} (|logits| up to {ref.abs().max():.2f})")
    assert ref.abs().max() > 0.5  # logits large enough that a wrong mapping shows
    assert diff <= TOL


def _hf_random(kind: str, folder: Path) -> Path:
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1)
    config = {"llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=False),
              "qwen2": lambda: tf.Qwen2Config(**common, tie_word_embeddings=True),
              "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
              "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)}[kind]()
    torch.manual_seed(11)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Small shards so the sharded-with-index layout is exercised.
    model.save_pretrained(str(folder), max_shard_size="20KB")
    return folder


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "mixtral"])
def test_import_from_transformers_then_export_round_trips(kind, tmp_path):
    from safetensors import safe_open

    src = _hf_random(kind, tmp_path / "src")
    assert (src / "model.safetensors.index.json").exists()
    import_hf(src, tmp_path / "ckpt")
    args = read_checkpoint_args(tmp_path / "ckpt")
    sd = read_model_state_dict(tmp_path / "ckpt")
    tokens = _tokens(args.vocab_size)
    diff = (_titan_logits(args, sd, tokens) - _hf_logits(src, tokens)).abs().max().item()
    print(f"\n{kind}: HF random -> import: max |logit diff| = {diff:.2e}")
    assert diff <= TOL
    out = export_hf(tmp_path / "ckpt", tmp_path / "back", arch=kind, dtype="float32")
    original = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            original.update({k: h.get_tensor(k) for k in h.keys()})
    exported = {}
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        exported = {k: h.get_tensor(k) for k in h.keys()}
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


# ---- bad inputs through the CLI: one line on stderr, exit 2, nothing written -----------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titan_aquila.convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0 and "import-hf" in r.stdout and "export-hf" in r.stdout and "import-gguf" in r.stdout
    r = _cli("export-hf", "--help")
    assert r.returncode == 0 and "--arch" in r.stdout and "--overwrite" in r.stdout


def test_cli_bad_inputs(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _hf_random("llama", tmp_path / "src")
    # Unsupported architecture, named.
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _one_line_error(_cli("import-hf", str(bad), str(tmp_path / "o1")), "GPT2LMHeadModel")
    assert not (tmp_path / "o1").exists()
    # A safetensors file missing a tensor, named.
    holed = tmp_path / "holed"
    holed.mkdir()
    (holed / "config.json").write_text((src / "config.json").read_text())
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(holed / "model.safetensors"))
    _one_line_error(_cli("import-hf", str(holed), str(tmp_path / "o2")), "model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "o2").exists()
    # Missing source folder; output that already holds a checkpoint (unless --overwrite).
    _one_line_error(_cli("import-hf", str(tmp_path / "nowhere"), str(tmp_path / "o3")), "does not exist")
    assert not (tmp_path / "o3").exists()
    r = _cli("import-hf", str(src), str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    before = sorted(p.name for p in (tmp_path / "ck").rglob("*"))
    _one_line_error(_cli("import-hf", str(src), str(tmp_path / "ck")), "already holds a checkpoint", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "ck").rglob("*")) == before
    assert _cli("import-hf", str(src), str(tmp_path / "ck"), "--overwrite").returncode == 0
    assert _cli("export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")).returncode == 0
    _one_line_error(_cli("export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")), "already holds a model")
    _one_line_error(_cli("export-hf", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--arch", "qwen2"), "bias")
    _one_line_error(_cli("export-hf", str(tmp_path / "nockpt"), str(tmp_path / "hf3")), "does not exist")
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf3").exists()


@pytest.mark.parametrize("overrides,needle", [
    (dict(n_shared_experts=1, shared_expert_gate=False), "shared_expert_gate"),
])
def test_cli_moe_export_refusals(overrides, needle, tmp_path):
    args = ModelArgs(**{**BASE, "n_experts": 4, "top_k": 2, "moe_ffn_dim": 16, **overrides}).validate()
    sd = build_model(args, seed=0).state_dict()
    write_model_checkpoint(tmp_path / "ckpt", sd, args, {})
    _one_line_error(_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")), needle)
    assert not (tmp_path / "hf").exists()


def test_moe_export_refuses_mixtral_for_softmax_topk_and_nonzero_expert_bias(tmp_path):
    args = ModelArgs(**{**BASE, "n_experts": 4, "top_k": 2, "moe_ffn_dim": 16,
                        "router_order": "softmax_topk"}).validate()
    sd = build_model(args, seed=0).state_dict()
    sd["layers.0.moe.expert_bias"] = torch.tensor([0.1, 0.0, 0.0, -0.1])
    write_model_checkpoint(tmp_path / "ckpt", sd, args, {})
    _one_line_error(_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--arch", "mixtral"),
                    "topk_softmax")
    _one_line_error(_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")), "expert_bias")
    assert not (tmp_path / "hf").exists()
    r = _cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--drop-expert-bias")
    assert r.returncode == 0 and json.loads((tmp_path / "hf" / "config.json").read_text())["norm_topk_prob"] is False
