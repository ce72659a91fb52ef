import torch

from omniquant.config import ActQuant
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.quant.activation import (
    attach_act_quantizers,
    detach_act_quantizers,
    quantize_heads,
)
from omniquant.quant.primitives import fake_quantize_per_token
from tests.conftest import random_ids, tiny_model


def test_per_head_quantization_uses_one_grid_per_token_and_head():
    x = torch.randn(2, 3, 4 * 8)
    x[..., :8] *= 100  # head 0 is huge; the other heads keep their own fine grid
    q = quantize_heads(x, 8, 4, False)
    heads = x.reshape(2, 3, 4, 8)
    qh = q.reshape(2, 3, 4, 8)
    for h in range(4):
        assert qh[:, :, h].unique().numel() <= 2 * 3 * 16
        step = (heads[:, :, h].amax(-1) - heads[:, :, h].amin(-1)) / 15
        assert ((qh[:, :, h] - heads[:, :, h]).abs() <= step[..., None] / 2 + 1e-4).all()


def test_hooks_quantize_every_linear_input_and_qkv_outputs():
    model = tiny_model("llama")
    arch = get_architecture(model)
    block = decoder_layers(model, arch)[0]
    seen: dict[str, torch.Tensor] = {}
    attach_act_quantizers(block, ActQuant(4), arch, head_dim=16)
    for name, lin in block_linears(block).items():  # pre-hooks run in order: after quantizing
        lin.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    ids = random_ids(1, 10)
    with torch.no_grad():
        model(ids)
    assert set(seen) == set(block_linears(block))
    for name, x in seen.items():  # every input already lies on a 4-bit per-token grid
        assert torch.allclose(fake_quantize_per_token(x, 4), x, atol=1e-5), name
        assert max(x[0, t].unique().numel() for t in range(10)) <= 16
    out = {}
    block.self_attn.k_proj.register_forward_hook(lambda m, a, o: out.setdefault("k", o))
    with torch.no_grad():
        model(ids)
    assert torch.allclose(quantize_heads(out["k"], 16, 4, False), out["k"], atol=1e-5)
    detach_act_quantizers(block)
    seen.clear()
    with torch.no_grad():
        model(ids)
    assert not torch.allclose(
        fake_quantize_per_token(seen["self_attn.q_proj"], 4), seen["self_attn.q_proj"], atol=1e-5
    )
