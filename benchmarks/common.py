"""Shared harness for the benchmarks: argument parsing, interleaved timing, training steps, HF twins, JSON output.

Timing rule (the box is a shared 2-core CPU): variants are compared only inside one process, interleaved
round-robin (A, B, A, B, ... with the order reversed every other round so neither always runs right after the
other), and summarised by medians. A ratio is the median over rounds of the per-round ratio of the two variants'
round medians, so a slow period that hits one round hits both variants of that round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ---- CLI and output ----------------------------------------------------------------------------------------
def base_parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions (seconds); for tests")
    p.add_argument("--out", default=None, help=f"JSON result path (default benchmarks/results/{name}.json)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds (default 5, smoke 2)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed")
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.rounds is None:
        args.rounds = 2 if args.smoke else 5


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from titan_aquila.metrics import cpu_bf16_flags

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_isa": cpu_bf16_flags(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "loadavg_at_end": load}


def write_result(name: str, args, result: dict) -> Path:
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
           "smoke": bool(args.smoke), "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    out.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    print(f"wrote {out}")
    return out


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


# ---- timing ------------------------------------------------------------------------------------------------
def interleaved(variants: dict[str, Callable[[], object]], rounds: int, reps: int = 1, warmup: int = 1,
                log: bool = True) -> dict[str, list[float]]:
    """Run each variant `warmup` times, then `rounds` rounds of `reps` timed calls each, alternating the order of
    the variants every round. Returns name -> list (one per round) of the median seconds per call in that round."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                variants[n]()
                ts.append(time.perf_counter() - t0)
            per_round[n].append(statistics.median(ts))
        if log:
            print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {per_round[n][-1] * 1e3:.1f} ms" for n in names),
                  flush=True)
    return per_round


def ratio(per_round: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time(num) / time(den): > 1 means `den` is faster."""
    return statistics.median(a / b for a, b in zip(per_round[num], per_round[den]))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def profile_ops(fn: Callable[[], object], top: int = 12, iters: int = 1, warmup: int = 1) -> dict:
    """torch.profiler (CPU) over `iters` calls of `fn` after `warmup` untimed calls: the `top` aten ops by self CPU time
    per call, and the share of all self time spent in GEMMs (GEMM_OPS) and in fused attention (SDPA kernels).
    Explains a ratio: two implementations that spend most of a step in the same GEMMs cannot differ by more than
    their non-GEMM remainder."""
    for _ in range(warmup):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    share = lambda pred: sum(e.self_cpu_time_total for e in ev if pred(e.key)) / total  # noqa: E731
    return {"self_ms_per_call": total / 1e3 / iters, "gemm_share": share(lambda k: k in GEMM_OPS),
            "sdpa_share": share(lambda k: "scaled_dot_product" in k or "flash_attention" in k),
            "top_ops": [{"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1e3 / iters,
                         "share": e.self_cpu_time_total / total, "calls_per_call": e.count // iters}
                        for e in ev[:top]]}


# ---- memory ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def rss_bytes(part: str = "") -> int:
    """Current resident set of this process: VmRSS, or one part of it: "Anon" (heap, tensors), "File" (mapped
    files: the shared libraries' code pages as they are first executed)."""
    return _status_kib(f"Rss{part}" if part else "VmRSS") * 1024


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel (malloc_trim), so that the resident set
    is the memory still in use and memory freed by one configuration is not silently reused by the next."""
    import gc

    from titan_aquila.host_memory import glibc_function

    gc.collect()
    malloc_trim = glibc_function("malloc_trim")
    if malloc_trim is not None:  # not glibc: nothing to trim
        malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current VmRSS (Linux: `5` into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---- dtypes ------------------------------------------------------------------------------------------------
def bf16_gemm_probe(n: int = 256) -> dict:
    """fp32 and bf16 GEMM FLOP/s at n^3 (metrics.measure_peak_flops). CPUs without native bf16 (no AVX512-BF16 /
    AMX) run bf16 matmuls through a slow generic kernel, 10-100x below fp32, which would make a bf16 benchmark take
    hours and say nothing about our code; scripts then leave bf16 out of their defaults (it can still be forced)."""
    from titan_aquila.metrics import measure_peak_flops

    cpu = torch.device("cpu")
    fp32 = measure_peak_flops(cpu, torch.float32, n=n, iters=3)
    bf16 = measure_peak_flops(cpu, torch.bfloat16, n=n, iters=3)
    return {"n": n, "fp32_gflops": fp32 / 1e9, "bf16_gflops": bf16 / 1e9, "bf16_native": bf16 >= 0.5 * fp32}


def default_dtypes(requested: str | None) -> tuple[list[str], dict | None]:
    """The dtypes to run: `requested` if given, else fp32 plus bf16 when the probe says bf16 GEMMs are native."""
    if requested:
        return requested.split(","), None
    probe = bf16_gemm_probe()
    if not probe["bf16_native"]:
        print(f"note: bf16 GEMM runs at {probe['bf16_gflops']:.1f} GFLOP/s vs fp32 {probe['fp32_gflops']:.1f} "
              f"({probe['n']}^3): no native bf16 on this CPU, bf16 left out (force it with --dtypes fp32,bf16)")
    return (["fp32", "bf16"] if probe["bf16_native"] else ["fp32"]), probe


def llama_args(dim: int, layers: int, vocab: int, seq: int, head_dim: int = 64, ffn_dim: int | None = None, **kw):
    """A Llama-shaped ModelArgs for a given width: dim/head_dim query heads, half as many KV heads (GQA), SwiGLU
    FFN of 8/3 dim rounded up to a multiple of 64 (the Llama rule), vocab and context as given."""
    from titan_aquila.models.args import ModelArgs

    heads = max(dim // head_dim, 1)
    ffn = ffn_dim or 64 * math.ceil(8 * dim / 3 / 64)
    return ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=max(heads // 2, 1), ffn_dim=ffn,
                     vocab_size=vocab, max_seq_len=max(seq, 64), **kw).validate()


# ---- models ------------------------------------------------------------------------------------------------
def build_ours(model_args, seed: int = 0):
    from titan_aquila.models.aquila import build_model

    return build_model(model_args, device="cpu", seed=seed)


def hf_model(model_args):
    """HF LlamaForCausalLM / MixtralForCausalLM (sdpa attention, HF's default experts implementation) of the same
    architecture as `model_args`, with HF's own random init."""
    import transformers
    from titan_aquila.convert.hf_map import export_arch, hf_config

    transformers.logging.set_verbosity_error()
    arch = export_arch(model_args)
    cls_name = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]
    conf_cls = {"llama": transformers.LlamaConfig, "mixtral": transformers.MixtralConfig}[arch]
    cfg = {k: v for k, v in hf_config(model_args, arch).items() if k not in ("architectures", "model_type")}
    config = conf_cls(**cfg)
    config._attn_implementation = "sdpa"
    return getattr(transformers, cls_name)(config).train()


def build_hf_twin(ours, model_args):
    """`hf_model` holding the same weights as `ours`, so both compute the same function (checked by
    `max_logit_diff`)."""
    from titan_aquila.convert.hf_map import export_arch, titan_to_hf

    arch = export_arch(model_args)
    hf = hf_model(model_args)
    sd = titan_to_hf(ours.state_dict(), model_args, arch)
    if arch == "mixtral":  # transformers 5 keeps experts fused in memory: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        for i in range(model_args.n_layers):
            p = f"model.layers.{i}.block_sparse_moe."
            q = f"model.layers.{i}.mlp."
            E = model_args.n_experts
            w1 = torch.stack([sd.pop(f"{p}experts.{e}.w1.weight") for e in range(E)])
            w3 = torch.stack([sd.pop(f"{p}experts.{e}.w3.weight") for e in range(E)])
            w2 = torch.stack([sd.pop(f"{p}experts.{e}.w2.weight") for e in range(E)])
            sd[q + "experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
            sd[q + "experts.down_proj"] = w2
            sd[q + "gate.weight"] = sd.pop(p + "gate.weight")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if model_args.tie_embeddings:  # lm_head shares embed_tokens' storage: loaded with it
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    return hf.train()


def ours_forward(model, fused_labels=None, chunk_size: int = 1024):
    """Our model's forward; with `fused_labels` it returns ((CE, z), aux) from the fused chunked output + loss
    (titan_aquila/losses.py, the trainer's default) instead of (logits, aux)."""
    if fused_labels is None:
        return lambda tokens: model(tokens)
    from titan_aquila.losses import FusedOutputLoss

    head = FusedOutputLoss(fused_labels, chunk_size, with_z=False)
    return lambda tokens: model(tokens, head=head)


def hf_forward(model):
    zero = torch.zeros(2)

    def fwd(tokens):
        return model(input_ids=tokens, use_cache=False).logits, zero
    return fwd


def max_logit_diff(fwd_a, fwd_b, tokens) -> float:
    with torch.no_grad():
        return (fwd_a(tokens)[0].float() - fwd_b(tokens)[0].float()).abs().max().item()


class BlockSwitch:
    """The eager and the per-block compiled decoder blocks of one model, sharing parameters; `use(mode)` puts one
    set in the model, so eager and compiled steps of the same model (and optimizer) can be interleaved.
    Ours compiles as train.py does (`parallelize.apply_compile`: fullgraph dense blocks; fp32 MoE experts stay
    eager); HF compiles each decoder layer whole (what `compile_blocks` does)."""

    def __init__(self, model, hf: bool):
        self.model, self.hf = model, hf
        self.container = model.model.layers if hf else model.layers
        self.keys = list(range(len(self.container))) if hf else list(self.container.keys())
        self.blocks = {"eager": [self.container[k] for k in self.keys]}

    def compile(self) -> None:
        if self.hf:
            compile_blocks(self.model, hf=True, moe=False)
        else:
            from titan_aquila.config.job_config import Compile
            from titan_aquila.parallel.parallelize import apply_compile

            apply_compile(self.model, Compile(enable=True))
        self.blocks["compiled"] = [self.container[k] for k in self.keys]
        self.use("eager")

    def use(self, mode: str) -> None:
        for k, block in zip(self.keys, self.blocks[mode]):
            if self.container[k] is not block:
                self.container[k] = block


def compile_blocks(model, hf: bool, moe: bool) -> None:
    """torch.compile each decoder block (the trainer's strategy, parallelize.apply_compile), for either model."""
    if hf:
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = torch.compile(layers[i])
        return
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=not moe)


def train_step_fn(forward, params, tokens, labels, bf16: bool, aux_coeff: float = 0.0,
                  optimizer: bool = True) -> Callable[[], float]:
    """One training step: zero grads, forward (bf16 autocast or fp32), CE (+ aux), backward, AdamW step.
    `optimizer=False` leaves out the AdamW step (forward + backward only), to separate optimizer cost."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True) if optimizer else None

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, aux = forward(tokens)
        if isinstance(out, tuple):  # fused output + loss: (CE, z) already
            loss = out[0]
        else:
            loss = F.cross_entropy(out.float().flatten(0, 1), labels.flatten())
        if aux_coeff:
            loss = loss + aux_coeff * aux.sum()
        loss.backward()
        if opt is not None:
            opt.step()
        return loss.detach()
    step.optimizer = opt  # for prime_optimizer
    return step


def prime_optimizer(opt) -> None:
    """Create the optimizer's state (AdamW: exp_avg, exp_avg_sq) by one step on zero gradients, so that the next
    training step already holds the steady-state memory (parameters + state + gradients + activations)."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()
