"""Upcycling on 2 real gloo ranks: FSDP2-sharded MoE loaded from the lazy upcycled state dict.

1. `test_sharded_upcycled_model_equals_dense`: this file is also the worker (`torchrun ... tests/integration/test_upcycle_dist.py
   OUT.json`). Each rank builds the dense model (same seed), upcycles its state dict (8 experts, top-2, Mixtral
   routing; with and without Drop-Upcycling), `fully_shard`s the MoE model (dim-0 shards: rank 0 holds experts 0..3,
   rank 1 experts 4..7) and writes the lazy state dict with `load_model_weights`. Checked: sharded logits = dense
   logits (r = 0, <= 1e-5), the full (unsharded) r = 0.5 weights gathered from the shards = the weights one process
   builds, and each rank called `LazyExperts.make` only for its own experts, once per expert per matrix per layer.
(train.py growing and upcycling on 2 ranks: tests/integration/test_grow_and_train.py.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch  # noqa: E402

E, K, LAYERS = 8, 2, 2
BASE = dict(dim=32, n_layers=LAYERS, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=128, max_seq_len=64,
            init_std=0.1)


def _worker(out_path: str) -> int:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from titan_aquila.checkpoint.weights import load_model_weights
    from titan_aquila.growth import GrowthOptions, LazyExperts, apply_growth, materialize, plan_growth
    from titan_aquila.models.args import ModelArgs
    from titan_aquila.models.aquila import build_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank}
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    src = ModelArgs(**BASE).validate()
    dense = build_model(src, seed=1).eval()
    with torch.no_grad():
        ref = dense(tokens)[0]
    for r in (0.0, 0.5):
        opts = GrowthOptions(drop_ratio=r, seed=5)
        plan = plan_growth(["upcycle"], src, src.replace(n_experts=E, top_k=K, router_order="topk_softmax"), opts)
        sd = apply_growth(plan, dense.state_dict(), opts)
        calls: dict[str, list[int]] = {}
        for name, v in sd.items():
            if isinstance(v, LazyExperts):
                make = v.make
                v.make = lambda e, make=make, name=name: calls.setdefault(name, []).append(e) or make(e)
        model = build_model(plan.dst_args, seed=99)  # different init: every weight must come from the load
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        load_model_weights(model, sd)
        model.eval()
        w1 = dict(model.named_parameters())["layers.0.moe.experts.w1"]
        assert isinstance(w1, DTensor) and w1.to_local().shape[0] == E // world
        with torch.no_grad():
            got = model(tokens)[0]
        full = {k: (t.full_tensor() if isinstance(t, DTensor) else t) for k, t in model.state_dict().items()}
        # Reference weights built by this process alone (fresh makers, all experts).
        alone = apply_growth(plan, dense.state_dict(), opts)
        weight_diff = max((full[k].float() - materialize(v).float()).abs().max().item() for k, v in alone.items())
        single = build_model(plan.dst_args, seed=99).eval()  # the same growth in one unsharded process
        single.load_state_dict({k: materialize(v) for k, v in alone.items()})
        with torch.no_grad():
            single_logits = single(tokens)[0]
        result[str(r)] = {"logit_diff": (got - ref).abs().max().item(), "weight_diff": weight_diff,
                          "single_diff": (got - single_logits).abs().max().item(),
                          "calls": {k: sorted(v) for k, v in calls.items()},
                          "calls_len": {k: len(v) for k, v in calls.items()}}
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    else:
        Path(out_path + f".rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


def test_sharded_upcycled_model_equals_dense(tmp_path):
    out = tmp_path / "result.json"
    from _util import run_workers  # here, not at the top: the torchrun workers import this file from elsewhere

    p = run_workers(__file__, str(out))
    assert p.rc == 0, p.err[-3000:]
    results = [json.loads(out.read_text()), json.loads(Path(str(out) + ".rank1").read_text())]
    for rank, res in enumerate(results):
        mine = list(range(rank * E // 2, (rank + 1) * E // 2))
        for r in ("0.0", "0.5"):
            print(f"\nrank {rank} r={r}: max |sharded - dense logits| {res[r]['logit_diff']:.2e}, "
                  f"max |gathered - single-process weights| {res[r]['weight_diff']:.1e}, experts built {mine}")
            assert res[r]["weight_diff"] == 0.0  # bit-identical: per-expert seeding, no dependence on the rank
            names = {f"layers.{i}.moe.experts.{w}" for i in range(LAYERS) for w in ("w1", "w2", "w3")}
            assert set(res[r]["calls"]) == names
            assert all(v == mine for v in res[r]["calls"].values()), res[r]["calls"]  # once per own expert
            assert res[r]["single_diff"] <= 1e-5  # sharded forward = the single-process model's forward
        assert res["0.0"]["logit_diff"] <= 1e-5
        # Drop-Upcycling changes the function, by what the single-process model says (not just "somehow")
        assert res["0.5"]["logit_diff"] > 1e-3


if __name__ == "__main__":
    code = 1
    try:
        code = _worker(sys.argv[1])
    finally:
        os._exit(code)
