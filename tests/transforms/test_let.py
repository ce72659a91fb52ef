import copy

import torch

from omniquant.capture import capture_block_inputs
from omniquant.models import decoder_layers, get_architecture
from omniquant.transforms.let import (
    attention_shape,
    expand_kv,
    fold_site,
    let_sites,
    rope_tied,
    site_shape,
)
from tests.conftest import random_ids, tiny_model


def _block_and_args(family):
    model = tiny_model(family)
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    cap = capture_block_inputs(model, blocks, [random_ids(2, 16)])
    return model, arch, blocks[0], cap.hidden[0], cap.block_args[0]


def _out(block, x, extra):
    with torch.no_grad():
        out = block(x, *extra.args, **extra.kwargs)
    return out[0] if isinstance(out, tuple) else out


def test_folded_random_scales_and_shifts_leave_every_family_block_unchanged(family):
    model, arch, block, x, extra = _block_and_args(family)
    shape = attention_shape(model.config, arch)
    sites, _ = let_sites(arch, shape)
    assert any(s.kind == "norm" for s in sites)
    folded = copy.deepcopy(block)
    g = torch.Generator().manual_seed(1)
    for site in sites:
        dims = site_shape(site, block, shape)
        s = torch.exp(0.5 * torch.randn(dims, generator=g))  # non-trivial positive scales
        delta = 0.3 * torch.randn(dims, generator=g) if site.shift else None
        fold_site(folded, site, s, delta, arch, shape)
    ref, out = _out(block, x, extra), _out(folded, x, extra)
    changed = [
        k for k, v in folded.state_dict().items() if not torch.equal(v, block.state_dict()[k])
    ]
    assert len(changed) >= 4  # the weights really moved
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, (family, rel.item(), [s.kind for s in sites])


def test_sites_per_family_and_reasons():
    expected = {
        "llama": {"norm", "vo", "qk"},
        "opt": {"norm", "vo", "qk"},
        "qwen3": {"norm", "vo"},
        "gemma3": {"norm", "vo"},
        "phi3": {"norm"},
    }
    for family, kinds in expected.items():
        model = tiny_model(family)
        arch = get_architecture(model)
        sites, skipped = let_sites(arch, attention_shape(model.config, arch))
        assert {s.kind for s in sites} == kinds, family
        assert len(skipped) == (0 if "qk" in kinds else 1), skipped
        assert all(s.shift == (family == "opt") for s in sites if s.kind == "norm")


def test_gqa_sharing_and_rotary_pairs():
    s_kv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # 2 KV heads, head_dim 2
    # 4 query heads, 2 per KV head: heads 0, 1 read KV head 0
    assert expand_kv(s_kv, 2).tolist() == [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
    tied = rope_tied(torch.tensor([[5.0, 6.0]]))
    assert tied.tolist() == [[5.0, 6.0, 5.0, 6.0]]  # channel i pairs with i + d/2


def test_an_untied_qk_scale_would_break_rotary_attention():
    """Why the pairing matters: scaling rotary partners differently changes the block."""
    model, arch, block, x, extra = _block_and_args("llama")
    shape = attention_shape(model.config, arch)
    site = next(s for s in let_sites(arch, shape)[0] if s.kind == "qk")
    q, k = block.self_attn.q_proj, block.self_attn.k_proj
    broken = copy.deepcopy(block)
    s_full = torch.exp(torch.randn(shape.n_kv_heads, shape.head_dim))  # not tied
    with torch.no_grad():
        bq, bk = broken.self_attn.q_proj, broken.self_attn.k_proj
        bq.weight.copy_(q.weight / expand_kv(s_full, shape.group)[:, None])
        bk.weight.copy_(k.weight * s_full.reshape(-1)[:, None])
    ref, out = _out(block, x, extra), _out(broken, x, extra)
    assert (out - ref).abs().max() / ref.abs().max() > 1e-3
    assert site.targets == ("self_attn.k_proj",)


def test_learnable_let_parametrization_is_exact_and_folds_like_fold_site(family):
    """LET attached as parametrizations (training form) keeps the block's function, gets
    gradients, and folds to the same tensors as the pure fold maths."""
    from omniquant.block_loop import fold_parametrizations
    from omniquant.transforms.let import LetParams, attach_let, plan_let

    model, arch, block, x, extra = _block_and_args(family)
    plan = plan_let(arch, model.config, alpha=None, shifts=True)
    trained, reference = copy.deepcopy(block), copy.deepcopy(block)
    let = LetParams(plan, trained)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in let.parameters():
            p.copy_(
                torch.exp(0.4 * torch.randn(p.shape, generator=g))
                if p in set(let.scales)
                else 0.2 * torch.randn(p.shape, generator=g)
            )
    attach_let(trained, let)
    out = trained(x, *extra.args, **extra.kwargs)
    out = out[0] if isinstance(out, tuple) else out
    ref = _out(block, x, extra)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in let.scales)
    for i, site in enumerate(plan.sites):
        fold_site(reference, site, let.scale(i).detach(), let.shift(i), arch, plan.shape)
    fold_parametrizations(trained)
    ref_state = reference.state_dict()
    for name, value in trained.state_dict().items():
        assert torch.allclose(value, ref_state[name], rtol=1e-5, atol=1e-6), name


def test_reference_start_scales_v_to_o_from_float_statistics_and_direct_scales_are_floored():
    from omniquant.block_loop import _extra_on_device, gather_stats
    from omniquant.capture import capture_block_inputs
    from omniquant.models import decoder_layers, get_architecture
    from omniquant.runtime import Runtime
    from omniquant.transforms.let import LetParams, plan_let
    from tests.conftest import random_ids, tiny_model

    model = tiny_model("llama")
    arch = get_architecture(model)
    blocks = decoder_layers(model, arch)
    cap = capture_block_inputs(model, blocks, [random_ids(2, 16)])
    rt = Runtime(progress=False)
    extra = _extra_on_device(cap.block_args[0], rt.device)
    starts = {}
    for init in ("ours", "reference"):
        plan = plan_let(arch, model.config, 0.5, False, "direct", init)
        stats = gather_stats(blocks[0], plan, cap.hidden, extra, rt)
        let = LetParams(plan, blocks[0])
        let.init_from_stats(blocks[0], stats)
        kinds = [s.kind for s in plan.sites]
        starts[init] = {k: let.scale(i).detach() for i, k in enumerate(kinds)}
    assert torch.equal(starts["ours"]["vo"], torch.ones_like(starts["ours"]["vo"]))
    assert not torch.allclose(starts["reference"]["vo"], torch.ones_like(starts["ours"]["vo"]))
    assert torch.equal(starts["reference"]["qk"], torch.ones_like(starts["reference"]["qk"]))
    # the first norm site: q_proj's |W| alone (reference) vs the largest over q, k, v (ours)
    assert (starts["reference"]["norm"] >= starts["ours"]["norm"] - 1e-6).all()
    let.scales[0].data.fill_(1e-4)  # a directly learned scale keeps |s| >= 1e-2
    s = let.scale(0)
    assert torch.allclose(s, torch.full_like(s, 1e-2))
    s.sum().backward()  # straight through the floor
    assert torch.equal(let.scales[0].grad, torch.ones_like(s))
