import pytest
import torch

from omniquant.quant.primitives import (
    fake_quantize,
    fake_quantize_grouped,
    fake_quantize_per_token,
    from_groups,
    minmax_params,
    num_groups,
    qrange,
    round_ste,
    to_groups,
)


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.2, 1.6, -2.5, 3.49], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, x.detach().round())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


@pytest.mark.parametrize(
    "in_f,g,expected",
    [(576, 128, 5), (576, 64, 9), (576, None, 1), (576, 576, 1), (100, 1000, 1), (10, 3, 4)],
)
def test_num_groups_holds_a_ragged_remainder(in_f, g, expected):
    assert num_groups(in_f, g) == expected


def test_groups_are_row_aligned_and_ragged_last_group_holds_remainder():
    w = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    wg = to_groups(w, 4)  # (2, 3, 4): [0..3], [4..7], [8, 9, 9, 9]
    assert wg.shape == (2, 3, 4)
    assert torch.equal(wg[0, 2], torch.tensor([8.0, 9.0, 9.0, 9.0]))
    assert torch.equal(wg[1, 0], torch.tensor([10.0, 11.0, 12.0, 13.0]))  # never straddles rows
    assert torch.equal(from_groups(wg, 10), w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16, 24])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantized_values_lie_on_the_grid(bits, group, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(8, 40)
    wq = fake_quantize(w, bits, group, symmetric)
    wg, qg = to_groups(w, group), to_groups(wq, group)
    p = minmax_params(wg, bits, symmetric)
    codes = qg / p.scale + p.zero  # integers in range
    qmin, qmax = qrange(bits, symmetric)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3
    # at most 2^bits distinct values per group
    for r in range(qg.shape[0]):
        for c in range(qg.shape[1]):
            assert qg[r, c].unique().numel() <= 2**bits
    # round-to-nearest: error at most half a step
    assert ((wg - qg).abs() <= p.scale / 2 + 1e-5).all()


def test_asymmetric_minmax_grid_spans_each_group_range():
    w = torch.randn(4, 32)
    wq = fake_quantize(w, 4, 8)
    wg, qg = to_groups(w, 8), to_groups(wq, 8)
    half = minmax_params(wg, 4).scale.squeeze(-1) / 2 + 1e-6
    assert ((qg.amax(-1) - wg.amax(-1)).abs() <= half).all()
    assert ((qg.amin(-1) - wg.amin(-1)).abs() <= half).all()


def test_eight_bit_error_is_small_and_two_bit_error_is_large():
    w = torch.randn(64, 128)
    e8 = (fake_quantize(w, 8, 32) - w).abs().mean()
    e2 = (fake_quantize(w, 2, 32) - w).abs().mean()
    assert e8 < 0.01 < e2


@pytest.mark.parametrize("group", [None, 16, 24])
def test_fused_fake_quant_matches_the_reference_composition_with_gradients(group):
    torch.manual_seed(0)
    w = torch.randn(6, 40, requires_grad=True)
    a = torch.full((6, num_groups(40, group), 1), 1.5, requires_grad=True)
    b = torch.full((6, num_groups(40, group), 1), 0.5, requires_grad=True)
    # clip hard so that both branches (in range / clipped) of the gradient are exercised
    up, lo = torch.sigmoid(a), torch.sigmoid(b)
    ref = fake_quantize(w, 3, group, False, up, lo)
    grad_out = torch.randn_like(ref)
    ga_ref, gb_ref, gw_ref = torch.autograd.grad((ref * grad_out).sum(), [a, b, w])

    wg = to_groups(w, group)
    p = minmax_params(wg, 3, False, torch.sigmoid(a), torch.sigmoid(b))
    fused = from_groups(fake_quantize_grouped(wg, p, 3), 40)
    ga, gb, gw = torch.autograd.grad((fused * grad_out).sum(), [a, b, w])
    assert torch.allclose(fused, ref, atol=1e-6)
    assert torch.allclose(ga, ga_ref, atol=1e-5)
    assert torch.allclose(gb, gb_ref, atol=1e-5)
    assert torch.allclose(gw, gw_ref, atol=1e-5)  # the weight's own STE gradient (weight training)
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_per_token_activation_quantization_is_per_row():
    x = torch.randn(2, 5, 16)
    x[0, 0] *= 100  # an outlier token does not change the others' grid
    xq = fake_quantize_per_token(x, 8)
    assert xq.shape == x.shape
    assert (xq[1] - x[1]).abs().max() < (x[1].amax() - x[1].amin()) / 255
