"""Meta build + sharded init through train.py: every layout starts from the same weights, bit for bit.

`training.steps = 0` builds, initialises and saves step-0 without any optimizer step, so the saved weights are the
initial ones: a 4-rank FSDP2 x TP2 run and a 2-rank EP run (each rank drew only its shards) must store exactly
the tensors `build_model(args, seed)` draws in one process. Then the first training step: identical step-1 losses at 1, 2 and 4 ranks.
"""

import re

import torch
from torch.distributed.checkpoint import FileSystemReader

from _util import TINY, losses, run_train, tiny_config
from titan_aquila.checkpoint.storage import read_model_state_dict
from titan_aquila.models.args import build_model_args
from titan_aquila.models.aquila import build_model

MOE = {"n_experts": 4, "top_k": 2, "moe_ffn_dim": 32}


def test_initial_weights_are_bit_identical_for_any_layout(tmp_path):
    saved = {}
    for name, nproc, flags in (("fsdp_tp", 4, ("--parallelism.tensor_parallel_degree", "2")),
                               ("ep", 2, ("--parallelism.expert_parallel_degree", "2"))):
        cfg = tiny_config(tmp_path, name=name, flavor="debugmoe", overrides=MOE, training={"steps": 0},
                          checkpoint={"enable": True})
        rc, out, err = run_train(cfg, *flags, nproc=nproc, timeout=400)
        assert rc == 0, err
        step0 = tmp_path / name / "checkpoint" / "step-0"
        saved[name] = read_model_state_dict(step0)
        # no optimizer step, no optimizer state saved (creating it would cost 3x the weights, all zeros)
        assert not any(k.startswith("optimizer") for k in FileSystemReader(str(step0)).read_metadata().state_dict_metadata)
    # ... against what build_model draws in one process without any parallel code
    want = build_model(build_model_args("debugmoe", {**TINY, **MOE}), seed=7).state_dict()
    for name, sd in saved.items():
        assert sorted(sd) == sorted(want), name
        for k, v in want.items():
            assert torch.equal(sd[k], v), (name, k)


def test_step_one_losses_equal_at_one_two_and_four_ranks(tmp_path):
    got = {}
    # global batch 4 everywhere: 1 x 4, FSDP 2 x 2, FSDP2 x TP2 (2 data-parallel ranks) 2 x 2
    for nproc, batch, flags in ((1, 4, ()), (2, 2, ()), (4, 2, ("--parallelism.tensor_parallel_degree", "2"))):
        cfg = tiny_config(tmp_path, name=f"w{nproc}", training={"steps": 1, "local_batch_size": batch})
        rc, out, err = run_train(cfg, *flags, nproc=nproc, timeout=400)
        assert rc == 0, err
        got[nproc] = losses(out)[1]
        # the run's last line: every rank's peak resident set (a gather, so rank 0 can print the others')
        peaks = re.search(r"^peak memory per rank: ([\d., ]+) GiB \(peak resident set, VmHWM\)$", out, re.M)
        assert peaks and len(peaks.group(1).split(", ")) == nproc, out[-500:]
        assert all(0.2 < float(x) < 8 for x in peaks.group(1).split(", ")), peaks.group(0)
    assert got[2] == got[1] and got[4] == got[1], got  # the same 4-decimal loss: same weights, same global batch
    assert 10.5 < got[1] < 11.2  # a fresh model: about ln(vocab 49152) = 10.8
