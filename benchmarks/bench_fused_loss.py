"""Memory and time of the fused chunked output + cross-entropy (titan_aquila/losses.py) vs the plain path
(logits = h W^T, then F.cross_entropy on fp32 logits), forward + backward of the loss alone.

    python benchmarks/bench_fused_loss.py            # a few minutes on the 2-core box
    python benchmarks/bench_fused_loss.py --smoke    # seconds

Memory ("loss peak"): the most bytes of tensors alive at once while the loss runs forward and backward, beyond its
inputs (h [N, D], W [V, D]); it includes the gradients dh and dW both paths must return. Counted exactly by a
dispatch mode that adds each new tensor storage's size and subtracts it when the storage is freed, on the meta
device (shapes and the allocation sequence of the real ops, no arithmetic), so it takes no time, does not depend on
the machine's load, and is what a GPU's caching allocator would be asked for. Checked against the real thing on a
shape that fits here: peak resident-set growth of a fresh process running the same loss on real tensors.
Time: the two paths interleaved in one process on real tensors (common.interleaved), fp32 and bf16 autocast.
Target (SmolLM2 width D = 576): loss peak at seq 8192, vocab 151,851 <= 1/4 of the plain path; time no worse.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import torch
import torch.nn.functional as F
from common import ROOT, base_parser, interleaved, ratio, setup, write_result
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from titan_aquila.losses import linear_cross_entropy
from titan_aquila.metrics import peak_rss_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (freed ones are subtracted).
    `inputs`' storages count as existing (0 bytes), so views of them (W^T, slices of h) are not new memory."""

    def __init__(self, inputs=()):
        super().__init__()
        self.live: dict[int, int] = {t.untyped_storage()._cdata: 0 for t in inputs}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out


def loss_inputs(n: int, dim: int, vocab: int, dtype: torch.dtype, device: str):
    h = torch.empty(n, dim, dtype=dtype, device=device)
    w = torch.empty(vocab, dim, dtype=dtype, device=device)
    if device != "meta":  # in place: no temporaries to raise the resident-set high-water mark
        h.normal_()
        w.normal_(std=0.02)
    labels = torch.randint(0, vocab, (n,), device=device) if device != "meta" else torch.zeros(n, dtype=torch.long,
                                                                                                 device=device)
    return h.requires_grad_(), w.requires_grad_(), labels


def loss_step(path: str, h, w, labels, chunk: int) -> None:
    if path == "fused":
        ce, _ = linear_cross_entropy(h, w, labels, chunk)
    else:
        ce = F.cross_entropy(F.linear(h, w).float(), labels)
    ce.backward()


def meta_peak(path: str, n: int, dim: int, vocab: int, dtype: str, chunk: int) -> int:
    h, w, labels = loss_inputs(n, dim, vocab, DTYPES[dtype], "meta")
    with LiveBytes((h, w, labels)) as tracker:
        loss_step(path, h, w, labels, chunk)
        del h, w  # their .grad stay alive in the count: the result of the step
    return tracker.peak


def child(path: str, n: int, dim: int, vocab: int, chunk: int) -> None:
    """Fresh process: peak resident-set growth of one fp32 loss step (printed as JSON)."""
    torch.set_num_threads(1)
    h, w, labels = loss_inputs(n, dim, vocab, torch.float32, "cpu")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass
    base = peak_rss_bytes()
    loss_step(path, h, w, labels, chunk)
    print(json.dumps({"rss_growth": peak_rss_bytes() - base}))


def real_peak(path: str, n: int, dim: int, vocab: int, chunk: int) -> int:
    cmd = [sys.executable, __file__, "--child", path, str(n), str(dim), str(vocab), str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_growth"]


def main(argv=None) -> int:
    p = base_parser("bench_fused_loss", __doc__)
    p.add_argument("--dim", type=int, default=576, help="hidden size (576 = SmolLM2-135M)")
    p.add_argument("--seqs", default="2048,8192", help="tokens per micro-batch (batch 1)")
    p.add_argument("--vocabs", default="49152,151851", help="49152 = SmolLM2, 151851 = Qwen2")
    p.add_argument("--chunk", type=int, default=1024, help="training.loss_chunk_size")
    p.add_argument("--check", default="2048,49152", help="seq,vocab measured for real (peak RSS) as a check")
    p.add_argument("--time-tokens", type=int, default=1024, help="tokens of the timed loss steps")
    p.add_argument("--time-vocab", type=int, default=49152)
    p.add_argument("--child", nargs=5, help=argparse_suppress())
    a = p.parse_args(argv)
    if a.child:
        path, *nums = a.child
        child(path, *map(int, nums))
        return 0
    if a.smoke:
        a.dim, a.seqs, a.vocabs, a.chunk, a.check, a.time_tokens, a.time_vocab = 64, "256", "1000", 64, "256,1000", \
            128, 1000
    setup(a)
    rows = []
    for dtype in ("fp32", "bf16"):
        for seq in map(int, a.seqs.split(",")):
            for vocab in map(int, a.vocabs.split(",")):
                plain, fused = (meta_peak(pth, seq, a.dim, vocab, dtype, a.chunk) for pth in ("plain", "fused"))
                rows.append({"dtype": dtype, "seq": seq, "vocab": vocab, "plain_gib": plain / 2 ** 30,
                             "fused_gib": fused / 2 ** 30, "fused_over_plain": fused / plain,
                             "logits_fp32_gib": seq * vocab * 4 / 2 ** 30})
                r = rows[-1]
                print(f"{dtype} seq {seq:5} vocab {vocab:6}: loss peak plain {r['plain_gib']:6.2f} GiB, fused "
                      f"{r['fused_gib']:5.2f} GiB ({r['fused_over_plain']:.3f}x)", flush=True)
    seq, vocab = map(int, a.check.split(","))
    check = {"seq": seq, "vocab": vocab, "dtype": "fp32"}
    for pth in ("plain", "fused"):
        check[f"{pth}_rss_gib"] = real_peak(pth, seq, a.dim, vocab, a.chunk) / 2 ** 30
        check[f"{pth}_meta_gib"] = meta_peak(pth, seq, a.dim, vocab, "fp32", a.chunk) / 2 ** 30
    print(f"check, real fp32 seq {seq} vocab {vocab}: peak RSS growth plain {check['plain_rss_gib']:.2f} GiB "
          f"(counted {check['plain_meta_gib']:.2f}), fused {check['fused_rss_gib']:.2f} GiB "
          f"(counted {check['fused_meta_gib']:.2f})", flush=True)
    timing = {}
    for dtype in ("fp32", "bf16"):
        h, w, labels = loss_inputs(a.time_tokens, a.dim, a.time_vocab, torch.float32, "cpu")

        def run(pth, h=h, w=w, labels=labels, bf16=dtype == "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss_step(pth, h, w, labels, a.chunk)
            h.grad = w.grad = None
        per_round = interleaved({"plain": lambda: run("plain"), "fused": lambda: run("fused")}, a.rounds)
        timing[dtype] = {"plain_over_fused": ratio(per_round, "plain", "fused"),
                         "per_round_s": per_round, "tokens": a.time_tokens, "vocab": a.time_vocab}
        print(f"time {dtype} ({a.time_tokens} tokens, vocab {a.time_vocab}): plain / fused "
              f"{timing[dtype]['plain_over_fused']:.2f}x", flush=True)
    write_result("bench_fused_loss", a, {"dim": a.dim, "chunk": a.chunk, "memory": rows, "real_check": check,
                                         "time": timing})
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
