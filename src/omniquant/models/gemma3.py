"""Gemma 3 (text): (1 + w) RMSNorms, a norm after attention and one before and after the MLP,
q/k norms, and sliding-window layers with their own rotary tables (captured per block)."""

from omniquant.models.architecture import Architecture, GgufSpec, Refusal

GEMMA3 = Architecture(
    name="gemma3",
    mlp_norm="pre_feedforward_layernorm",
    norm_kind="rms_offset",
    qk_norm=True,
    model_types=("gemma3_text",),
    gguf=GgufSpec(
        arch="gemma3",
        rope_scaling=("linear",),
        metadata=("sliding_window_pattern", "final_logit_softcapping"),
        refusals=(
            Refusal(
                "query_pre_attn_scalar",
                "llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim); this model's "
                "query_pre_attn_scalar {value} differs from head_dim {other}: use `format` "
                "omniquant-packed",
                unless_equal_to="head_dim",
            ),
            Refusal(
                "attn_logit_softcapping", "llama.cpp's gemma3 has no attention logit soft-capping"
            ),
        ),
    ),
    native="its scaled embeddings, sandwich norms (around attention and the MLP) and soft caps "
    "are not computed natively",
)
