"""Llama family: Llama 1/2/3 (grouped-query attention), SmolLM2, Mistral, Qwen2 share this shape."""

from omniquant.models.architecture import Architecture

LLAMA = Architecture(name="llama")
MISTRAL = Architecture(name="mistral")
QWEN2 = Architecture(name="qwen2")
