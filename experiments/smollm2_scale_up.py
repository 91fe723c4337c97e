"""Real-model Scale-Up: SmolLM2-135M grown by fpi / aki / aki_pro (+ depth) / exact, then continued pretraining.

    python experiments/smollm2_scale_up.py --steps 40 --batch 1 --seq-len 128 --val-tokens 512 --threads 2  # docs/results.md

AquilaMoE Tables 1-2 on a real pretrained model: the held-out loss right after growth (step 0) and after K AdamW steps
of continued pretraining on the shipped Austen text, next to SmolLM2 itself trained on the same K batches. Every
model sees the same batches (consecutive windows of `assets/text/train/austen_pp_ch01-06.txt`) and is validated on
the same held-out tokens (`assets/text/val/austen_pp_ch07-08.txt`). Targets (growth defaults: unequal split shares,
learnable `exact` padding, growth.seed 0):
    fpi, aki   width x2: dim 576 -> 1152, 9 -> 18 query heads in 3 KV groups, FFN 1536 -> 3072 (468M)
    aki_pro    width x2 and depth 30 -> 36 (interpolation; 550M)
    exact      dim 576 -> 960 (15 heads, FFN 2560): k = 1 copy + 384 padded dims (at x2 `exact` builds exactly the
               tensors of `fpi`, so the non-integer ratio is the informative case)
One process, models one after another (peak ~9 GB for the 550M model with AdamW states); a JSON line per model
goes to --out as soon as it is done.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titan_aquila.convert.gguf import default_gguf_path, read_gguf
from titan_aquila.data.tokenizer import Tokenizer
from titan_aquila.growth import GrowthOptions, apply_growth, plan_growth
from titan_aquila.models.aquila import build_model, rope_cos_sin

REPO = Path(__file__).resolve().parents[1]
WIDE = dict(dim=1152, n_heads=18, ffn_dim=3072, head_dim=None)
TARGETS = {"source": ([], {}), "fpi": (["fpi"], WIDE), "aki": (["aki"], WIDE),
           "aki_pro": (["aki_pro"], dict(WIDE, n_layers=36)),
           "exact": (["exact"], dict(dim=960, n_heads=15, ffn_dim=2560, head_dim=None))}


def tokens(path: str) -> torch.Tensor:
    return torch.tensor(Tokenizer(REPO / "assets/tokenizer/smollm2.tiktoken").encode((REPO / path).read_text()))


def model_from(args, sd):
    """Meta build + assign (no second copy of the weights), RoPE recomputed."""
    m = build_model(args, "meta")
    m.load_state_dict(sd, strict=True, assign=True)
    m.rope_cos, m.rope_sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)
    return m


@torch.no_grad()
def val_loss(model, val: torch.Tensor, T: int) -> float:
    n = (val.numel() - 1) // T
    x, y = val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)
    return sum(F.cross_entropy(model(x[i:i + 1])[0][0], y[i]).item() for i in range(n)) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="continued-pretraining steps K of every model")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    p.add_argument("--val-tokens", type=int, default=256, help="held-out tokens (windows of 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW LR (constant; betas 0.9/0.95, decay 0.1, clip 1)")
    p.add_argument("--methods", default="source,fpi,aki,aki_pro,exact", help="comma-separated, from " +
                   ", ".join(TARGETS))
    p.add_argument("--out", default=str(REPO / "outputs" / "smollm2_scale_up.jsonl"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    src_args, src_sd = read_gguf(default_gguf_path())
    train_ids = tokens("assets/text/train/austen_pp_ch01-06.txt")
    val = tokens("assets/text/val/austen_pp_ch07-08.txt")[:a.val_tokens + 1]
    B, T = a.batch, a.seq_len
    batches = [train_ids[s * B * (T + 1):(s + 1) * B * (T + 1)].view(B, T + 1) for s in range(a.steps)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"SmolLM2-135M, K = {a.steps} steps x {B} x {T} tokens, LR {a.lr}, validation {a.val_tokens} tokens; "
          f"ln V = {math.log(src_args.vocab_size):.3f}", flush=True)
    for name in a.methods.split(","):
        t0 = time.time()
        methods, target = TARGETS[name]
        if methods:
            opts = GrowthOptions()
            plan = plan_growth(methods, src_args, src_args.replace(**target), opts)
            # a private copy: growth may pass some source tensors through, and training updates them in place
            args, sd = plan.dst_args, apply_growth(plan, {k: v.clone() for k, v in src_sd.items()}, opts)
        else:
            args, sd = src_args, {k: v.clone() for k, v in src_sd.items()}
        model = model_from(args, sd)
        del sd
        v0 = val_loss(model, val, 128)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        train_losses = []
        for b in batches:
            loss = F.cross_entropy(model(b[:, :-1])[0].flatten(0, 1), b[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            train_losses.append(round(loss.item(), 4))
        vk = val_loss(model, val, 128)
        row = dict(model=name, methods=methods, dim=args.dim, n_layers=args.n_layers, params=args.num_params(),
                   val_step0=round(v0, 4), val_after=round(vk, 4), steps=a.steps, tokens_per_step=B * T, lr=a.lr,
                   train_losses=train_losses, wall_s=round(time.time() - t0, 1))
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        del model, opt
        gc.collect()


if __name__ == "__main__":
    main()
