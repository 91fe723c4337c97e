"""JobConfig: every option of a training job, one dataclass per section; defaults < TOML < command line.

Section and option names follow torchtitan v0.2.2 (`config/job_config.py`) where it has them. The string
under each field is its `--help` text. The mechanism (types, TOML/CLI merging, help) is in parse.py, the rules in validate.py.

    cfg = load_job_config(["--job.config_file", "train_configs/debug_model.toml", "--training.steps", "20"])
    python -m titan_aquila.config --help          # every option with its type, default and meaning
    python -m titan_aquila.config [options]       # print the resolved config as JSON
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from titan_aquila.config import parse as cp
from titan_aquila.config.scaling import Growth, MoE
from titan_aquila.errors import UserError


@dataclass
class Job:
    """Where the job reads its config and writes its outputs."""

    config_file: str | None = None
    """TOML file to load; its values override the defaults and command-line options override it."""
    dump_folder: str = "./outputs"
    """Root folder for everything the job writes (checkpoints, TensorBoard logs)."""
    description: str = ""
    """Free-text description of the job, saved with the config."""
    print_config: bool = False
    """Log the fully resolved config at startup."""


@dataclass
class Model:
    """Which model to build."""

    name: str = "aquila"
    """Model family to build."""
    flavor: str = "debugmodel"
    """Named size preset of the model family (e.g. debugmodel, smollm2_135m, aquila3_7b)."""
    tokenizer_path: str = ""
    """A .tiktoken file, or an HF tokenizer.json of a byte-level BPE (or a folder holding one). Empty: the tokenizer
    of the checkpoint the run starts from (import-hf copies the source's), else assets/tokenizer/smollm2.tiktoken.
    Naming a tokenizer other than the checkpoint's is an error."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelArgs fields to override on the flavor, e.g. `[model.overrides]` `n_layers = 4`; TOML only, checked
    by the model code."""


@dataclass
class Training:
    """Batch, sequence, steps, precision and data."""

    local_batch_size: int = 8
    """Sequences per data-parallel rank in one micro-batch."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = local_batch_size × data-parallel degree; a larger
    multiple of that means gradient accumulation."""
    seq_len: int = 2048
    """Tokens per training sequence."""
    max_norm: float = 1.0
    """Clip the total gradient norm to this value (inf disables clipping)."""
    steps: int = 10000
    """Number of optimizer steps to train for. 0: build, load or grow (and audit), save, stop: no optimizer step,
    so no gradients or AdamW moments are ever allocated (a growth run for a model too big to train here)."""
    seed: int = 42
    """Random seed for model initialisation and data order."""
    deterministic: bool = False
    """Use deterministic algorithms (torch.use_deterministic_algorithms); slower."""
    dataset_path: list[str] = field(default_factory=list)
    """Training text files or folders, or prepared folders (python -m titan_aquila.data prepare); empty = the shipped
    text fixture."""
    datasets: dict = field(default_factory=dict)
    """A mixture of prepared sources instead of dataset_path: [training.datasets.NAME] tables with path (a prepared
    folder), weight (> 0; the share of training sequences, normalised over the sources) and optionally
    validation_path (a prepared folder: one validation loss per source)."""
    mixed_precision_param: Literal["float32", "bfloat16"] = "float32"
    """dtype FSDP2 casts parameters to for compute (MixedPrecisionPolicy.param_dtype); without FSDP, 'bfloat16'
    means bf16 autocast (as in torchtitan)."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """dtype of FSDP2's gradient reduce-scatter (MixedPrecisionPolicy.reduce_dtype)."""
    autocast_dtype: Literal["", "bfloat16"] = ""
    """torch.autocast dtype for forward and loss where FSDP mixed precision does not apply; empty = off."""
    fused_linear_cross_entropy: bool = True
    """Compute the output projection and cross-entropy (and the 'output_max' z-loss) chunk by chunk of tokens, never
    holding the [tokens, vocab] logits (exact to rounding), in training and validation; false = plain logits then
    loss. Under tensor parallelism it is vocab-parallel (parallelism.disable_loss_parallel); a float8 output layer
    uses the plain path."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused output + cross-entropy (its extra memory is about chunk x vocab x 8 bytes)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """When the loss or gradient norm is NaN/Inf: 'stop' the job with an error, or 'skip' the optimizer step."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    return_freed_host_memory: bool = False
    """glibc only: fix malloc's thresholds so that host blocks of 128 KiB and more are mmapped and returned to the OS
    when freed (titan_aquila/host_memory.py). Lowers the peak resident set of FSDP runs on CPU hosts (1.87 instead of
    3.10 GiB per rank measured on 2 ranks) at 20-45% more time on CPU (page faults); for runs short of host memory."""


@dataclass
class Optimizer:
    """AdamW settings."""

    name: Literal["AdamW"] = "AdamW"
    """Optimizer; only AdamW is supported."""
    lr: float = 8e-4
    """Peak learning rate."""
    eps: float = 1e-8
    """Adam epsilon added to the denominator."""
    beta1: float = 0.9
    """Adam β1, decay of the first-moment estimate."""
    beta2: float = 0.95
    """Adam β2, decay of the second-moment estimate."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay."""
    implementation: Literal["foreach", "fused", "for-loop"] = "foreach"
    """AdamW kernel: 'foreach' (multi-tensor), 'fused' (one fused kernel) or 'for-loop' (per parameter)."""


@dataclass
class LRScheduler:
    """Learning-rate schedule: linear warmup, then optional stable phase, then decay to a floor."""

    warmup_steps: int = 200
    """Steps of linear warmup up to optimizer.lr (more than training.steps: clamped to training.steps, with a
    warning)."""
    decay_ratio: float | None = None
    """None = decay over all steps after warmup; a value in (0, 1] = warmup-stable-decay (WSD): hold lr, then
    decay over the last decay_ratio × training.steps steps."""
    decay_type: Literal["linear", "sqrt", "cosine"] = "linear"
    """Shape of the decay from lr down to the floor."""
    min_lr_factor: float = 0.0
    """Learning-rate floor at the end of decay, as a fraction of optimizer.lr."""


@dataclass
class Validation:
    """Held-out loss evaluation during training."""

    enable: bool = False
    """Evaluate the loss on validation data during training."""
    freq: int = 500
    """Validate every this many steps."""
    steps: int = -1
    """Validation batches per evaluation; -1 = the whole validation set."""
    dataset_path: list[str] = field(default_factory=list)
    """Validation text files or folders; empty = the shipped held-out fixture."""
    local_batch_size: int = -1
    """Validation sequences per rank per batch; -1 = training.local_batch_size."""


@dataclass
class Parallelism:
    """Device-mesh degrees and distributed options."""

    data_parallel_replicate_degree: int = 1
    """Replicas in the data-parallel replicate dimension (DDP, or HSDP together with sharding)."""
    data_parallel_shard_degree: int = -1
    """FSDP2 shard degree; -1 = all ranks left over by the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor-parallel degree (1 = off)."""
    expert_parallel_degree: int = 1
    """Expert-parallel degree of MoE layers: experts are split over this many ranks (1 = off)."""
    enable_sequence_parallel: bool = True
    """With tensor parallelism, shard norm inputs and residual activations along the sequence."""
    disable_loss_parallel: bool = False
    """With tensor parallelism and the fused loss (training.fused_linear_cross_entropy): false = loss parallel, each
    TP rank computes the loss on its slice of the vocabulary (no full logits); true = the output layer gathers the
    logits and the plain cross-entropy runs on them."""
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """Free all-gathered FSDP parameters after forward: 'always', 'never' (faster, more memory), or 'default'
    (the parallelize code's choice)."""


@dataclass
class Checkpoint:
    """Distributed checkpoints: periodic saves, resume, and the initial load."""

    enable: bool = False
    """Save checkpoints during training and resume from the latest one in folder."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder."""
    interval: int = 500
    """Save a checkpoint every this many steps."""
    initial_load_path: str | None = None
    """Checkpoint to start from when folder holds none (e.g. a previous stage or an imported model)."""
    initial_load_model_only: bool = True
    """Load only model weights from initial_load_path (no optimizer, scheduler or data state)."""
    keep_latest_k: int = 2
    """Keep only the latest k checkpoints; 0 = keep all."""
    last_save_model_only: bool = False
    """Save the final checkpoint as model weights only (smaller, for export or the next stage)."""
    export_dtype: Literal["float16", "bfloat16", "float32"] = "float32"
    """dtype of the weights in a model-only final checkpoint."""
    async_mode: Literal["disabled", "async"] = "disabled"
    """'async' writes checkpoints in the background while training continues."""
    verify_checksums: bool = True
    """Check every checkpoint file against the sha256 recorded when it was written before loading it (false skips
    the re-read of very large checkpoints; corruption then goes unnoticed)."""


@dataclass
class Metrics:
    """Console and TensorBoard logging."""

    log_freq: int = 10
    """Log metrics every this many steps."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files."""
    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""
    disable_color_printing: bool = False
    """Print console metrics without ANSI colours (colours are used only when stdout is a terminal)."""


@dataclass
class Compile:
    """torch.compile."""

    enable: bool = False
    """Apply torch.compile to the components listed in components."""
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend."""
    components: list[str] = field(default_factory=lambda: ["model"])
    """What to compile: 'model' (each transformer block) and/or 'loss'."""


@dataclass
class ActivationCheckpoint:
    """Activation checkpointing (recompute activations in backward to save memory)."""

    mode: Literal["none", "full", "selective"] = "none"
    """'none', 'full' (every block) or 'selective' (see selective_ac_option)."""
    selective_ac_option: str = "2"
    """For selective mode: a positive integer n (written as a string, as in torchtitan) checkpoints every n-th
    block (0, n, 2n, ...); torchtitan's op-level 'op' is not implemented."""


@dataclass
class Float8:
    """Float8 training of Linear layers with torchao."""

    enable: bool = False
    """Swap Linear layers for torchao Float8Linear."""
    recipe_name: Literal["tensorwise", "rowwise"] = "tensorwise"
    """torchao float8 scaling recipe."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linear layers whose fully-qualified name contains any of these stay in high precision."""
    enable_fsdp_float8_all_gather: bool = False
    """All-gather FSDP parameters in float8 (tensorwise recipe only)."""
    emulate: bool = False
    """Use torchao's float8 emulation instead of float8 kernels (for testing; forced on CPU)."""


@dataclass
class JobConfig:
    """All options of a job. Build with `load_job_config`; `validate()` checks each option's own rules."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    validation: Validation = field(default_factory=Validation)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    compile: Compile = field(default_factory=Compile)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    float8: Float8 = field(default_factory=Float8)
    moe: MoE = field(default_factory=MoE)
    growth: Growth = field(default_factory=Growth)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """`{section: {key: value}}`, JSON-serialisable; saved into checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> JobConfig:
        """Inverse of `to_dict`; missing keys keep defaults, unknown keys are a `UserError` (skipped if not
        `strict`, e.g. for a config saved by an older version). Does not call `validate()`."""
        cfg = cls()
        cp.apply_tables(cfg, d, "in the config dict", strict=strict)
        return cfg

    def validate(self) -> None:
        """Raise one `UserError` listing every violated single-option rule (types, allowed values, ranges);
        the rules are in titan_aquila/config/validate.py, with the ones that span sections (`validate_job`)."""
        from titan_aquila.config.validate import option_errors

        errors = option_errors(self)
        if errors:
            raise UserError("; ".join(errors))


def help_text(prog: str | None = None) -> str:
    """The `--help` text: usage, rules, and every option as `--section.key (type, default D): doc`."""
    return cp.format_help(JobConfig, prog or Path(sys.argv[0]).name or "train.py")


def print_help(prog: str | None = None, file=None) -> None:
    print(help_text(prog), end="", file=file or sys.stdout, flush=True)


def load_job_config(argv: list[str] | None = None, prog: str | None = None) -> JobConfig:
    """Defaults, then `--job.config_file` TOML, then command-line overrides; validated.
    `argv` defaults to `sys.argv[1:]`. `-h`/`--help` prints the help and raises `SystemExit(0)`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help(prog)
        raise SystemExit(0)
    return cp.load(JobConfig, argv)
