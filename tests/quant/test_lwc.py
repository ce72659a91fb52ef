import math

import torch

from omniquant.config import WeightQuant
from omniquant.quant.lwc import LWC
from omniquant.quant.primitives import fake_quantize


def test_parameters_have_one_pair_per_row_or_group():
    assert LWC(12, 576, WeightQuant(4, 128)).upper_logit.shape == (12, 5, 1)
    assert LWC(12, 576, WeightQuant(4, None)).lower_logit.shape == (12, 1, 1)
    assert list(LWC(12, 576, WeightQuant(4, 128), learnable=False).parameters()) == []


def test_init_equals_minmax_rtn_clipped_at_sigmoid_4():
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    spec = WeightQuant(3, 64)
    lwc = LWC(16, 200, spec, init=4.0)
    s = 1 / (1 + math.exp(-4.0))
    expected = fake_quantize(w, 3, 64, False, s, s)
    assert torch.allclose(lwc(w), expected, atol=1e-6)
    # and differs from plain RTN, which LWC(learnable=False) gives
    rtn = LWC(16, 200, spec, learnable=False)(w)
    assert torch.allclose(rtn, fake_quantize(w, 3, 64), atol=1e-6)
    assert not torch.allclose(rtn, expected)


def test_gradients_reach_both_strengths_and_training_lowers_the_error():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(256, 64)
    lwc = LWC(32, 64, WeightQuant(2, 32))
    opt = torch.optim.Adam(lwc.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = ((x @ lwc(w).T - x @ w.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        assert lwc.upper_logit.grad.abs().sum() > 0 and lwc.lower_logit.grad.abs().sum() > 0
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.8 * first


def test_hard_zero_point_rounding_stops_its_gradient_but_not_the_scales():
    """--zero-point-grad none (the reference): same forward; the clipping strengths learn only
    through the scale, so their gradients differ from the straight-through zero point's."""
    torch.manual_seed(0)
    w = torch.randn(8, 40)
    spec = WeightQuant(bits=3, group_size=16)
    grads, outs = {}, {}
    for ste in (True, False):
        q = LWC(8, 40, spec, init=1.0, zero_point_ste=ste)
        out = q(w)
        (out * torch.linspace(-1, 1, 40)).sum().backward()
        grads[ste], outs[ste] = q.lower_logit.grad.clone(), out.detach()
        assert q.last_params is not None
    assert torch.equal(outs[True], outs[False])
    assert grads[False].abs().sum() > 0  # through the scale
    assert not torch.allclose(grads[True], grads[False])
