"""metrics: peak memory and FLOP accounting."""

import subprocess
import sys

from titan_aquila.models.args import ModelArgs

CHILD = """
import torch
from titan_aquila.metrics import memory_gib, peak_rss_bytes
before = peak_rss_bytes()
x = torch.ones(64 * 2**20)  # 256 MiB, touched
after = peak_rss_bytes()
del x
print(before, after, peak_rss_bytes(), memory_gib(torch.device("cpu")) * 2**30)
"""


def test_peak_rss_is_this_process_high_water_mark_in_bytes():
    # A fresh interpreter, so the number is its own: 256 MiB more after the allocation, still there after the free.
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    before, after, later, gib = map(float, out)
    assert 250 * 2**20 < after - before < 300 * 2**20
    # The kernel's per-CPU RSS counters are approximate (VmHWM can read a few hundred KiB lower later on).
    assert later > after - 2**20 and abs(gib - later) < 2**20


def test_flops_per_token_counts_moe_active_experts_only():
    dense = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=100)
    moe = dense.replace(n_experts=8, top_k=2, moe_ffn_dim=40)
    # top-2 of 8 experts: twice the dense FFN matmuls plus the router, per layer; attention and output unchanged.
    extra = 2 * (2 * 3 * 16 * 40 - 3 * 16 * 40 + 16 * 8)
    assert moe.flops_per_token(seq_len=8) - dense.flops_per_token(seq_len=8) == 6 * extra


def test_cpu_bf16_flags_and_report():
    import torch

    from titan_aquila.metrics import cpu_bf16_flags, cpu_bf16_report

    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    spr = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    avx2 = "flags\t\t: fpu sse4_2 avx2 fma\n"
    assert cpu_bf16_flags(zen4) == ["AVX512-BF16"]
    assert cpu_bf16_flags(spr) == ["AMX-BF16", "AVX512-BF16"]
    assert cpu_bf16_flags(avx2) == []
    assert cpu_bf16_report(torch.bfloat16, spr).startswith("native bf16: AMX-BF16 + AVX512-BF16 (torch CPU kernels ")
    assert cpu_bf16_report(torch.bfloat16, avx2).startswith("warning: bf16 training on a CPU without AVX512-BF16/AMX")
    assert cpu_bf16_report(torch.float32, avx2).startswith("no native bf16")
