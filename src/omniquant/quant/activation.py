"""Activation quantization: per-token, dynamic, min-max fake quantization through hooks.

Every quantized linear's input is quantized by a forward pre-hook; with `quantize_qkv`, the query,
key and value projections' outputs are quantized per token and per head by forward hooks (so
"W4A4" also means 4-bit keys and values). The softmax output is not quantized. Hooks work on the
model's own modules: no attention code is copied, and gradients pass (straight-through) to LET.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from omniquant.config import ActQuant
from omniquant.models.architecture import Architecture, block_linears
from omniquant.quant.primitives import fake_quantize_per_token

HOOK_FLAG = "_omniquant_act_hooks"


def quantize_heads(x: torch.Tensor, head_dim: int, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-token, per-head fake quantization of a projection output (..., heads * head_dim)."""
    shape = x.shape
    heads = x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim)  # (..., heads, head_dim)
    return fake_quantize_per_token(heads, bits, symmetric).reshape(shape)


def attach_act_quantizers(
    block: nn.Module, spec: ActQuant, arch: Architecture, head_dim: int | None
) -> list[RemovableHandle]:
    """Quantize the inputs of every linear of the block (and q/k/v outputs); returns the hooks."""
    if not spec.enabled:
        return []
    handles: list[RemovableHandle] = []

    def quantize_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (fake_quantize_per_token(args[0], spec.bits, spec.symmetric), *args[1:])

    for linear in block_linears(block).values():
        handles.append(linear.register_forward_pre_hook(quantize_input))
    if spec.quantize_qkv and head_dim and len(arch.qkv) == 3 and not arch.fused_qkv:

        def quantize_output(_: nn.Module, __: Any, out: torch.Tensor) -> torch.Tensor:
            return quantize_heads(out, head_dim, spec.bits, spec.symmetric)

        for name in arch.qkv:
            handles.append(block.get_submodule(name).register_forward_hook(quantize_output))
    setattr(block, HOOK_FLAG, handles)
    return handles


def detach_act_quantizers(block: nn.Module) -> None:
    """Remove the hooks that `attach_act_quantizers` put on the block."""
    for handle in getattr(block, HOOK_FLAG, []):
        handle.remove()
    if hasattr(block, HOOK_FLAG):
        delattr(block, HOOK_FLAG)
