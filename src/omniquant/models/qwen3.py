"""Qwen3: the Llama shape plus per-head RMSNorm on queries and keys (q_norm, k_norm)."""

from omniquant.models.architecture import Architecture, GgufSpec

QWEN3 = Architecture(
    name="qwen3",
    qk_norm=True,
    model_types=("qwen3",),
    gguf=GgufSpec(arch="qwen3", rope_scaling=("linear", "yarn")),
    native=None,
)
