"""Recomputing Q(W) in backward (`--recompute`) gives the same training as keeping it."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from omniquant.config import ActQuant, CalibConfig, WeightQuant
from omniquant.quant.lwc import LWC
from omniquant.quant.recompute import recompute_weights
from tests.test_block_loop import _run

SPEC = WeightQuant(bits=3, group_size=16)


def _linear_with_lwc(seed: int = 0) -> tuple[nn.Linear, LWC]:
    torch.manual_seed(seed)
    lin = nn.Linear(32, 8)
    q = LWC(8, 32, SPEC)
    parametrize.register_parametrization(lin, "weight", q, unsafe=True)
    lin.parametrizations.weight.original.requires_grad_(False)
    return lin, q


def _grads(recompute: bool) -> tuple[torch.Tensor, ...]:
    lin, q = _linear_with_lwc()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with recompute_weights({"lin": lin}, [], recompute):
        y = lin(x)
        (y.sin().sum()).backward()
    return y.detach(), x.grad, q.upper_logit.grad, q.lower_logit.grad, lin.bias.grad


def test_one_linear_has_the_same_output_and_gradients():
    kept, recomputed = _grads(False), _grads(True)
    assert all(g is not None and g.abs().sum() > 0 for g in recomputed)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_weight_that_no_trained_tensor_reaches_passes_gradients_to_its_input_only():
    """A frozen quantizer (RTN) beside a trained tensor shared by the block (LET's scales) that
    this linear's weight does not read: the input still gets its gradient, the tensor none."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    parametrize.register_parametrization(lin, "weight", LWC(8, 32, SPEC, learnable=False))
    lin.parametrizations.weight.original.requires_grad_(False)
    lin.bias.requires_grad_(False)
    shared = nn.Parameter(torch.ones(3))
    x = torch.randn(2, 32, requires_grad=True)
    with recompute_weights({"lin": lin}, [shared], True):
        lin(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert shared.grad is None


def test_the_linear_forward_is_restored_after_the_context():
    lin, _ = _linear_with_lwc()
    with recompute_weights({"lin": lin}, [], True):
        assert "forward" in vars(lin)
    assert "forward" not in vars(lin)


def _saved_by_forward(recompute: bool) -> list[torch.Tensor]:
    """What autograd keeps from one forward pass of the linear (for its backward)."""
    lin, _ = _linear_with_lwc()
    x = torch.randn(1, 3, 32, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with recompute_weights({"lin": lin}, [], recompute):
        with hooks:
            y = lin(x)
        y.sum().backward()  # outside the hooks: the recomputation is not counted
    return saved


def test_recompute_keeps_nothing_of_the_weights_size_for_backward():
    weight_numel = 8 * 32
    assert any(t.numel() >= weight_numel for t in _saved_by_forward(False))  # Q(W), masks
    assert all(t.numel() < weight_numel for t in _saved_by_forward(True))  # x, LWC's logits


@pytest.mark.parametrize(
    "overrides, act",
    [
        ({}, None),
        ({"weight_lr": 0.05}, None),
        ({"let": True}, ActQuant(bits=4)),
    ],
    ids=["lwc", "weight-training", "let-w3a4"],
)
@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_calibration_gives_the_same_weights(family, overrides, act):
    base = dict(epochs=2, nsamples=2, seqlen=24, **overrides)
    _, kept, _ = _run(family, CalibConfig(recompute=False, **base), act=act)
    _, recomputed, _ = _run(family, CalibConfig(recompute=True, **base), act=act)
    for a, b in zip(kept.state_dict().values(), recomputed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
