"""Qwen3: the Llama shape plus per-head RMSNorm on queries and keys (q_norm, k_norm)."""

from omniquant.models.architecture import Architecture

QWEN3 = Architecture(name="qwen3", qk_norm=True)
