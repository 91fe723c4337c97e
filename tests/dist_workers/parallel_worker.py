"""Train a tiny model a few steps with `parallelize_model` and compare with an unparallelized reference.

    torchrun --standalone --nproc_per_node=N tests/dist_workers/parallel_worker.py SPEC.json
    python tests/dist_workers/parallel_worker.py SPEC.json            (one process: float8 / compile / AC only)

SPEC: {"model": ModelArgs overrides, "cfg": JobConfig sections (parallelism, training, compile, ...), "steps",
"lr", "global_batch", "seq", "optimizer": "sgd" (default: a wrongly scaled gradient changes the result) | "adamw",
"max_norm" (default: no clipping), "reference": true|false, "out": result.json}.

Every rank builds the same model from the same seed; data-parallel rank d trains on slice d of a fixed global
batch. Rank 0 also trains an unparallelized copy whose loss is the mean of the per-slice losses (the exact
quantity the parallel run optimises: the MoE aux losses are per-rank, so this is not the loss of the whole batch).
Rank 0 writes {"losses", "ref_losses", "max_param_diff", "max_count_diff", ...} to SPEC["out"].
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from titan_aquila.parallel.dist_utils import set_per_rank_inductor_cache  # noqa: E402

set_per_rank_inductor_cache()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from titan_aquila.config import JobConfig  # noqa: E402
from titan_aquila.models.aquila import build_model  # noqa: E402
from titan_aquila.models.args import ModelArgs  # noqa: E402
from titan_aquila.optim import param_groups  # noqa: E402
from titan_aquila.parallel.dist_utils import finish, init_distributed, seed_all, world_info  # noqa: E402
from titan_aquila.parallel.parallel_dims import ParallelDims  # noqa: E402
from titan_aquila.parallel.parallelize import parallelize_model  # noqa: E402
from titan_aquila.train_utils import collect_expert_load, full_grad_norm, moe_modules  # noqa: E402

LB, Z = 1e-2, 1e-3  # aux-loss coefficients: large enough that a wrong router gradient shows in the loss


def clean(name: str) -> str:
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def full_state(model) -> dict[str, torch.Tensor]:
    """Unsharded parameters under their model FQNs (collective: every rank must call it)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[clean(name)] = t.detach().float().cpu()
    return out


def make_optimizer(model, kind: str, lr: float):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.AdamW(param_groups(model, 0.1), lr=lr, eps=1e-6, foreach=False)


def step_loss(model, tokens, labels):
    logits, aux = model(tokens)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    return ce + LB * aux[0] + Z * aux[1]


def main(spec: dict) -> int:
    device = init_distributed()
    rank, _, world = world_info()
    cfg = JobConfig.from_dict(spec.get("cfg", {}))
    seed_all(1234)
    args = ModelArgs(**{"vocab_size": 256, "max_seq_len": 64, **spec["model"]}).validate()
    dims = ParallelDims.from_config(cfg.parallelism, world)
    dims.build_mesh(device.type)
    dp_rank, dp = dims.dp_rank(), dims.dp_degree
    B, T, steps = spec.get("global_batch", 4), spec.get("seq", 16), spec.get("steps", 4)
    assert B % dp == 0
    g = torch.Generator().manual_seed(99)
    data = torch.randint(0, args.vocab_size, (steps, B, T + 1), generator=g)

    model = build_model(args, device="cpu", seed=7)
    reference = build_model(args, device="cpu", seed=7) if rank == 0 and spec.get("reference", True) else None
    model = parallelize_model(model, dims, cfg).to(device)
    opt = make_optimizer(model, spec.get("optimizer", "sgd"), spec.get("lr", 0.5))
    ref_opt = make_optimizer(reference, spec.get("optimizer", "sgd"), spec.get("lr", 0.5)) if reference else None

    max_norm = spec.get("max_norm") or float("inf")  # clipping hides a uniformly scaled gradient: off by default
    losses, ref_losses, count_diffs, t0 = [], [], [], time.time()
    for s in range(steps):
        batch = data[s, dp_rank * (B // dp):(dp_rank + 1) * (B // dp)]
        opt.zero_grad(set_to_none=True)
        loss = step_loss(model, batch[:, :-1].to(device), batch[:, 1:].to(device))
        loss.backward()
        full_grad_norm(model, max_norm)
        opt.step()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)  # TP ranks hold equal losses, so the mean over all ranks is the mean over dp
            loss /= world
        losses.append(loss.item())
        load = collect_expert_load(model, dims.dp_mesh.get_group() if world > 1 else None)
        if reference is not None:
            ref_opt.zero_grad(set_to_none=True)
            parts = [step_loss(reference, batch_d[:, :-1], batch_d[:, 1:]) for batch_d in data[s].chunk(dp)]
            ref_loss = torch.stack(parts).mean()
            ref_loss.backward()
            full_grad_norm(reference, max_norm)
            ref_opt.step()
            ref_losses.append(ref_loss.item())
            ref_load = {k: m.tokens_per_expert.clone() for k, m in moe_modules(reference).items()}  # local only
            for m in moe_modules(reference).values():
                m.tokens_per_expert.zero_()
            count_diffs += [float((load[k] - ref_load[k]).abs().max()) for k in ref_load]
    elapsed = time.time() - t0
    state = full_state(model)
    if rank == 0:
        result = {"losses": losses, "ref_losses": ref_losses, "elapsed_s": elapsed, "dims": dims.describe(),
                  "expert_tokens": {str(k): v.tolist() for k, v in load.items()}}
        if reference is not None:
            ref_state = full_state(reference)
            assert set(ref_state) == set(state), sorted(set(ref_state) ^ set(state))
            result["max_param_diff"] = max(float((state[k] - ref_state[k]).abs().max()) for k in state)
            result["max_count_diff"] = max(count_diffs, default=0.0)
        with open(spec["out"], "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    import faulthandler

    # A hung collective would otherwise wait for the 10-minute process-group timeout: dump stacks and exit instead.
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT_S", "240")), exit=True)
    code = 1
    try:
        with open(sys.argv[1]) as f:
            code = main(json.load(f))
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finish(code)
