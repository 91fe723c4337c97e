"""float8 training through torchao's `convert_to_float8_training` (torchao is an optional extra).

Each converted Linear computes y = (s_x^-1 q(s_x x)) (s_w^-1 q(s_w W))^T with q = cast to float8 e4m3 after scaling by
s = 448 / amax, per tensor ('tensorwise') or per row ('rowwise'); the backward matmuls cast the output gradient the
same way. On SM89+ GPUs the matmuls run in float8 (`torch._scaled_mm`). Everywhere else `emulate=True` is forced:
the same scaling and rounding, the matmul in high precision, because CPU `_scaled_mm` is a reference kernel at
~0.03 GFLOP/s (measured with torch 2.13). Stacked MoE experts ([E, ...] parameters, not Linear) stay in high precision:
torchao's float8 grouped GEMM needs CUDA + triton.

Which Linear layers convert (decision): every one except
  - those whose name contains an entry of `float8.filter_fqns` (default ['output']: the LM head's rounding hurts
    the loss most), and
  - `shared_expert_gate` ([1, D], a matrix-vector product float8 cannot speed up).
A Linear with in/out features not divisible by 16 (the float8 GEMM's alignment rule) that no filter excludes is
a UserError naming it, rather than a silent skip: the user asked for float8 and should know what stays in bf16.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from titan_aquila.errors import UserError
from titan_aquila.logging import logger

ALWAYS_HIGH_PRECISION = ("shared_expert_gate",)


def _torchao():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise UserError(f"float8.enable needs torchao ({e}); install it with pip install 'titan_aquila[float8]' "
                        f"or pip install torchao") from None
    return Float8LinearConfig, convert_to_float8_training


def float8_plan(model: nn.Module, filter_fqns) -> tuple[list[str], list[str]]:
    """(names to convert, names kept in high precision); UserError for an unfiltered misaligned Linear."""
    convert, keep = [], []
    for fqn, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if any(name in fqn for name in list(filter_fqns) + list(ALWAYS_HIGH_PRECISION)):
            keep.append(fqn)
        elif m.in_features % 16 or m.out_features % 16:
            raise UserError(f"float8: Linear '{fqn}' is {m.in_features} -> {m.out_features}, not divisible by 16; "
                            f"add '{fqn.split('.')[-1]}' (or '{fqn}') to float8.filter_fqns to keep it in high "
                            f"precision")
        else:
            convert.append(fqn)
    if not convert:
        raise UserError("float8.enable: no Linear layer is left to convert (all are in float8.filter_fqns)")
    return convert, keep


def float8_emulated(f) -> bool:
    real = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    return f.emulate or not real


def apply_float8(model: nn.Module, f) -> None:
    """Convert the Linear layers `float8_plan` picks, with the `[float8]` section `f`'s recipe."""
    Float8LinearConfig, convert_to_float8_training = _torchao()
    convert, keep = float8_plan(model, f.filter_fqns)
    emulate = float8_emulated(f)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(f.recipe_name), emulate=emulate,
                                 enable_fsdp_float8_all_gather=f.enable_fsdp_float8_all_gather)
    chosen = set(convert)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in chosen or
                               not isinstance(m, nn.Linear))
    logger.info(f"[parallelize] float8 {f.recipe_name}{' (emulated)' if emulate else ''}"
                f"{' with float8 FSDP all-gather' if f.enable_fsdp_float8_all_gather else ''}: {len(convert)} Linear "
                f"layers converted; kept in high precision: {', '.join(keep) or 'none'}")
