"""Gemma 3 (text): (1 + w) RMSNorms, a norm after attention and one before and after the MLP,
q/k norms, and sliding-window layers with their own rotary tables (captured per block)."""

from omniquant.models.architecture import Architecture

GEMMA3 = Architecture(
    name="gemma3",
    mlp_norm="pre_feedforward_layernorm",
    norm_kind="rms_offset",
    qk_norm=True,
)
