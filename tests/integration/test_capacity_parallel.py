"""Capacity-factor routing under expert parallelism on 2 real gloo ranks, against one process on the same tokens.

This file is also the worker (`torchrun ... tests/integration/test_capacity_parallel.py OUT.json`). Each rank builds
the same tiny MoE model (4 experts, top-2, c = 1; router weights scaled up so routing is skewed and many assignments
drop), keeps an unsharded copy, and parallelizes the other exactly as train.py does (`parallelize_model`: EP 2 over
the two ranks, FSDP2 on the rest). The capacity is per EP rank (Megatron): each rank drops among its own T tokens
before the all-to-all, so rank r's result must equal the single-process model run on rank r's tokens alone:
  - logits and aux losses of rank r = the copy's on the same tokens;
  - the dropped counts per expert of rank r = the copy's (the same assignments dropped);
  - every gradient (full tensors) = the mean over ranks of the copy's gradients (FSDP2/EP average over ranks).
Checked without padding (uneven all-to-all splits) and with `pad_to_capacity` (fixed splits, no count exchange);
and, with padding, under FSDP2 alone (experts sharded like every other weight) with full activation checkpointing
and torch.compile (aot_eager) of every block, where the same must hold (drops compared as fractions: an eagerly
checkpointed block runs its forward again in backward, which counts its assignments twice).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path


BASE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=128, max_seq_len=64, n_experts=4,
            top_k=2, moe_ffn_dim=24, capacity_factor=1.0)


def _worker(out_path: str) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from titan_aquila.config.job_config import JobConfig
    from titan_aquila.models.args import ModelArgs
    from titan_aquila.models.aquila import build_model
    from titan_aquila.parallel.parallel_dims import ParallelDims
    from titan_aquila.parallel.parallelize import parallelize_model
    from titan_aquila.train_utils import moe_modules

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def plan(ep: int, ac_compile: bool):
        cfg = JobConfig()
        cfg.parallelism.expert_parallel_degree = ep
        if ac_compile:
            cfg.activation_checkpoint.mode = "full"
            cfg.compile.enable, cfg.compile.backend = True, "aot_eager"
        dims = ParallelDims.from_config(cfg.parallelism, world)
        dims.build_mesh("cpu")
        return cfg, dims

    data = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(100 + rank))  # this rank's tokens
    tokens, labels = data[:, :-1], data[:, 1:]
    result = {}
    for case, pad, ep, ac_compile in (("ep", False, world, False), ("ep_padded", True, world, False),
                                      ("fsdp_ac_compile_padded", True, 1, True)):
        cfg, dims = plan(ep, ac_compile)
        args = ModelArgs(**BASE, pad_to_capacity=pad).validate()
        ref = build_model(args, seed=3)
        with torch.no_grad():
            for moe in moe_modules(ref).values():
                moe.router.weight.mul_(40)  # skewed routing: c = 1 drops a good share
        model = parallelize_model(copy.deepcopy(ref), dims, cfg)

        def step(m):
            logits, aux = m(tokens)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + 0.01 * aux.sum()
            loss.backward()
            dropped = {layer: moe.tokens_dropped.tolist() for layer, moe in moe_modules(m).items()}
            fraction = {layer: (moe.tokens_dropped.sum() / moe.tokens_per_expert.sum()).item()
                        for layer, moe in moe_modules(m).items()}
            return logits.detach(), aux.detach(), dropped, fraction

        logits, aux, dropped, fraction = step(model)
        ref_logits, ref_aux, ref_dropped, ref_fraction = step(ref)
        grad_diff = 0.0
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")  # compile/AC wrappers
            want = ref_params[name].grad.clone()
            dist.all_reduce(want)
            grad_diff = max(grad_diff, (g - want / world).abs().max().item())
        result[case] = {"logit_diff": (logits - ref_logits).abs().max().item(),
                        "aux_diff": (aux - ref_aux).abs().max().item(), "dropped": dropped,
                        "ref_dropped": ref_dropped, "fraction": fraction, "ref_fraction": ref_fraction,
                        "grad_diff": grad_diff}
    Path(f"{out_path}.rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


def test_expert_parallel_and_fsdp_with_capacity_equal_single_process_on_the_same_tokens(tmp_path):
    from _util import run_workers  # here, not at the top: the torchrun workers import this file from elsewhere

    out = tmp_path / "result"
    p = run_workers(__file__, str(out))
    assert p.rc == 0, p.err[-3000:]
    assert "expert parallel over 2 ranks in 2 MoE layers" in p.out
    assert "activation checkpointing (full)" in p.out and "torch.compile (aot_eager)" in p.out
    per_rank = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    for rank, res in enumerate(per_rank):
        for case, r in res.items():
            print(f"\nrank {rank} {case}: dropped per layer and expert {r['dropped']}; max |logit diff| "
                  f"{r['logit_diff']:.1e}, |aux diff| {r['aux_diff']:.1e}, max |grad diff| {r['grad_diff']:.1e}")
            if case.startswith("ep"):
                assert r["dropped"] == r["ref_dropped"]  # the same assignments dropped, per rank
            assert r["fraction"] == r["ref_fraction"]
            # of 64 assignments per layer (C = 16): every layer drops some, >= 4 in all (weights from the seeded init)
            assert all(f >= 1 / 64 for f in r["ref_fraction"].values()) and sum(r["ref_fraction"].values()) >= 4 / 64
            assert r["logit_diff"] <= 2e-5 and r["aux_diff"] <= 1e-6 and r["grad_diff"] <= 2e-5
    # each rank's drops come from its own tokens: the two ranks' tokens differ, so do their drops
    assert per_rank[0]["ep_padded"]["dropped"] != per_rank[1]["ep_padded"]["dropped"]


if __name__ == "__main__":
    code = 1
    try:
        code = _worker(sys.argv[1])
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)
