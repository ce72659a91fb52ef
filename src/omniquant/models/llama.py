"""Llama family: Llama 1/2/3 (grouped-query attention), SmolLM2, Mistral, Qwen2 share this shape."""

from omniquant.models.architecture import Architecture, GgufSpec, Refusal

# llama.cpp runs Mistral as Llama: adjacent-pair RoPE (q/k rows permuted), llama3 scaling a tensor
LLAMA_GGUF = GgufSpec(
    arch="llama",
    permute_qk=True,
    rope_scaling=("linear", "yarn", "llama3"),
    metadata=("rope_dimension_count",),
)

LLAMA = Architecture(name="llama", model_types=("llama",), gguf=LLAMA_GGUF, native=None)
MISTRAL = Architecture(name="mistral", model_types=("mistral",), gguf=LLAMA_GGUF, native=None)
QWEN2 = Architecture(
    name="qwen2",
    model_types=("qwen2",),
    gguf=GgufSpec(
        arch="qwen2",
        rope_scaling=("linear", "yarn"),
        refusals=(
            Refusal(
                "use_sliding_window",
                "llama.cpp's qwen2 has no sliding-window attention; use another format",
            ),
        ),
    ),
    native=None,
)
