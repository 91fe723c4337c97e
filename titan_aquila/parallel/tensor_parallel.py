"""Tensor + sequence parallelism with `parallelize_module` (Megatron layout).

Per block, for TP degree t (heads, KV heads and FFN units split t ways; GQA stays correct because query head group
g and KV head g land on the same rank when t divides both H and G):

    attention_norm, ffn_norm    SequenceParallel        activations sharded on the sequence dim between blocks
    attention, feed_forward     PrepareModuleInput      all-gather the sequence: Shard(1) -> Replicate
    wq, wk, wv, w1, w3          ColwiseParallel         output features (heads / FFN units) split; q/k/v bias too
    wo, w2                      RowwiseParallel         reduce-scatter back to Shard(1)
    moe (router + experts)      replicated across TP    input gathered, output re-sharded on the sequence dim
                                                        (expert parallelism, not TP, is how experts are split)

Root: token embedding RowwiseParallel (vocab rows split, output Shard(1)); final norm SequenceParallel; output layer
ColwiseParallel gathering the logits (Replicate), which validation, the growth audit and
parallelism.disable_loss_parallel use; the training loss otherwise bypasses it and runs on each rank's vocab rows of
its weight (loss parallel: parallel/loss_parallel.py). With tied embeddings the table is used twice with different
layouts, so it stays replicated (the tied models here are small). Without sequence parallelism the same plan runs
with replicated activations.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from titan_aquila.logging import logger


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """The plan of the module docstring over `tp_mesh` (heads, KV heads and ffn_dim divisible by its size, and
    seq_len too with `sequence_parallel`: checked by titan_aquila/config/validate.py)."""
    args, tp, sp = model.args, tp_mesh.size(), sequence_parallel
    seq = Shard(1) if sp else Replicate()

    if not args.tie_embeddings:
        root = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
                "output": ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)}
        if sp:
            root["norm"] = SequenceParallel()
    elif sp:
        # Replicated tied table: cut its output on the sequence dim for the blocks, gather it back before the
        # final norm and the tied output matmul.
        root = {"tok_embeddings": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                      use_local_output=True),
                "norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                           use_local_output=True)}
    else:
        root = {}
    if root:
        parallelize_module(model, tp_mesh, root)

    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
        }
        if sp:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        if block.moe_enabled:
            plan["moe"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
            if sp:
                parallelize_module(block, tp_mesh, {"moe": PrepareModuleOutput(
                    output_layouts=(Replicate(), Replicate()), desired_output_layouts=(Shard(1), Replicate()),
                    use_local_output=True)})
        else:
            plan.update({
                "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            })
        parallelize_module(block, tp_mesh, plan)
    logger.info(f"[parallelize] tensor parallel over {tp} ranks"
                f"{' with sequence parallelism' if sp else ''}; heads {args.n_heads}/{tp}, kv heads "
                f"{args.n_kv_heads}/{tp}, ffn {args.ffn_dim}/{tp}"
                f"{'; tied embedding table replicated' if args.tie_embeddings else ''}")
