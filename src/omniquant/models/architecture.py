"""What omniquant needs to know about a decoder family, as data.

An `Architecture` names, by dotted module paths, where the decoder blocks, embeddings, final norm
and lm_head live in the Hugging Face model, and, inside one block, which norm feeds which linears
and which projections are q/k/v/o. Every `nn.Linear` inside a block is quantized; nothing outside
the blocks is,
unless asked. No decoder code is copied: calibration runs the model's own block.

The record is also the one place that says what other consumers make of the family: which
Hugging Face config `model_type`s it covers, how GGUF writes it for llama.cpp (`GgufSpec`, or
why it cannot), and whether the native decoder runs it (or why not). A new family is one record
here; `tests/models/test_family_records.py` checks every registered one against each consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

NormKind = Literal["rms", "rms_offset", "layernorm"]
# transformers' rope_type values llama.cpp can reproduce (`formats.gguf.rope`)
RopeScaling = Literal["linear", "yarn", "llama3", "longrope"]
# optional keys of llama.cpp's metadata an architecture reads (`formats.gguf.writer.add_metadata`)
GgufKey = Literal[
    "rope_dimension_count",  # rope.dimension_count: the rotated dimensions of a head
    "original_context",  # rope.scaling.original_context_length, even unscaled
    "sliding_window",  # attention.sliding_window (0 when the config has none)
    "sliding_window_pattern",  # the window, which layers slide, and their RoPE base
    "final_logit_softcapping",  # final_logit_softcapping, when the config sets one
]


@dataclass(frozen=True)
class Refusal:
    """A config setting a consumer cannot reproduce, as data (no code): refused when the config's
    `setting` is truthy or, with `unless_equal_to`, when it is set and differs from that other
    setting. `reason` may name the values as {value} and {other}."""

    setting: str
    reason: str
    unless_equal_to: str | None = None

    def check(self, config: Any) -> str | None:
        """Why this config is refused, or None when it is not."""
        value = getattr(config, self.setting, None)
        other = getattr(config, self.unless_equal_to, None) if self.unless_equal_to else None
        if self.unless_equal_to is None:
            refused = bool(value)
        else:
            refused = value is not None and value != other
        return self.reason.format(value=value, other=other) if refused else None


@dataclass(frozen=True)
class GgufSpec:
    """How a family is written as GGUF for llama.cpp.

    `arch`: llama.cpp's architecture name. `permute_qk`: llama.cpp's architecture rotates adjacent
    channel pairs, so HF's q/k rows (rotate-half layout) are permuted (needs separate q and k).
    `partial_rotary`: the rotated dimensions come from `partial_rotary_factor` (Phi-3).
    `rope_scaling`: the transformers rope_types llama.cpp scales as transformers does for it.
    `metadata`: the optional keys its loader reads. `refusals`: config settings it cannot run.
    """

    arch: str
    permute_qk: bool = False
    partial_rotary: bool = False
    rope_scaling: tuple[RopeScaling, ...] = ("linear",)
    metadata: tuple[GgufKey, ...] = ()
    refusals: tuple[Refusal, ...] = ()


NO_GGUF = "omniquant records no llama.cpp architecture for it"
NOT_NATIVE = "the native decoder has not been checked against this family"


@dataclass(frozen=True)
class Architecture:
    """Locations (dotted paths) and facts of one decoder family.

    Block-level paths are relative to one block. `qkv` lists the projections that read the attention
    norm's output (one fused module for Phi-3); `mlp_in` those that read the MLP norm's output.
    `norm_kind`: "rms" (x̂·w), "rms_offset" (Gemma: x̂·(1 + w)), "layernorm" (with bias).

    `model_types`: the HF config `model_type`s this record covers (how a config alone finds it).
    `gguf`: how GGUF writes it, or why GGUF cannot (a reason). `native`: None when the native
    decoder runs it, else why not.
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
    model_types: tuple[str, ...] = ()
    gguf: GgufSpec | str = NO_GGUF
    native: str | None = NOT_NATIVE


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
