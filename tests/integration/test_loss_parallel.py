"""The vocab-parallel fused loss (titan_aquila/parallel/loss_parallel.py) on 2 real gloo TP ranks, against the plain
path in one process (full logits, F.cross_entropy, max-z) on the same h, W and labels.

This file is also the worker (`torchrun ... tests/integration/test_loss_parallel.py OUT`). Every rank builds the same
h [2, 10, 16], W [53, 16] (53 rows: an uneven split, 27 + 26) and labels with ignored positions, splits W by rows over
the TP mesh and feeds h whole (replicated, no sequence parallelism) or as Shard(1) (sequence parallelism). CE, the
output z-loss and the gradients of h and W (gathered) must equal the plain path's, for chunks that do and do not
divide the 20 tokens, with and without z. Rows 3 (rank 0) and 40 (rank 1) of W are equal and dominate some tokens'
logits, so their max ties across ranks: the z gradient must go to one row only, the first (as torch.max picks).
A replicated W (tied embeddings) takes the ordinary fused path. Tolerances as tests/unit/test_losses.py: rtol 1e-5,
atol 1e-6 (the paths differ only in summation order).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path



def _worker(out_path: str) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from titan_aquila.parallel.loss_parallel import VocabParallelOutputLoss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    gen = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 10, 16, 53
    h0 = torch.randn(B, T, D, generator=gen) * 2
    w0 = torch.randn(V, D, generator=gen)
    # Token (0, 4) small integers and rows 3 and 40 equal to it: its logit |h|^2 (about 75, every product and sum
    # exact in any order) is its max on both ranks, an exact tie.
    h0[0, 4] = torch.randint(-3, 4, (D,), generator=gen).float()
    w0[3] = w0[40] = h0[0, 4]
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 1] = labels[1, 7] = -100  # ignored: out of the CE mean, still in the z mean
    labels[1, 2], labels[1, 3] = 26, 27  # the last row of rank 0, the first of rank 1

    def plain(h, w, z_coef):
        logits = F.linear(h.flatten(0, 1), w).float()
        ce = F.cross_entropy(logits, labels.flatten())
        z = logits.max(dim=-1).values.pow(2).mean()
        return ce, z, ce + z_coef * z

    def close(got, want, what):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {what}: {m}")
        return (got - want).abs().max().item()

    result = {}
    for layout in ("replicated", "sequence_parallel", "tied"):
        for chunk in (7, 1000):
            for z_coef in (0.0, 0.3):
                h_ref, w_ref = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                ce_ref, z_ref, loss_ref = plain(h_ref, w_ref, z_coef)
                loss_ref.backward()
                w = w0.clone() if layout == "tied" else distribute_tensor(w0.clone(), mesh, [Shard(0)])
                h = distribute_tensor(h0.clone(), mesh, [Shard(1)]) if layout == "sequence_parallel" else h0.clone()
                w.requires_grad_(), h.requires_grad_()
                ce, z = VocabParallelOutputLoss(labels, chunk, with_z=True)(h, w)
                (ce + z_coef * z).backward()
                full = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in (h.grad, w.grad)]
                case = f"{layout} chunk {chunk} z {z_coef}"
                result[case] = {"ce": close(ce, ce_ref, f"{case} ce"), "z": close(z, z_ref, f"{case} z"),
                                "dh": close(full[0], h_ref.grad, f"{case} dh"),
                                "dw": close(full[1], w_ref.grad, f"{case} dw")}
                if z_coef:  # the tie went to row 3 only: the plain path's dW rows 3 and 40 differ
                    assert not torch.equal(w_ref.grad[3], w_ref.grad[40]), "no z tie across the ranks' rows"
    Path(f"{out_path}.rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    return 0


def test_vocab_parallel_loss_and_gradients_equal_the_plain_path(tmp_path):
    from _util import run_workers  # here, not at the top: the torchrun workers import this file from elsewhere

    out = tmp_path / "result"
    p = run_workers(__file__, str(out))
    assert p.rc == 0, p.err[-4000:]
    for rank in range(2):
        res = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert len(res) == 12, sorted(res)  # 3 layouts x 2 chunk sizes x with/without z
        print(f"\nrank {rank}: max |diff| over the cases " +
              ", ".join(f"{k} {max(r[k] for r in res.values()):.1e}" for k in ("ce", "z", "dh", "dw")))


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
