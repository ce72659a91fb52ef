import pytest
import torch

from omniquant.config import ActQuant
from omniquant.models import block_linears, decoder_layers, get_architecture
from omniquant.quant import activation
from omniquant.quant.activation import (
    attach_act_quantizers,
    detach_act_quantizers,
    quantize_heads,
)
from omniquant.quant.primitives import fake_quantize_per_token
from tests.conftest import FAMILIES, random_ids, tiny_model


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
    attach_act_quantizers(block, ActQuant(4, qkv_point="projection"), arch, head_dim=16)
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


def _on_grid(t: torch.Tensor, bits: int) -> bool:
    return torch.allclose(fake_quantize_per_token(t, bits), t, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_are_quantized_as_the_attention_function_receives_them(family, monkeypatch):
    """Default point: q and k after RoPE (and q/k norms), k and v as the attention reads them
    from the cache; per token and head; the projections' outputs themselves stay float."""
    model = tiny_model(family)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    ids = random_ids(1, 12)
    with torch.no_grad():
        ref = model(ids).logits
    for block in blocks:
        attach_act_quantizers(block, ActQuant(4), arch, head_dim=16)
    seen: list[tuple[torch.Tensor, ...]] = []
    inner = activation._attention_function

    def spy(module, name):
        f = inner(module, name)
        return lambda m, q, k, v, *a, **kw: (seen.append((q, k, v)), f(m, q, k, v, *a, **kw))[1]

    monkeypatch.setattr(activation, "_attention_function", spy)
    proj: dict[str, torch.Tensor] = {}
    first = blocks[0].get_submodule(arch.qkv[0])
    first.register_forward_hook(lambda m, a, o: proj.update(out=o))  # returns None: no change
    with torch.no_grad():
        out = model(ids).logits
    assert len(seen) == len(blocks)
    for q, k, v in seen:
        assert q.dim() == 4 and q.shape[-1] == 16  # (batch, heads, tokens, head_dim)
        assert all(_on_grid(t, 4) for t in (q, k, v))
    assert not _on_grid(proj["out"].reshape(1, 12, -1, 16), 4)  # before: not yet quantized
    assert not torch.allclose(out, ref, atol=1e-3)
    for block in blocks:
        detach_act_quantizers(block)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)  # unmarked: the model's own


def test_the_projection_point_quantizes_the_projection_outputs():
    model = tiny_model("llama")
    arch = get_architecture(model)
    block = decoder_layers(model, arch)[0]
    attach_act_quantizers(block, ActQuant(4, qkv_point="projection"), arch, head_dim=16)
    out = {}
    block.self_attn.k_proj.register_forward_hook(lambda m, a, o: out.setdefault("k", o))
    with torch.no_grad():
        model(random_ids(1, 10))
    assert torch.allclose(quantize_heads(out["k"], 16, 4, False), out["k"], atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # no attention function of ours
