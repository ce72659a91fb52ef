"""Quantized linears whose quantized weight is recomputed in the backward pass (`--recompute`).

While a block trains, every linear's weight is Q(W) computed through its parametrizations (LET's
fold, the weight offset, LWC). Plain autograd keeps, for every linear of the block at once, what
the backward pass needs of that computation: the quantizer's per-weight temporaries (the scale's
gradient factor, the clipping mask) and Q(W) itself, saved by the matrix product. That is about
three float32 copies of the block besides its weights, and it is what sets the peak memory of a
large model's calibration (an 8B block: 0.8 GiB of weights, 3.7 GiB while it trains).

`RecomputedLinear` keeps only the linear's input. Its backward pass recomputes Q(W) from the
parameters (one linear at a time, so one linear's temporaries are alive at once), takes the
products' gradients, and sends the weight's gradient back through the recomputed quantizer to the
trained parameters. The matrix products run once each way, as in plain autograd; only the
quantizer runs twice (an elementwise pass over the weight, cheap next to the products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

WeightFn = Callable[[], torch.Tensor]


class RecomputedLinear(torch.autograd.Function):
    """y = x Q(W)ᵀ + b, saving x only; Q(W) = `weight_fn()` is recomputed in backward.

    `params`: every tensor requiring grad that `weight_fn` reads (they receive its gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        weight_fn: WeightFn,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        with torch.no_grad():
            w = weight_fn()
        ctx.weight_fn = weight_fn
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, *params)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, *params = ctx.saved_tensors
        needs_x, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:], strict=True) if need]
        with torch.enable_grad():
            w = ctx.weight_fn()
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ w.detach().to(grad.dtype)).to(x.dtype) if needs_x else None
        grad_bias = g2.sum(0).to(ctx.bias_dtype) if needs_bias and ctx.bias_dtype else None
        grads: dict[int, torch.Tensor | None] = {}
        if wanted and w.requires_grad:  # else nothing trained reaches this weight
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(w.dtype)
            found = torch.autograd.grad(w, wanted, grad_w, allow_unused=True)
            grads = {id(p): g for p, g in zip(wanted, found, strict=True)}
        return (grad_x, grad_bias, None, *(grads.get(id(p)) for p in params))


def recomputed_forward(linear: nn.Linear, shared: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """A forward for a parametrized linear that recomputes its quantized weight in backward;
    `shared`: trainable tensors the weight reads from outside its own parametrizations (LET)."""
    own = list(linear.parametrizations.weight.parameters())

    def weight() -> torch.Tensor:
        return linear.weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        params = [p for p in (*own, *shared) if p.requires_grad]
        return RecomputedLinear.apply(x, linear.bias, weight, *params)

    return forward


@contextmanager
def recompute_weights(
    linears: dict[str, nn.Module], shared: Sequence[torch.Tensor], enabled: bool = True
) -> Iterator[None]:
    """Within the context, every parametrized linear in `linears` recomputes its quantized weight
    in backward instead of keeping it (see the module's docstring); restored on exit."""
    patched = [
        lin
        for lin in linears.values()
        if enabled and isinstance(lin, nn.Linear) and parametrize.is_parametrized(lin, "weight")
    ]
    for lin in patched:
        lin.forward = recomputed_forward(lin, shared)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for lin in patched:
            del lin.forward
