"""Activation quantization: per-token, dynamic, min-max fake quantization through hooks.

Every quantized linear's input is quantized by a forward pre-hook. With `quantize_qkv` ("W4A4"
also means 4-bit queries, keys and values), q, k and v are quantized per token and per head:
  - at the "attention" point (default, as the reference code): where the model's attention module
    hands them to its attention function, so after RoPE and any q/k norm, k and v exactly as the KV
    cache stores them. transformers looks the attention function up by name in its registry on
    every call; we register one more name, `omniquant_qkv`, whose function quantizes q, k, v of
    marked modules and then calls the implementation the model had (sdpa, eager, ...);
  - at the "projection" point: the q/k/v projections' outputs (forward hooks), before RoPE.
The softmax output is not quantized. No attention code is copied, and gradients pass
(straight-through) to LET.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from omniquant.config import ActQuant, OmniQuantConfig
from omniquant.models.architecture import Architecture, block_linears, get_module
from omniquant.quant.primitives import fake_quantize_per_token

HOOK_FLAG = "_omniquant_act_hooks"
QKV_PREFIX = "omniquant_qkv_"  # + the model's own implementation: our registry names
QKV_FLAG = "_omniquant_qkv_quant"  # on an attention module: the ActQuant of its q, k, v


def _attention_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """A registered attention implementation, or the module's family's own
    `eager_attention_forward` (eager is not in the registry)."""
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(module).__module__].eager_attention_forward


def qkv_quant_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *args: Any,
    omniquant_inner: str,
    **kwargs: Any,
) -> Any:
    """Attention function: q, k, v (batch, heads, tokens, head_dim) quantized per token and head
    when the module is marked, then the implementation `omniquant_inner` the model had."""
    spec: ActQuant | None = getattr(module, QKV_FLAG, None)
    if spec is not None:
        query, key, value = (
            fake_quantize_per_token(t, spec.bits, spec.symmetric) for t in (query, key, value)
        )
    return _attention_function(module, omniquant_inner)(module, query, key, value, *args, **kwargs)


def _register(inner: str) -> str:
    """Register `omniquant_qkv_<inner>` as an attention function (and with `inner`'s masks)."""
    name = QKV_PREFIX + inner
    AttentionInterface.register(name, partial(qkv_quant_attention, omniquant_inner=inner))
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def mark_attention(attention: nn.Module, spec: ActQuant) -> None:
    """Route the module's attention through `qkv_quant_attention`, quantizing with `spec`.

    The implementation name lives in the model's config, which every block shares; it becomes
    `omniquant_qkv_<the model's own>`, under which modules not marked pass straight through and
    masks are built as before.
    """
    config = attention.config
    current = config._attn_implementation or "eager"
    if not current.startswith(QKV_PREFIX):
        config._attn_implementation = _register(current)
    setattr(attention, QKV_FLAG, spec)


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
    if spec.quantize_qkv and spec.qkv_point == "attention" and arch.attention:
        mark_attention(get_module(block, arch.attention), spec)
    elif spec.quantize_qkv and head_dim and len(arch.qkv) == 3 and not arch.fused_qkv:

        def quantize_output(_: nn.Module, __: Any, out: torch.Tensor) -> torch.Tensor:
            return quantize_heads(out, head_dim, spec.bits, spec.symmetric)

        for name in arch.qkv:
            handles.append(block.get_submodule(name).register_forward_hook(quantize_output))
    setattr(block, HOOK_FLAG, handles)
    return handles


def detach_act_quantizers(block: nn.Module) -> None:
    """Remove the hooks that `attach_act_quantizers` put on the block (a debugging tool: the
    block with float activations again, to compare; no run needs it)."""
    for handle in getattr(block, HOOK_FLAG, []):
        handle.remove()
    if hasattr(block, HOOK_FLAG):
        delattr(block, HOOK_FLAG)
    for module in block.modules():
        if hasattr(module, QKV_FLAG):
            delattr(module, QKV_FLAG)


def attach_act_quantizers_all(model: nn.Module, config: OmniQuantConfig) -> None:
    """Attach the activation quantizers of a weight-activation config to every block."""
    from omniquant.models import decoder_layers, get_architecture
    from omniquant.transforms.let import head_dim_of

    if not config.act.enabled:
        return
    arch = get_architecture(model)
    head_dim = head_dim_of(model, arch)
    for block in decoder_layers(model, arch):
        attach_act_quantizers(block, config.act, arch, head_dim)
