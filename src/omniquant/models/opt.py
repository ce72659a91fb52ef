"""OPT: LayerNorm with bias, learned absolute positions, fc1/fc2 MLP, biases on every linear."""

from omniquant.models.architecture import Architecture

OPT = Architecture(
    name="opt",
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    attn_norm="self_attn_layer_norm",
    o_proj="self_attn.out_proj",
    mlp_norm="final_layer_norm",
    mlp_in=("fc1",),
    mlp_out="fc2",
    norm_kind="layernorm",
    rotary=False,
    model_types=("opt",),
    gguf="llama.cpp has no OPT architecture",
    native="it uses layernorm norms and learned positions, no RoPE",
)
