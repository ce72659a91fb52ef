"""What omniquant needs to know about a decoder family, as data.

An `Architecture` names, by dotted module paths, where the decoder blocks, embeddings, final norm
and lm_head live in the Hugging Face model, and, inside one block, which norm feeds which linears
and which projections are q/k/v/o. Every `nn.Linear` inside a block is quantized; nothing outside
the blocks is,
unless asked. No decoder code is copied: calibration runs the model's own block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

NormKind = Literal["rms", "rms_offset", "layernorm"]


@dataclass(frozen=True)
class Architecture:
    """Locations (dotted paths) and facts of one decoder family.

    Block-level paths are relative to one block. `qkv` lists the projections that read the attention
    norm's output (one fused module for Phi-3); `mlp_in` those that read the MLP norm's output.
    `norm_kind`: "rms" (x̂·w), "rms_offset" (Gemma: x̂·(1 + w)), "layernorm" (with bias).
    """

    name: str
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    final_norm: str | None = "model.norm"
    lm_head: str = "lm_head"
    attn_norm: str | None = "input_layernorm"
    attention: str | None = "self_attn"  # the module that calls the attention function
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str | None = "self_attn.o_proj"
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str | None = "mlp.down_proj"
    norm_kind: NormKind = "rms"
    rotary: bool = True
    fused_qkv: bool = False
    qk_norm: bool = False


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path; raises AttributeError naming the missing part."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(root).__name__} has no submodule {path!r} (at {part!r})")
        module = getattr(module, part)
    return module


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of a block, by its dotted name inside the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
