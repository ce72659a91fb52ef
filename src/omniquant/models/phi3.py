"""Phi-3: fused qkv_proj and gate_up_proj linears."""

from omniquant.models.architecture import Architecture, GgufSpec

PHI3 = Architecture(
    name="phi3",
    qkv=("self_attn.qkv_proj",),
    mlp_in=("mlp.gate_up_proj",),
    fused_qkv=True,
    model_types=("phi3",),
    gguf=GgufSpec(
        arch="phi3",
        partial_rotary=True,
        rope_scaling=("linear", "longrope"),
        metadata=("rope_dimension_count", "original_context", "sliding_window"),
    ),
    native=None,
)
