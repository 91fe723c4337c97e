"""The `[moe]` and `[growth]` sections of the job config: how a model is scaled out and up. Each field's docstring is
its `--help` text (titan_aquila/config/parse.py reads them from this source)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MoE:
    """Mixture-of-experts training losses and load balancing."""

    load_balance_coeff: float = 1e-3
    """Weight of the load-balancing auxiliary loss (0 = off)."""
    z_loss_coeff: float = 1e-2
    """Weight of the z-loss (0 = off)."""
    z_loss_type: Literal["router_lse", "router_max", "output_max"] = "router_lse"
    """'router_lse' = mean(logsumexp(router logits)²) (ST-MoE/Megatron), 'router_max' = mean(max router
    logit²), 'output_max' = mean(max LM-head logit²) (Baichuan 2)."""
    aux_loss_reduction: Literal["sum", "mean"] = "sum"
    """'sum': each MoE layer adds its own load-balance and z-loss terms (Megatron, FlagScale); 'mean': their average."""
    bias_update_rate: float = 0.0
    """Step γ of DeepSeek-V3 aux-loss-free balancing: after each step every expert's routing bias moves ±γ
    towards balance; 0 = off."""
    capacity_factor: float | None = None
    """Token dropping: each expert takes at most ceil(c·k·T/E) of the T·k (token, slot) assignments of a
    micro-batch (T = this rank's tokens), keeping the highest router weights; none or 0 = dropless. c >= E/k
    never drops. "Llama 3 Meets MoE" trains with 4 and reaches its best MFU with 1."""
    pad_to_capacity: bool = False
    """With capacity_factor: pad each expert's tokens to exactly the capacity, so every expert GEMM and
    expert-parallel all-to-all has the same shape each step (faster on GPUs, more FLOPs)."""


@dataclass
class Growth:
    """Grow a pretrained source checkpoint into the target model at initial load."""

    enable: bool = False
    """Build the model by growing the source checkpoint with growth.methods instead of a plain load."""
    source_path: str | None = None
    """Checkpoint folder of the source model (its saved model args give the source shape)."""
    methods: list[str] = field(default_factory=list)
    """Growth transforms applied in order, by name: fpi, aki, exact (width); stack, interpolate, zero (depth);
    aki_pro (AKI width + interpolated depth); upcycle (dense -> MoE). E.g. aki_pro,upcycle."""
    noise_std: float = 0.0
    """Std of Gaussian noise added to grown weights to break symmetry (0 = none; not exact)."""
    split_spread: float = 0.5
    """Width growth: copies' outgoing shares u/Σu, u ~ U(1-s, 1+s), exact (docs/growth.md); 0 = equal shares."""
    seed: int = 0
    """Random seed of the growth transforms (noise, router init, dropped indices)."""
    router_init_std: float = 0.02
    """Std of the normal init of new MoE router weights."""
    drop_ratio: float = 0.0
    """Drop-Upcycling: fraction of each expert's FFN neurons re-initialised (0 = plain upcycling)."""
    drop_index_sets: Literal["shared", "per_matrix"] = "shared"
    """Drop-Upcycling: one set of dropped neuron indices shared by an expert's gate/up/down ('shared') or
    drawn independently per matrix ('per_matrix')."""
    granularity: int = 1
    """Fine-grained upcycling: split each dense FFN into this many expert shards (G)."""
    audit: bool = True
    """Before training, evaluate source and grown model on validation data and log the loss difference."""
    audit_steps: int = 4
    """Validation batches used by the growth audit; -1 = the whole validation set (as validation.steps)."""
