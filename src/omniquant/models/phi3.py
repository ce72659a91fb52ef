"""Phi-3: fused qkv_proj and gate_up_proj linears."""

from omniquant.models.architecture import Architecture

PHI3 = Architecture(
    name="phi3",
    qkv=("self_attn.qkv_proj",),
    mlp_in=("mlp.gate_up_proj",),
    fused_qkv=True,
)
