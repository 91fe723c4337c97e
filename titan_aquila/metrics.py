"""Console lines, TensorBoard scalars, throughput and MFU.

    tokens/s = global tokens per step / step time          (the console's tok/s; TensorBoard's throughput(tps) is
                                                            per device, tokens/s / devices, as in torchtitan)
    MFU      = tokens/s * flops_per_token / (peak FLOP/s per device * devices)

Peak on CUDA comes from the device's spec sheet (dense bf16, or tf32 = half that for fp32 when TF32 is allowed;
measured on an unknown GPU or for strict fp32); on CPU it is measured once at start-up as the best of a few 1024^3
GEMMs (a @ b and F.linear's a @ b^T) in the training dtype and printed, so MFU on CPU reads "fraction of what this
box's GEMM does".
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from titan_aquila.logging import logger

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
CUDA_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                  "B200": 2250e12}


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, iters: int = 5
                       ) -> float:
    """Best-of-`iters` FLOP/s (2 n^3 per product) of an n x n x n product on `device` with this process's threads,
    over both layouts: a @ b and F.linear(a, b) = a @ b^T, the one every nn.Linear uses. On CPU they take different
    kernels (bf16 linear ran 1.8x faster than bf16 matmul on one of these boxes), and a peak below what the model's
    own GEMMs reach would put MFU above 100%."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for product in (torch.matmul, torch.nn.functional.linear):
        product(a, b)  # warm up the kernel choice
        sync()
        for _ in range(iters):
            t = time.perf_counter()
            product(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in `dtype`, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in CUDA_PEAK_BF16.items() if k in name), None)
        if peak is not None and dtype in (torch.bfloat16, torch.float16):
            return peak, f"{name} dense bf16 spec"
        if peak is not None and torch.backends.cuda.matmul.allow_tf32:
            return peak / 2, f"{name} dense tf32 spec"  # TF32 tensor cores run at half the bf16 rate
        return measure_peak_flops(device, dtype, n=8192, iters=10), f"measured {dtype} 8192^3 GEMM on {name}"
    where = f"measured {dtype} 1024^3 GEMM on {torch.get_num_threads()} thread(s); {cpu_bf16_report(dtype)}"
    return measure_peak_flops(device, dtype), where


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 matmul instruction sets this CPU advertises (x86 /proc/cpuinfo flags): 'AMX-BF16' (tile
    matmul, Sapphire Rapids on) and/or 'AVX512-BF16' (dot products, Cooper Lake / Zen 4 on). oneDNN uses them for
    bf16 GEMMs; without either a bf16 GEMM is emulated and runs far below fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]


def cpu_bf16_report(dtype: torch.dtype, cpuinfo: str | None = None) -> str:
    """One start-up phrase: the CPU's native bf16 support (and torch's CPU kernel level), with a warning when bf16
    is the training dtype but the CPU lacks it."""
    found = cpu_bf16_flags(cpuinfo)
    level = torch.backends.cpu.get_cpu_capability()
    if found:
        return f"native bf16: {' + '.join(found)} (torch CPU kernels {level})"
    if dtype == torch.bfloat16:
        return (f"warning: bf16 training on a CPU without AVX512-BF16/AMX (torch CPU kernels {level}): bf16 GEMMs "
                f"are emulated, usually slower than fp32")
    return f"no native bf16 (no AVX512-BF16/AMX; torch CPU kernels {level})"


def peak_rss_bytes() -> int:
    """High-water resident set of this process image (VmHWM of /proc/self/status). Not getrusage's ru_maxrss: on
    Linux a child starts with its parent's peak at fork and keeps it through exec, so a torchrun worker would report
    the launcher's peak until it outgrows it. ru_maxrss only where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # no /proc
        status = ""
    hwm = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    if hwm:
        return int(hwm[0]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: max allocated on CUDA, peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return peak_rss_bytes() / 2 ** 30


def peak_memory_line(device: torch.device, group=None) -> str:
    """'peak memory per rank: 1.62, 1.65 GiB (...)': every rank's `memory_gib`, gathered (a collective: every rank
    of `group` calls it), for the end of a run: what each rank needed, not only rank 0."""
    import torch.distributed as dist

    mine = torch.tensor([memory_gib(device)], dtype=torch.float64, device=device)
    every = [mine]
    if dist.is_available() and dist.is_initialized():
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
    what = "max allocated" if device.type == "cuda" else "peak resident set, VmHWM"
    return f"peak memory per rank: {', '.join(f'{t.item():.2f}' for t in every)} GiB ({what})"


def drop_summary(drop_fracs: dict[int, float]) -> str:
    """'dropped 3.12% (max 5.00% layer 1)': assignments dropped at capacity, mean over MoE layers and the worst."""
    worst = max(drop_fracs, key=drop_fracs.get)
    mean = sum(drop_fracs.values()) / len(drop_fracs)
    return f"dropped {100 * mean:.2f}% (max {100 * drop_fracs[worst]:.2f}% layer {worst})"


def share_summary(shares: list[float]) -> dict[str, float]:
    """A layer's routing balance in three numbers: the largest and smallest expert share of the routed
    (token, slot) pairs and their coefficient of variation std/mean (0 = perfectly balanced)."""
    mean = statistics.fmean(shares)
    return {"max_share": max(shares), "min_share": min(shares),
            "cv": statistics.pstdev(shares) / mean if mean > 0 else 0.0}


def new_run_folder(root: Path) -> Path:
    """`root/<YYYYmmdd-HHMMSS>` (with `-2`, `-3`, ... when a run started in the same second), so that two runs of
    one job never write into one TensorBoard series."""
    base = root / datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir(parents=True)
    return folder


class MetricsLogger:
    """Console lines and TensorBoard. Every rank calls it; only `rank` 0 writes TensorBoard (and the logger prints
    on rank 0 only). Tags follow torchtitan where they mean the same: loss_metrics/global_avg_loss, grad_norm, lr,
    n_tokens_seen, throughput(tps), tflops, mfu(%), memory/max_active(GiB), time_metrics/end_to_end(s),
    validation_metrics/loss. Expert loads are summarised per MoE layer (`moe_load/layer{L}/max_share`,
    `min_share`, `cv`) plus one histogram per layer whose bucket e holds expert e's share (`.../shares`)."""

    def __init__(self, metrics_cfg, dump_folder: str, flops_per_token: int, peak_flops: float, n_devices: int,
                 rank: int = 0):
        self.log_freq = metrics_cfg.log_freq
        self.flops_per_token, self.peak, self.n_devices = flops_per_token, peak_flops, n_devices
        self.writer = None
        if rank == 0 and metrics_cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = new_run_folder(Path(dump_folder) / metrics_cfg.save_tb_folder)
            self.writer = SummaryWriter(str(folder))
            logger.info(f"TensorBoard: {folder}")
        # ANSI colours for a human at a terminal; never in pipes or files (tests and log parsers read those).
        color = getattr(sys.stdout, "isatty", lambda: False)() and not metrics_cfg.disable_color_printing
        self._c = {"step": "\033[36m", "loss": "\033[32m", "off": "\033[0m"} if color else dict.fromkeys(
            ("step", "loss", "off"), "")
        self._t0 = 0.0
        self._time = 0.0  # seconds spent in training steps since the last logged step
        self._tokens = 0  # global tokens trained on since the last logged step
        self._steps = 0  # steps since the last logged step

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.log_freq == 0

    def step_started(self) -> None:
        self._t0 = time.perf_counter()

    def step_finished(self, global_tokens: int) -> None:
        """Only the training step is timed: validation and checkpoint saves between steps do not dilute tokens/s."""
        self._time += time.perf_counter() - self._t0
        self._tokens += global_tokens
        self._steps += 1

    def log_step(self, step: int, losses: dict[str, float], lr: float, grad_norm: float, n_tokens_seen: int,
                 expert_fracs: dict[int, list[float]], device, drop_fracs: dict[int, float] | None = None) -> None:
        """`losses`: 'ce' and, when the run has them, 'load_balance' and 'z' (means over the global batch).
        drop_fracs (capacity-factor routing): layer -> fraction of its (token, slot) assignments dropped in this
        step; the console shows the mean over layers and the worst layer."""
        tps = self._tokens / self._time if self._time > 0 else 0.0
        step_time = self._time / max(self._steps, 1)
        self._time, self._tokens, self._steps = 0.0, 0, 0
        mfu = 100 * tps * self.flops_per_token / (self.peak * self.n_devices) if self.peak > 0 else float("nan")
        mem = memory_gib(device)
        c = self._c
        parts = [f"{c['step']}step {step:5d}{c['off']}", f"{c['loss']}loss {losses['ce']:.4f}{c['off']}"]
        parts += [f"{short} {losses[key]:.4f}" for key, short in (("load_balance", "lb"), ("z", "z")) if key in losses]
        parts += [drop_summary(drop_fracs)] if drop_fracs else []
        parts += [f"lr {lr:.2e}", f"gnorm {grad_norm:.3f}", f"tok/s {tps:,.0f}", f"mfu {mfu:.2f}%",
                  f"peak mem {mem:.2f}GiB"]
        logger.info("  ".join(parts))
        self.write(step, {"loss_metrics/global_avg_loss": losses["ce"],
                          **{f"loss_metrics/{k}": v for k, v in losses.items() if k != "ce"},
                          "lr": lr, "grad_norm": grad_norm, "n_tokens_seen": n_tokens_seen,
                          "throughput(tps)": tps / self.n_devices,
                          "tflops": tps * self.flops_per_token / self.n_devices / 1e12, "mfu(%)": mfu,
                          "memory/max_active(GiB)": mem, "time_metrics/end_to_end(s)": step_time})
        self.write_expert_load(step, "moe_load", expert_fracs, drop_fracs)

    def log_validation(self, step: int, loss: float, n_tokens: int, seconds: float | None = None,
                       expert_fracs: dict[int, list[float]] | None = None,
                       drop_fracs: dict[int, float] | None = None) -> None:
        """The validation loss, and (MoE) each layer's expert shares of the validation tokens' routing slots under
        `validation_metrics/moe_load/...`: the same held-out batches every time, so these show the router itself
        moving (step 0 is the growth audit's value, before any update)."""
        took = f"  in {seconds:.2f}s" if seconds is not None else ""
        drops = f"  {drop_summary(drop_fracs)}" if drop_fracs else ""
        logger.info(f"step {step:5d}  validation loss {loss:.4f}  ({n_tokens:,} tokens){drops}{took}")
        self.write(step, {"validation_metrics/loss": loss})
        self.write_expert_load(step, "validation_metrics/moe_load", expert_fracs or {}, drop_fracs)

    def log_sources(self, step: int, tokens: dict[str, float]) -> None:
        """Training tokens taken from each source of a mixture so far (all ranks), and their shares."""
        total = sum(tokens.values()) or 1.0
        logger.info(f"step {step:5d}  tokens by source: " + "  ".join(
            f"{k} {int(n):,} ({100 * n / total:.1f}%)" for k, n in tokens.items()))
        self.write(step, {f"data/tokens/{k}": n for k, n in tokens.items()})
        self.write(step, {f"data/share/{k}": n / total for k, n in tokens.items()})

    def log_source_validation(self, step: int, name: str, loss: float, n_tokens: int) -> None:
        """One source's validation loss (a mixture); `log_validation` then logs their weighted mean."""
        logger.info(f"step {step:5d}  validation {name} loss {loss:.4f}  ({n_tokens:,} tokens)")
        self.write(step, {f"validation_metrics/{name}/loss": loss})

    def write_expert_load(self, step: int, prefix: str, expert_fracs: dict[int, list[float]],
                          drop_fracs: dict[int, float] | None = None) -> None:
        if self.writer is None:
            return
        self.write(step, {f"{prefix}/layer{layer}/dropped_frac": f for layer, f in (drop_fracs or {}).items()})
        for layer, shares in expert_fracs.items():
            self.write(step, {f"{prefix}/layer{layer}/{k}": v for k, v in share_summary(shares).items()})
            # Bucket e (upper edge e + 0.5) holds expert e's share: the whole distribution, exactly, in one event.
            self.writer.add_histogram_raw(
                f"{prefix}/layer{layer}/shares", min=0, max=len(shares) - 1, num=sum(shares),
                sum=sum(e * x for e, x in enumerate(shares)), sum_squares=sum(e * e * x for e, x in enumerate(shares)),
                bucket_limits=[e + 0.5 for e in range(len(shares))], bucket_counts=list(shares), global_step=step)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
